"""Every notebook under nbs/ is one pytest test, run the way `nbdev_test` runs it (cells flagged with
settings.ini's tst_flags are skipped; NBDEV_FLAGS="slow gpu" forces them)."""
import os
from pathlib import Path
import pytest
from fastcore.xtras import working_directory
from nbdev.config import get_config
from nbdev.doclinks import nbglob
from nbdev.test import test_nb as run_nb   # aliased: pytest would collect `test_nb` itself

ROOT = Path(__file__).resolve().parents[1]
with working_directory(ROOT): cfg = get_config()
NBS = sorted(nbglob(cfg.nbs_path, as_path=True))
assert NBS, f'no notebooks found under {cfg.nbs_path}'
SKIP, FORCE = cfg.tst_flags.split(), os.environ.get('NBDEV_FLAGS', '').split()

@pytest.mark.parametrize('nb', NBS, ids=lambda p: str(Path(p).relative_to(cfg.nbs_path)))
def test_notebook(nb, monkeypatch):
    monkeypatch.chdir(cfg.nbs_path)
    ok, secs = run_nb(Path(nb).absolute(), skip_flags=SKIP, force_flags=FORCE, basepath=cfg.config_path)
    assert ok, f'{nb} failed (nbdev printed the failing cell and traceback above)'
