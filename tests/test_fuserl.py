"FuseRL (reconstructed): trainer losses against naive per-prompt loops on an independent forward, TRL SFT and PreferenceTrainer limits, bad input."
import copy, json, math, random, warnings
import pytest
import torch
import torch.nn.functional as F
import datasets
from transformers import PrinterCallback
from trl import SFTConfig, SFTTrainer
from fuselab.data import tokenize_pair
from fuselab.testing import train_tokenizer, tiny_lm
from fuselab.preference import PreferenceConfig, PreferenceTrainer
from fuselab.fusechat3 import FuseChat3Config
from fuselab.fuserl import (FuseRLConfig, FuseSFTTrainer, FusePOTrainer, fusesft_loss, fusepo_loss, fusepo_rloo_loss,
                            fuserl_records, fusechat3_items)

datasets.disable_progress_bars()
VOCAB = {'A': 'cat dog cow pig hen fox', 'B': 'red blue green pink gold grey', 'C': 'fig plum pear lime kiwi date'}
SCORES = {'A': (0.9, 0.5), 'B': (0.8, 0.4), 'C': (0.6, 0.3)}
PROMPTS = ['tell me one', 'tell me two', 'tell me three', 'tell me four']

@pytest.fixture(scope='module', autouse=True)
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1); yield; torch.set_num_threads(n)

@pytest.fixture(scope='module')
def world():
    rng = random.Random(1)
    say = lambda s: ' ' + ' '.join(rng.choice(VOCAB[s].split()) for _ in range(rng.randint(2, 5)))
    items = [dict(prompt=p, sources={s: dict(responses=[say(s), say(s)], rewards=list(SCORES[s]), correct=None) for s in 'ABC'}) for p in PROMPTS]
    del items[0]['sources']['B']                                   # prompt 0 has no answer from source B: a padded, masked slot
    tok = train_tokenizer([it['prompt'] + y for it in items for v in it['sources'].values() for y in v['responses']] * 10, vocab_size=400)
    return tok, tiny_lm(tok, hidden=32, seed=3), tiny_lm(tok, hidden=32, seed=4), items

def _ds(items, kind): return datasets.Dataset.from_list(fuserl_records(items, kind, window=(0.0, 1.0)))

def _args(tmp_path, **kw):
    return FuseRLConfig(**(dict(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to=[], max_length=64,
                                gradient_checkpointing=False, disable_tqdm=True, save_strategy='no', seed=0) | kw))

def _trainer(cls, world, data, tmp_path, ref=True, **kw):
    tok, pol, rf, _ = world
    t = cls(copy.deepcopy(pol), ref_model=copy.deepcopy(rf) if ref else None, args=_args(tmp_path, **kw), train_dataset=data, processing_class=tok)
    t.remove_callback(PrinterCallback)
    return t

def _batch_loss(t, data=None):
    "The trainer's loss on all records in order (the first batch of a non-shuffled pass)."
    recs = t.train_dataset if data is None else data
    with torch.no_grad(): return float(t.compute_loss(t.model, t._prepare_inputs(t.data_collator([recs[i] for i in range(len(recs))]))))

def _last_metrics(t): return {k: v[-1] for mode in ('train', 'eval') for k, v in t._metrics[mode].items() if v}

def _logp(model, tok, prompt, resp):
    "Summed response log-prob and length from a plain forward over the full-vocabulary logits (no fused head, no TRL)."
    e = tokenize_pair(tok, prompt, resp, max_length=64)
    ids = torch.tensor([e['input_ids']])
    with torch.no_grad(): lp = model(input_ids=ids).logits.double().log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
    m = torch.tensor(e['response_mask'][1:], dtype=torch.bool)
    return float(lp[m].sum()), int(m.sum())

def _softmax(xs, tau):
    if tau == 0: return [1.0 if i == max(range(len(xs)), key=lambda j: xs[j]) else 0.0 for i in range(len(xs))]
    if math.isinf(tau): return [1 / len(xs)] * len(xs)
    e = [math.exp((x - max(xs)) / tau) for x in xs]
    return [v / sum(e) for v in e]

