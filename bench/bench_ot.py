"""B3 (bench/ANCHORS.md section 8): PTA-LLM per-token OT, 10x10 problems at lambda = 30 (reg = 1/30), tol 1e-5.

Same synthetic inputs (`fuselab.ot.synthetic_pta_problems`) for every solver, in one run:
  * fuselab `sinkhorn`, batched torch on CPU (2 threads), all N positions, cap 1000 iterations and cap 50 (B3's budget);
  * PTA-LLM's per-position NumPy probability-domain loop (re-implemented from `compute_optimal_transport`), on a sample;
  * POT `ot.sinkhorn(..., method='sinkhorn_log')` in a Python loop, on a sample;
  * POT `ot.batch.solve_batch(..., method='log_sinkhorn')` (numpy float64 and torch float32), on a sample batch.
Sampled solvers are timed per problem and extrapolated (their cost is linear in the number of problems). Reported:
problems/s, speed-up of fuselab over each, mean iterations, max marginal error max(||P1-a||_1, ||P^T 1-b||_1) and the
fraction of problems within tol. GPU branch: fuselab on 1M positions, CUDA-event timing, median of 5 after warm-up.
Writes bench/results/ot.json.   Usage: python bench/bench_ot.py  [env BENCH_OT_N=100000]"""
import json, os, platform, time, warnings
from pathlib import Path
import numpy as np
import torch
import ot
from fuselab.ot import sinkhorn, synthetic_pta_problems

torch.set_num_threads(2)
N = int(os.environ.get('BENCH_OT_N', 100_000))
REG, TOL, LAM = 1 / 30, 1e-5, 30.
N_REF, N_POT, N_BATCH = 2000, 50, 2000           # sample sizes of the slow comparators

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

def row(name, n_timed, secs, P, a, b, iters, note=''):
    e = marg_err(np.asarray(P, np.float64), np.asarray(a, np.float64), np.asarray(b, np.float64))
    return dict(solver=name, problems_timed=n_timed, seconds=secs, problems_per_s=n_timed / secs,
                us_per_problem=secs / n_timed * 1e6, mean_iters=float(np.mean(iters)) if iters is not None else None,
                max_marginal_err=float(e.max()), frac_within_tol=float((e <= TOL).mean()), note=note)

def main():
    t_start = time.perf_counter()
    a, b, C = synthetic_pta_problems(N, seed=0)
    an, bn, Cn = a.double().numpy(), b.double().numpy(), C.double().numpy()
    rows = []
    sinkhorn(a[:512], b[:512], C[:512], REG)                                  # warm-up
    for cap in (1000, 50):
        t = time.perf_counter(); P, st = sinkhorn(a, b, C, REG, tol=TOL, max_iter=cap, log=True); dt = time.perf_counter() - t
        rows.append(row(f'fuselab sinkhorn (torch CPU, cap {cap})', N, dt, P.numpy(), an, bn, st.n_iter.numpy(), 'float32, all N'))
    t = time.perf_counter(); res = [pta_reference_sinkhorn(Cn[i], an[i], bn[i]) for i in range(N_REF)]; dt = time.perf_counter() - t
    rows.append(row('PTA-LLM reference loop (numpy)', N_REF, dt, np.stack([p for p, _ in res]), an[:N_REF], bn[:N_REF],
                    [i for _, i in res], 'float64, stops when row sums stop changing'))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        t = time.perf_counter(); Ps, its = [], []
        for i in range(N_POT):
            G, lg = ot.sinkhorn(an[i], bn[i], Cn[i], REG, method='sinkhorn_log', numItermax=1000, stopThr=TOL, log=True)
            Ps.append(G); its.append(lg['niter'])
        dt = time.perf_counter() - t
        rows.append(row('POT ot.sinkhorn loop (sinkhorn_log)', N_POT, dt, np.stack(Ps), an[:N_POT], bn[:N_POT], its, f'POT {ot.__version__}, float64'))
        if hasattr(ot, 'batch') and hasattr(ot.batch, 'solve_batch'):
            for lib, (A_, B_, C_) in (('numpy', (an, bn, Cn)), ('torch', (a.numpy(), b.numpy(), C.numpy()))):
                A_, B_, C_ = A_[:N_BATCH], B_[:N_BATCH], C_[:N_BATCH]
                if lib == 'torch': A_, B_, C_ = torch.from_numpy(A_), torch.from_numpy(B_), torch.from_numpy(C_)
                t = time.perf_counter()
                r = ot.batch.solve_batch(C_, REG, a=A_, b=B_, max_iter=1000, tol=TOL, method='log_sinkhorn')
                dt = time.perf_counter() - t
                plan = r.plan.numpy() if lib == 'torch' else r.plan
                rows.append(row(f'POT ot.batch.solve_batch ({lib})', N_BATCH, dt, plan, an[:N_BATCH], bn[:N_BATCH], None,
                                'float64' if lib == 'numpy' else 'float32; one tolerance for the whole batch'))
    base = {r['solver']: r['us_per_problem'] for r in rows}
    for r in rows:
        r['speedup_fuselab_cap1000'] = r['us_per_problem'] / base['fuselab sinkhorn (torch CPU, cap 1000)']
        r['speedup_fuselab_cap50'] = r['us_per_problem'] / base['fuselab sinkhorn (torch CPU, cap 50)']
    print(f'B3 PTA OT: N={N} positions of 10x10, reg=1/30, tol={TOL:g}, torch threads={torch.get_num_threads()}')
    print(f"{'solver':42} {'timed':>6} {'problems/s':>11} {'us/problem':>11} {'iters':>7} {'max err':>9} {'<=tol':>6} {'x cap1000':>10} {'x cap50':>9}")
    for r in rows:
        it = f"{r['mean_iters']:.0f}" if r['mean_iters'] is not None else '-'
        print(f"{r['solver']:42} {r['problems_timed']:>6} {r['problems_per_s']:>11.0f} {r['us_per_problem']:>11.1f} {it:>7} "
              f"{r['max_marginal_err']:>9.2e} {r['frac_within_tol']:>6.1%} {r['speedup_fuselab_cap1000']:>10.1f} {r['speedup_fuselab_cap50']:>9.1f}")
    out = dict(workload='B3', n_positions=N, shape=[10, 10], reg=REG, tol=TOL, device='cpu', threads=torch.get_num_threads(),
               cpu=platform.processor() or platform.machine(), versions=dict(torch=torch.__version__, pot=ot.__version__, numpy=np.__version__),
               rows=rows)
    if torch.cuda.is_available():
        out['gpu'] = gpu_bench()
        print(f"GPU {out['gpu']['device']}: {out['gpu']['positions']} positions in {out['gpu']['median_s']:.3f} s "
              f"-> {out['gpu']['positions_per_s']:.3g} positions/s (mean iters {out['gpu']['mean_iters']:.0f}, max err {out['gpu']['max_marginal_err']:.1e})")
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
    return dict(device=torch.cuda.get_device_name(), positions=n, **rows['cap1000'], cap50=rows['cap50'],
                peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30)

if __name__ == '__main__':
    main()
