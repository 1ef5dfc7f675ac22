"""Q-RM: the loss against Bradley–Terry and naive fp64 loops (+ gradcheck), position alignment on hand-built and full-logit
oracles (padding, LoRA, bf16), dense rewards / advantages / PPO / REINFORCE against numpy re-implementations of the
reference buffer, the reward sources on one path, the RL loop's dense (B,L) rewards, crash-and-resume, pass@k."""
import copy, itertools, math, random, warnings
from dataclasses import replace
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import PrinterCallback
from fuselab.losses import bt_loss
from fuselab.testing import tiny_lm, train_tokenizer
from fuselab.qrm import (qrm_loss, response_index, at_positions, policy_logprobs, QRewardModel, qrm_from_causal_lm, fresh_head, save_qrm,
                         load_qrm, encode_pairs, PairCollator, QRMConfig, QRMTrainer, pairwise_accuracy, score_responses, normalize_rewards,
                         eos_to_mean, sequence_to_tokens, kl_penalty, dense_rewards, q_advantages, gae_advantages, ppo_policy_loss,
                         reinforce_loss, value_loss, TokenReward, QRMReward, ORMReward, DPORMReward, RuleReward, DenseRLConfig,
                         DenseRewardTrainer, pass_at_k, extract_answer, answer_correct, evaluate_pass_at_k, arithmetic_problems,
                         arithmetic_reward, first_error_token, pack_responses, check_same_tokenizer, QRMRunConfig, qrm_run, qrm_stage_rm)

warnings.filterwarnings('ignore', message='.*(gradient_checkpointing|pin_memory)')

@pytest.fixture(scope='module', autouse=True)
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1); yield; torch.set_num_threads(n)

@pytest.fixture(scope='module')
def world():
    "A byte-level tokenizer, a tiny policy and a tiny Q-RM on the same tokenizer, and prompts."
    tok = train_tokenizer([f'{a} plus {b} is {a + b}.' for a in range(30) for b in range(30)], vocab_size=200)
    prompts = [f'{a} plus {b} is' for a, b in ((1, 2), (3, 4), (5, 6), (7, 8), (2, 2), (4, 4), (6, 6), (8, 8), (9, 1), (3, 3), (5, 5), (7, 7))]
    return tok, tiny_lm(tok, hidden=32, seed=0), qrm_from_causal_lm(tiny_lm(tok, hidden=32, seed=7), seed=7), prompts

def _masks(B, L, rng):
    n = torch.tensor([rng.randint(1, L) for _ in range(B)])
    return torch.arange(L) < n[:, None]

# ---------------------------------------------------------------- the loss
@pytest.mark.parametrize('beta,gamma', [(0.2, 2.0), (1.0, 0.0), (3.0, 0.5)])
def test_one_token_responses_reduce_to_bradley_terry(beta, gamma):
    g = torch.Generator().manual_seed(0)
    zw, zl = torch.randn(16, 1, generator=g, dtype=torch.float64), torch.randn(16, 1, generator=g, dtype=torch.float64)
    one = torch.ones(16, 1, dtype=torch.bool)
    loss, st = qrm_loss(zw, zl, one, one, beta, gamma)
    ref, _ = bt_loss(beta * zw[:, 0], beta * zl[:, 0], margin=torch.full((16,), gamma, dtype=torch.float64))
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(loss, -F.logsigmoid(beta * (zw - zl)[:, 0] - gamma), rtol=0, atol=1e-12)   # and the formula itself
    assert st['accuracy'] == float((zw > zl).double().mean())

@pytest.mark.parametrize('reduce', ['mean', 'last'])
def test_qrm_loss_against_naive_loop_and_gradcheck(reduce):
    rng, g = random.Random(1), torch.Generator().manual_seed(1)
    B, N, M = 7, 6, 9
    zw, zl = torch.randn(B, N, generator=g, dtype=torch.float64, requires_grad=True), torch.randn(B, M, generator=g, dtype=torch.float64, requires_grad=True)
    mw, ml = _masks(B, N, rng), _masks(B, M, rng)
    loss, _ = qrm_loss(zw, zl, mw, ml, 0.2, 2.0, reduce)
    for b in range(B):
        w, l = zw[b][mw[b]].tolist(), zl[b][ml[b]].tolist()
        sw, sl = (sum(w) / len(w), sum(l) / len(l)) if reduce == 'mean' else (w[-1], l[-1])
        assert abs(loss[b].item() - math.log1p(math.exp(-(0.2 * (sw - sl) - 2.0)))) < 1e-12
    assert torch.autograd.gradcheck(lambda a, b: qrm_loss(a, b, mw, ml, 0.2, 2.0, reduce)[0], (zw, zl))
    gw = torch.autograd.grad(loss.sum(), zw)[0]
    assert (gw[~mw] == 0).all()                                          # padding gets no gradient

