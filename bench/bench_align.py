"""B1/B2 (CPU size): cross-tokenizer alignment.
B1 MinED vocabulary map, real Llama 32k -> real Qwen 150k: fuselab's full map (exact dict + length-pruned
rapidfuzz cdist, all cores) vs a FuseLLM-style full Python `editdistance` scan per token, timed on the same sample
of tokens that need MinED (identical mappings required), extrapolated per token.
B2 sequence alignment of a ~2,048-token real English text (stdlib docstrings), GPT-2 -> Llama: fast DTW vs the
pure-Python reference DTW (FuseLLM style, one `editdistance` call per cell), reference timed on a prefix and
extrapolated by cells (DTW is O(M*N)); identical paths required on the prefix; offset alignment's agreement.
Writes bench/results/align.json."""
import json, os, statistics, time
os.environ.setdefault('HF_HUB_OFFLINE', '1')
from pathlib import Path
import numpy as np, editdistance
from fuselab.testing import real_tokenizer
from fuselab.align import token_texts, mined_vocab_map, dtw_align, dtw_reference, offset_align

N_SAMPLE, N_TOKENS, N_PREFIX = 200, 2048, 640

def med(f, n=5):
    ts = []
    for _ in range(n): t = time.perf_counter(); r = f(); ts.append(time.perf_counter() - t)
    return statistics.median(ts), r

def bench_mined():
    S, T = token_texts(real_tokenizer('llama')), token_texts(real_tokenizer('qwen'))
    t_full, (m, d) = med(lambda: mined_vocab_map(S, T, workers=-1, return_dist=True), n=1)
    need = np.flatnonzero(d > 0)
    sample = np.random.default_rng(0).choice(need, N_SAMPLE, replace=False)
    t_fl_s, ms = med(lambda: mined_vocab_map(S, T, ids=sample, workers=-1), n=3)
    def fusellm_scan():   # FuseLLM vocab_mapping.py: min over all target tokens of editdistance.eval, first on ties
        out = []
        for i in sample:
            best, bd = -1, 1 << 30
            for j, v in enumerate(T):
                e = editdistance.eval(S[i], v)
                if e < bd: best, bd = j, e
            out.append(best)
        return out
    t_ref, mref = med(fusellm_scan, n=1)
    assert list(ms) == mref == list(m[sample]), 'MinED mappings differ from the full scan'
    per_ref = t_ref / N_SAMPLE
    return dict(src_vocab=len(S), tgt_vocab=len(T), exact=int((d == 0).sum()), mined=int(len(need)),
                fuselab_full_map_s=t_full, sample=N_SAMPLE, fuselab_sample_s=t_fl_s, fusellm_sample_s=t_ref,
                fusellm_per_token_s=per_ref, speedup_on_sample=t_ref / t_fl_s,
                fusellm_full_map_extrapolated_s=per_ref * len(need), speedup_full_map_extrapolated=per_ref * len(need) / t_full,
                identical_on_sample=True)

def long_text(tok, n):
    import json as j, collections, argparse, functools, itertools, pathlib, re, subprocess, threading, typing, logging, unittest, email
    mods = [j, collections, argparse, functools, itertools, pathlib, re, subprocess, threading, typing, logging, unittest, email]
    text = '\n\n'.join(m.__doc__.strip() for m in mods if m.__doc__)
    ids = tok(text, add_special_tokens=False)['input_ids']
    assert len(ids) >= n, len(ids)
    return tok.decode(ids[:n])

def bench_dtw():
    g, l = real_tokenizer('gpt2'), real_tokenizer('llama')
    text = long_text(g, N_TOKENS)
    es, et = g(text, add_special_tokens=False, return_offsets_mapping=True), l(text, add_special_tokens=False, return_offsets_mapping=True)
    s, t = g.convert_ids_to_tokens(es['input_ids']), l.convert_ids_to_tokens(et['input_ids'])
    ps, pt = s[:N_PREFIX], t[:int(N_PREFIX * len(t) / len(s))]
    t_ref, ref = med(lambda: dtw_reference(ps, pt, 'fusellm', dist=editdistance.eval), n=1)
    agree = {tb: dtw_align(ps, pt, tb).path.tolist() == [list(p) for p in dtw_reference(ps, pt, tb, dist=editdistance.eval)]
             for tb in ('fusellm', 'fusechat')}
    assert all(agree.values()), agree
    t_fast_prefix, _ = med(lambda: dtw_align(ps, pt))
    t_fast, al = med(lambda: dtw_align(s, t, workers=1))
    t_fast2, _ = med(lambda: dtw_align(s, t, workers=-1))
    t_off, ao = med(lambda: offset_align(es['offset_mapping'], et['offset_mapping']))
    ref_full = t_ref * (len(s) * len(t)) / (len(ps) * len(pt))
    return dict(src='gpt2', tgt='llama', src_tokens=len(s), tgt_tokens=len(t), prefix=[len(ps), len(pt)],
                reference_prefix_s=t_ref, fast_prefix_s=t_fast_prefix, speedup_prefix_measured=t_ref / t_fast_prefix,
                reference_full_extrapolated_s=ref_full, fast_full_s=t_fast, fast_full_allcores_s=t_fast2,
                speedup_full=ref_full / t_fast, identical_path_on_prefix=agree,
                offsets_full_s=t_off, offsets_speedup_vs_fast_dtw=t_fast / t_off,
                offsets_agreement=float(np.mean([x == y for x, y in zip(al.groups(), ao.groups())])))

def main():
    t0 = time.perf_counter()
    b1, b2 = bench_mined(), bench_dtw()
    print(f"{'B1 MinED map llama(32k)->qwen(150k)':44}")
    print(f"  exact {b1['exact']}, MinED {b1['mined']}; fuselab full map {b1['fuselab_full_map_s']:.2f} s (all cores)")
    print(f"  sample of {N_SAMPLE} MinED tokens: fuselab {b1['fuselab_sample_s']:.3f} s, FuseLLM scan {b1['fusellm_sample_s']:.2f} s "
          f"-> {b1['speedup_on_sample']:.0f}x, identical mappings")
    print(f"  FuseLLM full map extrapolated {b1['fusellm_full_map_extrapolated_s']/3600:.2f} h -> {b1['speedup_full_map_extrapolated']:.0f}x")
    print(f"{'B2 DTW gpt2->llama':44}{b2['src_tokens']}x{b2['tgt_tokens']} tokens")
    print(f"  reference on {b2['prefix'][0]}x{b2['prefix'][1]} prefix {b2['reference_prefix_s']:.2f} s vs fast {b2['fast_prefix_s']*1e3:.1f} ms "
          f"-> {b2['speedup_prefix_measured']:.0f}x (identical paths, both tie orders)")
    print(f"  full: reference extrapolated (x cells) {b2['reference_full_extrapolated_s']:.1f} s, fast {b2['fast_full_s']*1e3:.0f} ms "
          f"-> {b2['speedup_full']:.0f}x; offsets {b2['offsets_full_s']*1e3:.2f} ms, agreement with DTW {b2['offsets_agreement']:.1%}")
    res = dict(workload='B1/B2-cpu', cores=os.cpu_count(), mined=b1, dtw=b2, wall_s=time.perf_counter() - t0)
    out = Path(__file__).parent/'results'/'align.json'; out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=1)); print('wrote', out, f"({res['wall_s']:.0f} s)")

if __name__ == '__main__': main()