def _softplus(x): return math.log1p(math.exp(-abs(x))) + max(x, 0)

# ---------------------------------------------------------------- FuseSFT

def test_fusesft_tau0_is_best_only_sft_equal_to_trl(world, tmp_path):
    "B=1, τ=0: FuseSFT = mean NLL of the best response's tokens = TRL SFTTrainer's completion-only loss; τ=1e-4 is the same."
    tok, pol, _, items = world
    one = _ds(items[1:2], 'sft')
    best = max(one[0]['responses'], key=lambda r: r['score'])
    s, n = _logp(pol, tok, one[0]['prompt'], best['text'])
    e = tokenize_pair(tok, one[0]['prompt'], best['text'], max_length=64)
    trl = SFTTrainer(copy.deepcopy(pol), args=SFTConfig(output_dir=str(tmp_path / 'sft'), report_to=[], bf16=False, completion_only_loss=True,
                                                        per_device_train_batch_size=1),
                     train_dataset=datasets.Dataset.from_list([dict(input_ids=e['input_ids'], completion_mask=e['response_mask'])]), processing_class=tok)
    with torch.no_grad(): l_trl = float(trl.compute_loss(trl.model, trl._prepare_inputs(next(iter(trl.get_train_dataloader())))))
    for tau in (0.0, 1e-4):
        ours = _batch_loss(_trainer(FuseSFTTrainer, world, one, tmp_path, ref=False, tau=tau, per_device_train_batch_size=1))
        assert ours == pytest.approx(-s / n, abs=2e-5) and ours == pytest.approx(l_trl, abs=2e-5), (tau, ours, -s / n, l_trl)

@pytest.mark.parametrize('tau', [0.0, 0.3, math.inf])
@pytest.mark.parametrize('token_mean', [True, False])
def test_fusesft_equals_naive_loop(world, tmp_path, tau, token_mean):
    "B=4 with one prompt missing a source (masked copy): the trainer's loss is the per-prompt loop Σ_k w_k·ll_k, averaged."
    tok, pol, _, items = world
    ds = _ds(items, 'sft')
    t = _trainer(FuseSFTTrainer, world, ds, tmp_path, ref=False, tau=tau, sft_token_mean=token_mean)
    assert t.train_dataset[0]['slot_mask'] == [1, 1, 0] and t.train_dataset[1]['slot_mask'] == [1, 1, 1]
    per_prompt = []
    for r in ds:
        ll = [(lambda s, n: s / n if token_mean else s)(*_logp(pol, tok, r['prompt'], x['text'])) for x in r['responses']]
        w = _softmax([x['score'] for x in r['responses']], tau)
        per_prompt.append(-sum(wi * li for wi, li in zip(w, ll)))
    assert _batch_loss(t) == pytest.approx(sum(per_prompt) / len(per_prompt), rel=2e-5, abs=2e-5)
    if tau in (0.0, math.inf):   # best-only: max weight 1; uniform: 1/2 on the prompt with 2 sources, 1/3 on the others
        assert _last_metrics(t)['weights/max'] == pytest.approx({0.0: 1.0, math.inf: (1 / 2 + 3 * (1 / 3)) / 4}[tau])

def test_fusesft_masked_slot_gets_no_gradient(world, tmp_path):
    "Changing the padded copy's reward changes nothing: masked slots have weight 0 whatever their numbers."
    ds = _ds(world[3], 'sft')
    t = _trainer(FuseSFTTrainer, world, ds, tmp_path, ref=False, tau=0.3)
    a = _batch_loss(t)
    hacked = t.train_dataset.map(lambda r, i: dict(rewards=[*r['rewards'][:2], 1e6]) if i == 0 else {}, with_indices=True)
    assert _batch_loss(t, hacked) == pytest.approx(a, abs=1e-7)

# ---------------------------------------------------------------- FusePO (DPO / SimPO)