def test_qrm_loss_bad_input():
    z, m = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match='empty response'): qrm_loss(z, z, m, torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match='empty rejected'): qrm_loss(z, z, m, torch.zeros(2, 3, dtype=torch.bool), reduce='last')
    with pytest.raises(ValueError, match='chosen_z shape'): qrm_loss(z[:, :2], z, m, m)
    with pytest.raises(ValueError, match='pass pairs'): qrm_loss(z[:1], z, m[:1], m)
    with pytest.raises(ValueError, match="reduce='sum'"): qrm_loss(z, z, m, m, reduce='sum')

# ---------------------------------------------------------------- positions
def test_response_index_against_loop():
    rng = random.Random(2)
    m = torch.tensor([[rng.random() < 0.4 for _ in range(11)] for _ in range(9)]); m[:, 5] = True   # arbitrary, non-contiguous masks
    idx = response_index(m)
    for b in range(9):
        want = [t for t in range(11) if m[b, t]]
        assert idx.pos[b, :len(want)].tolist() == want and idx.mask[b].sum() == len(want)
    with pytest.raises(ValueError, match=r'row\(s\) \[0\]'): response_index(torch.zeros(1, 3))

def test_position_alignment_hand_built_left_and_right_padding():
    "0 transformer blocks: Z reads the token itself, log π reads the previous token — exact oracles from the weights."
    lm0 = tiny_lm(40, layers=0, hidden=16, seed=3)
    qrm0 = qrm_from_causal_lm(lm0, seed=5)
    E, W, norm, w = lm0.get_input_embeddings().weight, lm0.get_output_embeddings().weight, lm0.get_decoder().norm, qrm0.head.weight[0]
    rows = [([5, 6, 7], [11, 12, 13]), ([8, 9], [21, 22]), ([4], [30])]
    for left in (False, True):
        T = max(len(p) + len(r) for p, r in rows)
        ids, resp = torch.zeros(3, T, dtype=torch.long), torch.zeros(3, T, dtype=torch.bool)
        for b, (p, r) in enumerate(rows):
            off = T - len(p) - len(r) if left else 0
            ids[b, off:off + len(p) + len(r)] = torch.tensor(p + r); resp[b, off + len(p):off + len(p) + len(r)] = True
        idx = response_index(resp)
        with torch.no_grad():
            Z, lp = qrm0(ids, None, pos=idx.pos), policy_logprobs(lm0, ids, None, idx)
            for b, (p, r) in enumerate(rows):
                for t, a in enumerate(r):
                    prev = (p + r)[len(p) + t - 1]
                    assert abs(Z[b, t].item() - float(norm(E[a]) @ w)) < 1e-5
                    assert abs(lp[b, t].item() - float(torch.log_softmax(W @ norm(E[prev]), -1)[a])) < 1e-5
                assert (lp[b, len(r):] == 0).all()

def _full_logps(lm, ids, am):
    with torch.no_grad(): lg = lm(input_ids=ids, attention_mask=am).logits.double().log_softmax(-1)
    return F.pad(lg[:, :-1].gather(-1, ids[:, 1:, None])[..., 0], (1, 0))     # [b, p] = log p(ids[p] | ids[<p])

def test_alignment_with_real_blocks_batched_equals_unbatched(world):
    tok, policy, qrm, _ = world
    P = [tok('3 plus 4 is')['input_ids'], tok('10 plus 2 is')['input_ids'], tok('1 plus 1 is')['input_ids']]
    R = [tok(' 7.')['input_ids'] + [tok.eos_token_id], tok(' 12')['input_ids'], tok(' 2. 2 plus 2 is 4.')['input_ids'] + [tok.eos_token_id]]
    b = pack_responses(P, R, tok.pad_token_id)
    idx = response_index(b['response_mask'])
    with torch.no_grad():
        Z, lp = qrm(b['input_ids'], b['attention_mask'], pos=idx.pos), policy_logprobs(policy, b['input_ids'], b['attention_mask'], idx, chunk_size=3)
        full = _full_logps(policy, b['input_ids'], b['attention_mask'])
        for i, (p, r) in enumerate(zip(P, R)):
            one = torch.tensor([p + r])
            z1 = qrm(one)[0, len(p):]                                              # Z at the response positions of the row alone
            torch.testing.assert_close(Z[i, :len(r)], z1, atol=1e-5, rtol=0)
            torch.testing.assert_close(lp[i, :len(r)].double(), full[i, len(p):len(p) + len(r)], atol=1e-5, rtol=0)
    assert score_responses(qrm, P, R, tok.pad_token_id)[1].shape == (len(R[1]),)

