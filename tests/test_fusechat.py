"FuseChat: MS token alignment against naive ports of the reference semantics, chat rendering, resumable pipeline, CLI."
import copy, json, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
import torch
from fuselab.core import IGNORE_INDEX
from fuselab.align import levenshtein as _lev     # plain-Python oracle (itself tested against rapidfuzz)
from fuselab.testing import real_tokenizer, train_tokenizer, tiny_lm, skill_data, CHAT_TEMPLATE
from fuselab.fusechat import (VocabTexts, ms_align, ms_token_counts, TokenCounts, ms_vocab_map, ms_id_map, ms_project_topk,
                              render_chat, encode_chat, chat_messages, chat_skill_records, FuseChatConfig, fusechat_run,
                              load_chat_records, _counts, _write_jsonl, load_tokenizer)

TEXTS = ['Tokenizers disagree about unbelievable words.', 'The  quick brown fox\njumps over 13 lazy dogs!',
         "Qwen's vocabulary: 151,643 tokens; Llama-2's: 32,000.", '  indented code:\n    return x**2  # square']

def _ref_dtw(src, tgt):
    "FuseChat `dtw(series_1=source, series_2=pivot)` with its `dist_fn` (empty-string rule), [diag, left, up] backtrack."
    def dist(a, b):
        aa, bb = a.replace(' ', ''), b.replace(' ', '')
        if not aa or not bb: aa, bb = a, b
        return _lev(aa, bb)
    M, N, inf = len(src), len(tgt), float('inf')
    D = [[inf] * (N + 1) for _ in range(M + 1)]; D[0][0] = 0
    for i in range(M):
        for j in range(N): D[i+1][j+1] = dist(src[i], tgt[j]) + min(D[i][j+1], D[i+1][j], D[i][j])
    D = [r[1:] for r in D[1:]]
    i, j, groups = M - 1, N - 1, [[] for _ in range(N)]
    while i > 0 or j > 0:
        groups[j].append(i)
        opts = [D[i-1][j-1] if i and j else inf, D[i][j-1] if j else inf, D[i-1][j] if i else inf]
        mv = int(np.argmin(opts))
        if mv == 0: i, j = i - 1, j - 1
        elif mv == 1: j -= 1
        else: i -= 1
    groups[0].append(0)
    return [sorted(g) for g in groups]

@pytest.mark.parametrize('src,tgt', [('gpt2', 'llama'), ('qwen', 'llama'), ('llama', 'gpt2'), ('bert', 'qwen')])
def test_ms_align_matches_reference_dtw(src, tgt):
    st, tt = real_tokenizer(src), real_tokenizer(tgt)
    sv, tv = VocabTexts(st), VocabTexts(tt)
    for text in TEXTS:
        si, ti = st(text, add_special_tokens=False)['input_ids'], tt(text, add_special_tokens=False)['input_ids']
        al = ms_align(sv, tv, si, ti)
        assert al.groups() == _ref_dtw([sv.norm[i] for i in si], [tv.norm[i] for i in ti]), text

def test_ms_align_hand_checked_spans():
    "GPT-2 source vs Llama pivot: spans read off by hand, including edit-distance DTW's known miss on 'unbelievable'."
    g, l = real_tokenizer('gpt2'), real_tokenizer('llama')
    text = 'Tokenizers disagree about unbelievable words.'
    si, ti = g(text, add_special_tokens=False)['input_ids'], l(text, add_special_tokens=False)['input_ids']
    gv, lv = VocabTexts(g), VocabTexts(l)
    got = [(lv.norm[t], [gv.norm[si[i]] for i in ms_align(gv, lv, si, ti)[j]]) for j, t in enumerate(ti)]
    assert got == [(' Token', ['Token']), ('izers', ['izers']), (' disagree', [' disagree']), (' about', [' about']),
                   (' un', [' about']), ('bel', [' about']), ('iev', [' about']), ('able', [' unbelievable']),
                   (' words', [' words']), ('.', ['.'])]
    # one pivot token over several source tokens: Llama ' indented' vs BERT-style pieces
    b = real_tokenizer('bert'); bv = VocabTexts(b)
    si = b('indented', add_special_tokens=False)['input_ids']; ti = l('indented', add_special_tokens=False)['input_ids']
    al = ms_align(bv, lv, si, ti)
    assert sum(len(al[j]) for j in range(len(ti))) >= len(si)

def _tiny_vocab(kind, n=150):
    ref = train_tokenizer(['x'], 50)
    texts = [r['text'] for sk in ('add', 'reverse') for r in chat_skill_records(ref, sk, 200, 0)]
    return train_tokenizer(texts, n, kind=kind)

