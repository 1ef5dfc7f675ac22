"DCKD / ADPA: sparse losses against dense oracles, teacher passes, the cross-tokenizer transport, the trainer, the pipeline."
import copy, json, math, random
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fuselab.core import IGNORE_INDEX
from fuselab.data import TopKStore, tokenize_pair
from fuselab.testing import train_tokenizer, tiny_lm
from fuselab.adpa import (support_logprobs, topk_kl, dckd_loss, adpa_advantage, code_ref_logprobs, adpa_loss, teacher_topk,
                          support_pass, advantage_store, transport_topk, DistillConfig, DistillCollator, DistillTrainer,
                          ADPAConfig, adpa_run, load_preference_data)

@pytest.fixture(scope='module', autouse=True)
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1); yield; torch.set_num_threads(n)

# ---------------------------------------------------------------- pure maths

def test_support_logprobs_dense_gradcheck_and_bf16():
    g = torch.Generator().manual_seed(0)
    h, W = torch.randn(3, 6, 8, generator=g, dtype=torch.float64), torch.randn(40, 8, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 40, (3, 6, 5), generator=g)
    torch.testing.assert_close(support_logprobs(h, W, ids, chunk_size=4), torch.log_softmax(h @ W.T, -1).gather(-1, ids))
    assert torch.autograd.gradcheck(lambda h, W: support_logprobs(h, W, ids, chunk_size=4), (h.requires_grad_(), W.requires_grad_()))
    hb, Wb = h.detach().bfloat16().requires_grad_(), W.detach().bfloat16().requires_grad_()
    out = support_logprobs(hb, Wb, ids)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    out.sum().backward()
    assert hb.grad.dtype == torch.bfloat16 and torch.isfinite(hb.grad.float()).all()
    with pytest.raises(ValueError, match='outside the student vocabulary'): support_logprobs(h, W, ids + 40)
    with pytest.raises(ValueError, match='disagree on the positions'): support_logprobs(h, W, ids[:, :5])

@pytest.mark.parametrize('stored_tail', [False, True])
def test_topk_kl_equals_dense_coarsened_kl(stored_tail):
    "Teacher top-k + tail vs student: the KL of the two distributions coarsened to {support} ∪ {tail}, by F.kl_div, per position."
    g = torch.Generator().manual_seed(2)
    P, Z = torch.softmax(2 * torch.randn(4, 5, 30, generator=g, dtype=torch.float64), -1), torch.randn(4, 5, 30, generator=g, dtype=torch.float64)
    top = P.topk(6, -1)
    lq = torch.log_softmax(Z, -1).gather(-1, top.indices)
    mask = torch.ones(4, 5, dtype=torch.bool); mask[3, 2:] = False
    tail = 1 - top.values.sum(-1)
    kl, st = topk_kl(lq, top.values.log(), mask, tail if stored_tail else None, reduction='none', floor=1e-30)
    Q = torch.softmax(Z, -1)
    coarse = lambda D: torch.cat([D.gather(-1, top.indices), 1 - D.gather(-1, top.indices).sum(-1, keepdim=True)], -1)
    oracle = F.kl_div(coarse(Q).log(), coarse(P), reduction='none').sum(-1)
    torch.testing.assert_close(kl.double()[mask], oracle[mask], atol=1e-6, rtol=1e-5)
    assert (kl[~mask] == 0).all() and st['n_tokens'] == int(mask.sum())
    b, _ = topk_kl(lq, top.values.log(), mask, reduction='batch', floor=1e-30)
    assert float(b) == pytest.approx(float(oracle[mask].mean()), rel=1e-5)
    s, _ = topk_kl(lq, top.values.log(), mask, tail=False, reduction='none', floor=1e-30)  # support terms only
    torch.testing.assert_close(s.double()[mask], (top.values * (top.values.log() - lq)).sum(-1)[mask], atol=1e-6, rtol=1e-5)