def test_bf16_scores_and_logprobs_close_to_fp32(world):
    tok, policy, qrm, _ = world
    b = pack_responses([tok('3 plus 4 is')['input_ids']] * 2, [tok(' 7.')['input_ids'], tok(' 8 and 9.')['input_ids']], tok.pad_token_id)
    idx = response_index(b['response_mask'])
    with torch.no_grad():
        z32, lp32 = qrm(b['input_ids'], b['attention_mask'], pos=idx.pos), policy_logprobs(policy, b['input_ids'], b['attention_mask'], idx)
        q16, p16 = copy.deepcopy(qrm).to(torch.bfloat16), copy.deepcopy(policy).to(torch.bfloat16)
        z16, lp16 = q16(b['input_ids'], b['attention_mask'], pos=idx.pos), policy_logprobs(p16, b['input_ids'], b['attention_mask'], idx)
    assert z16.dtype == torch.float32 and lp16.dtype == torch.float32
    torch.testing.assert_close(z16, z32, atol=0.05, rtol=0.05); torch.testing.assert_close(lp16, lp32, atol=0.1, rtol=0.05)

def test_lora_qrm_trains_adapter_and_head_only(world, tmp_path):
    from peft import LoraConfig
    tok, _, _, _ = world
    base = tiny_lm(tok, hidden=32, seed=11)
    q = qrm_from_causal_lm(copy.deepcopy(base), lora=LoraConfig(r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj']), seed=3)
    frozen = {n: p.detach().clone() for n, p in q.named_parameters() if not p.requires_grad}
    pairs = [dict(prompt=f'{a} plus {a} is', chosen=f' {2 * a}.', rejected=f' {2 * a + 1}.') for a in range(12)]
    tr = QRMTrainer(q, QRMConfig(output_dir=str(tmp_path), learning_rate=1e-2, per_device_train_batch_size=4, max_steps=3, save_strategy='no',
                                 disable_tqdm=True, use_cpu=True, logging_steps=1), train_dataset=pairs, processing_class=tok)
    tr.remove_callback(PrinterCallback); tr.train()
    assert all(torch.equal(p, frozen[n]) for n, p in q.named_parameters() if n in frozen)
    assert any('lora_B' in n and p.abs().sum() > 0 for n, p in q.named_parameters())
    save_qrm(q, tmp_path/'q', tok)
    b = pack_responses([tok('1 plus 1 is')['input_ids']], [tok(' 2.')['input_ids']], tok.pad_token_id)
    with torch.no_grad(): torch.testing.assert_close(load_qrm(tmp_path/'q')(b['input_ids'], b['attention_mask']), q(b['input_ids'], b['attention_mask']))

def test_qrm_trainer_matches_hand_loss_and_checkpoints(world, tmp_path):
    "The trainer's loss on a batch equals qrm_loss on an independent per-row forward; its checkpoint loads with load_qrm."
    tok, _, qrm, _ = world
    q = copy.deepcopy(qrm)
    pairs = [dict(prompt=f'{a} plus {b} is', chosen=f' {a + b}.', rejected=f' {a + b + 1} or so.') for a, b in ((1, 2), (3, 4), (2, 5))]
    tr = QRMTrainer(q, QRMConfig(output_dir=str(tmp_path), per_device_train_batch_size=3, max_steps=2, save_steps=2, disable_tqdm=True, use_cpu=True),
                    train_dataset=pairs, processing_class=tok)
    batch = tr.data_collator(encode_pairs(tok, pairs))
    with torch.no_grad(): got = float(tr.compute_loss(q, batch))
    enc = encode_pairs(tok, pairs)
    with torch.no_grad():
        zs = [(q(torch.tensor([e['prompt_ids'] + e[k]]))[0, len(e['prompt_ids']):]) for e in enc for k in ('chosen_ids', 'rejected_ids')]
    want = np.mean([math.log1p(math.exp(-(0.2 * (zs[2 * i].mean() - zs[2 * i + 1].mean()).item() - 2.0))) for i in range(3)])
    assert abs(got - want) < 1e-5
    tr.remove_callback(PrinterCallback); tr.train()
    ck = tmp_path/'checkpoint-2'
    with torch.no_grad(): torch.testing.assert_close(load_qrm(ck)(batch['input_ids'], batch['attention_mask']), q(batch['input_ids'], batch['attention_mask']))
    assert pairwise_accuracy(q, tok, pairs)['pairs'] == 3

# ---------------------------------------------------------------- dense rewards and advantages vs the reference buffer
def _ref_buffer(Z, masks, sub_mean=False, eos=False, old=None, ref=None, kl_coef=0.0, values=None, value_coef=0.01):
    "numpy loops written from the reference code's buffer semantics (np.std, abs KL, reward_is_q), row by row."
    Z, masks = Z.numpy().astype(np.float64), masks.numpy()
    v = Z[masks]
    r = (Z - v.mean()) / v.std() if sub_mean else Z / v.std()
    for i in range(Z.shape[0]):
        if eos:
            nz = np.nonzero(masks[i])[0]; r[i][nz[-1]] = r[i][masks[i]].mean()
    if old is not None: r = r - kl_coef * np.abs(old.numpy() - ref.numpy())
    r[~masks] = 0.0
    out = dict(rewards=r)
    if values is not None:
        V = values.numpy().astype(np.float64); vv = V[masks]
        Vn = (V - vv.mean()) / vv.std() if sub_mean else V / vv.std()
        out['advantages'] = np.where(masks, r - value_coef * Vn, 0.0); out['returns'] = r
    return out

@pytest.mark.parametrize('sub_mean,eos,kl', list(itertools.product([False, True], [False, True], [0.0, 0.05])))
def test_dense_rewards_and_q_advantages_against_reference_buffer(sub_mean, eos, kl):
    rng, g = random.Random(3), torch.Generator().manual_seed(3)
    B, L = 6, 8
    m = _masks(B, L, rng)
    Z = torch.randn(B, L, generator=g) * 3 + 1; Z[~m] = 1e6                    # garbage off the mask must not leak
    old, ref, V = torch.randn(B, L, generator=g), torch.randn(B, L, generator=g), torch.randn(B, L, generator=g) + 2
    r = dense_rewards(Z, m, True, sub_mean, 'mean' if eos else 'keep', kl_penalty(old, ref) if kl else None, kl)
    want = _ref_buffer(Z, m, sub_mean, eos, old if kl else None, ref, kl, V)
    np.testing.assert_allclose(r.numpy(), want['rewards'], atol=1e-5)
    A, R = q_advantages(r, V, m, 0.01, True, sub_mean)
    np.testing.assert_allclose(A.numpy(), want['advantages'], atol=1e-5); np.testing.assert_allclose(R.numpy(), want['returns'], atol=1e-5)

def test_sequence_rewards_and_kl_kinds():
    m = torch.tensor([[True, True, False], [True, False, False]])
    s = torch.tensor([0.5, -2.0])
    assert sequence_to_tokens(s, m).tolist() == [[0.5, 0.5, 0.0], [-2.0, 0.0, 0.0]]
    assert sequence_to_tokens(s, m, 'last').tolist() == [[0.0, 0.5, 0.0], [-2.0, 0.0, 0.0]]
    a, b = torch.tensor([[-1.0, -3.0]]), torch.tensor([[-2.0, -1.0]])
    assert kl_penalty(a, b).tolist() == [[1.0, 2.0]] and kl_penalty(a, b, 'k1').tolist() == [[1.0, -2.0]] and kl_penalty(a, b, 'mse').tolist() == [[0.5, 2.0]]
    with pytest.warns(UserWarning, match='std = 0'): assert normalize_rewards(torch.full((2, 3), 2.0), m).tolist() == [[2, 2, 0], [2, 0, 0]]
    with pytest.raises(ValueError, match='needs the per-token KL'): dense_rewards(torch.ones(2, 3), m, kl_coef=0.1)
    with pytest.raises(ValueError, match="placement='first'"): sequence_to_tokens(s, m, 'first')

def test_gae_against_naive_per_row_loop():
    rng, g = random.Random(4), torch.Generator().manual_seed(4)
    m = _masks(5, 7, rng); r, v = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    A, R = gae_advantages(r, v, m, 0.9, 0.8)
    for b in range(5):
        n = int(m[b].sum()); last, want = 0.0, [0.0] * n
        for t in reversed(range(n)):
            nv = v[b, t + 1].item() if t + 1 < n else 0.0
            last = r[b, t].item() + 0.9 * nv - v[b, t].item() + 0.9 * 0.8 * last
            want[t] = last
        np.testing.assert_allclose(A[b, :n].numpy(), want, atol=1e-5); np.testing.assert_allclose(R[b, :n].numpy(), np.array(want) + v[b, :n].numpy(), atol=1e-5)
        assert (A[b, n:] == 0).all()

def test_ppo_and_reinforce_losses_against_token_loops():
    rng, g = random.Random(5), torch.Generator().manual_seed(5)
    m = _masks(4, 6, rng)
    logp = (torch.randn(4, 6, generator=g) * 0.3 - 1).requires_grad_(True); old = logp.detach() + torch.randn(4, 6, generator=g) * 0.3
    A = torch.randn(4, 6, generator=g)
    loss, st = ppo_policy_loss(logp, old, A, m, 0.2)
    toks = [(b, t) for b in range(4) for t in range(6) if m[b, t]]
    want = 0.0
    for b, t in toks:
        ratio = math.exp(logp[b, t].item() - old[b, t].item())
        want -= min(ratio * A[b, t].item(), min(max(ratio, 0.8), 1.2) * A[b, t].item()) / len(toks)
    assert abs(loss.item() - want) < 1e-5
    assert abs(st['clipfrac'] - np.mean([abs(math.exp(logp[b, t].item() - old[b, t].item()) - 1) > 0.2 for b, t in toks])) < 1e-6
    rw = torch.randn(4, 6, generator=g)
    (gr,) = torch.autograd.grad(reinforce_loss(logp, rw, m), logp)
    torch.testing.assert_close(gr, torch.where(m, -rw / len(toks), 0.))                  # d/dlogp of −(1/#tokens) Σ r·logp
    assert abs(value_loss(A, rw, m).item() - np.mean([(A[b, t] - rw[b, t]).item() ** 2 for b, t in toks])) < 1e-6

# ---------------------------------------------------------------- reward sources and the loop
class _Recorder(TokenReward):
    "A dense reward source returning arbitrary values everywhere (garbage off the mask) and recording what it saw."
    name, vocab_size = 'recorder', None
    def __init__(self): self.seen = []
    def __call__(self, ro):
        self.seen.append(ro['mask'].clone())
        z = torch.arange(ro['mask'].numel(), dtype=torch.float32).view(ro['mask'].shape) % 5 - 2
        return torch.where(ro['mask'], z, torch.full_like(z, 1e9))

def _cfg(**kw):
    return DenseRLConfig(**(dict(algo='reinforce', learning_rate=1e-3, chunk_size=4, samples_per_prompt=2, micro_batch_size=4, max_new_tokens=5,
                                 forward_batch_size=3) | kw))

def test_dense_bxl_rewards_with_masks_reach_the_update(world, tmp_path):
    tok, policy, _, prompts = world
    rec = _Recorder()
    tr = DenseRewardTrainer(copy.deepcopy(policy), tok, rec, _cfg(), tmp_path, progress=False)
    ro = tr.rollout([dict(prompt=p) for p in prompts[:4]]); tr.score(ro); tr.build_buffer(ro)
    assert ro['raw'].shape == ro['mask'].shape and len(rec.seen) == 3                      # 8 rows in forward micro-batches of 3
    assert (ro['rewards'][~ro['mask']] == 0).all() and ro['rewards'].abs().max() < 10       # the 1e9 garbage never leaks
    want = _ref_buffer(torch.where(ro['mask'], ro['raw'], 0.), ro['mask'], eos=True)['rewards']
    np.testing.assert_allclose(ro['rewards'].numpy(), want, atol=1e-5)
    class Bad(_Recorder):
        def __call__(self, ro): return torch.zeros(len(ro), 1)
    with pytest.raises(ValueError, match=r'Bad returned rewards of shape \(3, 1\)'):
        DenseRewardTrainer(copy.deepcopy(policy), tok, Bad(), _cfg(), tmp_path/'bad', progress=False).train(prompts[:4])

def test_orm_dpo_rule_rewards_on_the_same_grid(world):
    tok, policy, qrm, _ = world
    b = pack_responses([tok('3 plus 4 is')['input_ids']] * 2, [tok(' 7.')['input_ids'] + [tok.eos_token_id], tok(' 8 and 9')['input_ids']], tok.pad_token_id)
    idx = response_index(b.pop('response_mask'))
    from fuselab.qrm import Rollout
    ro = Rollout(dict(b, pos=idx.pos, mask=idx.mask), [dict(prompt='3 plus 4 is', answer='7')] * 2, [' 7.', ' 8 and 9'], ['stop', 'length'])
    z = QRMReward(qrm)(ro)
    orm = ORMReward(qrm)(ro)
    for i in range(2):
        n = int(idx.mask[i].sum())
        assert torch.allclose(orm[i, :n], z[i, n - 1].expand(n)) and (orm[i, n:] == 0).all()
    dpo = tiny_lm(tok, hidden=32, seed=9)
    full = lambda m: _full_logps(m, b['input_ids'], b['attention_mask'])
    want = 0.1 * (at_positions(full(dpo), idx.pos) - at_positions(full(policy), idx.pos))
    torch.testing.assert_close(DPORMReward(dpo, policy)(ro), torch.where(idx.mask, want, 0.).float(), atol=1e-5, rtol=0)
    rr, n0 = RuleReward(arithmetic_reward, 'last')(ro), int(idx.mask[0].sum())
    assert rr[0, n0 - 1] == 1.0 and rr[0, :n0 - 1].abs().sum() == 0 and rr[1].abs().sum() == 0     # ' 7.' is right, ' 8 and 9' is not
    assert RuleReward(arithmetic_reward)(ro)[0, :n0].tolist() == [1.0] * n0

def test_tokenizer_mismatch_and_vocab_errors(world, tmp_path):
    tok, policy, qrm, prompts = world
    other = train_tokenizer(['completely different words here'] * 50, vocab_size=300, kind='wordpiece')
    with pytest.raises(ValueError, match='tokenizers differ'): DenseRewardTrainer(policy, tok, QRMReward(qrm, other), _cfg(), tmp_path)
    small = qrm_from_causal_lm(tiny_lm(50, hidden=16), seed=0)
    with pytest.raises(ValueError, match='embeds only 50'): DenseRewardTrainer(policy, tok, QRMReward(small), _cfg(), tmp_path)
    with pytest.raises(ValueError, match='PPO needs a critic'): DenseRewardTrainer(policy, tok, RuleReward(lambda r, t: 1.0), _cfg(algo='ppo'), tmp_path)
    check_same_tokenizer(tok, copy.deepcopy(tok))
    with pytest.raises(ValueError, match="algo='a2c'"): _cfg(algo='a2c')

def _same(a, b): return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))

