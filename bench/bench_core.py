"""B4 (CPU-CI size): label log-probs + backward from hidden states and the LM head at V=151,936.
fuselab `chunked_logprobs` vs the naive path (materialise logits, log_softmax, gather) in the same run.
Each variant runs in a fresh subprocess; peak memory = growth of the process's max RSS over the inputs
(on a GPU: torch.cuda.max_memory_allocated). Prints a table and writes bench/results/core.json."""
import torch
import torch.nn.functional as F
from harness import measure, run_variants, report, main_or_one

V, CPU = 151_936, dict(T=512, H=64, chunk=64, dtype='float32', reps=2)
GPU = dict(T=8192, H=896, chunk=1024, dtype='bfloat16', reps=5)   # Qwen2.5-0.5B head

def inputs(T, H, dtype, dev):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(T, H, generator=g).to(dev, getattr(torch, dtype)).requires_grad_()
    W = (torch.randn(V, H, generator=g) * 0.02).to(dev, getattr(torch, dtype)).requires_grad_()
    return h, W, torch.randint(0, V, (T,), generator=g).to(dev)

def step(variant, h, W, y, chunk):
    if variant == 'naive': lp = F.log_softmax((h @ W.T).float(), -1).gather(-1, y[:, None])[:, 0]
    else:
        from fuselab.core import chunked_logprobs
        lp = chunked_logprobs(h, W, y, chunk_size=chunk)
    lp.sum().backward()
    return float(lp.sum())

def one(variant, dev):
    cfg = GPU if dev == 'cuda' else CPU
    torch.set_num_threads(2)
    h, W, y = inputs(cfg['T'], cfg['H'], cfg['dtype'], dev)
    return dict(variant=variant, **measure(lambda: step(variant, h, W, y, cfg['chunk']), (h, W), dev, cfg['reps']))

def main():
    dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    cfg = GPU if dev == 'cuda' else CPU
    rows = run_variants(__file__, ('naive', 'chunked'), dev)
    assert abs(rows['naive']['value'] - rows['chunked']['value']) < 1e-2 * abs(rows['naive']['value']), rows
    res = dict(workload='B4-cpu' if dev == 'cpu' else 'B4-gpu', device=torch.cuda.get_device_name() if dev == 'cuda' else 'cpu',
               V=V, **{k: cfg[k] for k in ('T', 'H', 'chunk', 'dtype')}, torch=torch.__version__,
               naive=rows['naive'], chunked=rows['chunked'],
               peak_memory_ratio_naive_over_chunked=rows['naive']['peak_extra_bytes'] / max(rows['chunked']['peak_extra_bytes'], 1),
               time_ratio_naive_over_chunked=rows['naive']['seconds'] / rows['chunked']['seconds'],
               dense_logits_bytes_fp32=cfg['T'] * V * 4)
    if dev == 'cuda':
        flops = 6 * cfg['T'] * cfg['H'] * V      # fwd 2THV + bwd 4THV (chunked recomputes the fwd GEMM: +2THV not counted)
        res['chunked_tflops'] = flops / rows['chunked']['seconds'] / 1e12
        res['fraction_of_h100_bf16_peak'] = res['chunked_tflops'] / 989
    return report('core', rows, res, f"peak memory ratio naive/chunked = {res['peak_memory_ratio_naive_over_chunked']:.1f}x; "
          f"time ratio naive/chunked = {res['time_ratio_naive_over_chunked']:.2f}x  (T={cfg['T']}, H={cfg['H']}, V={V})")

if __name__ == '__main__': main_or_one(one, main)
