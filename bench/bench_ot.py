"""B3 (bench/ANCHORS.md section 8): PTA-LLM per-token OT, 10x10 problems at lambda = 30 (reg = 1/30), tol 1e-5.

Same synthetic inputs (`fuselab.ot.synthetic_pta_problems`) for every solver, in one run:
  * fuselab `sinkhorn` on CPU, all N positions: the compiled solver (the CPU default) at cap 50 (B3's budget: "50
    iterations or tol 1e-5") and cap 1000, with 2 threads; cap 50 also with 1 thread (does the second thread help?);
  * fuselab's torch path (`kernel='torch'`, the GPU path and the CPU fallback without a C compiler), cap 50, 2 threads;
  * PTA-LLM's per-position NumPy probability-domain loop (re-implemented from `compute_optimal_transport`), on a sample;
  * POT `ot.sinkhorn(..., method='sinkhorn_log')` in a Python loop, on a sample;
  * POT `ot.batch.solve_batch(..., method='log_sinkhorn')` (numpy float64 and torch float32), on a sample batch.
The headline pair (fuselab cap 50 and the PTA loop) is timed interleaved, REPS times each (the loop on a different
slice of its sample each time), and compared by the medians, so that both see the same load on a shared machine.
Sampled solvers are timed per problem (their cost is linear in the number of problems). Reported: problems/s, speed-up
of fuselab over each, mean iterations, max marginal error max(||P1-a||_1, ||P^T 1-b||_1) and the fraction of problems
within tol; and how many cores other processes used meanwhile (from /proc/stat): fuselab's 2-thread times need both
cores free, and on a shared machine a busy neighbour slows every op's thread barrier (the 1-thread row is the fallback).
GPU branch: fuselab on 1M positions, CUDA-event timing, median of 5 after warm-up.
Writes bench/results/ot.json.   Usage: python bench/bench_ot.py  [env BENCH_OT_N=100000]"""
import json, os, platform, resource, statistics, time, warnings
from pathlib import Path
import numpy as np
import torch
import ot
from fuselab.ot import sinkhorn, synthetic_pta_problems

THREADS = 2
torch.set_num_threads(THREADS)
N = int(os.environ.get('BENCH_OT_N', 100_000))
REG, TOL, LAM = 1 / 30, 1e-5, 30.
REPS, N_REF, N_POT, N_BATCH = 5, 1000, 50, 2000   # interleaved repeats; per-repeat sample of the PTA loop; other samples

def marg_err(P, a, b):                             # (B,n,m) float64 numpy -> (B,) L1 marginal error
    b = b * (a.sum(-1) / b.sum(-1))[:, None]
    return np.maximum(np.abs(P.sum(-1) - a).sum(-1), np.abs(P.sum(-2) - b).sum(-1))

def pta_reference_sinkhorn(M, r, c, lam=LAM, epsilon=TOL):
    "PTA-LLM `compute_optimal_transport` (probability domain, row-sum-change stopping rule, no cap)."
    n, m = M.shape
    P = np.exp(-lam * M); P /= P.sum(); u, it = np.zeros(n), 0
    while np.max(np.abs(u - P.sum(1))) > epsilon:
        u = P.sum(1); u[u < 1e-10] = 1e-10; P *= (r / u).reshape((-1, 1))
        v = P.sum(0); v[v < 1e-10] = 1e-10; P *= (c / v).reshape((1, -1)); it += 1
    return P, it

def row(name, n_timed, times, P, a, b, iters, note='', threads=None):
    "One table row; `times` are the timed runs (seconds for n_timed problems each), compared by their median."
    e = marg_err(np.asarray(P, np.float64), np.asarray(a, np.float64), np.asarray(b, np.float64))
    secs = statistics.median(times)
    return dict(solver=name, problems_timed=n_timed, seconds=secs, times_s=list(times), problems_per_s=n_timed / secs,
                us_per_problem=secs / n_timed * 1e6, mean_iters=float(np.mean(iters)) if iters is not None else None,
                max_marginal_err=float(e.max()), frac_within_tol=float((e <= TOL).mean()), threads=threads, note=note)

