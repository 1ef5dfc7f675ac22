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


# ---------------------------------------------------------------------------------------------------------------
# Preference losses: independent oracles (TRL 1.16 trainers on a tiny random LM, gradcheck, bf16, naive loops)
# ---------------------------------------------------------------------------------------------------------------
import copy
from fuselab.losses import (sequence_logps, dpo_loss, ipo_loss, simpo_loss, bt_loss, wrpo_loss, reward_weights,
                            weighted_sft_loss, rloo_advantages, rloo_loss)

PREFS = [dict(prompt='Q: what is two plus two? A:', chosen=' four', rejected=' five, I think, or maybe six'),
         dict(prompt='Q: name a colour. A:', chosen=' red is a colour that many people like', rejected=' dog'),
         dict(prompt='Tell me a story:', chosen=' once upon a time', rejected=' no'),
         dict(prompt='Q: capital of France? A:', chosen=' Paris', rejected=' London, probably')]

def _perturb(model, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters(): p.add_(torch.randn(p.shape, generator=g) * scale)
    return model

@pytest.fixture(scope='module')
def pref_models():
    "A real (trained) byte-level BPE tokenizer, a tiny policy and a DIFFERENT reference, and the preference dataset."
    datasets = pytest.importorskip('datasets')
    from fuselab.testing import tiny_lm, train_tokenizer
    tok = train_tokenizer([ex[k] for ex in PREFS for k in ex] * 5, vocab_size=300)
    base = tiny_lm(tok, hidden=32, layers=2, heads=4, kv_heads=2, seed=0)
    pol, ref = _perturb(copy.deepcopy(base), 1), _perturb(copy.deepcopy(base), 2)
    return tok, pol.eval(), ref.eval(), datasets.Dataset.from_list(PREFS)

def _oracle_logps(model, input_ids, attention_mask, completion_mask, grad=False):
    "Summed completion log-probs and completion lengths per row: one unpadded plain forward per row, log_softmax, gather."
    sums, lens, per_tok = [], [], []
    with torch.set_grad_enabled(grad):
        for ids, am, cm in zip(input_ids, attention_mask, completion_mask):
            keep = am.bool(); ids, cm = ids[keep], cm[keep].bool()
            assert not cm[0]                                    # a prompt token comes first: every completion token is scored
            logits = model(input_ids=ids[None]).logits[0].double()
            lp = torch.log_softmax(logits[:-1], -1).gather(-1, ids[1:, None])[:, 0]
            sums.append(lp[cm[1:]].sum()); lens.append(int(cm[1:].sum()))
            per_tok.append((lp.detach(), cm[1:]))
    # fuselab's own reduction of padded per-token log-probs gives the same sums and lengths
    T = max(len(lp) for lp, _ in per_tok)
    tok_lp = torch.stack([F.pad(lp, (0, T - len(lp)), value=float('nan')) for lp, _ in per_tok])
    tok_m = torch.stack([F.pad(m, (0, T - len(m))) for _, m in per_tok])
    s, n = sequence_logps(tok_lp, tok_m)
    torch.testing.assert_close(s, torch.stack(sums).detach(), rtol=1e-12, atol=1e-12)
    assert n.tolist() == lens
    return torch.stack(sums), torch.tensor(lens)

def _dpo_trainer(pref_models, tmp_path, **kw):
    trl = pytest.importorskip('trl')
    tok, pol, ref, ds = pref_models
    cfg = trl.DPOConfig(output_dir=str(tmp_path), report_to=[], bf16=False, use_cpu=True, per_device_train_batch_size=len(PREFS), **kw)
    tr = trl.DPOTrainer(model=copy.deepcopy(pol), ref_model=copy.deepcopy(ref), args=cfg, train_dataset=ds, processing_class=tok)
    batch = next(iter(tr.get_train_dataloader()))
    assert batch['input_ids'].shape[0] == 2 * len(PREFS)   # [chosen..., rejected...]
    tr.model.train()                                        # metrics go to _metrics['train']; dropout is 0
    return tr, batch

def _dpo_oracle(pref_models, batch, grad_model=None):
    "(chosen, rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths), computed without TRL."
    _, pol, ref, _ = pref_models
    args = batch['input_ids'], batch['attention_mask'], batch['completion_mask']
    lp, n = _oracle_logps(grad_model or pol, *args, grad=grad_model is not None)
    rlp, rn = _oracle_logps(ref, *args)
    assert (n == rn).all() and (n == batch['completion_mask'].sum(1)).all() and (n > 0).all()
    (cw, cl), (rw, rl), (nw, nl) = lp.chunk(2), rlp.chunk(2), n.chunk(2)
    assert ((cw - rw).abs() > 1e-4).all() and ((cl - rl).abs() > 1e-4).all()   # the reference really differs
    assert (cw - rw).abs().mean() > 0.1
    assert len(set(nw.tolist() + nl.tolist())) > 2                              # responses of different lengths
    return cw, cl, rw, rl, nw, nl

TRL_ATOL = dict(rtol=1e-5, atol=1e-5)

@pytest.mark.parametrize('beta', [0.1, 2.0])
@pytest.mark.parametrize('loss_type', ['sigmoid', 'sigmoid_norm', 'ipo'])
def test_dpo_ipo_equal_trl(pref_models, tmp_path, loss_type, beta):
    "fuselab's DPO / LN-DPO / IPO equal TRL DPOTrainer's loss for the same policy, reference and collated batch."
    tr, batch = _dpo_trainer(pref_models, tmp_path, beta=beta, loss_type=[loss_type])
    with torch.no_grad(): trl_loss = tr.compute_loss(tr.model, batch)
    cw, cl, rw, rl, nw, nl = _dpo_oracle(pref_models, batch)
    if loss_type == 'sigmoid': ours, st = dpo_loss(cw, cl, rw, rl, beta=beta)
    elif loss_type == 'sigmoid_norm': ours, st = dpo_loss(cw, cl, rw, rl, beta=beta, length_normalize=True, chosen_lengths=nw, rejected_lengths=nl)
    else: ours, st = ipo_loss(cw, cl, rw, rl, beta=beta, chosen_lengths=nw, rejected_lengths=nl)
    torch.testing.assert_close(ours.mean().double(), trl_loss.double(), **TRL_ATOL)
    m = {k: v[-1] for k, v in tr._metrics['train'].items()}
    # TRL logs the un-normalised rewards β·(log π − log π_ref) for every loss type; fuselab's DPO and IPO stats are those
    # too, LN-DPO's stats are per-token (β·log-ratio/|y|), so compare LN-DPO's TRL metrics to plain DPO's stats
    if loss_type == 'sigmoid_norm': st = dpo_loss(cw, cl, rw, rl, beta=beta)[1]
    for k in ('rewards/chosen', 'rewards/rejected', 'rewards/margins', 'rewards/accuracies'):   # float32 sums in two reduction orders, times beta (up to 2)
        assert st[k] == pytest.approx(m[k], rel=5e-5, abs=1e-5), (k, st[k], m[k])
    # the oracle's summed log-probs match TRL's own logged means
    assert float(cw.mean()) == pytest.approx(m['logps/chosen'], rel=1e-5) and float(cl.mean()) == pytest.approx(m['logps/rejected'], rel=1e-5)

def test_dpo_gradient_equals_trl(pref_models, tmp_path):
    "The gradient of fuselab's DPO loss through a plain forward equals the gradient of TRL's loss w.r.t. the policy weights."
    tr, batch = _dpo_trainer(pref_models, tmp_path, beta=0.5, loss_type=['sigmoid'])
    tr.model.zero_grad(); tr.compute_loss(tr.model, batch).backward()
    g_trl = {k: p.grad.clone() for k, p in tr.model.named_parameters() if p.grad is not None}
    pol = copy.deepcopy(pref_models[1]).train()
    cw, cl, rw, rl, _, _ = _dpo_oracle(pref_models, batch, grad_model=pol)
    dpo_loss(cw, cl, rw, rl, beta=0.5)[0].mean().backward()
    g_ours = {k: p.grad for k, p in pol.named_parameters() if p.grad is not None}
    assert g_ours.keys() == g_trl.keys() and len(g_ours) > 0
    for k in g_ours: torch.testing.assert_close(g_ours[k].float(), g_trl[k], rtol=1e-4, atol=1e-6, msg=k)

def test_dpo_label_smoothing_convention(pref_models, tmp_path):
    "TRL 1.16's 'sigmoid' DPO ignores label_smoothing (it is only read by 'robust'/'exo_pair'); fuselab's is conservative DPO."
    tr, batch = _dpo_trainer(pref_models, tmp_path, beta=0.5, loss_type=['sigmoid'], label_smoothing=0.2)
    with torch.no_grad(): trl_loss = tr.compute_loss(tr.model, batch)
    cw, cl, rw, rl, _, _ = _dpo_oracle(pref_models, batch)
    torch.testing.assert_close(dpo_loss(cw, cl, rw, rl, beta=0.5)[0].mean().double(), trl_loss.double(), **TRL_ATOL)
    smoothed = dpo_loss(cw, cl, rw, rl, beta=0.5, label_smoothing=0.2)[0].mean()
    assert abs(float(smoothed) - float(trl_loss)) > 1e-3
    # TRL's 'robust' loss is the unbiased variant (Chowdhury et al.), not cDPO: ((1-ε)·ℓ(z) − ε·ℓ(−z)) / (1 − 2ε)
    z = 0.5 * ((cw - rw) - (cl - rl)); eps = 0.2
    robust = ((1 - eps) * -F.logsigmoid(z) - eps * -F.logsigmoid(-z)) / (1 - 2 * eps)
    tr2, _ = _dpo_trainer(pref_models, tmp_path / 'robust', beta=0.5, loss_type=['robust'], label_smoothing=eps)
    with torch.no_grad(): trl_robust = tr2.compute_loss(tr2.model, batch)
    torch.testing.assert_close(robust.mean(), trl_robust.double(), **TRL_ATOL)

def _cpo(pref_models, tmp_path, **kw):
    pytest.importorskip('trl')
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    tok, pol, _, ds = pref_models
    cfg = CPOConfig(output_dir=str(tmp_path), report_to=[], bf16=False, use_cpu=True, per_device_train_batch_size=len(PREFS),
                    cpo_alpha=0.0, remove_unused_columns=False, **kw)
    tr = CPOTrainer(model=copy.deepcopy(pol), args=cfg, train_dataset=ds, processing_class=tok)
    batch = next(iter(tr.get_train_dataloader()))
    with torch.no_grad(): loss, metrics = tr.get_batch_loss_metrics(tr.model, batch)
    _, pol, _, _ = pref_models
    out = []
    for side in ('chosen', 'rejected'):
        out += _oracle_logps(pol, batch[f'{side}_input_ids'], batch[f'{side}_attention_mask'], batch[f'{side}_labels'] != -100)
    cw, nw, cl, nl = out
    assert len(set(nw.tolist() + nl.tolist())) > 2
    return loss, metrics, cw, cl, nw, nl

@pytest.mark.parametrize('beta,gamma', [(2.5, 0.7), (0.5, 0.3)])
@pytest.mark.parametrize('label_smoothing', [0.0, 0.2])
def test_simpo_equals_trl_cpo(pref_models, tmp_path, beta, gamma, label_smoothing):
    "fuselab's SimPO equals TRL's CPO loss_type='simpo' with cpo_alpha=0; fuselab's gamma is CPO's simpo_gamma."
    trl_loss, m, cw, cl, nw, nl = _cpo(pref_models, tmp_path, loss_type='simpo', beta=beta, simpo_gamma=gamma, label_smoothing=label_smoothing)
    ours, st = simpo_loss(cw, cl, nw, nl, beta=beta, gamma=gamma, label_smoothing=label_smoothing)
    torch.testing.assert_close(ours.mean().double(), trl_loss.double(), **TRL_ATOL)
    # fed the independently computed average log-probs directly (lengths 1) it is the same loss
    avg = simpo_loss(cw / nw, cl / nl, torch.ones_like(nw), torch.ones_like(nl), beta=beta, gamma=gamma, label_smoothing=label_smoothing)[0]
    torch.testing.assert_close(avg.mean().double(), trl_loss.double(), **TRL_ATOL)
    # CPO computes β·(avg_w − avg_l − simpo_gamma/β) = β·Δavg − simpo_gamma: the margin is NOT simpo_gamma/β in fuselab's units
    wrong = simpo_loss(cw, cl, nw, nl, beta=beta, gamma=gamma / beta, label_smoothing=label_smoothing)[0].mean()
    assert abs(float(wrong) - float(trl_loss)) > 1e-3
    for k in ('rewards/chosen', 'rewards/rejected', 'rewards/margins', 'rewards/accuracies'):
        assert st[k] == pytest.approx(m[k], rel=1e-5, abs=1e-6), (k, st[k], m[k])

def test_cdpo_label_smoothing_equals_trl_cpo_sigmoid(pref_models, tmp_path):
    "Conservative DPO: CPO's loss_type='sigmoid' (cpo_alpha=0) is cDPO with a zero reference, summed log-probs."
    trl_loss, _, cw, cl, _, _ = _cpo(pref_models, tmp_path, loss_type='sigmoid', beta=0.3, label_smoothing=0.2)
    z = torch.zeros_like(cw)
    torch.testing.assert_close(dpo_loss(cw, cl, z, z, beta=0.3, label_smoothing=0.2)[0].mean().double(), trl_loss.double(), **TRL_ATOL)

@pytest.mark.parametrize('with_margin', [False, True])
def test_bt_equals_trl_reward_trainer(pref_models, tmp_path, with_margin):
    "Bradley–Terry: TRL RewardTrainer's loss (with its optional per-example 'margin') equals bt_loss on the same scores."
    trl = pytest.importorskip('trl')
    import datasets
    from transformers import LlamaConfig, AutoModelForSequenceClassification
    tok = pref_models[0]
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_config(cfg).eval()
    with torch.no_grad(): rm.score.weight.normal_(0, 3.0)          # spread the scores so the loss is not ~log 2
    rows = [dict(ex, margin=0.25 * i) if with_margin else dict(ex) for i, ex in enumerate(PREFS)]
    args = trl.RewardConfig(output_dir=str(tmp_path), report_to=[], bf16=False, use_cpu=True, per_device_train_batch_size=len(PREFS))
    tr = trl.RewardTrainer(model=copy.deepcopy(rm), args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    batch = next(iter(tr.get_train_dataloader()))
    tr.model.train()
    with torch.no_grad(): trl_loss = tr.compute_loss(tr.model, dict(batch))
    # oracle: score = linear head on the backbone's last hidden state at the last real token, one unpadded row at a time
    with torch.no_grad():
        s = torch.stack([rm.score(rm.model(input_ids=ids[am.bool()][None]).last_hidden_state[0, -1])[0]
                         for ids, am in zip(batch['input_ids'], batch['attention_mask'])])
    sw, sl = s.chunk(2)
    margin = batch.get('margin')
    assert (margin is not None) == with_margin
    ours, st = bt_loss(sw, sl, margin)
    torch.testing.assert_close(ours.mean(), trl_loss, **TRL_ATOL)
    m = {k: v[-1] for k, v in tr._metrics['train'].items()}
    assert st['scores/accuracies'] == pytest.approx(m['accuracy']) and st['scores/margins'] == pytest.approx(m['margin'], rel=1e-5, abs=1e-6)
    assert abs(float(trl_loss) - math.log(2)) > 1e-2

# --- float64 gradcheck -------------------------------------------------------------------------------------------
def _rand64(*shape, seed=0, scale=3.0):
    return (torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * scale).requires_grad_()

def test_preference_gradcheck():
    B = 4
    cw, cl, rw, rl = (_rand64(B, seed=s) for s in range(4))
    nw, nl = torch.tensor([3, 5, 1, 8]), torch.tensor([2, 7, 4, 1])
    for eps in (0.0, 0.15):
        assert torch.autograd.gradcheck(lambda *x: dpo_loss(*x, beta=0.7, label_smoothing=eps)[0], (cw, cl, rw, rl))
        assert torch.autograd.gradcheck(lambda *x: dpo_loss(*x, beta=0.7, label_smoothing=eps, length_normalize=True,
                                                            chosen_lengths=nw, rejected_lengths=nl)[0], (cw, cl, rw, rl))
        assert torch.autograd.gradcheck(lambda a, b: simpo_loss(a, b, nw, nl, beta=2.0, gamma=0.8, label_smoothing=eps)[0], (cw, cl))
    for ln in (True, False):
        assert torch.autograd.gradcheck(lambda *x: ipo_loss(*x, beta=0.3, length_normalize=ln, chosen_lengths=nw, rejected_lengths=nl)[0], (cw, cl, rw, rl))
    src, rsrc = _rand64(B, 2, seed=10), _rand64(B, 2, seed=11)
    w = torch.tensor([[0.3, 0.7], [1.0, 0.0], [0.5, 0.5], [0.9, 0.1]], dtype=torch.float64)
    for weights in (None, w):
        assert torch.autograd.gradcheck(lambda *x: wrpo_loss(*x, alpha=0.35, beta=0.4, label_smoothing=0.1, source_weights=weights)[0],
                                        (src, cw, cl, rsrc, rw, rl))
    alpha = torch.tensor([0.0, 0.2, 0.6, 1.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *x: wrpo_loss(*x, alpha=alpha, beta=0.4, source_weights=w)[0], (src, cw, cl, rsrc, rw, rl))
    lp, n = _rand64(B, 3, seed=12), torch.tensor([[3, 0, 2], [1, 1, 1], [4, 2, 0], [5, 6, 7]])
    ww = reward_weights(torch.randn(B, 3, dtype=torch.float64), tau=0.5, mask=n > 0)
    for tm in (True, False):
        assert torch.autograd.gradcheck(lambda x: weighted_sft_loss(x, n, ww, token_mean=tm)[0], (lp,))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 1, 1], [1, 1, 1]], dtype=torch.bool)
    A = rloo_advantages(torch.randn(B, 3, dtype=torch.float64), mask)
    for weights in (None, torch.rand(B, 3, dtype=torch.float64)):
        assert torch.autograd.gradcheck(lambda x: rloo_loss(x, A, weights=weights, mask=mask)[0], (lp,))
    assert torch.autograd.gradcheck(lambda a, b: bt_loss(a, b, torch.full((B,), 0.5, dtype=torch.float64))[0], (cw, cl))