@pytest.mark.parametrize('algo', ['reinforce', 'ppo'])
def test_resumed_run_continues_from_its_last_chunk(world, tmp_path, algo):
    tok, policy, qrm, prompts = world
    cfg = _cfg(algo=algo)
    full = copy.deepcopy(policy)
    full_tr = DenseRewardTrainer(full, tok, QRMReward(qrm), cfg, tmp_path/'full', progress=False)
    full_tr.train(prompts)
    ran = []
    def crash(trainer, c, st):
        ran.append(c)
        if c == 1: raise RuntimeError('boom after chunk 1')
    crashed = copy.deepcopy(policy)
    with pytest.raises(RuntimeError, match='boom'):
        DenseRewardTrainer(crashed, tok, QRMReward(qrm), cfg, tmp_path/'crash', progress=False).train(prompts, [crash])
    after_chunk1 = copy.deepcopy(crashed)
    resumed = copy.deepcopy(policy)                                           # a fresh process: the initial policy again
    tr = DenseRewardTrainer(resumed, tok, QRMReward(qrm), cfg, tmp_path/'crash', progress=False)
    hist = tr.train(prompts, [lambda t, c, s: ran.append(c)])
    assert ran == [0, 1, 2] and [h['chunk'] for h in hist] == [0, 1, 2]        # only chunk 2 ran after the restart
    assert not _same(after_chunk1, policy) and _same(resumed, full)             # continued from the saved weights, ended equal
    if algo == 'ppo': assert _same(tr.acc.unwrap_model(tr.critic), full_tr.acc.unwrap_model(full_tr.critic))   # the critic resumed too
    assert DenseRewardTrainer(copy.deepcopy(policy), tok, QRMReward(qrm), cfg, tmp_path/'crash', progress=False).train(prompts) == hist   # finished: nothing reruns
    with pytest.raises(ValueError, match='over other prompts'):
        DenseRewardTrainer(copy.deepcopy(policy), tok, QRMReward(qrm), cfg, tmp_path/'crash', progress=False).train(prompts[::-1])