@pytest.mark.parametrize('fusepo,pref_loss,beta', [('dpo', 'dpo', 0.5), ('dpo', 'ln_dpo', 2.0), ('simpo', 'simpo', 2.0)])
def test_fusepo_one_source_equals_preference_trainer(world, tmp_path, fusepo, pref_loss, beta):
    "K=1: FusePO is PreferenceTrainer's DPO / LN-DPO / SimPO on the same model, reference and pairs (loss and gradient)."
    tok, pol, rf, items = world
    a_only = [dict(prompt=it['prompt'], sources=dict(A=it['sources']['A'])) for it in items]
    ds = _ds(a_only, 'po')
    pairs = datasets.Dataset.from_list([dict(prompt=r['prompt'], chosen=r['pairs'][0]['chosen'], rejected=r['pairs'][0]['rejected']) for r in ds])
    base = PreferenceTrainer(copy.deepcopy(pol), ref_model=copy.deepcopy(rf), train_dataset=pairs, processing_class=tok,
                             args=PreferenceConfig(output_dir=str(tmp_path / 'b'), pref_loss=pref_loss, beta=beta, simpo_gamma=0.7, report_to=[],
                                                   per_device_train_batch_size=4, max_length=64, gradient_checkpointing=False))
    ours = _trainer(FusePOTrainer, world, ds, tmp_path, fusepo=fusepo, pref_loss='dpo' if fusepo == 'simpo' else pref_loss, beta=beta, simpo_gamma=0.7)
    grads = []
    for t in (base, ours):
        batch = t._prepare_inputs(t.data_collator([t.train_dataset[i] for i in range(4)]))
        t.model.zero_grad(); loss = t.compute_loss(t.model, batch); loss.backward()
        grads.append((float(loss.detach()), torch.cat([p.grad.flatten() for p in t.model.parameters() if p.grad is not None])))
    assert grads[1][0] == pytest.approx(grads[0][0], abs=1e-6)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-5, atol=1e-7)

@pytest.mark.parametrize('fusepo', ['dpo', 'simpo'])
@pytest.mark.parametrize('po_weight,tau', [('chosen', 0.2), ('margin', 0.5), ('chosen', math.inf)])
def test_fusepo_equals_naive_loop(world, tmp_path, fusepo, po_weight, tau):
    "K ≤ 3 sources (prompt 0 has 2, padded): the loss is the loop Σ_k w_k ℓ_k over real pairs, log-probs from a plain forward."
    tok, pol, rf, items = world
    ds = _ds(items, 'po')
    beta, gamma = (0.7, None) if fusepo == 'dpo' else (2.0, 0.6)
    t = _trainer(FusePOTrainer, world, ds, tmp_path, fusepo=fusepo, po_weight=po_weight, tau=tau, beta=beta, simpo_gamma=gamma)
    assert t.train_dataset[0]['slot_mask'] == [1, 1, 0] and len(t.train_dataset[0]['responses_ids']) == 6
    per_prompt = []
    for r in ds:
        ps = r['pairs']
        w = _softmax([p['chosen_score'] - (p['rejected_score'] if po_weight == 'margin' else 0) for p in ps], tau)
        ell = []
        for p in ps:
            (cw, nw), (cl, nl) = _logp(pol, tok, r['prompt'], p['chosen']), _logp(pol, tok, r['prompt'], p['rejected'])
            if fusepo == 'dpo':
                rw, rl = _logp(rf, tok, r['prompt'], p['chosen'])[0], _logp(rf, tok, r['prompt'], p['rejected'])[0]
                z = beta * ((cw - rw) - (cl - rl))
            else: z = beta * (cw / nw - cl / nl) - gamma
            ell.append(_softplus(-z))
        per_prompt.append(sum(a * b for a, b in zip(w, ell)))
    assert _batch_loss(t) == pytest.approx(sum(per_prompt) / len(per_prompt), rel=1e-5, abs=1e-6)
    m = _last_metrics(t)
    assert m['pairs/per_prompt'] == pytest.approx(2.75) and 'rewards/margins' in m and 'weights/entropy' in m

