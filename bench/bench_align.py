"""B1/B2 (CPU size): cross-tokenizer alignment.
B1 MinED vocabulary map, real Llama 32k -> real Qwen 150k: fuselab's full map (exact dict + one id-ordered rapidfuzz
cdist scan of the target vocabulary, all cores) vs a FuseLLM-style full Python `editdistance` scan per token, both
timed on the same sample of 200 tokens that need MinED (identical mappings required). fuselab's sample time is a cold
call (nothing cached between calls), median of 6 runs taken before and after the scan; the scan runs once.
B2 sequence alignment of a 2,048-token real English text (stdlib docstrings), GPT-2 -> Llama: fast DTW vs the
pure-Python reference DTW (FuseLLM style, one `editdistance` call per cell), both measured on the full text for
both tie-break orders (identical paths required); the fast path's time is the median of 10 runs taken before and
after the reference runs. The old 640-token prefix measurement is kept; offset alignment's agreement with DTW.
Writes bench/results/align.json."""
import json, os, statistics, time
os.environ.setdefault('HF_HUB_OFFLINE', '1')
from pathlib import Path
import numpy as np, editdistance
from fuselab.testing import real_tokenizer
from fuselab.align import token_texts, mined_vocab_map, dtw_align, dtw_reference, offset_align

N_SAMPLE, N_TOKENS, N_PREFIX = 200, 2048, 640

_LAST = []   # the individual times of the last `med` call

def med(f, n=5):
    ts = []
    for _ in range(n): t = time.perf_counter(); r = f(); ts.append(time.perf_counter() - t)
    _LAST[:] = ts
    return statistics.median(ts), r

def bench_mined():
    S, T = token_texts(real_tokenizer('llama')), token_texts(real_tokenizer('qwen'))
    t_full, (m, d) = med(lambda: mined_vocab_map(S, T, workers=-1, return_dist=True), n=1)
    need = np.flatnonzero(d > 0)
    sample = np.random.default_rng(0).choice(need, N_SAMPLE, replace=False)
    fl = lambda: mined_vocab_map(S, T, ids=sample, workers=-1)
    _, ms_before = med(fl, n=3); ts_before = _LAST[:]
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
    _, ms = med(fl, n=3); ts = ts_before + _LAST[:]
    t_fl_s = statistics.median(ts)
    assert list(ms) == list(ms_before) == mref == list(m[sample]), 'MinED mappings differ from the full scan'
    per_ref = t_ref / N_SAMPLE
    return dict(src_vocab=len(S), tgt_vocab=len(T), exact=int((d == 0).sum()), mined=int(len(need)),
                fuselab_full_map_s=t_full, sample=N_SAMPLE, fuselab_sample_s=t_fl_s, fuselab_sample_times_s=ts,
                fusellm_sample_s=t_ref, fusellm_per_token_s=per_ref, speedup_on_sample=t_ref / t_fl_s,
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
    t_ref_prefix, _ = med(lambda: dtw_reference(ps, pt, 'fusellm', dist=editdistance.eval), n=1)
    t_fast_prefix, _ = med(lambda: dtw_align(ps, pt))
    _, al = med(lambda: dtw_align(s, t, workers=1)); ts = _LAST[:]
    t_ref, agree = {}, {}
    for tb in ('fusellm', 'fusechat'):                     # the reference on the full text, both tie orders
        t_ref[tb], ref = med(lambda: dtw_reference(s, t, tb, dist=editdistance.eval), n=1)
        agree[tb] = dtw_align(s, t, tb).path.tolist() == [list(p) for p in ref]
    assert all(agree.values()), agree
    med(lambda: dtw_align(s, t, workers=1)); ts += _LAST[:]
    t_fast = statistics.median(ts)
    t_fast_fc, _ = med(lambda: dtw_align(s, t, 'fusechat', workers=1))
    t_fast2, _ = med(lambda: dtw_align(s, t, workers=-1))
    t_off, ao = med(lambda: offset_align(es['offset_mapping'], et['offset_mapping']))
    return dict(src='gpt2', tgt='llama', src_tokens=len(s), tgt_tokens=len(t),
                reference_full_s=t_ref['fusellm'], reference_full_fusechat_s=t_ref['fusechat'],
                fast_full_s=t_fast, fast_full_times_s=ts, fast_full_fusechat_s=t_fast_fc, fast_full_allcores_s=t_fast2,
                speedup_full=t_ref['fusellm'] / t_fast, speedup_full_fusechat=t_ref['fusechat'] / t_fast_fc,
                identical_path_full=agree,
                prefix=[len(ps), len(pt)], reference_prefix_s=t_ref_prefix, fast_prefix_s=t_fast_prefix,
                speedup_prefix_measured=t_ref_prefix / t_fast_prefix,
                offsets_full_s=t_off, offsets_speedup_vs_fast_dtw=t_fast / t_off,
                offsets_agreement=float(np.mean([x == y for x, y in zip(al.groups(), ao.groups())])))

def main():
    t0 = time.perf_counter()
    b1, b2 = bench_mined(), bench_dtw()
    print(f"{'B1 MinED map llama(32k)->qwen(150k)':44}")
    print(f"  exact {b1['exact']}, MinED {b1['mined']}; fuselab full map {b1['fuselab_full_map_s']:.2f} s (all cores)")
    print(f"  sample of {N_SAMPLE} MinED tokens: fuselab {b1['fuselab_sample_s']:.3f} s (cold call, median of 6), FuseLLM scan "
          f"{b1['fusellm_sample_s']:.2f} s -> {b1['speedup_on_sample']:.0f}x, identical mappings")
    print(f"  FuseLLM full map extrapolated {b1['fusellm_full_map_extrapolated_s']/3600:.2f} h -> {b1['speedup_full_map_extrapolated']:.0f}x")
    print(f"{'B2 DTW gpt2->llama':44}{b2['src_tokens']}x{b2['tgt_tokens']} tokens")
    print(f"  full text: reference {b2['reference_full_s']:.2f} s vs fast {b2['fast_full_s']*1e3:.1f} ms -> {b2['speedup_full']:.0f}x "
          f"(fusechat order: {b2['reference_full_fusechat_s']:.2f} s vs {b2['fast_full_fusechat_s']*1e3:.1f} ms -> "
          f"{b2['speedup_full_fusechat']:.0f}x); identical paths, both tie orders")
    print(f"  {b2['prefix'][0]}x{b2['prefix'][1]} prefix: reference {b2['reference_prefix_s']:.2f} s vs fast {b2['fast_prefix_s']*1e3:.1f} ms "
          f"-> {b2['speedup_prefix_measured']:.0f}x; offsets {b2['offsets_full_s']*1e3:.2f} ms, agreement with DTW {b2['offsets_agreement']:.1%}")
    res = dict(workload='B1/B2-cpu', cores=os.cpu_count(), mined=b1, dtw=b2, wall_s=time.perf_counter() - t0)
    out = Path(__file__).parent/'results'/'align.json'; out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=1)); print('wrote', out, f"({res['wall_s']:.0f} s)")

if __name__ == '__main__': main()