def test_ppo_critic_from_qrm_with_fresh_head_and_value_positions(world, tmp_path):
    tok, policy, qrm, prompts = world
    for value_at in ('action', 'state'):
        tr = DenseRewardTrainer(copy.deepcopy(policy), tok, QRMReward(qrm), _cfg(algo='ppo', value_at=value_at, chunk_size=4), tmp_path/value_at, progress=False)
        crit = tr.acc.unwrap_model(tr.critic)
        assert not torch.equal(crit.head.weight, qrm.head.weight) and torch.equal(crit.backbone.embed_tokens.weight, qrm.backbone.embed_tokens.weight)
        ro = tr.rollout([dict(prompt=p) for p in prompts[:4]]); tr.score(ro)
        with torch.no_grad():
            pos = ro['pos'] if value_at == 'action' else (ro['pos'] - 1).clamp_min(0)
            want = crit(ro.input_ids, ro.attention_mask, pos=pos)
        torch.testing.assert_close(torch.where(ro['mask'], ro['values'], 0.), torch.where(ro['mask'], want, 0.))
        tr.build_buffer(ro)
        A, R = q_advantages(ro['rewards'], ro['values'], ro['mask'])
        torch.testing.assert_close(ro['advantages'], A); torch.testing.assert_close(ro['returns'], R)
        st = tr.update(ro, 0)
        assert st['lr'] == pytest.approx(1e-3 * 0.075) and math.isfinite(st['value_loss'])

