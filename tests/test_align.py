"Oracle tests for fuselab.align: fast DTW == reference DTW on real tokenizers, MinED == brute-force scan, projection rules."
import subprocess, sys, textwrap
import numpy as np, pytest
import editdistance
from fuselab.align import (dtw_align, dtw_reference, dtw_cost, dtw_matrix, offset_align, align_texts, token_texts,
                           mined_vocab_map, project_topk, alignment_from_pairs, levenshtein, strip_token, check_same_text)
from fuselab.testing import real_tokenizer

TEXT = ("In 1969, Apollo 11 landed on the Moon; Neil Armstrong's first words were broadcast worldwide.\n"
        "Dynamic time warping aligns two sequences whose elements drift: e.g. 'tokenization' vs 'token', 'ization'. "
        "Prices rose 3.75% to $1,024.50 — naïve café owners (ünïcode!) complained.\n\tIndented code: x = f(y) + 42")

@pytest.fixture(scope='module')
def toks(): return {n: real_tokenizer(n) for n in ('gpt2', 'llama', 'qwen')}

def _tokens(tok, text): return tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)['input_ids'])

def test_hand_made():
    al = dtw_align(['▁Hello', '▁world'], ['Hel', 'lo', 'Ġworld'])
    assert al.groups() == [[0], [0], [1]] and al.path.tolist() == [[0, 0], [0, 1], [1, 2]]
    assert strip_token('▁Hello') == strip_token('ĠHello') == strip_token('Hello')
    assert dtw_align(['x'], ['x']).groups() == [[0]]

@pytest.mark.parametrize('pair', [('gpt2', 'llama'), ('llama', 'qwen'), ('qwen', 'gpt2')])
@pytest.mark.parametrize('tiebreak', ['fusellm', 'fusechat'])
def test_fast_equals_reference_real(toks, pair, tiebreak):
    s, t = _tokens(toks[pair[0]], TEXT), _tokens(toks[pair[1]], TEXT)
    ref = dtw_reference(s, t, tiebreak, dist=editdistance.eval)
    fast = dtw_align(s, t, tiebreak, workers=2)
    assert fast.path.tolist() == [list(p) for p in ref]
    assert len(fast) == len(t) and sorted(set(fast.src.tolist())) == list(range(len(s)))

def test_tiebreak_orders_differ_and_match_reference():
    rng = np.random.default_rng(0); differ = 0
    for _ in range(200):
        s = [''.join(rng.choice(list('ab'), rng.integers(1, 3))) for _ in range(rng.integers(1, 6))]
        t = [''.join(rng.choice(list('ab'), rng.integers(1, 3))) for _ in range(rng.integers(1, 6))]
        for tb in ('fusellm', 'fusechat'):
            assert dtw_align(s, t, tb).path.tolist() == [list(p) for p in dtw_reference(s, t, tb)]
        differ += dtw_reference(s, t, 'fusellm') != dtw_reference(s, t, 'fusechat')
    assert differ > 0

def test_dtw_matrix_against_loop():
    rng = np.random.default_rng(1); C = rng.integers(0, 5, (7, 9))
    D = np.full((8, 10), np.inf); D[0, 0] = 0
    for i in range(7):
        for j in range(9): D[i+1, j+1] = C[i, j] + min(D[i, j], D[i, j+1], D[i+1, j])
    np.testing.assert_array_equal(dtw_matrix(C), D[1:, 1:])

def test_dtw_matrix_both_orientations():
    "The DP runs over the shorter side and is transposed back: tall, wide, square and one-row/column matrices."
    rng = np.random.default_rng(3)
    for shape in [(9, 7), (7, 9), (1, 5), (5, 1), (6, 6)]:
        C = rng.integers(0, 5, shape)
        D = np.full((shape[0] + 1, shape[1] + 1), np.inf); D[0, 0] = 0
        for i in range(shape[0]):
            for j in range(shape[1]): D[i+1, j+1] = C[i, j] + min(D[i, j], D[i, j+1], D[i+1, j])
        np.testing.assert_array_equal(dtw_matrix(C), D[1:, 1:])

def test_rapidfuzz_cost_equals_python():
    s, t = ['▁naïve', 'Ġcaf', 'é', '##abs', '<0x0A>'], ['naive', 'café', 'Ċ', 'tabs']
    C = dtw_cost(s, t)
    assert C.tolist() == [[levenshtein(strip_token(a), strip_token(b)) for b in t] for a in s]

def test_offsets_agreement(toks):
    for a, b in [('gpt2', 'llama'), ('gpt2', 'qwen')]:
        _, _, ad = align_texts(TEXT, toks[a], toks[b]); _, _, ao = align_texts(TEXT, toks[a], toks[b], method='offsets')
        agree = np.mean([x == y for x, y in zip(ad.groups(), ao.groups())])
        assert agree > 0.6, (a, b, agree)

def test_offset_align_bruteforce():
    rng = np.random.default_rng(2)
    for _ in range(50):
        cs = np.unique(np.r_[0, rng.integers(1, 30, 6), 30]); ct = np.unique(np.r_[0, rng.integers(1, 30, 6), 30])
        so, to = np.stack([cs[:-1], cs[1:]], 1), np.stack([ct[:-1], ct[1:]], 1)
        want = [[i for i, (a, b) in enumerate(so) if a < e and b > s] for s, e in to]
        assert offset_align(so, to).groups() == want

