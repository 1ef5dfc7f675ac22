"Oracle tests for fuselab.losses: sparse soft-CE against the dense FuseLLM target, chunked vs logits, fusion weights."
import math, warnings
import pytest, torch
import torch.nn.functional as F
from fuselab.core import TopK
from fuselab.losses import sparse_soft_ce, chunked_sparse_soft_ce, fusellm_select, combine_topk, fusion_loss

def dense_target(ids, lps, V, T=1.0, renormalize=True):
    "Densify a top-k teacher the way the FuseLLM collator does: scatter softmax(lps/T) into a V-vector."
    lps = lps.double()
    empty = torch.isneginf(lps).all(-1, keepdim=True)
    p = torch.softmax(torch.where(empty, 0., lps) / T, -1) if renormalize else lps.exp()
    p = torch.where(empty, 0., p)
    return torch.zeros(*ids.shape[:-1], V, dtype=torch.float64).scatter_add_(-1, torch.where(torch.isneginf(lps), 0, ids).long(), p)

def dense_ce(z, ids, lps, mask, T=1.0, renormalize=True):
    P = dense_target(ids, lps, z.shape[-1], T, renormalize)
    ce = -(P * F.log_softmax(z, -1)).sum(-1)
    valid = mask & ~torch.isneginf(lps).all(-1)
    return ce, valid

def make(B, T, V, K, seed, empty=True, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, V, dtype=dtype, generator=g) * 2
    ids = torch.randint(0, V, (B, T, K), generator=g)
    lps = torch.log_softmax(torch.randn(B, T, K, dtype=torch.float64, generator=g) * 2, -1)
    if K > 1: lps[..., -1] = float('-inf')                         # a padded slot
    if empty and T > 1: lps[0, 1] = float('-inf')                  # an empty row
    mask = torch.rand(B, T, generator=g) > 0.2; mask[:, 0] = True
    return z, ids, lps, mask

SHAPES = [(1, 1, 3, 1), (2, 5, 11, 3), (3, 7, 50, 10), (2, 4, 8, 8)]

@pytest.mark.parametrize('B,T,V,K', SHAPES)
@pytest.mark.parametrize('temp', [1.0, 0.5, 2.0])
@pytest.mark.parametrize('reduction', ['none', 'sequence', 'batch'])
def test_sparse_equals_dense_fp64(B, T, V, K, temp, reduction):
    z, ids, lps, mask = make(B, T, V, K, seed=B * 1000 + T * 10 + K)
    ce_ref, valid = dense_ce(z, ids, lps, mask, temp)
    ref = {'none': torch.where(valid, ce_ref, 0.),
           'sequence': (ce_ref * valid).sum(-1) / valid.sum(-1).clamp_min(1),
           'batch': (ce_ref * valid).sum() / valid.sum()}[reduction]
    zs, zd = z.clone().requires_grad_(), z.clone().requires_grad_()
    out, st = sparse_soft_ce(zs, ids, lps, mask, temperature=temp, reduction=reduction)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert st['n_tokens'] == int(valid.sum()) and st['n_empty'] == int((mask & ~valid).sum())
    up = torch.randn(out.shape, dtype=torch.float64)
    ref_d = {'none': torch.where(valid, dense_ce(zd, ids, lps, mask, temp)[0], 0.),
             'sequence': (dense_ce(zd, ids, lps, mask, temp)[0] * valid).sum(-1) / valid.sum(-1).clamp_min(1),
             'batch': (dense_ce(zd, ids, lps, mask, temp)[0] * valid).sum() / valid.sum()}[reduction]
    gs, = torch.autograd.grad((out * up).sum(), zs)
    gd, = torch.autograd.grad((ref_d * up).sum(), zd)
    torch.testing.assert_close(gs, gd, rtol=1e-10, atol=1e-10)

@pytest.mark.parametrize('B,T,V,K', SHAPES)
def test_no_renormalize_equals_dense(B, T, V, K):
    z, ids, lps, mask = make(B, T, V, K, seed=7 + K)
    lps = lps + math.log(0.8)                              # stored log-probs over the full vocab, 20% tail dropped
    ce_ref, valid = dense_ce(z, ids, lps, mask, renormalize=False)
    out, _ = sparse_soft_ce(z, ids, lps, mask, renormalize=False, reduction='none')
    torch.testing.assert_close(out, torch.where(valid, ce_ref, 0.), rtol=1e-10, atol=1e-10)

def test_full_support_is_full_ce():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 3, 9, dtype=torch.float64, generator=g)
    P = torch.softmax(torch.randn(2, 3, 9, dtype=torch.float64, generator=g), -1)
    ids = torch.stack([torch.randperm(9, generator=g) for _ in range(6)]).view(2, 3, 9)   # K = V, shuffled
    mask = torch.ones(2, 3, dtype=torch.bool)
    for rn in (True, False):
        out, _ = sparse_soft_ce(z, ids, P.gather(-1, ids).log(), mask, renormalize=rn, reduction='none')
        torch.testing.assert_close(out, -(P * F.log_softmax(z, -1)).sum(-1), rtol=1e-12, atol=1e-12)

