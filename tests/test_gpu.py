"""The CPU-tested kernels and trainers on a CUDA device (marker `gpu`, skipped without one), in float32 and bf16, against
float64 CPU oracles. Run on a GPU machine: `pytest tests/test_gpu.py` (see README, "GPU checks")."""
import copy
import numpy as np
import pytest
import torch
import ot as pot
from fuselab.ot import sinkhorn, synthetic_pta_problems
from fuselab.core import chunked_logprobs, chunked_topk, IGNORE_INDEX
from fuselab.losses import chunked_sparse_soft_ce

pytestmark = pytest.mark.gpu

def _cos(x, y): return float(torch.nn.functional.cosine_similarity(x.double().flatten(), y.double().flatten(), 0))

def test_sinkhorn_cuda_float64_matches_pot():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(32, 7, generator=g, dtype=torch.float64) + .1; a /= a.sum(-1, keepdim=True)
    b = torch.rand(32, 9, generator=g, dtype=torch.float64) + .1; b /= b.sum(-1, keepdim=True)
    C = torch.rand(32, 7, 9, generator=g, dtype=torch.float64)
    P = sinkhorn(a.cuda(), b.cuda(), C.cuda(), .1, tol=1e-12, max_iter=20000).cpu()
    for i in range(32):
        ref = pot.sinkhorn(a[i].numpy(), b[i].numpy(), C[i].numpy(), .1, method='sinkhorn_log', stopThr=1e-13, numItermax=200000)
        np.testing.assert_allclose(P[i].numpy(), ref, atol=1e-8)

@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_sinkhorn_cuda_pta_lambda30_equals_cpu(dtype):
    "PTA's problems (integer costs, lambda = 30): the GPU plan is the CPU plan, low-precision inputs included, no NaN."
    a, b, C = synthetic_pta_problems(20000, seed=3)
    a, b, C = a.to(dtype), b.to(dtype), C.to(dtype)
    Pg, sg = sinkhorn(a.cuda(), b.cuda(), C.cuda(), 1/30, tol=1e-5, max_iter=3000, log=True)
    Pc, sc = sinkhorn(a, b, C, 1/30, tol=1e-5, max_iter=3000, log=True)
    assert torch.isfinite(Pg).all() and sg.converged.float().mean() > .95
    assert (sg.converged.cpu() == sc.converged).float().mean() > .99
    ok = sg.converged.cpu() & sc.converged
    assert (Pg.cpu() - Pc).abs().amax((-1, -2))[ok].max() < 1e-4