def test_fusepo_precomputed_reference_equals_live(world, tmp_path):
    "DPO with reference log-probs precomputed once (policy = reference at the start) equals the live reference forward."
    ds = _ds(world[3], 'po')
    live = _trainer(FusePOTrainer, world, ds, tmp_path, beta=0.5)
    live.ref_model = copy.deepcopy(live.model)
    pre = _trainer(FusePOTrainer, world, ds, tmp_path, ref=False, beta=0.5, precompute_ref_log_probs=True)
    assert pre.ref_model is None and len(pre.train_dataset[0]['ref_logps']) == 6
    l_pre, l_live = _batch_loss(pre), _batch_loss(live)
    assert l_pre == pytest.approx(l_live, abs=1e-6) and l_pre == pytest.approx(math.log(2), abs=1e-6)

def test_reference_free_variants_load_and_run_no_reference(world, tmp_path):
    "FuseSFT, SimPO and RLOO with ref_model=None: no reference is loaded (a random tiny model has no name to load one from) or run."
    for cls, data, kw in ((FuseSFTTrainer, 'sft', {}), (FusePOTrainer, 'po', dict(fusepo='simpo')), (FusePOTrainer, 'rloo', dict(fusepo='rloo'))):
        t = _trainer(cls, world, _ds(world[3], data), tmp_path, ref=False, **kw)
        assert t.ref_model is None and not t.uses_reference
        calls = []
        h = t.model.register_forward_hook(lambda *a: calls.append(1))
        _batch_loss(t); h.remove()
        assert len(calls) == 1
    with pytest.raises(OSError):   # the DPO variant does need one: TRL tries to load the policy's name as reference
        _trainer(FusePOTrainer, world, _ds(world[3], 'po'), tmp_path, ref=False)

# ---------------------------------------------------------------- FusePO (RLOO)

@pytest.mark.parametrize('weighting,tau', [('uniform', 0.1), ('reward', 0.3)])
def test_rloo_equals_naive_loop(world, tmp_path, weighting, tau):
    "RLOO over every sample of every source (prompt 0: 4 samples, padded to 6): the loop −Σ_i w_i A_i log π(y_i|x)."
    tok, pol, _, items = world
    ds = _ds(items, 'rloo')
    t = _trainer(FusePOTrainer, world, ds, tmp_path, ref=False, fusepo='rloo', rloo_weight=weighting, tau=tau)
    assert t.train_dataset[0]['slot_mask'] == [1, 1, 1, 1, 0, 0]
    per_prompt = []
    for r in ds:
        R = [x['score'] for x in r['responses']]; n = len(R)
        A = [R[i] - (sum(R) - R[i]) / (n - 1) for i in range(n)]
        w = [1 / n] * n if weighting == 'uniform' else _softmax(R, tau)
        per_prompt.append(-sum(w[i] * A[i] * _logp(pol, tok, r['prompt'], x['text'])[0] for i, x in enumerate(r['responses'])))
    assert _batch_loss(t) == pytest.approx(sum(per_prompt) / len(per_prompt), rel=1e-5, abs=1e-6)

# ---------------------------------------------------------------- pure losses: gradients and dtypes

def test_losses_gradcheck_and_bf16():
    torch.manual_seed(0)
    B, K = 3, 4
    cw, cl = (torch.randn(B, K, dtype=torch.float64, requires_grad=True) for _ in range(2))
    n = torch.randint(1, 6, (B, K)); s = torch.rand(B, K, dtype=torch.float64)
    m = torch.ones(B, K, dtype=torch.bool); m[0, 3] = m[2, 0] = False
    z = torch.zeros(B, K, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: fusepo_loss(a, b, n, n, s, z, z, mask=m, tau=0.5, beta=0.7)[0], (cw, cl))
    assert torch.autograd.gradcheck(lambda a, b: fusepo_loss(a, b, n, n, s, mask=m, variant='simpo', tau=0.5)[0], (cw, cl))
    assert torch.autograd.gradcheck(lambda a: fusesft_loss(a, n, s, m, tau=0.5)[0], (cw,))
    assert torch.autograd.gradcheck(lambda a: fusepo_rloo_loss(a, s, m, weighting='reward', tau=0.5)[0], (cw,))
    loss, _ = fusepo_loss(cw.detach().bfloat16(), cl.detach().bfloat16(), n, n, s.float(), z.bfloat16(), z.bfloat16(), mask=m)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    g = torch.autograd.grad(fusepo_loss(cw, cl, n, n, s, z, z, mask=m)[0].sum(), cw)[0]
    assert (g[~m] == 0).all() and (g[m] != 0).all()                      # masked pairs get exactly no gradient

