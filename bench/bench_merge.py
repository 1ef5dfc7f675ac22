"""B7 (CPU-CI size): parameter-space merge of safetensors checkpoints. fuselab's streaming `merge_models` (one tensor
at a time, files reopened per read, shards written incrementally) vs the in-memory way (load every state dict with
`safetensors.torch.load_file`, merge each tensor with the same `fuselab.merge.merge_tensor`, save), same run, SCE and
linear. Input: random bf16 Llama-shaped checkpoints (16k vocabulary, hidden 1024, 13 layers: a pivot and two targets,
~0.40 GB each, sharded at 150 MB; 1.2 GB in all), written to a temp folder under /tmp and deleted afterwards. Each
variant runs in a fresh process: throughput = input bytes / wall seconds; peak memory = growth of the process's peak
RSS (VmHWM) over its post-import value, as a fraction of the input size and as a multiple of the largest input tensor
(what bounds the streaming merge: extrapolate with it to real checkpoints). VmHWM, not ru_maxrss: a child's
ru_maxrss starts at its parent's peak (Linux carries it over fork+exec). The inputs were just written, so both variants
read from the page cache.
Writes bench/results/merge.json."""
import json, math, shutil, subprocess, sys, tempfile, time
from pathlib import Path
import torch
from harness import main_or_one

V, H, I, L, TARGETS, SHARD = 16_000, 1024, 2816, 13, 2, '150MB'
THREADS = 1      # the CI box has 2 cores shared with other jobs: 2 OpenMP threads there ran 3x slower than 1

def layout():
    yield 'model.embed_tokens.weight', (V, H); yield 'lm_head.weight', (V, H); yield 'model.norm.weight', (H,)
    for i in range(L):
        p = f'model.layers.{i}.'
        for n in ('q', 'k', 'v', 'o'): yield p + f'self_attn.{n}_proj.weight', (H, H)
        for n, s in (('gate', (I, H)), ('up', (I, H)), ('down', (H, I))): yield p + f'mlp.{n}_proj.weight', s
        yield p + 'input_layernorm.weight', (H,); yield p + 'post_attention_layernorm.weight', (H,)

def write_inputs(d:Path):
    from huggingface_hub import save_torch_state_dict
    g = torch.Generator().manual_seed(0)
    piv = {n: (0.02 * torch.randn(s, generator=g)).bfloat16() for n, s in layout()}
    for name, sd in [('pivot', piv)] + [(f't{k}', None) for k in range(TARGETS)]:
        sd = sd or {n: (v.float() + 0.002 * torch.randn(v.shape, generator=g)).bfloat16() for n, v in piv.items()}
        (d/name).mkdir(); save_torch_state_dict(sd, d/name, max_shard_size=SHARD)
        (d/name/'config.json').write_text(json.dumps(dict(model_type='llama', architectures=['LlamaForCausalLM'])))
    return sum(f.stat().st_size for f in d.rglob('*.safetensors'))

def _hwm()->int:
    "Peak resident set of this process (bytes), from /proc: per address space, reset by exec."
    return int(Path('/proc/self/status').read_text().split('VmHWM:')[1].split()[0]) * 1024

def one(variant:str, d:str):
    from safetensors.torch import load_file
    from fuselab.merge import merge_models, merge_tensor
    torch.set_num_threads(THREADS)
    d = Path(d); mode, method = variant.split('-')
    params = dict(select_topk=0.1) if method == 'sce' else {}
    base = _hwm()                                                 # imports done, nothing read yet
    t = time.perf_counter()
    if mode == 'stream':
        cfg = dict(merge_method=method, base_model=str(d/'pivot'), models=[str(d/f't{k}') for k in range(TARGETS)], parameters=params)
        merge_models(cfg, d/f'out-{variant}', progress=False)
    else:
        from huggingface_hub import save_torch_state_dict
        load = lambda m: {k: v for f in sorted((d/m).glob('*.safetensors')) for k, v in load_file(f).items()}
        piv, tg = load('pivot'), [load(f't{k}') for k in range(TARGETS)]
        out = {n: merge_tensor(method, piv[n], [s[n] for s in tg], name=n, **params)[0] for n in piv}
        (d/f'out-{variant}').mkdir(); save_torch_state_dict(out, d/f'out-{variant}', max_shard_size='5GB')
    return dict(variant=variant, seconds=time.perf_counter() - t, peak_extra_bytes=max(_hwm() - base, 0))