def test_topk_kl_floor_empty_rows_and_gradient():
    lq = torch.tensor([[[-30., -0.1, math.log(.05)]]], requires_grad=True)            # q=exp(-30) < 1e-7: floored
    tl = torch.tensor([[[math.log(.2), math.log(.5), float('-inf')]]])                 # an empty slot
    kl, _ = topk_kl(lq, tl, torch.ones(1, 1, dtype=torch.bool), reduction='none')
    q1 = math.exp(-.1)
    qt = 1 - (math.exp(-30) + q1)                      # the student's tail: everything off the teacher's live support (slot 2 included)
    ref = .2 * math.log(.2 / 1e-7) + .5 * math.log(.5 / q1) + .3 * math.log(.3 / qt)
    assert float(kl.detach()) == pytest.approx(ref, rel=1e-5)
    kl.sum().backward()
    assert float(lq.grad[0, 0, 1]) == pytest.approx(-.5 + .3 * q1 / qt, rel=1e-4)   # support term + tail term
    assert abs(float(lq.grad[0, 0, 0])) < 1e-9         # floored: no support gradient, a negligible tail one
    assert float(lq.grad[0, 0, 2]) == 0                # an empty teacher slot is not part of the support
    e, st = topk_kl(lq.detach(), torch.full((1, 1, 3), float('-inf')), torch.ones(1, 1, dtype=torch.bool), reduction='batch')
    assert float(e) == 0 and st['n_empty'] == 1
    with pytest.raises(ValueError, match='NaN'): topk_kl(lq, torch.full((1, 1, 3), float('nan')), torch.ones(1, 1, dtype=torch.bool))

def test_dckd_loss_weights():
    assert float(dckd_loss(torch.tensor(2.), torch.tensor(3.), torch.tensor(5.))) == pytest.approx(2 + .1 * 3 + .1 * 5)
    assert float(dckd_loss(torch.tensor(2.), torch.tensor(3.), torch.tensor(5.), 0.5, 2., .2, .3)) == pytest.approx(1 + 2 * (.6 + 1.5))

def test_adpa_loss_formula_modes_and_weights():
    g = torch.Generator().manual_seed(3)
    Z = torch.randn(2, 4, 12, generator=g, dtype=torch.float64)
    ids = torch.stack([torch.randperm(12, generator=g)[:5] for _ in range(8)]).view(2, 4, 5)
    A = 3 * torch.randn(2, 4, 5, generator=g, dtype=torch.float64)
    sup = torch.ones(2, 4, 5, dtype=torch.bool); sup[0, 1, 3:] = False
    m = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    lq = torch.log_softmax(Z, -1).gather(-1, ids)
    w = torch.tensor([.5, 2.])
    for mode, Ae in (('paper', A), ('code_compat', A.clamp(1e-8, 1 - 1e-8))):
        loss, _ = adpa_loss(lq, A, m, sup, mode, w, reduction='sequence')
        for b in range(2):                                                       # naive loop
            tot = [-sum(math.exp(float(lq[b, t, j])) * float(Ae[b, t, j]) for j in range(5) if sup[b, t, j]) for t in range(4) if m[b, t]]
            assert float(loss[b]) == pytest.approx(float(w[b]) * sum(tot) / len(tot), rel=1e-6)
    assert adpa_loss(lq, A, m, sup, 'code_compat')[1]['adv_mean'] <= 1
    with pytest.raises(ValueError, match="'paper'"): adpa_loss(lq, A, m, mode='clip')

def test_adpa_gradient_direction_paper_vs_code_compat():
    "paper: one step raises q where A>0 and lowers it where A<0; code_compat turns A<0 into 1e-8 (≈ no push down)."
    z0 = torch.zeros(1, 1, 6)
    A = torch.tensor([[[1.5, -1.5, .5, -.5]]]); ids = torch.tensor([[[0, 1, 2, 3]]])
    for mode in ('paper', 'code_compat'):
        z = z0.clone().requires_grad_()
        loss, _ = adpa_loss(torch.log_softmax(z, -1).gather(-1, ids), A, torch.ones(1, 1, dtype=torch.bool), mode=mode)
        gz, = torch.autograd.grad(loss, z)
        dq = torch.softmax(z0 - .1 * gz, -1)[0, 0] - 1 / 6
        assert dq[0] > 0 and dq[2] > 0
        if mode == 'paper': assert dq[1] < 0 and dq[3] < 0 and dq[1] < dq[3]
        else: assert abs(float(dq[1] - dq[3])) < 1e-7 and dq[0] > dq[2]      # both negatives clamped to the same 1e-8
    with torch.no_grad():
        Ac = adpa_loss(torch.zeros(1, 1, 4), torch.tensor([[[-3., 0., .3, 7.]]]), torch.ones(1, 1, dtype=torch.bool), mode='code_compat')[0]
    assert float(Ac) == pytest.approx(-(1e-8 + 1e-8 + .3 + (1 - 1e-8)))