# ---------------------------------------------------------------- records and bad input

def test_fusechat3_items_and_records(tmp_path):
    "Items read back from a FuseChat-3.0 run folder; per-source selection with correctness (math) and the gap window."
    (tmp_path / 'p.jsonl').write_text('\n'.join(json.dumps(r) for r in [dict(prompt='q1', domain='general'), dict(prompt='2+2=', domain='math', answer='4')]) + '\n')
    for st in ('sample', 'score'): (tmp_path / st).mkdir()
    rows = {'A': ([['a1', 'a2', ''], ['5', '4', '3']], [[0.2, 0.25, None], [0.9, 0.6, 0.55]], [None, [False, True, False]]),
            'B': ([['b1']], [[0.7]], [None])}
    for name, (ys, rw, ok) in rows.items():
        (tmp_path / 'sample' / f'{name}.jsonl').write_text('\n'.join(json.dumps(dict(key=k, domain='x', responses=y)) for k, y in enumerate(ys)) + '\n')
        (tmp_path / 'score' / f'{name}.jsonl').write_text('\n'.join(json.dumps(dict(key=k, domain='x', rewards=r, correct=c)) for k, (r, c) in enumerate(zip(rw, ok))) + '\n')
    cfg = FuseChat3Config(sources=dict(A='a', B='b'), target='t', data=str(tmp_path / 'p.jsonl'), out_dir=str(tmp_path), scorer=lambda r, y: 0.0)
    items = fusechat3_items(cfg)
    assert [sorted(it['sources']) for it in items] == [['A', 'B'], ['A']] and items[1]['sources']['A']['correct'] == [False, True, False]
    sft = fuserl_records(items, 'sft')
    assert [[(x['source'], x['text']) for x in r['responses']] for r in sft] == [[('A', 'a2'), ('B', 'b1')], [('A', '4')]]
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        po = fuserl_records(items, 'po')
        rl = fuserl_records(items, 'rloo')
    assert [[(p['source'], p['chosen'], p['rejected']) for p in r['pairs']] for r in po] == [[('A', 'a2', 'a1')], [('A', '4', '3')]]
    assert [len(r['responses']) for r in rl] == [3, 3] and not ws                         # the empty response takes no part
    (tmp_path / 'score' / 'B.jsonl').write_text('')
    with pytest.raises(ValueError, match=r"scores of \['B'\] do not cover their samples"): fusechat3_items(cfg)

def _src(ys, rw): return dict(responses=ys, rewards=rw, correct=None)