def _pairs(st, tt, n=40):
    ref = train_tokenizer(['x'], 50)
    out = []
    for sk in ('add', 'reverse'):
        for r in chat_skill_records(ref, sk, n // 2, 3):
            out.append((st(r['text'], add_special_tokens=False)['input_ids'], tt(r['text'], add_special_tokens=False)['input_ids']))
    return out

def test_token_counts_equal_dense_reference():
    "Sparse counts == the reference's dense `matrix[t_j, ids] += 1` (a repeated source token in A(j) counted once)."
    st, tt = _tiny_vocab('wordpiece'), _tiny_vocab('bytelevel', 120)
    sv, tv = VocabTexts(st), VocabTexts(tt)
    pairs = _pairs(st, tt)
    dense = np.zeros((len(tv), len(sv)), np.int64)
    for s, t in pairs:
        groups = _ref_dtw([sv.norm[i] for i in s], [tv.norm[i] for i in t])
        for j, g in enumerate(groups): dense[t[j], [s[i] for i in g]] += 1
    c = ms_token_counts(pairs, sv, tv, flush=50)                    # small flush: exercises the coalescing
    assert np.array_equal(c.dense(), dense) and dense.sum() > len(pairs)

def _ref_vocab_map(dense, sv, tv, sigmoid_count):
    "Naive port of `token_align_mapping` (default align type): per source id, argmin over co-occurring pivot ids."
    g = np.full(len(sv), -1)
    for u in range(len(sv)):
        nz = np.nonzero(dense[:, u])[0]
        if not len(nz): continue
        scores = []
        for v in nz:
            a, b = sv.norm[u].replace(' ', ''), tv.norm[v].replace(' ', '')
            if not a or not b: a, b = sv.norm[u], tv.norm[v]
            d = _lev(a, b) * (0.1 if (a in b or b in a) else 1)
            scores.append((d / (1 + np.exp(-dense[v, u])), v) if sigmoid_count else (d, -dense[v, u], v))
        g[u] = min(scores)[-1]
    return g

@pytest.mark.parametrize('sigmoid_count', [False, True])
def test_vocab_map_equals_naive_reference(sigmoid_count):
    st, tt = _tiny_vocab('metaspace'), _tiny_vocab('bytelevel', 120)
    sv, tv = VocabTexts(st), VocabTexts(tt)
    c = ms_token_counts(_pairs(st, tt), sv, tv)
    ref = _ref_vocab_map(c.dense(), sv, tv, sigmoid_count)
    g = ms_vocab_map(c, sv, tv, sigmoid_count=sigmoid_count)       # no tokenizers: no BOS/EOS override
    assert np.array_equal(g, ref) and (g >= 0).sum() > 20
    g2 = ms_vocab_map(c, sv, tv, sigmoid_count, unmatched='unk', src_tok=st, tgt_tok=tt)
    assert (g2[g < 0] == tt.unk_token_id).all() and g2[st.eos_token_id] == tt.eos_token_id

def _ref_project(top_ids, top_lp, groups, si, ti, sv, tv, im, rule):
    "Per-position loop of the distribution-alignment rules (list-based dedupe keep-first), the notebook's table."
    rows = []
    for j, A in enumerate(groups):
        pick = None
        if len(A) == 1:
            a, b = sv.norm[si[A[0]]], tv.norm[ti[j]]
            if a.endswith(b) or b.endswith(a): pick = A[0]
        else:
            t = tv.strip[ti[j]]
            comp = [i for i in A if sv.strip[si[i]] and t and (t.endswith(sv.strip[si[i]]) or sv.strip[si[i]].endswith(t))]
            if comp and (rule == 'first' or len(comp) == 1): pick = comp[0]
            elif t:
                rest, last = t, None
                for i in A:
                    s = sv.strip[si[i]]
                    if s and rest.startswith(s): rest, last = rest[len(s):], i
                if not rest: pick = last
        row = []
        if pick is not None:
            for tid, lp in zip(top_ids[pick], top_lp[pick]):
                m = im[tid]
                if m >= 0 and np.isfinite(lp) and m not in [r[0] for r in row]: row.append((int(m), float(lp)))
        if not row and j + 1 < len(ti): row = [(int(ti[j + 1]), 0.0)]
        rows.append(row)
    return rows

@pytest.mark.parametrize('rule', ['unique', 'first'])
def test_project_equals_naive_rules(rule):
    st, tt = real_tokenizer('llama'), real_tokenizer('gpt2')       # SentencePiece source, byte-level pivot
    sv, tv = VocabTexts(st), VocabTexts(tt)
    rng = np.random.default_rng(0)
    im = ms_id_map(sv, tv, np.where(rng.random(len(sv)) < .5, rng.integers(0, len(tv), len(sv)), -1))
    for text in TEXTS:
        si, ti = st(text, add_special_tokens=False)['input_ids'], tt(text, add_special_tokens=False)['input_ids']
        top_ids = rng.integers(0, len(sv), (len(si), 6)); top_ids[:, 0] = np.r_[si[1:], si[-1]]
        top_lp = np.log(rng.dirichlet(np.ones(6), len(si))).astype(np.float32); top_lp[rng.random(top_lp.shape) < .1] = -np.inf
        al = ms_align(sv, tv, si, ti)
        p = ms_project_topk(top_ids, top_lp, al, si, ti, sv, tv, im, span_rule=rule)
        ref = _ref_project(top_ids, top_lp, al.groups(), si, ti, sv, tv, im, rule)
        got = [[(int(i), float(l)) for i, l in zip(p.ids[j], p.logprobs[j]) if np.isfinite(l)] for j in range(len(ti))]
        assert got == [[(i, pytest.approx(l)) for i, l in r] for r in ref], text
        assert p.stats['transferred'] > 0

def test_chat_spans_and_labels_multi_turn():
    tok = copy.deepcopy(real_tokenizer('gpt2')); tok.chat_template = CHAT_TEMPLATE   # a copy: real_tokenizer is cached and shared
    msgs = [dict(role='system', content='Be brief.'), dict(role='user', content='2+2?'), dict(role='assistant', content='4'),
            dict(role='user', content='And 3+3?'), dict(role='assistant', content='It is 6.')]
    text, spans = render_chat(tok, msgs)
    assert [text[a:b] for a, b in spans] == [' 4</s>', ' It is 6.</s>']
    e = encode_chat(tok, text, spans, 0)
    lab = [i for i in e['labels'] if i != IGNORE_INDEX]
    assert tok.decode(lab).startswith(' 4</s>') and tok.decode(lab).endswith(' It is 6.</s>')   # GPT-2 has no '</s>' token:
    off = tok(text, add_special_tokens=False, return_offsets_mapping=True)['offset_mapping']        # a boundary token
    on = [any(a < e and b > s for s, e in spans) for a, b in off]                                  # that overlaps is labelled
    assert [l != IGNORE_INDEX for l in e['labels']] == on and 0 < sum(on) < len(on)
    tiny = train_tokenizer([text], 80)                                                             # '</s>' special: exact
    t2, sp2 = render_chat(tiny, msgs); e2 = encode_chat(tiny, t2, sp2, 0)
    assert tiny.decode([i for i in e2['labels'] if i != IGNORE_INDEX]) == ' 4</s> It is 6.</s>'
    tok2 = real_tokenizer('llama')
    with pytest.raises(ValueError, match='no chat_template'): render_chat(tok2, msgs)
    with pytest.raises(ValueError, match='no assistant turn'): chat_messages(dict(messages=msgs[:2]))

def test_counts_resume_after_crash(tmp_path):
    "A statistics pass killed mid-way resumes from its saved partial counts and ends with the uninterrupted counts."
    st, tt = _tiny_vocab('wordpiece'), _tiny_vocab('bytelevel', 120)
    sv, tv = VocabTexts(st), VocabTexts(tt)
    pairs = _pairs(st, tt, 40)
    cfg = FuseChatConfig(pivot='p', sources=dict(s='s'), data='d', count_every=7)
    broken = pairs[:20] + [([], pairs[20][1])] + pairs[21:]           # an empty tokenization crashes the 3rd chunk
    with pytest.raises(ValueError, match='empty token sequences'): _counts(tmp_path, broken, sv, tv, cfg, False)
    assert json.loads((tmp_path/'counts.partial.json').read_text())['records'] == 14 and not (tmp_path/'counts.npz').exists()
    resumed = _counts(tmp_path, pairs, sv, tv, cfg, False)
    assert np.array_equal(resumed.dense(), ms_token_counts(pairs, sv, tv).dense())
    assert not (tmp_path/'counts.partial.npz').exists()

def _setup(d, n=16):
    ref = train_tokenizer(['x'], 50); models = {}
    texts = [r['text'] for sk in ('add', 'reverse') for r in chat_skill_records(ref, sk, 200, 0)]
    for name, kind in (('add', 'metaspace'), ('rev', 'wordpiece'), ('pivot', 'bytelevel')):
        tok = train_tokenizer(texts, 150, kind=kind)
        tiny_lm(tok, hidden=32, layers=1, heads=2, kv_heads=1, seed=len(name)).save_pretrained(d/name); tok.save_pretrained(d/name)
        models[name] = str(d/name)
    _write_jsonl(d/'chat.jsonl', [dict(prompt=r['prompt'], completion=r['answer']) for sk in ('add', 'reverse') for r in skill_data(sk, n // 2, 7)])
    return models

def test_extract_ce_is_response_only(tmp_path):
    "The pivot's stored sequence CE is the mean next-token NLL over the assistant tokens only (MinCE's score)."
    m = _setup(tmp_path)
    cfg = FuseChatConfig(pivot=m['pivot'], sources=dict(add=m['add']), data=str(tmp_path/'chat.jsonl'), out_dir=str(tmp_path/'run'), k=4)
    fusechat_run(cfg, stages=('extract',), progress=False)
    from fuselab.data import TopKStore
    from transformers import AutoModelForCausalLM
    tok, model = load_tokenizer(m['pivot']), AutoModelForCausalLM.from_pretrained(m['pivot'])
    rec = load_chat_records(tmp_path/'chat.jsonl')[3]
    text, spans = render_chat(tok, rec['messages']); e = encode_chat(tok, text, spans, rec['key'])
    ids, lab = torch.tensor([e['input_ids']]), torch.tensor(e['labels'][1:])
    with torch.no_grad(): lp = model(ids).logits[0, :-1].log_softmax(-1)
    keep = lab != IGNORE_INDEX
    ce = -lp[keep].gather(-1, lab[keep][:, None]).mean()
    assert keep.sum() < len(lab) / 2                                    # the prompt is most of the text
    assert TopKStore(tmp_path/'run'/'extract'/'pivot')[rec['key']].seq_value == pytest.approx(float(ce), rel=1e-4)

def test_pipeline_cli_resume_and_merge(tmp_path):
    "`fuselab fusechat run` end to end (extract, align, train, merge), a rerun resumes, the merged model loads and runs."
    m = _setup(tmp_path)
    (tmp_path/'fc.yml').write_text(f"""
pivot: pivot
sources: {{add: add, rev: rev}}
data: chat.jsonl
out_dir: run
k: 4
train: {{max_steps: 2, per_device_train_batch_size: 8, learning_rate: 1.0e-3}}
merge: [{{merge_method: sce, parameters: {{select_topk: 0.5}}}}, {{merge_method: varm}}]
""")
    cmd = [str(Path(sys.executable).parent/'fuselab'), 'fusechat', 'run', str(tmp_path/'fc.yml'), '--quiet']
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path/'run'
    for n in ('add', 'rev'):
        assert (run/'train'/n/'results.json').exists() and (run/'align'/n/'counts.npz').exists()
        assert json.loads((run/'align'/n/'stats.json').read_text())['sequences'] == 16
    r2 = subprocess.run(cmd, capture_output=True, text=True)
    assert r2.returncode == 0, r2.stderr[-3000:]
    from transformers import AutoModelForCausalLM
    tok = load_tokenizer(run/'merged'/'sce')
    for name in ('sce', 'varm'):
        model = AutoModelForCausalLM.from_pretrained(run/'merged'/name)
        out = model(**tok('<s>user: 1+1=</s>', return_tensors='pt'))
        assert torch.isfinite(out.logits).all()
    a = AutoModelForCausalLM.from_pretrained(run/'train'/'add'/'final').state_dict()
    b = AutoModelForCausalLM.from_pretrained(run/'train'/'rev'/'final').state_dict()
    v = AutoModelForCausalLM.from_pretrained(run/'merged'/'varm').state_dict()
    k = 'model.layers.0.mlp.up_proj.weight'
    assert not torch.equal(a[k], b[k]) and not torch.equal(v[k], a[k])

def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unmatched='none'"): FuseChatConfig(pivot='p', sources=dict(s='s'), data='d', unmatched='none')
    with pytest.raises(ValueError, match='sources is empty'): FuseChatConfig(pivot='p', sources={}, data='d')
    with pytest.raises(ValueError, match='distinct `name`'):
        FuseChatConfig(pivot='p', sources=dict(s='s'), data='d', merge=[dict(merge_method='sce'), dict(merge_method='sce')])
    (tmp_path/'x.yml').write_text('pivot: p\nsources: {s: s}\ndata: d\nlr: 1\n')
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['lr'\]"): FuseChatConfig.from_yaml(tmp_path/'x.yml')

def test_same_text_keeps_template_markers():
    "A source that reads the pivot's special markers ('<s>') as plain text still covers the same characters."
    from collections import defaultdict
    from fuselab.fusechat import _same_text
    piv, g = _tiny_vocab('bytelevel', 120), real_tokenizer('gpt2')
    text, spans = render_chat(piv, chat_messages(dict(prompt='12+30=', completion='42')))
    st = defaultdict(int)
    assert _same_text(g, encode_chat(g, text, spans, 0), piv, encode_chat(piv, text, spans, 0), st)
    with pytest.warns(UserWarning, match='sequence skipped'):
        assert not _same_text(g, encode_chat(g, text + 'x', spans, 0), piv, encode_chat(piv, text, spans, 0), st)
    assert st['text_mismatch'] == 1