def test_rloo_advantages_are_constants():
    "rloo_loss treats the advantages as constants: no gradient reaches the rewards."
    R = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    lp = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    rloo_loss(lp, rloo_advantages(R))[0].sum().backward()
    assert R.grad is None and lp.grad is not None

# --- bf16 inputs ----------------------------------------------------------------------------------------------------
def _bf(*shape, seed, scale=20.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).bfloat16()

BF16_CASES = {   # x: dict of bf16 tensors (c, l, rc, rl: (B,) log-probs; s, rs: (B,K); u, v: small (B,K); m: small (B,)) and int lengths
    'dpo': lambda x, n: dpo_loss(x['c'], x['l'], x['rc'], x['rl'], beta=0.3, label_smoothing=0.1),
    'ln_dpo': lambda x, n: dpo_loss(x['c'], x['l'], x['rc'], x['rl'], beta=2.0, length_normalize=True, chosen_lengths=n['w'], rejected_lengths=n['l']),
    'ipo': lambda x, n: ipo_loss(x['c'], x['l'], x['rc'], x['rl'], beta=0.4, chosen_lengths=n['w'], rejected_lengths=n['l']),
    'simpo': lambda x, n: simpo_loss(x['c'], x['l'], n['w'], n['l'], beta=2.5, gamma=1.2, label_smoothing=0.05),
    'bt': lambda x, n: bt_loss(x['u'][:, 0], x['u'][:, 1], x['m']),
    'wrpo': lambda x, n: wrpo_loss(x['s'], x['c'], x['l'], x['rs'], x['rc'], x['rl'], alpha=0.3, beta=0.05,
                                   source_weights=reward_weights(x['u'], tau=2.0)),
    'wsft': lambda x, n: weighted_sft_loss(x['s'], n['k'], reward_weights(x['v'], tau=1.0)),
    'rloo': lambda x, n: rloo_loss(x['s'], rloo_advantages(x['v'])),
    'rloo_adv': lambda x, n: (rloo_advantages(x['v']), {}),
    'weights': lambda x, n: (reward_weights(x['v'], tau=0.7), {}),
    'seq': lambda x, n: (sequence_logps(x['s'], n['k'] > 1)[0], {}),
}