def test_advantage_and_code_reference_floor():
    dl = torch.log(torch.tensor([[.5, .3, .1, 0.]])); dl[0, 3] = float('-inf')
    rl = torch.log(torch.tensor([[.25, .6, .1, .5]]))
    A = adpa_advantage(dl, rl, beta=2.)
    torch.testing.assert_close(A, torch.tensor([[2 * math.log(2), 2 * math.log(.5), 0., 0.]]))
    ids, rids = torch.tensor([[7, 3, 9, 0]]), torch.tensor([[3, 8, 7, 1]])
    rlp = torch.log(torch.tensor([[.4, .3, .2, .1]]))
    c = code_ref_logprobs(ids, dl, rids, rlp)
    torch.testing.assert_close(c, torch.log(torch.tensor([[.2, .4, .1, .1]])))   # 9 is not in the reference's top-k: floor = min DPO p = .1
    with pytest.raises(ValueError, match='not finite'): adpa_advantage(dl, torch.full_like(dl, float('-inf')))

# ---------------------------------------------------------------- teacher passes, transport, trainer

PROMPTS = [f'{a}+{b}=' for a, b in [(12, 30), (7, 8), (41, 2), (3, 33), (25, 25), (9, 90)]]

@pytest.fixture(scope='module')
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp('adpa')
    rows = [dict(key=i, prompt=p, chosen=f' {eval(p[:-1])}\n', rejected=f' {eval(p[:-1]) + 1}\n') for i, p in enumerate(PROMPTS)]
    tok = train_tokenizer([r['prompt'] + r['chosen'] + r['rejected'] for r in rows] * 20, vocab_size=300)
    return d, rows, tok, tiny_lm(tok, hidden=32, seed=1), tiny_lm(tok, hidden=32, seed=2), tiny_lm(tok, hidden=16, seed=3)

def _recs(tok, rows, slot):
    return [dict(key=r['key'], **{k: v for k, v in tokenize_pair(tok, r['prompt'], r[slot]).items() if k != 'response_mask'}) for r in rows]

def _dense(model, recs):
    out = []
    for r in recs:
        with torch.no_grad(): out.append(torch.log_softmax(model(input_ids=torch.tensor([r['input_ids']])).logits[0].double(), -1))
    return out

def test_teacher_topk_tail_and_support_pass(world):
    "Stored top-k, tail = 1 - Σ top-k (mass conservation) and the reference scored at the DPO ids all match dense softmaxes."
    d, rows, tok, dpo, ref, _ = world
    recs = _recs(tok, rows, 'chosen')
    st = teacher_topk(dpo, recs, d/'dpo', k=7, progress=False)
    rs = support_pass(ref, recs, st, d/'ref', progress=False)
    for r, D, R in zip(recs, _dense(dpo, recs), _dense(ref, recs)):
        s = st[r['key']]
        top = D.topk(7, -1)
        np.testing.assert_allclose(s.logprobs.astype(np.float64), top.values.numpy(), atol=2e-2)
        np.testing.assert_allclose(s.tail.astype(np.float64), (1 - top.values.exp().sum(-1)).numpy(), atol=1e-3)
        np.testing.assert_allclose(s.tail + np.exp(s.logprobs.astype(np.float64)).sum(-1), 1, atol=3e-3)
        np.testing.assert_allclose(rs[r['key']].logprobs.astype(np.float64), R.gather(-1, torch.from_numpy(np.array(s.ids)).long()).numpy(), atol=2e-2)
    adv = advantage_store(st, rs, d/'margin', progress=False)
    k0 = recs[0]['key']
    np.testing.assert_allclose(adv[k0].logprobs.astype(np.float32), st[k0].logprobs.astype(np.float32) - rs[k0].logprobs.astype(np.float32), atol=2e-2)
    with pytest.raises(Exception, match='ref_topk'): advantage_store(st, rs, d/'margin2', ref_support='code')