@pytest.mark.parametrize('dtype,tol', [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_chunked_head_cuda(dtype, tol):
    "chunked_topk / chunked_logprobs (forward and backward) on CUDA at a real vocabulary size vs float64 dense CPU."
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 50, 64, generator=g); W = torch.randn(32000, 64, generator=g) / 8
    lab = torch.randint(0, 32000, (3, 50), generator=g); lab[:, :5] = IGNORE_INDEX
    hd, Wd = h.to(dtype).double(), W.to(dtype).double()                 # the oracle sees the same rounded inputs
    ref = torch.log_softmax(hd @ Wd.T, -1)
    tk = chunked_topk(h.to(dtype).cuda(), W.to(dtype).cuda(), k=8, labels=lab.cuda(), chunk_size=37)
    torch.testing.assert_close(tk.logprobs.cpu().double(), ref.topk(8, -1).values, atol=tol, rtol=0)
    ok = lab != IGNORE_INDEX
    torch.testing.assert_close(tk.label_logprobs.cpu().double()[ok], ref.gather(-1, lab.clamp_min(0)[..., None])[..., 0][ok], atol=tol, rtol=0)
    hg, Wg = h.to(dtype).cuda().requires_grad_(), W.to(dtype).cuda().requires_grad_()
    chunked_logprobs(hg, Wg, lab.cuda(), chunk_size=37).sum().backward()
    hr, Wr = hd.clone().requires_grad_(), Wd.clone().requires_grad_()
    torch.log_softmax(hr @ Wr.T, -1).gather(-1, lab.clamp_min(0)[..., None])[..., 0][ok].sum().backward()
    assert _cos(hg.grad.cpu(), hr.grad) > 1 - tol and _cos(Wg.grad.cpu(), Wr.grad) > 1 - tol

@pytest.mark.parametrize('dtype,tol', [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_chunked_sparse_soft_ce_cuda(dtype, tol):
    "FuseLLM's sparse soft CE from the LM head on CUDA vs the dense float64 formula (value and gradient)."
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 40, 64, generator=g); W = torch.randn(32000, 64, generator=g) / 8
    ids = torch.randint(0, 32000, (2, 40, 10), generator=g); lps = torch.log_softmax(torch.randn(2, 40, 10, generator=g), -1) - 1
    m = torch.ones(2, 40, dtype=torch.bool); m[1, 30:] = False
    hg, Wg = h.to(dtype).cuda().requires_grad_(), W.to(dtype).cuda().requires_grad_()
    loss, _ = chunked_sparse_soft_ce(hg, Wg, ids.cuda(), lps.cuda(), m.cuda(), reduction='batch', chunk_size=33)
    loss.backward()
    hr, Wr = h.to(dtype).double().requires_grad_(), W.to(dtype).double().requires_grad_()
    P = torch.zeros(2, 40, 32000, dtype=torch.float64).scatter_add_(-1, ids, torch.softmax(lps.double(), -1))
    ref = -(P * torch.log_softmax(hr @ Wr.T, -1)).sum(-1)[m].mean(); ref.backward()
    assert float(loss) == pytest.approx(float(ref), rel=tol)
    assert _cos(hg.grad.cpu(), hr.grad) > 1 - tol and _cos(Wg.grad.cpu(), Wr.grad) > 1 - tol

def test_preference_trainer_cuda_bf16_steps():
    "PreferenceTrainer (DPO) on CUDA with TRL's bf16 default: the first-batch loss equals the float32 CPU loss, and steps train."
    import datasets
    from fuselab.testing import train_tokenizer, tiny_lm
    from fuselab.preference import PreferenceConfig, PreferenceTrainer
    datasets.disable_progress_bars()
    rows = [dict(prompt=f'say {w}', chosen=f' {w} {w} yes', rejected=f' {w} no no') for w in 'cat dog cow pig hen fox owl bee'.split()]
    tok = train_tokenizer([r['prompt'] + r['chosen'] + r['rejected'] for r in rows] * 20, vocab_size=300)
    pol, ref = tiny_lm(tok, hidden=32, seed=0), tiny_lm(tok, hidden=32, seed=1)
    def trainer(dev, tmp):
        args = PreferenceConfig(output_dir=tmp, pref_loss='dpo', beta=0.1, report_to=[], per_device_train_batch_size=8, max_length=32,
                                gradient_checkpointing=False, max_steps=3, learning_rate=1e-3, save_strategy='no', disable_tqdm=True,
                                use_cpu=dev == 'cpu', bf16=dev == 'cuda')
        return PreferenceTrainer(copy.deepcopy(pol), ref_model=copy.deepcopy(ref), args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    losses = []
    for dev in ('cpu', 'cuda'):
        t = trainer(dev, f'/tmp/fuselab-gpu-{dev}')
        assert t.model.device.type == dev
        batch = t._prepare_inputs(t.data_collator([t.train_dataset[i] for i in range(8)]))
        with torch.no_grad(), t.compute_loss_context_manager(): losses.append(float(t.compute_loss(t.model, batch)))
        if dev == 'cuda':
            out = t.train()
            assert np.isfinite(out.training_loss)
    assert losses[1] == pytest.approx(losses[0], abs=2e-2)

@pytest.mark.parametrize('dtype,tol', [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_adpa_support_losses_cuda(dtype, tol):
    "DCKD's top-k KL and ADPA's expected advantage from `support_logprobs` on CUDA vs dense float64 (value and gradient)."
    from fuselab.adpa import support_logprobs, topk_kl, adpa_loss
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 40, 64, generator=g); W = torch.randn(32000, 64, generator=g) / 8
    P = torch.softmax(3 * torch.randn(2, 40, 32000, generator=g, dtype=torch.float64), -1)
    top = P.topk(50, -1); A = torch.randn(2, 40, 50, generator=g)
    m = torch.ones(2, 40, dtype=torch.bool); m[1, 25:] = False
    def losses(hh, WW, dev):
        lq = support_logprobs(hh, WW, top.indices.to(dev))
        kl, _ = topk_kl(lq, top.values.log().float().to(dev), m.to(dev), (1 - top.values.sum(-1)).float().to(dev))
        ad, _ = adpa_loss(lq, A.to(dev), m.to(dev))
        return kl + ad
    hg, Wg = h.to(dtype).cuda().requires_grad_(), W.to(dtype).cuda().requires_grad_()
    lg = losses(hg, Wg, 'cuda'); lg.backward()
    hr, Wr = h.to(dtype).double().requires_grad_(), W.to(dtype).double().requires_grad_()
    lr = losses(hr, Wr, 'cpu'); lr.backward()
    assert float(lg.detach()) == pytest.approx(float(lr.detach()), rel=tol)
    assert _cos(hg.grad.cpu(), hr.grad) > 1 - tol and _cos(Wg.grad.cpu(), Wr.grad) > 1 - tol