@pytest.mark.parametrize('name', list(BF16_CASES))
def test_bf16_inputs_return_fp32(name):
    "bf16 log-probs are accepted, the result is float32 and equals the float32 computation on the bf16-rounded inputs."
    B, K = 5, 3
    x = {k: _bf(*shape, seed=i, scale=sc) for i, (k, shape, sc) in enumerate([
        ('c', (B,), 20.), ('l', (B,), 20.), ('rc', (B,), 20.), ('rl', (B,), 20.), ('s', (B, K), 20.), ('rs', (B, K), 20.),
        ('u', (B, K), 2.), ('v', (B, K), 2.), ('m', (B,), 0.5)])}
    n = dict(w=torch.tensor([3, 9, 1, 4, 12]), l=torch.tensor([7, 2, 5, 5, 1]), k=torch.tensor([[3, 1, 2], [1, 4, 2], [2, 2, 2], [5, 1, 1], [1, 1, 9]]))
    f = BF16_CASES[name]
    out, st = f(x, n)
    ref, st_ref = f({k: v.float() for k, v in x.items()}, n)
    assert out.dtype == torch.float32 and ref.dtype == torch.float32
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert st.keys() == st_ref.keys() and all(st[k] == pytest.approx(st_ref[k], rel=1e-6, abs=1e-6) for k in st)
    if name not in ('seq', 'weights', 'rloo_adv'):                  # gradients reach the bf16 inputs, in bf16
        y = {k: v.clone().requires_grad_() for k, v in x.items()}
        f(y, n)[0].sum().backward()
        got = [v.grad for v in y.values() if v.grad is not None]
        assert got and all(gr.dtype == torch.bfloat16 for gr in got)