def _trainer(model, tok, recs, stores, other, tmp, **kw):
    args = DistillConfig(output_dir=str(tmp), report_to=[], per_device_train_batch_size=len(recs), gradient_checkpointing=False,
                         disable_tqdm=True, save_strategy='no', chunk_size=5, **kw)
    return DistillTrainer(copy.deepcopy(model), args=args, train_dataset=recs, data_collator=DistillCollator(stores, tok.pad_token_id, other), processing_class=tok)

def _pairs(tok, rows, other):
    c, o = _recs(tok, rows, 'chosen'), _recs(tok, rows, other if other != 'gen' else 'rejected')
    return [dict(key=a['key'], chosen_input_ids=a['input_ids'], chosen_labels=a['labels'],
                 **{f'{other}_input_ids': b['input_ids'], f'{other}_labels': b['labels']}) for a, b in zip(c, o)]

def _loss(t, recs):
    batch = t._prepare_inputs(t.data_collator(recs))
    return t.compute_loss(t.model, batch)

def test_dckd_trainer_equals_dense_loop(world, tmp_path):
    "DistillTrainer('dckd') = λ_sft·NLL(y_w) + α_w·KL_w + α_l·KL_l recomputed from full-vocabulary student logits, position by position."
    d, rows, tok, dpo, _, student = world
    stores = {s: teacher_topk(dpo, _recs(tok, rows, s), d/f'dckd-{s}', k=6, progress=False) for s in ('chosen', 'rejected')}
    recs = _pairs(tok, rows, 'rejected')
    t = _trainer(student, tok, recs, stores, 'rejected', tmp_path, distill_loss='dckd', alpha_w=.3, alpha_l=.2, lambda_sft=.7)
    loss = float(_loss(t, recs))
    nll, kls = [], {'chosen': [], 'rejected': []}
    for r in recs:
        for s in ('chosen', 'rejected'):
            ids = r[f'{s}_input_ids']
            with torch.no_grad(): L = torch.log_softmax(student(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            st = stores[s][r['key']]
            for j in range(len(ids) - 1):
                if r[f'{s}_labels'][j + 1] == IGNORE_INDEX: continue
                if s == 'chosen': nll.append(-float(L[j, ids[j + 1]]))
                p, sid, tail = np.exp(st.logprobs[j].astype(np.float64)), np.array(st.ids[j]), float(st.tail[j])
                q = L[j, torch.from_numpy(sid).long()].exp().numpy()
                qt = max(1 - q.sum(), 1e-7)
                kls[s].append(float((p * (np.log(p) - np.log(np.maximum(q, 1e-7)))).sum() + (tail * (math.log(tail) - math.log(qt)) if tail > 0 else 0)))
    ref = .7 * np.mean(nll) + .3 * np.mean(kls['chosen']) + .2 * np.mean(kls['rejected'])
    assert loss == pytest.approx(ref, rel=2e-4)

@pytest.mark.parametrize('mode', ['paper', 'code_compat'])
def test_adpa_trainer_equals_dense_loop_and_importance_weight(world, tmp_path, mode):
    d, rows, tok, dpo, ref, student = world
    g = _recs(tok, rows, 'rejected')                                         # stand-in generations
    st = teacher_topk(dpo, g, d/'gen-dpo', k=6, progress=False)
    margin = advantage_store(st, support_pass(ref, g, st, d/'gen-ref', progress=False), d/'gen-margin', progress=False)
    recs = _pairs(tok, rows, 'gen')
    for r in recs: r['gen_init_logp'] = -3.0
    t = _trainer(student, tok, recs, {'gen': margin}, 'gen', tmp_path, distill_loss='adpa', adpa_mode=mode, adpa_weight=1.6, adpa_beta=.5)
    tw = _trainer(student, tok, recs, {'gen': margin}, 'gen', tmp_path, distill_loss='adpa', adpa_mode=mode, adpa_weight=1.6, adpa_beta=.5, importance_weight=True)
    loss, loss_w = float(_loss(t, recs)), float(_loss(tw, recs))
    nll, seq, seq_w = [], [], []
    for r in recs:
        for s in ('chosen', 'gen'):
            ids = r[f'{s}_input_ids']
            with torch.no_grad(): L = torch.log_softmax(student(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            terms, lp_y = [], 0.
            for j in range(len(ids) - 1):
                if r[f'{s}_labels'][j + 1] == IGNORE_INDEX: continue
                if s == 'chosen': nll.append(-float(L[j, ids[j + 1]])); continue
                lp_y += float(L[j, ids[j + 1]])
                m = margin[r['key']]
                A = .5 * m.logprobs[j].astype(np.float64)
                if mode == 'code_compat': A = np.clip(A, 1e-8, 1 - 1e-8)
                terms.append(-(L[j, torch.from_numpy(np.array(m.ids[j])).long()].exp().numpy() * A).sum())
            if s == 'gen': seq.append(np.mean(terms)); seq_w.append(np.mean(terms) * math.exp(lp_y + 3.0))
    assert loss == pytest.approx(np.mean(nll) + 1.6 * np.mean(seq), rel=2e-4)
    assert loss_w == pytest.approx(np.mean(nll) + 1.6 * np.mean(seq_w), rel=2e-4)

def test_cross_tokenizer_path_equals_same_tokenizer_path(world, tmp_path):
    "Transport with identical tokenizers (identity alignment and vocabulary map) leaves the stores, and so both losses, unchanged."
    d, rows, tok, dpo, ref, student = world
    tok2 = copy.deepcopy(tok)
    vm = np.arange(len(tok), dtype=np.int32)
    V = student.get_output_embeddings().weight.shape[0]
    stores, moved = {}, {}
    for s in ('chosen', 'rejected'):
        recs = _recs(tok, rows, s)
        stores[s] = teacher_topk(dpo, recs, d/f'x-{s}', k=6, progress=False)
        moved[s], stats = transport_topk(tok, tok2, recs, _recs(tok2, rows, s), stores[s], tmp_path/f'moved-{s}', vm, V, progress=False)
        assert stats['transferred'] == sum(len(r['input_ids']) for r in recs) and stats.get('fallback', 0) == 0
        for r in recs:
            a, b = stores[s][r['key']], moved[s][r['key']]
            np.testing.assert_array_equal(a.ids, b.ids); np.testing.assert_array_equal(a.logprobs, b.logprobs)
            np.testing.assert_allclose(a.tail, b.tail, atol=2e-3)
    recs = _pairs(tok, rows, 'rejected')
    l1 = float(_loss(_trainer(student, tok, recs, stores, 'rejected', tmp_path/'a', distill_loss='dckd'), recs))
    l2 = float(_loss(_trainer(student, tok, recs, moved, 'rejected', tmp_path/'b', distill_loss='dckd'), recs))
    assert l2 == pytest.approx(l1, rel=1e-3)
    g = _recs(tok, rows, 'rejected')
    st = teacher_topk(dpo, g, d/'x-gen', k=6, progress=False)
    margin = advantage_store(st, support_pass(ref, g, st, d/'x-gen-ref', progress=False), d/'x-gen-margin', progress=False)
    mm, _ = transport_topk(tok, tok2, g, _recs(tok2, rows, 'rejected'), margin, tmp_path/'moved-gen', vm, V, values='margins', progress=False)
    recs = _pairs(tok, rows, 'gen')
    a1 = float(_loss(_trainer(student, tok, recs, {'gen': margin}, 'gen', tmp_path/'c', distill_loss='adpa'), recs))
    a2 = float(_loss(_trainer(student, tok, recs, {'gen': mm}, 'gen', tmp_path/'d', distill_loss='adpa'), recs))
    assert a2 == pytest.approx(a1, rel=1e-6)

def test_cross_tokenizer_transport_real_pair(world, tmp_path):
    "Different tokenizers (byte-level BPE teacher, metaspace BPE student): ids land in the student vocabulary, margins carried, fallbacks carry none."
    d, rows, tok, dpo, ref, _ = world
    stok = train_tokenizer([r['prompt'] + r['chosen'] + r['rejected'] for r in rows] * 20, vocab_size=120, kind='metaspace')
    from fuselab.fusellm import fusion_vocab_map
    vm = fusion_vocab_map(tok, stok, dpo.get_output_embeddings().weight.shape[0])
    g = _recs(tok, rows, 'rejected')
    st = teacher_topk(dpo, g, d/'y-gen', k=6, progress=False)
    margin = advantage_store(st, support_pass(ref, g, st, d/'y-gen-ref', progress=False), d/'y-gen-margin', progress=False)
    srecs = _recs(stok, rows, 'rejected')
    mm, stats = transport_topk(tok, stok, g, srecs, margin, tmp_path/'y', vm, len(stok), values='margins', progress=False)
    assert stats['transferred'] > 0 and len(mm) == len(rows)
    teacher_vals = {float(v) for r in g for v in margin[r['key']].logprobs.ravel() if np.isfinite(v)}
    n_fb = 0
    for r in srecs:
        s = mm[r['key']]
        assert s.ids.shape == (len(r['input_ids']), 6) and s.ids.max() < len(stok)
        live = np.isfinite(s.logprobs)
        assert {float(v) for v in s.logprobs[live]} <= teacher_vals | {0.0}    # carried, never renormalised
        n_fb += int(((live.sum(-1) == 1) & (np.where(live, s.logprobs, 1) == 0).any(-1)).sum())
    assert n_fb >= stats.get('fallback', 0)                                    # every fallback row carries a single 0 margin

def test_bad_input_messages(world, tmp_path):
    d, rows, tok, dpo, _, student = world
    with pytest.raises(ValueError, match='distill_loss'): DistillConfig(output_dir=str(tmp_path), distill_loss='kd')
    with pytest.raises(ValueError, match='adpa_mode'): DistillConfig(output_dir=str(tmp_path), adpa_mode='clip')
    recs = _pairs(tok, rows, 'rejected')
    t = _trainer(student, tok, recs, {}, 'rejected', tmp_path, distill_loss='dckd')
    with pytest.raises(ValueError, match="teacher rows of 'rejected'"): _loss(t, recs)
    big = TopKStore(tmp_path/'big', k=2, vocab_size=10**6)
    with big.writer() as w:
        for r in _recs(tok, rows, 'rejected'): w.add(r['key'], np.full((len(r['input_ids']), 2), 10**5), np.full((len(r['input_ids']), 2), -1.))
    t = _trainer(student, tok, _pairs(tok, rows, 'gen'), {'gen': big}, 'gen', tmp_path, distill_loss='adpa')
    with pytest.raises(ValueError, match='outside the student vocabulary'): _loss(t, _pairs(tok, rows, 'gen'))
    p = tmp_path/'bad.jsonl'; p.write_text(json.dumps(dict(prompt='a', completion='b')) + '\n')
    with pytest.raises(ValueError, match='not a preference record'): load_preference_data(p)
    with pytest.raises(ValueError, match='adpa_from'): ADPAConfig(data='x', teacher='t', student='s', adpa_from=('dpo',))

# ---------------------------------------------------------------- the pipeline

def test_pipeline_cli_resume_and_ref_wiring(world, tmp_path):
    "fuselab adpa run on tiny models: every stage's output, a rerun that finds everything done, and the teacher's SFT model as the reference."
    import subprocess, sys, yaml
    from pathlib import Path
    d, rows, tok, _, _, _ = world
    for name, m in (('teacher', tiny_lm(tok, hidden=32, seed=5)), ('student', tiny_lm(tok, hidden=16, seed=6))):
        m.save_pretrained(tmp_path/name); tok.save_pretrained(tmp_path/name)
    (tmp_path/'pref.jsonl').write_text(''.join(json.dumps({k: r[k] for k in ('prompt', 'chosen', 'rejected')}) + '\n' for r in rows))
    short = dict(max_steps=3, per_device_train_batch_size=4, save_steps=2, learning_rate=1e-3)
    cfg = dict(data='pref.jsonl', teacher='teacher', student='student', out_dir='out', k=5, max_length=32, adpa_from=['sft', 'dckd'],
               teacher_sft=short, teacher_dpo=short, student_sft=short, dckd=short, adpa=short, generation=dict(max_new_tokens=4))
    (tmp_path/'adpa.yml').write_text(yaml.safe_dump(cfg))
    bin_ = Path(sys.executable).parent/'fuselab'
    r = subprocess.run([bin_, 'adpa', 'run', str(tmp_path/'adpa.yml'), '--quiet'], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path/'out'
    for sub in ('teacher_sft', 'teacher_dpo', 'student_sft', 'dckd', 'adpa-sft', 'adpa-dckd'): assert (out/sub/'model'/'config.json').exists(), sub
    for f in ('gen-sft.jsonl', 'gen-dckd.jsonl'): assert len((out/f).read_text().splitlines()) >= 1
    meta = json.loads((out/'adpa_data-sft'/'ref'/'meta.json').read_text())
    assert meta['source'] == str((out/'teacher_sft'/'model').resolve())       # the advantage's reference is the teacher's SFT model
    dpo_args = json.loads((out/'teacher_dpo'/'model'/'fuselab_log.json').read_text())
    assert dpo_args['log']
    stamp = {p: p.stat().st_mtime for p in out.rglob('*') if p.is_file()}
    r = subprocess.run([bin_, 'adpa', 'run', str(tmp_path/'adpa.yml'), '--quiet'], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {p: p.stat().st_mtime for p in out.rglob('*') if p.is_file() and p in stamp} == stamp    # nothing redone

def test_training_stage_resumes_after_a_crash(world, tmp_path):
    "A DCKD stage killed after its first checkpoint continues from it (global step carried over) instead of restarting."
    from transformers import TrainerCallback
    from fuselab import adpa
    d, rows, tok, dpo, _, student = world
    stores = {s: teacher_topk(dpo, _recs(tok, rows, s), d/f'dckd-{s}', k=6, progress=False) for s in ('chosen', 'rejected')}
    recs = _pairs(tok, rows, 'rejected')
    student.save_pretrained(tmp_path/'init'); tok.save_pretrained(tmp_path/'init')
    cfg = ADPAConfig(data='unused', teacher=str(tmp_path/'init'), student=str(tmp_path/'init'), out_dir=str(tmp_path/'run'), max_length=32)
    class Crash(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == 2: raise RuntimeError('killed')
    orig = adpa.DistillTrainer.__init__
    def patched(self, *a, **kw): orig(self, *a, **kw); self.add_callback(Crash())
    over = dict(max_steps=4, per_device_train_batch_size=2, save_steps=2, learning_rate=1e-3)
    adpa.DistillTrainer.__init__ = patched
    try:
        with pytest.raises(RuntimeError, match='killed'): adpa._distill(cfg, tmp_path/'init', tmp_path/'run'/'dckd', 'dckd', recs, stores, over, False)
    finally: adpa.DistillTrainer.__init__ = orig
    assert (tmp_path/'run'/'dckd'/'trainer'/'checkpoint-2'/'trainer_state.json').exists()
    steps = []
    class Count(TrainerCallback):
        def on_step_end(self, args, state, control, **kw): steps.append(state.global_step)
    def counting(self, *a, **kw): orig(self, *a, **kw); self.add_callback(Count())
    adpa.DistillTrainer.__init__ = counting
    try: res = adpa._distill(cfg, tmp_path/'init', tmp_path/'run'/'dckd', 'dckd', recs, stores, over, False)
    finally: adpa.DistillTrainer.__init__ = orig
    assert steps == [3, 4]                                   # continued from checkpoint-2, not restarted
    assert (tmp_path/'run'/'dckd'/'model'/'config.json').exists() and not (tmp_path/'run'/'dckd'/'trainer').exists()
    assert adpa._distill(cfg, tmp_path/'init', tmp_path/'run'/'dckd', 'dckd', recs, stores, over, False) == res   # done: not retrained
