"`make bench`: run every bench/bench_*.py in its own process; each prints its table and writes bench/results/<name>.json."
import subprocess, sys, time
from pathlib import Path

if __name__ == '__main__':
    failed = []
    for f in sorted(Path(__file__).parent.glob('bench_*.py')):
        print(f'\n=== {f.name}', flush=True); t = time.time()
        if subprocess.run([sys.executable, str(f)]).returncode: failed.append(f.name)
        print(f'({time.time() - t:.0f} s)', flush=True)
    sys.exit(f'benchmarks failed: {failed}' if failed else 0)