# --- randomised sweeps against naive per-example loops --------------------------------------------------------------
def _logsig(x): return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))

@pytest.mark.parametrize('seed', range(4))
@pytest.mark.parametrize('B', [1, 3, 8])
@pytest.mark.parametrize('K', [1, 2, 3])
def test_wrpo_sweep(seed, B, K):
    g = torch.Generator().manual_seed(1000 * seed + 10 * B + K)
    r = lambda *s: torch.randn(*s, dtype=torch.float64, generator=g) * 30 - 40
    src, rsrc, cw, cl, rw, rl = r(B, K), r(B, K), r(B), r(B), r(B), r(B)
    beta = float(torch.rand(1, generator=g)) * 0.5 + 0.01
    eps = [0.0, 0.1, 0.3][seed % 3]
    per_ex_alpha = seed % 2 == 1
    alpha = torch.rand(B, dtype=torch.float64, generator=g) if per_ex_alpha else 0.25   # 0.25 is exact in float32
    weights = None if seed == 0 else torch.distributions.Dirichlet(torch.ones(K, dtype=torch.float64)).sample((B,))
    if seed == 3 and K > 1: weights = F.one_hot(torch.randint(0, K, (B,), generator=g), K).double()
    out, st = wrpo_loss(src if K > 1 or seed % 2 else src[:, 0], cw, cl, rsrc if K > 1 or seed % 2 else rsrc[:, 0], rw, rl,
                        alpha=alpha, beta=beta, label_smoothing=eps, source_weights=weights)
    naive, deltas = [], []
    for b in range(B):
        w = [1 / K] * K if weights is None else weights[b].tolist()
        a = float(alpha[b]) if per_ex_alpha else alpha
        r_ws = sum(w[k] * beta * (float(src[b, k]) - float(rsrc[b, k])) for k in range(K))
        d = a * r_ws + (1 - a) * beta * (float(cw[b]) - float(rw[b])) - beta * (float(cl[b]) - float(rl[b]))
        naive.append(-(1 - eps) * _logsig(d) - eps * _logsig(-d)); deltas.append(d)
    torch.testing.assert_close(out, torch.tensor(naive, dtype=torch.float64), rtol=1e-6, atol=1e-9)
    assert st['rewards/margins'] == pytest.approx(sum(deltas) / B, rel=1e-5, abs=1e-6)
    assert st['rewards/accuracies'] == pytest.approx(sum(d > 0 for d in deltas) / B)