def test_text_mismatch_error(toks):
    g, l = toks['gpt2'], toks['llama']
    with pytest.raises(ValueError, match='cover different text'):
        check_same_text(g, g('Hello world')['input_ids'], l, l('Hello there', add_special_tokens=False)['input_ids'])
    with pytest.raises(ValueError, match='empty token sequences'): dtw_align([], ['a'])

def _brute(q, T):
    d = [editdistance.eval(q, v) for v in T]
    return int(np.argmin(d)), int(min(d))   # argmin: first (smallest id) on ties

def test_mined_equals_bruteforce(toks):
    S, T = token_texts(toks['qwen']), token_texts(toks['llama'])
    exact = set(T)
    rng = np.random.default_rng(0)
    need = [i for i in rng.permutation(len(S))[:3000] if S[i] not in exact][:100]
    m, d = mined_vocab_map(S, T, ids=need, return_dist=True, workers=2)
    assert m.dtype == np.int32 and len(m) == 100 and (d > 0).all()
    for i, mi, di in zip(need, m, d): assert (int(mi), int(di)) == _brute(S[i], T), (S[i], T[mi])

def test_mined_small_blocks_and_ties_equal_bruteforce():
    "Id-ordered block scan with early stop and length cut: exact minimum, smallest id on ties, for any block size."
    rng = np.random.default_rng(4)
    T = list(dict.fromkeys(''.join(rng.choice(list('abc'), rng.integers(1, 7))) for _ in range(400)))
    S = [''.join(rng.choice(list('abcd'), rng.integers(0, 9))) for _ in range(300)]      # duplicates, exact hits, ''
    for block, max_bytes in [(1, 1 << 20), (3, 64), (2048, 256 << 20)]:
        m, d = mined_vocab_map(S, T, block=block, max_bytes=max_bytes, workers=1, return_dist=True)
        for q, mi, di in zip(S, m, d): assert (int(mi), int(di)) == _brute(q, T), (q, block)

def test_mined_exact_and_full_length(toks):
    g = toks['gpt2']; T = token_texts(toks['llama'])
    m = mined_vocab_map(['a', ' the', 'zzzzqqq'], T)
    assert T[m[0]] == 'a' and T[m[1]] == ' the' and m[0] == T.index('a')
    full = mined_vocab_map(T[:500], T, workers=2)
    assert len(full) == 500 and all(T[full[i]] == T[i] for i in range(500))

def test_projection_rules():
    vm = np.array([3, 0, 1, 1, 2])
    al = alignment_from_pairs([(0, 0), (1, 0), (2, 1), (3, 1), (4, 2)], 5, 3)
    top = np.array([[0, 1, 2], [1, 0, 4], [2, 3, 4], [3, 2, 4], [4, 3, 2]])
    lp = np.log(np.array([[.5, .3, .2]] * 5, np.float32))
    p = project_topk(top, lp, al, [0, 1, 2, 3, 4], [0, 1, 2], vm)
    assert p.ids.dtype == np.int32 and p.logprobs.dtype == np.float32 and p.ids.shape == (3, 3)
    assert p.transferred.tolist() == [False, False, True] and p.ids[2].tolist() == [2, 1, 0]
    assert p.logprobs[2, 2] == -np.inf and p.ids[:2, 0].tolist() == [1, 2]
    pc = project_topk(top, lp, al, [0, 1, 2, 3, 4], [0, 1, 2], vm, onehot_fallback='current')
    assert pc.ids[:2, 0].tolist() == [0, 1] and (pc.logprobs[:2, 1:] == -np.inf).all()
    # 1-to-1 where only the *string* map matches (m(s_i) == t_j): transferred
    al1 = alignment_from_pairs([(0, 0)], 1, 1)
    p1 = project_topk(np.array([[1, 2]]), np.log([[.7, .3]]), al1, [1], [0], vm)
    assert p1.transferred.tolist() == [True] and p1.ids.tolist() == [[0, 1]]
    with pytest.raises(ValueError, match='len\\(vocab_map\\)=2'): project_topk(top, lp, al, range(5), range(3), np.arange(2))

def test_projection_empty_rows():
    I = alignment_from_pairs([(k, k) for k in range(3)], 3, 3)
    top, lp = np.zeros((3, 2), int), np.full((3, 2), -np.inf, np.float32); lp[0] = [0, -1]
    p = project_topk(top, lp, I, [0, 1, 2], [0, 1, 2], np.arange(3), onehot_fallback='current')
    assert p.transferred.tolist() == [True, False, False] and p.stats['empty_src_rows'] == 2
    assert p.ids[1:, 0].tolist() == [1, 2] and (p.logprobs[1:, 0] == 0).all() and p.valid.all()

def test_layering_no_transformers():
    code = textwrap.dedent('''
        import sys, importlib.abc
        class B(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split('.')[0] in ('transformers', 'tokenizers', 'datasets', 'trl', 'peft'): raise ImportError(name)
        sys.meta_path.insert(0, B()); import fuselab.align; print('ok')''')
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert r.stdout.strip() == 'ok', r.stderr[-1000:]
