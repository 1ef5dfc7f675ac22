"FuseChat-3.0 pipeline: selection rules against brute-force oracles, correctness gating, resume after SIGKILL (byte-identical data), CLI end to end, bad inputs."
import json, math, os, random, signal, subprocess, sys, time, warnings
from pathlib import Path
import pytest
from fuselab.testing import tiny_lm, train_tokenizer, skill_data
from fuselab.fusechat3 import (FuseChat3Config, DomainRule, source_pair, fusechat3_run, fusechat3_sample, fusechat3_score, fusechat3_dpo,
                               assign_split)

def _jsonl(path, recs): Path(path).write_text(''.join(json.dumps(r) + '\n' for r in recs)); return str(path)
def _lines(path): return [json.loads(l) for l in Path(path).read_text().splitlines()]
REWARD = {}                                                            # response text -> reward, read by the scorer below
def _reward_of(rec, y): return REWARD[y]
def _ship(rows):
    "Responses given as 'text|reward': register each reward, ship the texts (the reward must not pollute math/code checks)."
    for r in rows:
        for s, ys in r.get('responses', {}).items():
            for y in ys:
                if '|' in y: REWARD[y.rsplit('|', 1)[0]] = float(y.rsplit('|', 1)[1])
            r['responses'][s] = [y.rsplit('|', 1)[0] for y in ys]
    return rows

def _oracle_pair(rs, cs, window):
    "Brute force over every ordered pair of one source's samples: the largest r_i - r_j (i correct, j not, in checked domains)."
    ok = [i for i, r in enumerate(rs) if r is not None]
    if cs is not None:
        if not any(cs[i] for i in ok): return 'no_correct'
        if all(cs[i] for i in ok): return 'no_incorrect'
    elif len(ok) < 2: return 'too_few'
    if len({rs[i] for i in ok}) == 1: return 'flat'
    cand = [(rs[i] - rs[j], -i, j) for i in ok for j in ok if i != j and (cs is None or (cs[i] and not cs[j]))]
    gap, mi, j = max(cand)                                  # largest gap; then the smallest i, the largest j
    return 'gap_below' if gap < window[0] else 'gap_above' if gap > window[1] else (-mi, j)

def test_source_pair_matches_brute_force():
    rng = random.Random(0)
    for t in range(3000):
        n = rng.randint(1, 7)
        rs = [None if rng.random() < 0.1 else rng.randint(0, 16) / 32 for _ in range(n)]      # binary fractions: exact ties and window edges
        cs = [rng.random() < 0.5 for _ in range(n)] if t % 2 else None
        lo = rng.randint(0, 4) / 32; window = (lo, lo + rng.randint(0, 6) / 32)
        assert source_pair(rs, cs, window) == _oracle_pair(rs, cs, window), (rs, cs, window)

def _records_run(tmp, recs, sources, window, domains=None, **kw):
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = FuseChat3Config(sources={s: 'shipped' for s in sources}, target='unused', data=_jsonl(tmp/'p.jsonl', _ship(recs)), out_dir=str(tmp/'run'),
                          scorer=_reward_of, gap_window=window, chat=False, domains=domains or {},
                          source_defaults=dict(backend='records'), **kw)
    res = fusechat3_run(cfg, ('sample', 'score', 'build'), progress=False)
    return cfg, res, _lines(tmp/'run'/'build'/'sft.jsonl'), _lines(tmp/'run'/'build'/'dpo.jsonl')

def test_build_same_source_pairs_vs_naive_loop(tmp_path):
    "Random rewards for 3 sources x 60 prompts: the DPO records are exactly the oracle's same-source pairs in the window, one per prompt."
    rng, window, S = random.Random(1), (2 / 32, 6 / 32), ('A', 'B', 'C')
    recs = [dict(key=k, prompt=f'q{k}', domain='general',
                 responses={s: [f'{s}{k}.{i}|{rng.randint(0, 12) / 32}' for i in range(rng.randint(1, 5))] for s in S}) for k in range(60)]
    cfg, res, sft, dpo = _records_run(tmp_path, recs, S, window, domains=dict(general=dict(split='both')))
    want, want_sft = {}, {}
    for r in recs:
        rw = {s: [REWARD[y] for y in r['responses'][s]] for s in S}
        kept = [(rw[s][o[0]], -S.index(s), s, o) for s in S for o in [_oracle_pair(rw[s], None, window)] if isinstance(o, tuple)]
        if kept:
            _, _, s, (w, l) = max(kept)                            # the source whose chosen scores highest, first source on ties
            want[r['key']] = (s, r['responses'][s][w], r['responses'][s][l])
        want_sft[r['key']] = max((v, -S.index(s), -i, y) for s in S for i, (v, y) in enumerate(zip(rw[s], r['responses'][s])))[3]
    assert {d['key']: (d['source'], d['chosen'], d['rejected']) for d in dpo} == want and len(dpo) == len(want)
    for d in dpo:                                                     # same source: both responses are that source's samples
        resp = recs[d['key']]['responses'][d['source']]
        assert d['chosen'] in resp and d['rejected'] in resp and window[0] <= d['chosen_reward'] - d['rejected_reward'] <= window[1]
    assert {s['key']: s['completion'] for s in sft} == want_sft
    st = res['build']['domains']['general']
    assert st['pairs']['kept'] >= len(want) and st['dpo'] == len(want)
    assert st['dropped_by_gap_window'] == st['pairs'].get('gap_below', 0) + st['pairs'].get('gap_above', 0) > 0