def cpu_marks():
    "(machine-wide busy CPU seconds, this process's CPU seconds): other processes' load = difference of the deltas / wall."
    try:
        j = [int(x) for x in open('/proc/stat').readline().split()[1:]]
        busy = (sum(j) - j[3] - j[4]) / os.sysconf('SC_CLK_TCK')
    except (OSError, ValueError, IndexError): busy = float('nan')
    r = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), busy, r.ru_utime + r.ru_stime

def other_load(m0, m1):
    "Average number of cores used by other processes between two `cpu_marks` (fuselab's 2 threads need both cores)."
    return ((m1[1] - m0[1]) - (m1[2] - m0[2])) / (m1[0] - m0[0])

def timed(f):
    t = time.perf_counter(); r = f(); return time.perf_counter() - t, r

def main():
    t_start = time.perf_counter()
    a, b, C = synthetic_pta_problems(N, seed=0)
    an, bn, Cn = a.double().numpy(), b.double().numpy(), C.double().numpy()
    rows = []
    sinkhorn(a[:4096], b[:4096], C[:4096], REG, max_iter=50)                     # warm-up
    fl_t, ref_t, ref_res = [], [], []
    m0 = m_start = cpu_marks()
    for r in range(REPS):                                                        # the headline pair, interleaved
        dt, (P50, st50) = timed(lambda: sinkhorn(a, b, C, REG, tol=TOL, max_iter=50, log=True)); fl_t.append(dt)
        sl = slice(r * N_REF, (r + 1) * N_REF)
        dt, res = timed(lambda: [pta_reference_sinkhorn(Cn[i], an[i], bn[i]) for i in range(sl.start, sl.stop)])
        ref_t.append(dt); ref_res += res
    load_pair = other_load(m0, cpu_marks())
    rows.append(row('fuselab sinkhorn (CPU, cap 50)', N, fl_t, P50.numpy(), an, bn, st50.n_iter.numpy(), 'float32, all N', THREADS))
    nr = REPS * N_REF
    rows.append(row('PTA-LLM reference loop (numpy)', N_REF, ref_t, np.stack([p for p, _ in ref_res]), an[:nr], bn[:nr],
                    [i for _, i in ref_res], f'float64, stops when row sums stop changing; {REPS} slices of {N_REF}', 1))
    dt, (P, st) = timed(lambda: sinkhorn(a, b, C, REG, tol=TOL, max_iter=1000, log=True))
    rows.append(row('fuselab sinkhorn (CPU, cap 1000)', N, [dt], P.numpy(), an, bn, st.n_iter.numpy(), 'float32, all N', THREADS))
    sinkhorn(a[:4096], b[:4096], C[:4096], REG, max_iter=50, kernel='torch')     # warm-up
    dt, (P, st) = timed(lambda: sinkhorn(a, b, C, REG, tol=TOL, max_iter=50, log=True, kernel='torch'))
    rows.append(row('fuselab torch path (kernel=torch, cap 50)', N, [dt], P.numpy(), an, bn, st.n_iter.numpy(), 'float32, all N', THREADS))
    torch.set_num_threads(1)
    dt, (P, st) = timed(lambda: sinkhorn(a, b, C, REG, tol=TOL, max_iter=50, log=True))
    rows.append(row('fuselab sinkhorn (CPU, cap 50, 1 thread)', N, [dt], P.numpy(), an, bn, st.n_iter.numpy(), 'float32, all N', 1))
    torch.set_num_threads(THREADS)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        t = time.perf_counter(); Ps, its = [], []
        for i in range(N_POT):
            G, lg = ot.sinkhorn(an[i], bn[i], Cn[i], REG, method='sinkhorn_log', numItermax=1000, stopThr=TOL, log=True)
            Ps.append(G); its.append(lg['niter'])
        dt = time.perf_counter() - t
        rows.append(row('POT ot.sinkhorn loop (sinkhorn_log)', N_POT, [dt], np.stack(Ps), an[:N_POT], bn[:N_POT], its, f'POT {ot.__version__}, float64'))
        if hasattr(ot, 'batch') and hasattr(ot.batch, 'solve_batch'):
            for lib, (A_, B_, C_) in (('numpy', (an, bn, Cn)), ('torch', (a.numpy(), b.numpy(), C.numpy()))):
                A_, B_, C_ = A_[:N_BATCH], B_[:N_BATCH], C_[:N_BATCH]
                if lib == 'torch': A_, B_, C_ = torch.from_numpy(A_), torch.from_numpy(B_), torch.from_numpy(C_)
                dt, r = timed(lambda: ot.batch.solve_batch(C_, REG, a=A_, b=B_, max_iter=1000, tol=TOL, method='log_sinkhorn'))
                plan = r.plan.numpy() if lib == 'torch' else r.plan
                rows.append(row(f'POT ot.batch.solve_batch ({lib})', N_BATCH, [dt], plan, an[:N_BATCH], bn[:N_BATCH], None,
                                'float64' if lib == 'numpy' else 'float32; one tolerance for the whole batch'))
    base = {r['solver']: r['us_per_problem'] for r in rows}
    for r in rows:
        r['speedup_fuselab_cap1000'] = r['us_per_problem'] / base['fuselab sinkhorn (CPU, cap 1000)']
        r['speedup_fuselab_cap50'] = r['us_per_problem'] / base['fuselab sinkhorn (CPU, cap 50)']
    print(f'B3 PTA OT: N={N} positions of 10x10, reg=1/30, tol={TOL:g}, torch threads={THREADS} (unless noted)')
    print(f"{'solver':47} {'timed':>6} {'problems/s':>11} {'us/problem':>11} {'iters':>7} {'max err':>9} {'<=tol':>6} {'x cap1000':>10} {'x cap50':>9}")
    for r in rows:
        it = f"{r['mean_iters']:.0f}" if r['mean_iters'] is not None else '-'
        print(f"{r['solver']:47} {r['problems_timed']:>6} {r['problems_per_s']:>11.0f} {r['us_per_problem']:>11.1f} {it:>7} "
              f"{r['max_marginal_err']:>9.2e} {r['frac_within_tol']:>6.1%} {r['speedup_fuselab_cap1000']:>10.1f} {r['speedup_fuselab_cap50']:>9.1f}")
    f50, ref, f1k, f1t = (next(r for r in rows if r['solver'] == s) for s in (
        'fuselab sinkhorn (CPU, cap 50)', 'PTA-LLM reference loop (numpy)', 'fuselab sinkhorn (CPU, cap 1000)',
        'fuselab sinkhorn (CPU, cap 50, 1 thread)'))
    goal = dict(speedup_cap50_vs_pta=ref['us_per_problem'] / f50['us_per_problem'],
                speedup_cap1000_vs_pta=ref['us_per_problem'] / f1k['us_per_problem'],
                cap50_at_least_as_accurate=bool(f50['max_marginal_err'] <= ref['max_marginal_err'] and f50['frac_within_tol'] >= ref['frac_within_tol']),
                second_thread_speedup=f1t['us_per_problem'] / f50['us_per_problem'],
                speedup_compiled_vs_torch_path=next(r for r in rows if r['solver'].startswith('fuselab torch path'))['us_per_problem'] / f50['us_per_problem'],
                speedup_cap50_vs_pta_per_rep=[rt / N_REF / (ft / N) for rt, ft in zip(ref['times_s'], f50['times_s'])],
                other_processes_cores_during_pair=load_pair, other_processes_cores_whole_run=other_load(m_start, cpu_marks()))
    print(f"goal (>= 100x the PTA loop at the 50-iteration budget, accuracy at least the loop's): "
          f"{goal['speedup_cap50_vs_pta']:.0f}x (per interleaved repeat: {', '.join(f'{x:.0f}x' for x in goal['speedup_cap50_vs_pta_per_rep'])}); "
          f"max err {f50['max_marginal_err']:.2f} vs {ref['max_marginal_err']:.2f}, within tol {f50['frac_within_tol']:.1%} vs {ref['frac_within_tol']:.1%}; "
          f"cap 1000: {goal['speedup_cap1000_vs_pta']:.1f}x; 2 threads vs 1: {goal['second_thread_speedup']:.2f}x; "
          f"compiled vs torch path: {goal['speedup_compiled_vs_torch_path']:.1f}x")
    print(f"other processes used {goal['other_processes_cores_during_pair']:.2f} cores on average during the interleaved pair "
          f"({goal['other_processes_cores_whole_run']:.2f} over the run); the 2-thread times need both cores free")
    out = dict(workload='B3', n_positions=N, shape=[10, 10], reg=REG, tol=TOL, device='cpu', threads=THREADS,
               cpu=platform.processor() or platform.machine(), versions=dict(torch=torch.__version__, pot=ot.__version__, numpy=np.__version__),
               rows=rows, goal=goal)
    if torch.cuda.is_available():
        out['gpu'] = gpu_bench()
        print(f"GPU {out['gpu']['device']}: {out['gpu']['positions']} positions in {out['gpu']['median_s']:.3f} s "
              f"-> {out['gpu']['positions_per_s']:.3g} positions/s (mean iters {out['gpu']['mean_iters']:.0f}, max err {out['gpu']['max_marginal_err']:.1e}, "
              f"{out['gpu']['frac_of_copy_bw']:.1%} of the measured copy bandwidth {out['gpu']['copy_bw_bytes_per_s']/1e12:.2f} TB/s at the 2-reads-per-iteration floor); "
              f"cap 50: {out['gpu']['cap50']['positions_per_s']:.3g} positions/s, {out['gpu']['cap50']['frac_of_copy_bw']:.1%}")
    out['wall_s'] = time.perf_counter() - t_start
    Path(__file__).parent.joinpath('results').mkdir(exist_ok=True)
    Path(__file__).parent.joinpath('results', 'ot.json').write_text(json.dumps(out, indent=1))
    print(f"wrote bench/results/ot.json ({out['wall_s']:.0f} s)")