def test_generator_refresh_for_a_separate_hf_model(world, tmp_path):
    from fuselab.gen import HFGenerator
    tok, policy, qrm, prompts = world
    gen_model = copy.deepcopy(policy)
    tr = DenseRewardTrainer(copy.deepcopy(policy), tok, QRMReward(qrm), _cfg(), tmp_path, generator=HFGenerator(gen_model, tok), progress=False)
    tr.train(prompts[:4])
    assert _same(gen_model, tr.policy) and not _same(gen_model, policy)

# ---------------------------------------------------------------- evaluation and the miniature's helpers
def test_pass_at_k_against_subset_enumeration():
    for n, c, k in [(5, 2, 1), (5, 2, 3), (6, 0, 2), (6, 6, 4), (7, 3, 7), (8, 1, 5)]:
        subsets = list(itertools.combinations([1] * c + [0] * (n - c), k))
        assert abs(pass_at_k(n, c, k) - np.mean([any(s) for s in subsets])) < 1e-12
    with pytest.raises(ValueError): pass_at_k(3, 1, 4)

def test_answer_extraction_styles():
    assert extract_answer('12+3=15, 15-4=11. #### 11') == '11' and extract_answer('x is \\boxed{3\\sqrt{2}} or 4', 'math') == '3\\sqrt{2}'
    assert extract_answer('no box, 42', 'math') is None and extract_answer('no box, 42', 'auto') == '42'
    assert answer_correct('so 3/4', '0.75') and not answer_correct('so 3/5', '0.75') and answer_correct('\\boxed{50\\%}', '0.5', 'math')
    with pytest.raises(ValueError, match='empty'): answer_correct('1', '')

