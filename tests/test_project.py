"Project-level checks: notebooks and fuselab/ in sync, notebooks clean, pure-maths layering, CLI entry point."
import filecmp, shutil, subprocess, sys, textwrap
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PURE = ['fuselab.core', 'fuselab.ot', 'fuselab.align', 'fuselab.losses', 'fuselab.pta', 'fuselab.merge']   # torch/numpy(+rapidfuzz; merge: +safetensors I/O) only (DESIGN.md "Layering")
HEAVY = ['transformers', 'trl', 'peft', 'vllm', 'datasets', 'accelerate']

def _copy_project(tmp):
    for f in ('settings.ini', 'setup.py'): shutil.copy(ROOT/f, tmp/f)
    shutil.copytree(ROOT/'nbs', tmp/'nbs', symlinks=True)
    shutil.copytree(ROOT/'fuselab', tmp/'fuselab')
    return tmp

def test_export_in_sync(tmp_path):
    "`nbdev_export` must leave fuselab/ unchanged: the package is exactly what the notebooks say."
    tmp = _copy_project(tmp_path)
    subprocess.run([BIN/'nbdev_export'], cwd=tmp, check=True, capture_output=True)
    gen = sorted(p.relative_to(tmp) for p in (tmp/'fuselab').rglob('*.py'))
    have = sorted(p.relative_to(ROOT) for p in (ROOT/'fuselab').rglob('*.py'))
    assert gen == have, f'files differ: only exported {set(gen)-set(have)}, only committed {set(have)-set(gen)}; run `make export`'
    stale = [str(p) for p in gen if not filecmp.cmp(tmp/p, ROOT/p, shallow=False)]
    assert not stale, f'{stale} out of sync with nbs/: run `make export` and commit'

def test_notebooks_clean(tmp_path):
    "Notebooks are committed as `nbdev_clean` leaves them (outputs kept, no execution counts/metadata noise)."
    tmp = _copy_project(tmp_path)
    subprocess.run([BIN/'nbdev_clean'], cwd=tmp, check=True, capture_output=True)
    dirty = [p.name for p in (ROOT/'nbs').glob('*.ipynb') if not filecmp.cmp(p, tmp/'nbs'/p.name, shallow=False)]
    assert not dirty, f'{dirty} not clean: run `make export` (nbdev_clean) and commit'

BLOCKER = textwrap.dedent('''
    import sys, importlib.abc
    HEAVY = set(sys.argv[1].split(','))
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split('.')[0] in HEAVY: raise ImportError(f'layering violation: {name} imported')
    sys.meta_path.insert(0, Block())
    import importlib
    for m in sys.argv[2].split(','): importlib.import_module(m)
    print('ok')''')

def test_layering_pure_modules():
    "The maths modules import with transformers/trl/peft/vllm/datasets/accelerate unavailable."
    r = subprocess.run([sys.executable, '-c', BLOCKER, ','.join(HEAVY), ','.join(PURE)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == 'ok', r.stderr[-2000:]

def test_layering_blocker_bites():
    "The blocker itself works: a module that needs transformers must fail under it."
    r = subprocess.run([sys.executable, '-c', BLOCKER, ','.join(HEAVY), 'fuselab.testing'], capture_output=True, text=True)
    assert r.returncode != 0 and 'layering violation' in r.stderr

def test_cli_help():
    r = subprocess.run([BIN/'fuselab', '--help'], capture_output=True, text=True, check=True)
    assert 'demo' in r.stdout and 'fusellm' in r.stdout and 'merge' in r.stdout