def same_outputs(a:Path, b:Path)->bool:
    from safetensors.torch import load_file
    la = lambda p: {k: v for f in sorted(p.glob('*.safetensors')) for k, v in load_file(f).items()}
    x, y = la(a), la(b)
    return x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x)

def main():
    d = Path(tempfile.mkdtemp(prefix='bench_merge_', dir='/tmp'))
    try:
        t = time.time(); nbytes = write_inputs(d); gen_s = time.time() - t
        largest = max(math.prod(s) for _, s in layout()) * 2                # bf16 bytes
        rows = {}
        for v in ('stream-sce', 'memory-sce', 'stream-linear', 'memory-linear'):
            r = subprocess.run([sys.executable, __file__, '--one', v, str(d)], capture_output=True, text=True, check=True)
            rows[v] = json.loads(r.stdout.strip().splitlines()[-1])
            rows[v].update(gb_per_s=nbytes / rows[v]['seconds'] / 1e9, peak_rss_over_input=rows[v]['peak_extra_bytes'] / nbytes,
                           peak_rss_over_largest_tensor=rows[v]['peak_extra_bytes'] / largest)
        identical = {m: same_outputs(d/f'out-stream-{m}', d/f'out-memory-{m}') for m in ('sce', 'linear')}
    finally: shutil.rmtree(d, ignore_errors=True)
    print(f'input: {TARGETS + 1} bf16 checkpoints, {nbytes / 1e9:.2f} GB in {SHARD} shards (written in {gen_s:.0f} s); '
          f'largest tensor {largest / 1e6:.0f} MB')
    print(f"{'variant':16}{'seconds':>9}{'GB/s':>8}{'peak RSS MB':>13}{'RSS / input':>13}{'RSS / largest':>15}")
    for v, r in rows.items():
        print(f"{v:16}{r['seconds']:>9.2f}{r['gb_per_s']:>8.3f}{r['peak_extra_bytes'] / 2**20:>13.0f}{r['peak_rss_over_input']:>13.3f}"
              f"{r['peak_rss_over_largest_tensor']:>15.1f}")
    ratios = {m: dict(peak_rss_memory_over_stream=rows[f'memory-{m}']['peak_extra_bytes'] / max(rows[f'stream-{m}']['peak_extra_bytes'], 1),
                      throughput_stream_over_memory=rows[f'stream-{m}']['gb_per_s'] / rows[f'memory-{m}']['gb_per_s']) for m in ('sce', 'linear')}
    for m, r in ratios.items():
        print(f"{m}: in-memory needs {r['peak_rss_memory_over_stream']:.1f}x the streaming peak RSS; streaming runs at "
              f"{r['throughput_stream_over_memory']:.2f}x its throughput; outputs identical: {identical[m]}")
    res = dict(workload='B7-cpu', input_bytes=nbytes, largest_tensor_bytes=largest, models=TARGETS + 1, dtype='bfloat16', shard=SHARD, layout=dict(V=V, H=H, I=I, L=L),
               torch=torch.__version__, threads=THREADS, rows=rows, ratios=ratios, identical_outputs=identical)
    out = Path(__file__).parent/'results'/'merge.json'; out.parent.mkdir(exist_ok=True); out.write_text(json.dumps(res, indent=1))
    assert all(identical.values()), identical
    return res

if __name__ == '__main__': main_or_one(one, main)
