"PTA-LLM (`fuselab.pta`): a NumPy port of the reference Sinkhorn + read-out as oracle, batching, fallbacks, bad input."
import numpy as np
import pytest
import torch

import fuselab.pta as pta
from fuselab.pta import pta_transport, pta_readout, pta_values, pta_align_position_batch
from fuselab.ot import synthetic_pta_problems

def _reference_ot(a, b, C, lmbda=30., eps=1e-5, cap=200_000, code_stop=True):
    """The official `compute_optimal_transport` loop (plain domain), with a cap instead of `while True`.
    code_stop: the code's rule, stop when the row sums change by <= eps over one sweep; else stop on ||P1 - a||_inf <= eps."""
    P = np.exp(-lmbda * C); P /= P.sum()
    for _ in range(cap):
        u = np.maximum(P.sum(1), 1e-10); P *= (a / u)[:, None]
        v = np.maximum(P.sum(0), 1e-10); P *= (b / v)[None, :]
        if np.abs((u if code_stop else a) - P.sum(1)).max() <= eps: break
    return P

def _reference_readout(P, tgt_ids):
    q = {}
    for r in range(P.shape[0]):
        c = int(P[r].argmax()); q[int(tgt_ids[c])] = q.get(int(tgt_ids[c]), 0.) + float(P[r, c])
    return q

def test_matches_reference_code():
    N = 8
    a, b, C = (x.double() for x in synthetic_pta_problems(N, k=10, seed=2))
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    P, st = pta_transport(a.log(), b.log(), C, eps=1e-8, max_iter=100_000)
    assert st['converged'] == N
    tid = torch.arange(N * 10).view(N, 10) + 100
    ids, m = pta_readout(P, tid)
    for n in range(N):
        R = _reference_ot(a[n].numpy(), b[n].numpy(), C[n].numpy(), eps=1e-8, code_stop=False)
        np.testing.assert_allclose(P[n].numpy(), R, atol=2e-5)
        q = _reference_readout(R, tid[n].numpy())
        got = {int(i): float(x) for i, x in zip(ids[n], m[n]) if x > 0}
        assert got.keys() == q.keys()
        for k in q: assert abs(got[k] - q[k]) < 2e-5

def test_reference_stopping_rule_stops_early():
    "Quirk: the code's rule measures progress, not the marginal; on near-degenerate kernels it stops far from a."
    a, b, C = (x.double().numpy() for x in synthetic_pta_problems(16, k=10, seed=1))
    a, b = a / a.sum(-1, keepdims=True), b / b.sum(-1, keepdims=True)
    R = _reference_ot(a[3], b[3], C[3], eps=1e-9)
    assert np.abs(R.sum(1) - a[3]).sum() > 1e-3                 # 1e6 x eps off the row marginal
    P = pta_transport(torch.tensor(a[3:4]).log(), torch.tensor(b[3:4]).log(), torch.tensor(C[3:4]), eps=1e-9, max_iter=100_000)[0]
    assert (P.sum(-1)[0] - torch.tensor(a[3])).abs().sum() < 1e-8

def _toy(N=12, K=4, V=40, seed=0):
    rng = np.random.default_rng(seed)
    letters = np.array(list('abcde▁'))
    vocab = [''.join(rng.choice(letters, rng.integers(1, 5))) for _ in range(V)]
    si = np.stack([rng.choice(V, K, replace=False) for _ in range(N)]).astype(np.int32)
    ti = np.stack([rng.choice(V, K, replace=False) for _ in range(N)]).astype(np.int32)
    sl = np.log(rng.dirichlet(np.ones(K), N)).astype(np.float32)
    tl = np.log(rng.dirichlet(np.ones(K), N)).astype(np.float32)
    return si, sl, ti, tl, vocab