def gpu_bench(n=1_000_000, reps=5):
    "fuselab on 1M PTA positions on the GPU: CUDA-event timing after synchronize, median of `reps` after one warm-up."
    a, b, C = (x.cuda() for x in synthetic_pta_problems(n, seed=1))
    rows = {}
    for cap in (1000, 50):
        sinkhorn(a, b, C, REG, tol=TOL, max_iter=cap)                          # warm-up (allocator, kernels)
        times = []
        for _ in range(reps):
            torch.cuda.synchronize(); s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record(); P, st = sinkhorn(a, b, C, REG, tol=TOL, max_iter=cap, log=True); e.record(); torch.cuda.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        med = float(np.median(times))
        rows[f'cap{cap}'] = dict(median_s=med, positions_per_s=n / med, mean_iters=float(st.n_iter.float().mean()),
                                 max_marginal_err=float(st.err.max()), frac_within_tol=float(st.converged.float().mean()),
                                 times_s=times)
    # hardware limit, measured in this run: device-to-device copy bandwidth (bytes read + written per second)
    x = torch.empty(2**30, dtype=torch.float32, device='cuda'); y = torch.empty_like(x); y.copy_(x)
    torch.cuda.synchronize(); s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record(); [y.copy_(x) for _ in range(10)]; e.record(); torch.cuda.synchronize()
    copy_bw = 10 * 2 * x.numel() * 4 / (s.elapsed_time(e) / 1e3); del x, y
    for r in rows.values():   # floor: the fp32 kernel (n*m per problem) read twice per iteration (row and column sums)
        r['bytes_floor'] = n * r['mean_iters'] * 2 * C.shape[-2] * C.shape[-1] * 4
        r['frac_of_copy_bw'] = r['bytes_floor'] / r['median_s'] / copy_bw
    return dict(device=torch.cuda.get_device_name(), positions=n, **rows['cap1000'], cap50=rows['cap50'],
                copy_bw_bytes_per_s=copy_bw, peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30)

if __name__ == '__main__':
    main()