def test_evaluate_pass_at_k_counts_with_a_real_generator(world):
    from fuselab.gen import HFGenerator
    tok, policy, _, _ = world
    recs = [dict(prompt=f'{a} plus {b} is', answer=str(a + b)) for a, b in ((1, 2), (3, 4))]
    gen = HFGenerator(policy, tok)
    torch.manual_seed(0)
    res = evaluate_pass_at_k(gen, recs, n=4, ks=(1, 4), max_new_tokens=4)
    torch.manual_seed(0)
    outs = gen.generate([r['prompt'] for r in recs], temperature=0, max_new_tokens=4, progress=False)
    assert res['greedy'] == np.mean([answer_correct(o[0].text, r['answer']) for o, r in zip(outs, recs)])
    assert 0 <= res['pass@1'] <= res['pass@4'] <= 1 and res['prompts'] == 2

def test_arithmetic_world_helpers():
    ps = arithmetic_problems(200, seed=1)
    assert all(arithmetic_reward(p, p['solution']) == 1.0 and int(p['answer']) >= 0 for p in ps)
    assert arithmetic_problems(5, seed=1) == ps[:5] and arithmetic_problems(5, seed=2) != ps[:5]
    tok = train_tokenizer([p['prompt'] + p['solution'] for p in ps], vocab_size=300)
    for p in ps[:20]:
        sol = p['solution']
        assert first_error_token(tok, tok(sol, add_special_tokens=False)['input_ids'], sol) is None
        i = sol.index('=') + 1                                                    # corrupt the first result's first digit
        wrong = sol[:i] + str((int(sol[i]) + 1) % 10) + sol[i + 1:]
        ids = tok(wrong, add_special_tokens=False)['input_ids']
        k = first_error_token(tok, ids, sol)
        assert sol.startswith(tok.decode(ids[:k])) and not sol.startswith(tok.decode(ids[:k + 1]))
        assert len(tok.decode(ids[:k])) <= i < len(tok.decode(ids[:k + 1]))      # the token holding the corrupted digit

