"""B5 (issue 3 wording): FuseLLM soft cross-entropy towards a stored top-k teacher at V=151,936, with backward.
Comparators in the same run, each in a fresh subprocess (peak memory = growth of max RSS over the inputs; on a GPU
torch.cuda.max_memory_allocated):
  dense          the reference collator's way: a dense [N,V] target scattered from the top-k, logits [N,V], -(P*log q).sum
  sparse_logits  fuselab `sparse_soft_ce`: logits [N,V] still built, target kept sparse (gather of K logits)
  chunked        fuselab `chunked_sparse_soft_ce`: neither logits nor target ever [N,V] (chunked LM head)
Prints a table and writes bench/results/losses.json."""
import torch
from harness import measure, run_variants, report, main_or_one

V, K = 151_936, 10
CPU = dict(N=512, H=64, chunk=64, dtype='float32', reps=2)
GPU = dict(N=8192, H=896, chunk=1024, dtype='bfloat16', reps=5)

def inputs(N, H, dtype, dev):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, H, generator=g).to(dev, getattr(torch, dtype)).requires_grad_()
    W = (torch.randn(V, H, generator=g) * 0.02).to(dev, getattr(torch, dtype)).requires_grad_()
    ids = torch.randint(0, V, (N, K), generator=g).to(dev)        # (duplicates allowed: the loss is linear in P)
    lps = torch.log_softmax(torch.randn(N, K, generator=g) * 2, -1).to(dev)
    return h, W, ids, lps

def step(variant, h, W, ids, lps, chunk):
    mask = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
    if variant == 'dense':
        P = torch.zeros(h.shape[0], V, device=h.device, dtype=torch.float32).scatter_(-1, ids, lps.softmax(-1))
        loss = -(P * torch.log_softmax((h @ W.T).float(), -1)).sum(-1).mean()
    elif variant == 'sparse_logits':
        from fuselab.losses import sparse_soft_ce
        loss = sparse_soft_ce((h @ W.T)[None], ids[None], lps[None], mask[None], reduction='batch')[0]
    else:
        from fuselab.losses import chunked_sparse_soft_ce
        loss = chunked_sparse_soft_ce(h[None], W, ids[None], lps[None], mask[None], reduction='batch', chunk_size=chunk)[0]
    loss.backward()
    return float(loss)

def one(variant, dev):
    cfg = GPU if dev == 'cuda' else CPU
    torch.set_num_threads(2)
    h, W, ids, lps = inputs(cfg['N'], cfg['H'], cfg['dtype'], dev)
    return dict(variant=variant, **measure(lambda: step(variant, h, W, ids, lps, cfg['chunk']), (h, W), dev, cfg['reps']))

VARIANTS = ('dense', 'sparse_logits', 'chunked')

def main():
    dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    cfg = GPU if dev == 'cuda' else CPU
    rows = run_variants(__file__, VARIANTS, dev)
    for v in VARIANTS[1:]: assert abs(rows[v]['value'] - rows['dense']['value']) < 1e-2 * abs(rows['dense']['value']), rows
    res = dict(workload='B5-cpu' if dev == 'cpu' else 'B5-gpu', device=torch.cuda.get_device_name() if dev == 'cuda' else 'cpu',
               V=V, K=K, **{k: cfg[k] for k in ('N', 'H', 'chunk', 'dtype')}, torch=torch.__version__, **rows,
               peak_memory_ratio_dense_over_chunked=rows['dense']['peak_extra_bytes'] / max(rows['chunked']['peak_extra_bytes'], 1),
               peak_memory_ratio_dense_over_sparse_logits=rows['dense']['peak_extra_bytes'] / max(rows['sparse_logits']['peak_extra_bytes'], 1),
               time_ratio_dense_over_chunked=rows['dense']['seconds'] / rows['chunked']['seconds'],
               dense_target_bytes_fp32=cfg['N'] * V * 4)
    return report('losses', rows, res, f"peak memory dense/chunked = {res['peak_memory_ratio_dense_over_chunked']:.1f}x, dense/sparse_logits = "
          f"{res['peak_memory_ratio_dense_over_sparse_logits']:.1f}x; time dense/chunked = {res['time_ratio_dense_over_chunked']:.2f}x "
          f"(N={cfg['N']}, H={cfg['H']}, V={V}, K={K})")

if __name__ == '__main__': main_or_one(one, main)
