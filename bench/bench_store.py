"""B6 (CPU-CI size): teacher top-k storage. Write and read 100k token positions of top-10 with
fuselab's TopKStore vs HF `datasets` list columns (FuseLLM's format) vs JSONL (ADPA's format), same data, same run.
Reports bytes/token on disk and read throughput (tokens/s, each sequence materialised as (T,K) arrays).
Writes bench/results/store.json."""
import json, shutil, tempfile, time
from pathlib import Path
import numpy as np

N_SEQ, T, K, V = 1000, 100, 10, 151_936

def data():
    rng = np.random.default_rng(0)
    return [(rng.integers(0, V, (T, K)).astype(np.int32), np.log(rng.dirichlet(np.ones(K + 1), T)[:, :K]).astype(np.float32))
            for _ in range(N_SEQ)]

def dir_bytes(p): return sum(f.stat().st_size for f in Path(p).rglob('*') if f.is_file())

def bench_fuselab(d, tmp):
    from fuselab.data import TopKStore
    t = time.perf_counter(); st = TopKStore(tmp/'fl', k=K, vocab_size=V)
    with st.writer() as w:
        for key, (i, v) in enumerate(d): w.add(key, i, v)
    tw = time.perf_counter() - t
    t = time.perf_counter(); st = TopKStore(tmp/'fl')
    n = 0
    for key in range(N_SEQ): s = st[key]; n += np.asarray(s.ids).shape[0]; np.asarray(s.logprobs, dtype=np.float32)
    return tw, time.perf_counter() - t, dir_bytes(tmp/'fl'), n

def bench_datasets(d, tmp):
    from datasets import Dataset, load_from_disk
    t = time.perf_counter()
    Dataset.from_dict({'per_step_indices': [i.tolist() for i, _ in d], 'per_step_logits': [v.tolist() for _, v in d]}).save_to_disk(tmp/'hf')
    tw = time.perf_counter() - t
    t = time.perf_counter(); ds = load_from_disk(str(tmp/'hf')).with_format('numpy'); n = 0
    for r in ds: n += np.asarray(r['per_step_indices']).shape[0]; np.asarray(r['per_step_logits'], dtype=np.float32)
    return tw, time.perf_counter() - t, dir_bytes(tmp/'hf'), n

def bench_jsonl(d, tmp):
    t = time.perf_counter()
    with open(tmp/'t.jsonl', 'w') as f:
        for key, (i, v) in enumerate(d): f.write(json.dumps({'key': key, 'ids': i.tolist(), 'probs': np.exp(v).tolist()}) + '\n')
    tw = time.perf_counter() - t
    t = time.perf_counter(); n = 0
    with open(tmp/'t.jsonl') as f:
        for line in f: r = json.loads(line); n += np.asarray(r['ids'], dtype=np.int32).shape[0]; np.log(np.asarray(r['probs'], dtype=np.float32))
    return tw, time.perf_counter() - t, (tmp/'t.jsonl').stat().st_size, n

def main():
    d, tmp = data(), Path(tempfile.mkdtemp())
    rows = {}
    try:
        for name, fn in (('fuselab TopKStore', bench_fuselab), ('HF datasets lists (FuseLLM)', bench_datasets), ('JSONL (ADPA)', bench_jsonl)):
            tw, tr, nbytes, n = fn(d, tmp)
            assert n == N_SEQ * T, (name, n)
            rows[name] = dict(write_s=tw, read_s=tr, bytes_per_token=nbytes / n, read_tokens_per_s=n / tr)
    finally: shutil.rmtree(tmp)
    fl = rows['fuselab TopKStore']
    print(f"{'format':30}{'bytes/token':>12}{'read tok/s':>14}{'write s':>9}")
    for k, r in rows.items(): print(f"{k:30}{r['bytes_per_token']:>12.1f}{r['read_tokens_per_s']:>14,.0f}{r['write_s']:>9.2f}")
    res = dict(workload='B6-cpu', tokens=N_SEQ * T, k=K, vocab=V, rows=rows,
               size_ratio={k: r['bytes_per_token'] / fl['bytes_per_token'] for k, r in rows.items()},
               read_speedup={k: fl['read_tokens_per_s'] / r['read_tokens_per_s'] for k, r in rows.items()})
    print('size vs fuselab:', {k: round(v, 2) for k, v in res['size_ratio'].items()})
    print('fuselab read speed-up:', {k: round(v, 1) for k, v in res['read_speedup'].items()})
    out = Path(__file__).parent/'results'/'store.json'; out.parent.mkdir(exist_ok=True); out.write_text(json.dumps(res, indent=1))
    return res

if __name__ == '__main__': main()