def test_duplicate_ids_add():
    z = torch.randn(1, 1, 5, dtype=torch.float64)
    m = torch.ones(1, 1, dtype=torch.bool)
    a, _ = sparse_soft_ce(z, torch.tensor([[[2, 2, 4]]]), torch.tensor([[[0.25, 0.25, 0.5]]], dtype=torch.float64).log(), m)
    b, _ = sparse_soft_ce(z, torch.tensor([[[2, 4]]]), torch.tensor([[[0.5, 0.5]]], dtype=torch.float64).log(), m)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

def test_gradcheck():
    z, ids, lps, mask = make(2, 3, 5, 3, seed=3)
    zz = z.clone().requires_grad_()
    for red in ('none', 'sequence', 'batch'):
        assert torch.autograd.gradcheck(lambda x: sparse_soft_ce(x, ids, lps, mask, temperature=1.7, reduction=red)[0], (zz,))

def test_empty_rows_excluded_and_counted():
    z, ids, lps, mask = make(2, 4, 6, 3, seed=5, empty=False)
    mask[:] = True
    lps[0, 1] = float('-inf'); lps[1, :] = float('-inf')   # one empty position, one fully empty sequence
    out, st = sparse_soft_ce(z, ids, lps, mask)
    assert st['n_empty'] == 5 and st['n_tokens'] == 3
    assert torch.isfinite(out).all() and out[1] == 0
    ref, _ = dense_ce(z, ids, lps, mask)
    torch.testing.assert_close(out[0], ref[0, [0, 2, 3]].mean())
    lb, _ = sparse_soft_ce(z, ids, lps, mask, reduction='batch')
    assert torch.isfinite(lb)

def test_bf16_logits_close_to_fp64():
    z, ids, lps, mask = make(2, 6, 40, 5, seed=11)
    ref, _ = sparse_soft_ce(z, ids, lps, mask)
    out, _ = sparse_soft_ce(z.bfloat16(), ids.int(), lps.float(), mask)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)

@pytest.mark.parametrize('B,T,H,V,K,chunk', [(1, 1, 4, 3, 2, 1), (2, 5, 8, 37, 4, 3), (3, 7, 16, 64, 10, 1024)])
@pytest.mark.parametrize('bias', [False, True])
def test_chunked_equals_logits(B, T, H, V, K, chunk, bias):
    _, ids, lps, mask = make(B, T, V, K, seed=H + V)
    g = torch.Generator().manual_seed(V)
    h = torch.randn(B, T, H, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(V, H, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, generator=g, requires_grad=True) if bias else None
    params = [p for p in (h, W, b) if p is not None]
    for red in ('none', 'sequence', 'batch'):
        lc, sc = chunked_sparse_soft_ce(h, W, ids, lps, mask, bias=b, temperature=1.3, reduction=red, chunk_size=chunk)
        lr, sr = sparse_soft_ce(h @ W.T + (0 if b is None else b), ids, lps, mask, temperature=1.3, reduction=red)
        assert sc == sr
        torch.testing.assert_close(lc, lr, rtol=1e-10, atol=1e-10)
        up = torch.randn(lc.shape, dtype=torch.float64, generator=g)
        for a, r in zip(torch.autograd.grad((lc * up).sum(), params), torch.autograd.grad((lr * up).sum(), params)):
            torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)

def test_chunked_fp32_and_gradcheck():
    _, ids, lps, mask = make(2, 3, 6, 3, seed=2)
    h = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    W = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h, W: chunked_sparse_soft_ce(h, W, ids, lps, mask, chunk_size=2)[0], (h, W))
    lc, _ = chunked_sparse_soft_ce(h.float(), W.float(), ids, lps.float(), mask, chunk_size=4)
    lr, _ = sparse_soft_ce(h @ W.T, ids, lps, mask)
    torch.testing.assert_close(lc.double(), lr, rtol=1e-5, atol=1e-5)

def test_minCE_picks_lowest():
    g = torch.Generator().manual_seed(0)
    ce = torch.rand(20, 4, generator=g) * 3
    w, st = fusellm_select(ce, 'minCE')
    assert (w.argmax(-1) == ce.argmin(-1)).all() and (w.sum(-1) == 1).all() and ((w == 0) | (w == 1)).all()
    assert st['n_nan'] == 0 and abs(sum(st['teacher_share']) - 1) < 1e-6

@pytest.mark.parametrize('kind,f', [('softmax_exp_neg_ce', lambda c: torch.exp(-c)), ('softmax_neg_ce', lambda c: -c)])
def test_avgCE_weights(kind, f):
    ce = torch.rand(10, 3, dtype=torch.float64) * 4
    w, _ = fusellm_select(ce, 'avgCE', kind)
    torch.testing.assert_close(w.sum(-1), torch.ones(10, dtype=torch.float64))
    e = torch.exp(f(ce)); torch.testing.assert_close(w, e / e.sum(-1, keepdim=True))