def test_wrpo_reduces_to_dpo():
    "alpha=0 is DPO on (y_wt, y_l); alpha=1 with one source is DPO on (y_ws, y_l)."
    g = torch.Generator().manual_seed(0)
    src, rsrc, cw, cl, rw, rl = (torch.randn(6, dtype=torch.float64, generator=g) * 10 for _ in range(6))
    for eps in (0.0, 0.2):
        torch.testing.assert_close(wrpo_loss(src, cw, cl, rsrc, rw, rl, alpha=0.0, beta=0.3, label_smoothing=eps)[0],
                                   dpo_loss(cw, cl, rw, rl, beta=0.3, label_smoothing=eps)[0])
        torch.testing.assert_close(wrpo_loss(src, cw, cl, rsrc, rw, rl, alpha=1.0, beta=0.3, label_smoothing=eps)[0],
                                   dpo_loss(src, cl, rsrc, rl, beta=0.3, label_smoothing=eps)[0])

@pytest.mark.parametrize('seed', range(5))
@pytest.mark.parametrize('B,n', [(1, 2), (3, 4), (6, 5), (4, 8)])
def test_rloo_advantages_sweep(seed, B, n):
    g = torch.Generator().manual_seed(seed * 100 + B * 10 + n)
    R = torch.randn(B, n, dtype=torch.float64, generator=g) * 5
    mask = torch.rand(B, n, generator=g) > 0.35 if seed else torch.ones(B, n, dtype=torch.bool)
    for b in range(B):                                                   # every group keeps >= 2 valid responses
        if mask[b].sum() < 2: mask[b, torch.randperm(n, generator=g)[:2]] = True
    R = torch.where(mask, R, torch.tensor(float('nan'), dtype=torch.float64)) if seed % 2 else R   # junk where invalid
    A = rloo_advantages(R, None if seed == 0 else mask)
    naive = torch.zeros(B, n, dtype=torch.float64)
    for b in range(B):
        for i in range(n):
            if not mask[b, i]: continue
            others = [float(R[b, j]) for j in range(n) if j != i and mask[b, j]]
            naive[b, i] = float(R[b, i]) - sum(others) / len(others)
    torch.testing.assert_close(A, naive, rtol=1e-12, atol=1e-12)
    # and the policy-gradient loss is the naive weighted sum, 1/n_valid weights by default
    lp = torch.randn(B, n, dtype=torch.float64, generator=g) * 10
    lp = torch.where(mask, lp, torch.tensor(float('nan'), dtype=torch.float64)) if seed % 2 else lp
    loss, st = rloo_loss(lp, A, mask=mask)
    ref = torch.tensor([-sum(float(A[b, i]) * float(lp[b, i]) for i in range(n) if mask[b, i]) / int(mask[b].sum()) for b in range(B)], dtype=torch.float64)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-9)   # 1e-6: the default 1/n weights are built in float32 (see below)
    w = torch.rand(B, n, dtype=torch.float64, generator=g)
    loss_w, _ = rloo_loss(lp, A, weights=w, mask=mask)
    ref_w = torch.tensor([-sum(float(w[b, i]) * float(A[b, i]) * float(lp[b, i]) for i in range(n) if mask[b, i]) for b in range(B)], dtype=torch.float64)
    torch.testing.assert_close(loss_w, ref_w, rtol=1e-12, atol=1e-12)
    assert st['advantages/abs_mean'] == pytest.approx(float(naive[mask].abs().mean()))

def test_rloo_loss_default_weights_keep_fp64():
    lp = torch.tensor([[-1.1e3, -2.3e3, -3.7e3]], dtype=torch.float64)
    A = torch.tensor([[1.0, -2.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(rloo_loss(lp, A)[0], -(A * lp).sum(-1) / 3, rtol=1e-13, atol=0)

def test_wrpo_python_alpha_keeps_fp64():
    one = torch.ones(1, dtype=torch.float64)
    out, _ = wrpo_loss(-1e3 * one, 0 * one, 0 * one, 0 * one, 0 * one, 0 * one, alpha=0.1, beta=1.0)   # Δ = 0.1·(−1000) = −100
    torch.testing.assert_close(out, -F.logsigmoid(one * (0.1 * -1e3)), rtol=1e-13, atol=1e-13)

def test_rloo_needs_two():
    with pytest.raises(ValueError, match='fewer than 2'):
        rloo_advantages(torch.randn(2, 3), torch.tensor([[1, 1, 0], [0, 0, 1]], dtype=torch.bool))
