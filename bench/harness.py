"""Shared by the memory benchmarks (bench_core, bench_losses): each variant runs in a fresh process (max RSS is
monotone, so each must start clean) and reports its median time and the peak memory it adds over its inputs
(on a GPU: torch.cuda.max_memory_allocated)."""
import json, resource, subprocess, sys, time
import torch

def _mem(dev)->int:
    return torch.cuda.max_memory_allocated() if dev == 'cuda' else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

def measure(step, params, dev:str, reps:int)->dict:
    "Warm up `step()` once (its peak counts: same work), then time it `reps` times; grads of `params` are cleared between calls."
    if dev == 'cuda': torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    else: base = _mem(dev)                                   # inputs allocated, nothing computed yet
    def clear():
        for p in params: p.grad = None
    step(); clear(); ts = []
    for _ in range(reps):
        t = time.perf_counter(); val = step()
        if dev == 'cuda': torch.cuda.synchronize()
        ts.append(time.perf_counter() - t); clear()
    return dict(seconds=sorted(ts)[len(ts) // 2], peak_extra_bytes=max(_mem(dev) - base, 0), value=val)

def run_variants(script:str, variants, dev:str)->dict:
    "Run `python script --one VARIANT DEV` for each variant in a fresh process; each prints one JSON line."
    rows = {}
    for v in variants:
        r = subprocess.run([sys.executable, script, '--one', v, dev], capture_output=True, text=True, check=True)
        rows[v] = json.loads(r.stdout.strip().splitlines()[-1])
        print(f'  {v}: {rows[v]["seconds"]:.4f} s, peak extra {rows[v]["peak_extra_bytes"] / 2**20:.1f} MB', flush=True)   # partial results survive a timeout
    return rows

def report(name:str, rows:dict, res:dict, summary:str)->dict:
    "Print the variants' table and a summary line; write `res` to bench/results/<name>.json."
    from pathlib import Path
    w = max(map(len, rows)) + 2
    print(f"{'variant':{w}}{'median s':>10}{'peak extra MB':>16}{'value':>14}")
    for v, r in rows.items(): print(f"{v:{w}}{r['seconds']:>10.3f}{r['peak_extra_bytes'] / 2**20:>16.1f}{r['value']:>14.4f}")
    print(summary)
    out = Path(__file__).parent/'results'/f'{name}.json'; out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=1)); return res

def main_or_one(one, main):
    "Script entry: `--one VARIANT DEV` measures one variant in this process, else `main()` runs them all."
    if len(sys.argv) > 1 and sys.argv[1] == '--one': print(json.dumps(one(sys.argv[2], sys.argv[3])))
    else: main()