def test_file_driven_run_resumes_the_rm_stage_from_its_checkpoint(world, tmp_path):
    "qrm_run on files: rm → rl → eval; a killed rm stage (results missing) resumes from the Trainer's last checkpoint."
    import json, shutil, yaml
    tok, policy, _, prompts = world
    policy.save_pretrained(tmp_path/'policy'); tok.save_pretrained(tmp_path/'policy')
    pairs = [dict(prompt=f'{a} plus {b} is', chosen=f' {a + b}.', rejected=f' {a + b + 1}.') for a in range(6) for b in range(4)]
    (tmp_path/'pairs.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in pairs))
    (tmp_path/'prompts.jsonl').write_text(''.join(json.dumps(dict(prompt=p, answer=str(sum(int(x) for x in p.split()[::2])))) + '\n' for p in prompts[:4]))
    cfg = dict(policy='policy', pairs='pairs.jsonl', prompts='prompts.jsonl', eval_data='prompts.jsonl', out_dir='out', rm_eval_fraction=0.25,
               rm=dict(per_device_train_batch_size=4, max_steps=4, save_steps=2, learning_rate=1e-3), rl=dict(learning_rate=1e-3, chunk_size=2, samples_per_prompt=2,
               max_new_tokens=3), eval=dict(n=2, ks=[1, 2], max_new_tokens=3))
    (tmp_path/'run.yml').write_text(yaml.safe_dump(cfg))
    c = QRMRunConfig.from_yaml(tmp_path/'run.yml')
    assert c.policy == str(tmp_path/'policy') and c.out_dir == str(tmp_path/'out')
    r1 = qrm_stage_rm(c, progress=False)
    assert r1['steps'] == 4 and r1['held_out'] == 6 and r1['resumed_from'] is None
    (tmp_path/'out'/'qrm'/'results.json').unlink()                              # as if killed before the stage finished
    c2 = QRMRunConfig.from_yaml(tmp_path/'run.yml'); c2.rm = dict(c2.rm, max_steps=6)
    r2 = qrm_stage_rm(c2, progress=False)
    assert r2['resumed_from'] == 'checkpoint-4' and r2['steps'] == 6
    out = qrm_run(c2, progress=False)
    assert out['rl']['chunks'] == 2 and 'correct' in out['rl']['history'][-1] and set(out['eval']) == {'policy', 'rl'}
    assert (tmp_path/'out'/'rl'/'final'/'config.json').exists()
    with pytest.raises(ValueError, match='unknown field'):
        (tmp_path/'bad.yml').write_text(yaml.safe_dump(dict(policy='policy', learning_rate=1.0))); QRMRunConfig.from_yaml(tmp_path/'bad.yml')
    with pytest.raises(ValueError, match="unknown stage"): qrm_run(c2, ['train'])

def test_trainer_after_another_accelerator_state(world, tmp_path):
    "Regression (seen on the H200 run): a Trainer earlier in the process fixed mixed_precision='bf16'; DenseRewardTrainer still builds its own."
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    tok, policy, qrm, prompts = world
    AcceleratorState._reset_state(reset_partial_state=False)        # whatever earlier tests in this worker left
    Accelerator(mixed_precision='bf16', cpu=True)
    try:
        t = DenseRewardTrainer(copy.deepcopy(policy), tok, QRMReward(qrm, tok), _cfg(), tmp_path, progress=False)
        assert t.acc.mixed_precision == 'no'
    finally: AcceleratorState._reset_state(reset_partial_state=False)

@pytest.mark.gpu
def test_cuda_bf16_scores_logprobs_and_one_ppo_chunk(world, tmp_path):
    "On a GPU: bf16 Q-RM scores and chunked log-probs match the fp32 CPU values; a PPO chunk (critic, KL, accelerate) runs in bf16."
    tok, policy, qrm, prompts = world
    b = pack_responses([tok('3 plus 4 is')['input_ids']] * 2, [tok(' 7.')['input_ids'], tok(' 8 and 9.')['input_ids']], tok.pad_token_id)
    idx = response_index(b['response_mask'])
    p16, q16 = copy.deepcopy(policy).to('cuda', torch.bfloat16), copy.deepcopy(qrm).to('cuda', torch.bfloat16)
    bc, ic = {k: v.cuda() for k, v in b.items()}, response_index(b['response_mask'].cuda())
    with torch.no_grad():
        torch.testing.assert_close(q16(bc['input_ids'], bc['attention_mask'], pos=ic.pos).cpu(), qrm(b['input_ids'], b['attention_mask'], pos=idx.pos), atol=0.05, rtol=0.05)
        torch.testing.assert_close(policy_logprobs(p16, bc['input_ids'], bc['attention_mask'], ic).cpu(),
                                   policy_logprobs(policy, b['input_ids'], b['attention_mask'], idx), atol=0.1, rtol=0.05)
    hist = DenseRewardTrainer(p16, tok, QRMReward(q16, tok), _cfg(algo='ppo', chunk_size=4), tmp_path, progress=False).train(prompts[:4])
    assert len(hist) == 1 and all(math.isfinite(hist[0][k]) for k in ('policy_loss', 'value_loss', 'kl'))