def test_same_source_rule_and_split(tmp_path):
    "A cross-source (best, worst) would sit in the window, but each source alone is flat: no pair; the 4:6 split holds on paired prompts."
    recs = [dict(key=0, prompt='q', domain='general', responses=dict(A=['p0|0.5', 'p1|0.5'], B=['q0|0.45', 'q1|0.45']))]
    recs += [dict(key=k, prompt=f'q{k}', domain='general', responses=dict(A=[f'a{k}|0.5', f'x{k}|0.45'], B=[f'b{k}|0.2'])) for k in range(1, 21)]
    cfg, res, sft, dpo = _records_run(tmp_path, recs, ('A', 'B'), (0.01, 0.1))
    st = res['build']['domains']['general']
    assert 0 not in {d['key'] for d in dpo} and 0 not in {s['key'] for s in sft}   # prompt 0 has no kept pair: dropped ('unpaired')
    assert st['pairs'] == dict(flat=2, kept=20, too_few=20) and st['unpaired_dropped'] == 1
    assert (st['sft'], st['dpo']) == (8, 12) and not {s['key'] for s in sft} & {d['key'] for d in dpo}
    assert all(d['source'] == 'A' and d['chosen'].startswith('a') for d in dpo)

MATH = [dict(key='m0', prompt='2+2?', domain='math', answer='4',
             responses=dict(A=['It is \\boxed{5}|0.9', 'So \\boxed{4}|0.3', 'Four: 4|0.35', 'maybe 6|0.1'])),
        dict(key='m1', prompt='3+3?', domain='math', answer='6', responses=dict(A=['6|0.5', '6.0|0.45']))]
CODE = [dict(key='c0', prompt='add one', domain='code', tests=['assert f(1) == 2', 'assert f(5) == 6'],
             responses=dict(A=['```python\ndef f(x):\n    return x + 2\n```|0.95', '```python\ndef f(x):\n    return x + 1\n```|0.5',
                               'def f(x) return x|0.05', '```python\ndef f(x):\n    return 1 + x\n```|0.52'])),
        dict(key='c1', prompt='double', domain='code', tests=['assert g(2) == 4'], responses=dict(A=['def g(x): return x|0.9', 'def g(x): return 0|0.8']))]

def test_math_and_code_gating(tmp_path):
    "Correctness comes first: the SFT target is the best *correct* response; pairs are correct vs incorrect; all-fail code prompts drop."
    cfg, res, sft, dpo = _records_run(tmp_path, MATH + CODE, ('A',), (0.0, 1.0))
    by = {s['key']: s['completion'] for s in sft}
    assert 'm1' in by and by['m1'] == '6'                       # no incorrect response: no pair, so SFT ('pair_first')
    assert {d['key']: (d['chosen'], d['rejected']) for d in dpo} == {
        'm0': ('Four: 4', 'maybe 6'),                                # the best correct (not the 0.9 wrong one) vs the worst wrong
        'c0': ('```python\ndef f(x):\n    return 1 + x\n```', 'def f(x) return x')}   # syntax error counts as failing
    assert 'm0' not in by and 'c0' not in by and 'c1' not in by     # 'pair_first': paired prompts go to DPO; c1 all fail
    st = res['build']['domains']
    assert st['code']['no_sft_target'] == {'all_fail': 1} and st['code']['pairs']['no_correct'] == 1
    assert st['math']['pairs'] == dict(kept=1, no_incorrect=1)
    sc = {r['key']: r for r in _lines(tmp_path/'run'/'score'/'A.jsonl')}
    assert sc['m0']['correct'] == [False, True, True, False] and sc['c0']['correct'] == [False, True, False, True]