@pytest.mark.parametrize('cls,recs,kw,msg', [
    (FuseSFTTrainer, [dict(prompt='a', responses=[dict(text=' cat', score=float('nan'))])], {}, 'responses[0].score = nan'),
    (FuseSFTTrainer, [dict(prompt='a', responses=[dict(text=' cat', score=1.0)]), dict(prompt='b', responses=[])], {}, "record 1 (prompt 'b') has 0 response(s)"),
    (FuseSFTTrainer, [dict(prompt='a', responses=[dict(text=' ', score=1.0)])], {}, 'record 0 responses[0] has empty text'),
    (FuseSFTTrainer, [dict(prompt='a', chosen=' cat', rejected=' dog')], {}, "record 0 has no 'responses'"),
    (FusePOTrainer, [dict(prompt='a', pairs=[dict(chosen=' cat', rejected=' dog', chosen_score=0.1, rejected_score=0.3)])], {}, 'chosen_score 0.1 < rejected_score 0.3'),
    (FusePOTrainer, [dict(prompt='a', pairs=[dict(chosen=' cat', rejected=' dog', chosen_score=0.1, rejected_score=None)])], {}, 'pairs[0].rejected_score = None'),
    (FusePOTrainer, [dict(prompt='a', pairs=[])], {}, 'has no pairs'),
    (FusePOTrainer, [dict(prompt='a', responses=[dict(text=' cat', score=1.0), dict(text=' dog', score=0.0)])], {}, "record 0 has no 'pairs'"),
    (FusePOTrainer, [dict(prompt='a', responses=[dict(text=' cat', score=1.0)])], dict(fusepo='rloo'), 'FusePO-RLOO (a leave-one-out baseline) needs >= 2'),
])
def test_bad_records(world, tmp_path, cls, recs, kw, msg):
    with pytest.raises((ValueError, KeyError)) as e: _trainer(cls, world, datasets.Dataset.from_list(recs), tmp_path, ref=False, **(dict(fusepo='simpo') | kw))
    assert msg in str(e.value), str(e.value)

def test_bad_config_and_shapes(world, tmp_path):
    tok, pol, _, items = world
    for kw, msg in [(dict(tau=-0.5), 'tau=-0.5 must be >= 0'), (dict(tau=float('nan')), 'tau=nan'), (dict(fusepo='ppo'), "fusepo='ppo'"),
                    (dict(po_weight='rejected'), "po_weight='rejected'"), (dict(rloo_weight='softmax'), "rloo_weight='softmax'"),
                    (dict(fusepo='rloo', pref_loss='ln_dpo'), "pref_loss='ln_dpo' with fusepo='rloo'"), (dict(pref_loss='ipo'), "pref_loss='ipo'")]:
        with pytest.raises(ValueError, match=msg.replace('(', r'\(').replace('[', r'\[')): _args(tmp_path, **kw)
    with pytest.raises(TypeError, match='pass FuseRLConfig'):
        FuseSFTTrainer(copy.deepcopy(pol), args=PreferenceConfig(output_dir=str(tmp_path), report_to=[]), train_dataset=_ds(items, 'sft'), processing_class=tok)
    t = _trainer(FusePOTrainer, world, _ds(items, 'po'), tmp_path, fusepo='simpo')
    ins = dict(slot_mask=torch.ones(1, 2), chosen_scores=torch.zeros(1, 2), rejected_scores=torch.zeros(1, 2))
    with pytest.raises(ValueError, match='got 5 responses per prompt for K=2 pairs'): t.preference_loss(torch.zeros(1, 5), None, torch.ones(1, 5), ins)
    with pytest.raises(ValueError, match=r"'scores': \(1, 3\)"):      # mismatched K between log-probs and scores
        fusepo_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), torch.zeros(1, 3), variant='simpo')
    with pytest.raises(ValueError, match='no valid source response'):
        fusesft_loss(torch.zeros(2, 2), torch.ones(2, 2), torch.zeros(2, 2), torch.tensor([[True, False], [False, False]]))
    with pytest.raises(ValueError, match='rewards contain NaN'): fusepo_rloo_loss(torch.zeros(1, 3), torch.tensor([[0., float('nan'), 1.]]))

# ---------------------------------------------------------------- training

@pytest.mark.parametrize('cls,kind,kw', [(FuseSFTTrainer, 'sft', {}), (FusePOTrainer, 'po', dict(beta=1.0)),
                                         (FusePOTrainer, 'po', dict(fusepo='simpo')), (FusePOTrainer, 'rloo', dict(fusepo='rloo'))])
def test_short_training_loss_falls(world, tmp_path, cls, kind, kw):
    t = _trainer(cls, world, _ds(world[3], kind), tmp_path, ref=kw.get('fusepo', 'dpo') == 'dpo' and cls is FusePOTrainer,
                 learning_rate=3e-3, max_steps=8, logging_steps=1, **kw)
    t.train()
    losses = [h['loss'] for h in t.state.log_history if 'loss' in h]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.05, losses