@pytest.mark.parametrize('readout', ['softmax_as_logits', 'renormalize'])
@pytest.mark.parametrize('markers', ['strip', 'code'])
def test_batched_equals_loop(readout, markers):
    si, sl, ti, tl, vocab = _toy()
    ap = np.arange(len(si)) % 3 != 0
    sl[1, 3] = -np.inf                                   # a short (deduplicated) row
    kw = dict(readout=readout, markers=markers, src_marker='Ġ', tgt_marker='▁', max_iter=5000)
    out, st = pta_align_position_batch(si, sl, ti, tl, vocab, ap, **kw)
    assert st['ot'] == int(ap.sum()) - 1 and st['fallback_short'] == 1 and st['not_applicable'] == int((~ap).sum())
    for n in range(len(si)):
        o, _ = pta_align_position_batch(si[n:n+1], sl[n:n+1], ti[n:n+1], tl[n:n+1], vocab, ap[n:n+1], **kw)
        assert torch.equal(o.ids[0], out.ids[n])
        torch.testing.assert_close(o.logprobs[0], out.logprobs[n], atol=1e-5, rtol=0)
    assert out.ids.dtype == torch.int32 and out.logprobs.dtype == torch.float32
    ok = torch.from_numpy(ap).clone(); ok[1] = False
    for n in np.flatnonzero(ok):                                     # OT rows: ids from the target's own top-k
        used = torch.isfinite(out.logprobs[n])
        assert set(out.ids[n][used].tolist()) <= set(ti[n].tolist())
        assert abs(float(out.logprobs[n][used].exp().sum()) - 1) < 1e-5
    for n in np.flatnonzero(~ok.numpy()):                            # fallbacks untouched
        assert out.ids[n].tolist() == si[n].tolist() and np.array_equal(out.logprobs[n].numpy(), sl[n])

def test_bad_plan_falls_back(monkeypatch):
    si, sl, ti, tl, vocab = _toy(N=3)
    real = pta.pta_transport
    def broken(*a, **k):
        P, st = real(*a, **k); P = P.clone(); P[0, 0, 0] = float('nan'); P[1, 0, 0] = -1.; return P, st
    monkeypatch.setattr(pta, 'pta_transport', broken)
    out, st = pta_align_position_batch(si, sl, ti, tl, vocab, np.ones(3, bool))
    assert st['fallback_bad_plan'] == 2 and st['ot'] == 1
    assert np.array_equal(out.logprobs[:2].numpy(), sl[:2]) and out.ids[:2].tolist() == si[:2].tolist()

def test_empty_and_all_fallback():
    si, sl, ti, tl, vocab = _toy(N=2)
    out, st = pta_align_position_batch(si, sl, ti, tl, vocab, np.zeros(2, bool))
    assert st['ot'] == 0 and st['not_applicable'] == 2 and np.array_equal(out.logprobs.numpy(), sl)
    out, st = pta_align_position_batch(si[:0], sl[:0], ti[:0], tl[:0], vocab, np.zeros(0, bool))
    assert out.ids.shape == (0, 4) and st['ot'] == 0

def test_identity_cost_returns_source():
    K = 5
    a = torch.tensor([.4, .25, .15, .12, .08])
    perm = torch.tensor([3, 0, 4, 1, 2])
    C = torch.full((1, K, K), 10.)
    C[0, torch.arange(K), torch.argsort(perm)] = 0.                  # source r matches target column with perm[c] = r
    P, st = pta_transport(a.log()[None], a[perm].log()[None], C, lmbda=50.)
    ids, m = pta_readout(P, (perm + 100)[None])
    assert ids.tolist() == [[100, 101, 102, 103, 104]]
    torch.testing.assert_close(m[0], a, atol=1e-6, rtol=0)
    torch.testing.assert_close(pta_values(m, 'renormalize')[0].exp(), a, atol=1e-6, rtol=0)

def test_values_temperature():
    q = torch.tensor([[.6, .3, .1]])
    torch.testing.assert_close(pta_values(q, temperature=.5).exp(), (q / .5).softmax(-1))
    torch.testing.assert_close(pta_values(q, 'renormalize', temperature=.5).exp(), (q ** 2) / (q ** 2).sum())

@pytest.mark.parametrize('call,msg', [
    (lambda: pta_transport(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3, 3), lmbda=-1), 'lmbda=-1 must be'),
    (lambda: pta_transport(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3, 3), eps=0), 'eps=0 must be'),
    (lambda: pta_transport(torch.zeros(2, 3), torch.zeros(3, 3), torch.zeros(2, 3, 3)), 'same K'),
    (lambda: pta_values(torch.ones(1, 3), 'probs'), "readout='probs' is unknown"),
    (lambda: pta_values(torch.ones(1, 3), temperature=0), 'temperature=0 must be'),
    (lambda: pta_readout(torch.zeros(1, 3, 3), torch.zeros(1, 3), mode='sum'), "mode='sum' is unknown"),
    (lambda: pta_align_position_batch(*_toy(N=2)[:4], _toy()[4], np.ones(3, bool)), 'applies (3,) must be (N,)=(2,)'),
    (lambda: pta_align_position_batch(*_toy(N=2)[:4], _toy()[4], np.ones(2, bool), readout='x'), "readout='x' is unknown"),
])
def test_bad_input(call, msg):
    with pytest.raises(ValueError, match=None) as e: call()
    assert msg in str(e.value)