def test_bad_inputs(tmp_path):
    good = [dict(key=0, prompt='q', domain='general', responses=dict(A=['x|0.5', 'y|0.45', '  ']))]
    with pytest.warns(UserWarning, match="1 empty response"): cfg, res, sft, dpo = _records_run(tmp_path/'e', good, ('A',), (0.01, 0.1))
    assert res['score']['A'] == dict(responses=2, scored_now=2, empty=1) and dpo[0]['rejected'] == 'y'
    with pytest.raises(ValueError, match="source 'A' returned no non-empty response"):
        _records_run(tmp_path/'n', [dict(key=0, prompt='q', domain='general', responses=dict(A=['', ' ']))], ('A',), (0.01, 0.1))
    with pytest.raises(ValueError, match=r"p.jsonl:1: a math prompt needs a gold 'answer'"):
        _records_run(tmp_path/'m', [dict(prompt='1+1', domain='math', responses=dict(A=['2|1']))], ('A',), (0.01, 0.1))
    with pytest.raises(ValueError, match=r"ships no list of strings under responses\['A'\]"):
        _records_run(tmp_path/'r', [dict(prompt='q', domain='general')], ('A',), (0.01, 0.1))
    with pytest.raises(ValueError, match="reward nan is not finite"):
        _records_run(tmp_path/'nan', [dict(key=0, prompt='q', domain='general', responses=dict(A=['xn|nan', 'yn|0.3']))], ('A',), (0.01, 0.1))
    cfg, *_ = _records_run(tmp_path/'w', [dict(key=0, prompt='q', domain='general', responses=dict(A=['xw|0.9', 'yw|0.1']))], ('A',), (0.01, 0.1))
    with pytest.raises(ValueError, match=r"build/dpo.jsonl is empty.*gap window \(0.01, 0.1\)"): fusechat3_dpo(FuseChat3Config(**{**cfg.__dict__, 'dpo_init': 'target'}), progress=False)
    with pytest.raises(ValueError, match='no reward: set reward_model'):
        fusechat3_score(FuseChat3Config(**{**cfg.__dict__, 'scorer': None}), progress=False)

def _tiny(d):
    corpus = [r['text'] for s in ('add', 'sort') for r in skill_data(s, 200, 0)]
    out = {}
    for name, kind, h in (('a', 'metaspace', 32), ('b', 'bytelevel', 48), ('t', 'bytelevel', 32)):
        tok = train_tokenizer(corpus, 150, kind=kind)
        tiny_lm(tok, hidden=h, layers=1, heads=2, kv_heads=1, seed=h).save_pretrained(d/name); tok.save_pretrained(d/name)
    recs = [dict(key=f'{s}{i}', prompt=r['prompt'], domain='general', answer=r['answer']) for s in ('sort', 'add') for i, r in enumerate(skill_data(s, 10, 1))]
    _jsonl(d/'p.jsonl', recs)
    (d/'cfg.yml').write_text("""sources: {a: a, b: b}
target: t
data: p.jsonl
scorer: fuselab.fusechat3:skill_reward
chat: false
gap_window: [0.0, 1.0]
source_defaults: {n: {default: 3}, max_new_tokens: 6, kwargs: {batch_size: 2}}
source_options: {b: {temperature: 0.7, top_p: 0.8}}
sft: {max_steps: 2, per_device_train_batch_size: 4, max_length: 64, save_steps: 1}
dpo: {max_steps: 2, per_device_train_batch_size: 4, max_length: 64, save_steps: 1}
""")

def test_cli_end_to_end_and_resume_after_sigkill(tmp_path):
    "`fuselab fusechat3 run` end to end; a second run, SIGKILLed mid-sampling and rerun, writes byte-identical samples, scores and datasets."
    _tiny(tmp_path)
    cmd = lambda out: [str(Path(sys.executable).parent/'fuselab'), 'fusechat3', 'run', str(tmp_path/'cfg.yml'), '--out', str(tmp_path/out), '--quiet']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    r = subprocess.run(cmd('full'), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    full = tmp_path/'full'
    for st in ('sft', 'dpo'): assert (full/st/'final'/'model.safetensors').exists() and (full/st/'results.json').exists()
    stats = json.loads((full/'build'/'stats.json').read_text())
    assert stats['prompts'] == 20 and stats['sft'] > 0 and stats['dpo'] > 0
    assert json.loads((full/'dpo'/'results.json').read_text())['pairs'] == stats['dpo']
    p = subprocess.Popen(cmd('killed'), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    cache, t0 = tmp_path/'killed'/'sample'/'a'/'cache', time.time()
    while not list(cache.glob('shard-*.jsonl')) and p.poll() is None and time.time() - t0 < 300: time.sleep(0.02)
    assert p.poll() is None, 'the run ended before sampling started: ' + p.stdout.read().decode()[-2000:]
    p.send_signal(signal.SIGKILL); p.wait()
    assert not (tmp_path/'killed'/'sample'/'b.jsonl').exists() and not (tmp_path/'killed'/'build').exists()
    cfg = FuseChat3Config.from_yaml(tmp_path/'cfg.yml'); cfg.out_dir = str(tmp_path/'killed')     # rerun (in-process: no second start-up)
    res = fusechat3_run(cfg, ('sample', 'score', 'build'), progress=False)
    assert 0 < res['sample']['a']['new_prompts'] < res['sample']['a']['prompts'] and res['sample']['b']['new_prompts'] == res['sample']['b']['prompts']
    for f in ('sample/a.jsonl', 'sample/b.jsonl', 'score/a.jsonl', 'score/b.jsonl', 'build/sft.jsonl', 'build/dpo.jsonl', 'build/stats.json'):
        assert (full/f).read_bytes() == (tmp_path/'killed'/f).read_bytes(), f