def test_select_nan():
    ce = torch.tensor([[1.0, float('nan'), 0.5], [float('nan'), 2.0, 3.0]])
    with pytest.warns(UserWarning, match='2 teacher CE value'):
        w, st = fusellm_select(ce, 'minCE')
    assert w.tolist() == [[0, 0, 1], [0, 1, 0]] and st['n_nan'] == 2
    with pytest.warns(UserWarning):
        w, _ = fusellm_select(ce, 'avgCE')
    assert w[0, 1] == 0 and w[1, 0] == 0 and torch.allclose(w.sum(-1), torch.ones(2))
    with pytest.raises(ValueError, match=r'sequence\(s\) \[0\]'):
        fusellm_select(torch.tensor([[float('nan')] * 2, [1.0, 2.0]]))

@pytest.mark.parametrize('mode', ['minCE', 'avgCE'])
@pytest.mark.parametrize('temp', [1.0, 2.0])
def test_linearity_identity(mode, temp):
    B, T, V, M = 3, 5, 13, 3
    teachers = []
    for m in range(M):
        _, ids, lps, _ = make(B, T, V, 2 + m, seed=50 + m, empty=False)
        teachers.append(TopK(ids, lps))
    z, _, _, mask = make(B, T, V, 1, seed=99)
    ce_seq = torch.stack([sparse_soft_ce(z, t.ids, t.logprobs, mask, temperature=temp)[0] for t in teachers], -1)  # (B,M)
    w, _ = fusellm_select(ce_seq, mode)
    fused = combine_topk(teachers, w, temperature=temp)
    for red in ('none', 'sequence'):
        per = torch.stack([sparse_soft_ce(z, t.ids, t.logprobs, mask, temperature=temp, reduction=red)[0] for t in teachers], -1)
        lhs = (per * (w if red == 'sequence' else w[:, None, :])).sum(-1)
        rhs, _ = sparse_soft_ce(z, fused.ids, fused.logprobs, mask, reduction=red)
        torch.testing.assert_close(rhs, lhs, rtol=1e-10, atol=1e-10)
    # and the dense fused target gives the same value
    P = sum(w[:, m, None, None] * dense_target(t.ids, t.logprobs, V, temp) for m, t in enumerate(teachers))
    ref = -(P * F.log_softmax(z, -1)).sum(-1)
    torch.testing.assert_close(sparse_soft_ce(z, fused.ids, fused.logprobs, mask, reduction='none')[0], torch.where(mask, ref, 0.))

def test_fusion_loss():
    clm, sce = torch.tensor([2.0, 1.0]), torch.tensor([4.0, 3.0])
    torch.testing.assert_close(fusion_loss(clm, sce), torch.tensor([2.2, 1.2]))
    torch.testing.assert_close(fusion_loss(clm, sce, 1.0), clm)
    torch.testing.assert_close(fusion_loss(clm, sce, 0.0), sce)

@pytest.mark.parametrize('call,msg', [
    (lambda z, i, l, m: sparse_soft_ce(z, i, l[..., :2], m), 'topk_logprobs shape'),
    (lambda z, i, l, m: sparse_soft_ce(z[:, :2], i, l, m), 'disagree on the positions'),
    (lambda z, i, l, m: sparse_soft_ce(z, i, l, m[:, :1]), 'mask shape'),
    (lambda z, i, l, m: sparse_soft_ce(z, i + 6, l, m), 'outside the student vocabulary [0, 6)'),
    (lambda z, i, l, m: sparse_soft_ce(z, i - 10, l, m), 'outside the student vocabulary'),
    (lambda z, i, l, m: sparse_soft_ce(z, i.double(), l, m), 'pass integer token ids'),
    (lambda z, i, l, m: sparse_soft_ce(z, i, l, m, temperature=0), 'temperature=0 must be > 0'),
    (lambda z, i, l, m: sparse_soft_ce(z, i, l + 1.0, m, renormalize=False), 'use renormalize=True'),
    (lambda z, i, l, m: sparse_soft_ce(z, i, l.clone().fill_(float('nan')), m), 'NaN/+inf'),
    (lambda z, i, l, m: sparse_soft_ce(z, i, l, m, reduction='sum'), "reduction='sum'"),
    (lambda z, i, l, m: chunked_sparse_soft_ce(z[..., :4], torch.randn(6, 5, dtype=z.dtype), i, l, m), 'hidden size 4 != LM head width 5'),
    (lambda z, i, l, m: fusion_loss(torch.tensor(1.), torch.tensor(1.), lmbda=-0.1), 'lmbda=-0.1 must be in [0, 1]'),
    (lambda z, i, l, m: fusion_loss(torch.tensor(1.), torch.tensor(1.), lmbda=1.01), 'lmbda=1.01'),
    (lambda z, i, l, m: fusellm_select(torch.rand(2, 3), 'avgCE', 'softmax'), "avgce_weights='softmax'"),
    (lambda z, i, l, m: combine_topk([TopK(i, l)], torch.ones(2, 2)), 'must be (B, M=1)'),
])
def test_bad_inputs(call, msg):
    z, ids, lps, mask = make(2, 3, 6, 3, seed=0, empty=False)
    with pytest.raises(ValueError) as e: call(z, ids, lps, mask)
    assert msg in str(e.value), str(e.value)
