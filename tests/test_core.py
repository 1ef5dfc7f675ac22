"Oracle sweeps for fuselab.core: chunked LM-head log-probs/top-k against the naive dense path."
import pytest, torch
import torch.nn.functional as F
from fuselab.core import IGNORE_INDEX, chunked_logprobs, chunked_topk, selective_log_softmax, masked_mean

def naive(h, W, y, b=None, tau=1.0):
    z = (h @ W.T + (0 if b is None else b)) / tau
    return torch.where(y != IGNORE_INDEX, F.log_softmax(z, -1).gather(-1, y.clamp_min(0)[..., None])[..., 0], 0.)

@pytest.mark.parametrize('B,T,H,V,chunk', [(1, 1, 4, 3, 1), (2, 9, 8, 37, 4), (3, 5, 16, 200, 1024), (2, 33, 8, 64, 7)])
@pytest.mark.parametrize('bias', [False, True])
def test_chunked_logprobs_matches_naive_fp64(B, T, H, V, chunk, bias):
    g = torch.Generator().manual_seed(B * 100 + T)
    h = torch.randn(B, T, H, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(V, H, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, generator=g, requires_grad=True) if bias else None
    y = torch.randint(0, V, (B, T), generator=g); y[0, 0] = IGNORE_INDEX
    lp, ref = chunked_logprobs(h, W, y, b, temperature=1.3, chunk_size=chunk), naive(h, W, y, b, 1.3)
    torch.testing.assert_close(lp, ref.float(), rtol=1e-5, atol=1e-5)
    up = torch.randn(B, T, dtype=torch.float64, generator=g)
    params = [p for p in (h, W, b) if p is not None]
    for a, r in zip(torch.autograd.grad((lp * up).sum(), params), torch.autograd.grad((ref * up).sum(), params)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)

def test_chunked_logprobs_bf16_close_to_fp32():
    g = torch.Generator().manual_seed(0)
    h, W = torch.randn(2, 16, 32, generator=g), torch.randn(1000, 32, generator=g) * 0.2
    y = torch.randint(0, 1000, (2, 16), generator=g)
    hb, Wb = h.bfloat16().requires_grad_(), W.bfloat16().requires_grad_()
    lp = chunked_logprobs(hb, Wb, y, chunk_size=5)
    assert lp.dtype == torch.float32 and torch.isfinite(lp).all()
    torch.testing.assert_close(lp, naive(hb.float(), Wb.float(), y), rtol=2e-2, atol=3e-2)
    lp.sum().backward()
    assert hb.grad.dtype == torch.bfloat16 and Wb.grad.dtype == torch.bfloat16 and torch.isfinite(Wb.grad.float()).all()

def test_chunked_topk_matches_dense():
    g = torch.Generator().manual_seed(1)
    h, W, y = torch.randn(3, 11, 8, generator=g), torch.randn(97, 8, generator=g), torch.randint(0, 97, (3, 11), generator=g)
    for chunk in (1, 4, 1000):
        tk = chunked_topk(h, W, k=7, labels=y, chunk_size=chunk)
        full = F.log_softmax(h @ W.T, -1)
        v, i = full.topk(7, -1)
        assert torch.equal(tk.ids.long(), i) and tk.ids.dtype == torch.int32
        torch.testing.assert_close(tk.logprobs, v, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tk.label_logprobs, full.gather(-1, y[..., None])[..., 0], rtol=1e-5, atol=1e-5)

def test_selective_log_softmax_fp16_large_vocab():
    z, y = torch.randn(4, 3, 5000).half() * 8, torch.randint(0, 5000, (4, 3))
    torch.testing.assert_close(selective_log_softmax(z, y, chunk_rows=5), F.log_softmax(z.float(), -1).gather(-1, y[..., None])[..., 0])

def test_masked_mean_ignores_masked_inf():
    x = torch.tensor([[1., float('inf')], [2., 3.]]); m = torch.tensor([[1, 0], [1, 1]])
    torch.testing.assert_close(masked_mean(x, m, 1), torch.tensor([1., 2.5]))

def test_chunked_path_on_a_real_model():
    "lm_hidden_and_head + chunked_logprobs reproduce the model's own logits path."
    from fuselab.testing import tiny_lm, train_tokenizer
    from fuselab.data import lm_hidden_and_head
    tok = train_tokenizer(['alpha beta gamma delta'] * 10, 280)
    m = tiny_lm(tok, 'qwen2')
    ids = torch.tensor([tok('alpha beta gamma')['input_ids']])
    h, W, b = lm_hidden_and_head(m, ids, torch.ones_like(ids))
    lp = chunked_logprobs(h[:, :-1], W, ids[:, 1:], b, chunk_size=2)
    ref = F.log_softmax(m(ids).logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(lp, ref, rtol=1e-5, atol=1e-5)
