"""Execute notebooks headlessly and save their outputs (what the docs show), skipping cells flagged with
settings.ini's tst_flags (`#| slow`, `#| gpu`, `#| notest`) and `nbdev_export()` cells.
Usage: python tools/run_nbs.py [--flags "notest slow"] [nbs/00_core.ipynb ...]   (default: every notebook).
`--flags` runs those flagged cells too (e.g. the demo's full run, whose table and plot the docs show). Then `nbdev_clean`."""
import os, re, sys, time
from pathlib import Path
from execnb.shell import CaptureShell
from nbdev.config import get_config

cfg = get_config()
args = sys.argv[1:]
force = args[args.index('--flags') + 1].split() if '--flags' in args else []
if '--flags' in args: i = args.index('--flags'); del args[i:i + 2]
flag_re = re.compile(r'^#\|\s*(' + '|'.join(re.escape(f) for f in cfg.tst_flags.split() if f not in force) + r')\b', re.M)
def skip(cell): return cell.cell_type == 'code' and (bool(flag_re.search(cell.source)) or 'nbdev_export(' in cell.source)

files = [Path(f).resolve() for f in args] or sorted(cfg.nbs_path.glob('*.ipynb'))
os.environ['IN_TEST'] = '1'
for f in files:
    if f.name.startswith(('.', '_')): continue
    t, cwd = time.time(), os.getcwd(); os.chdir(f.parent)
    try: CaptureShell(f).execute(f, f, exc_stop=True, preproc=skip)
    finally: os.chdir(cwd)
    print(f'executed {f.name} in {time.time() - t:.1f}s')
