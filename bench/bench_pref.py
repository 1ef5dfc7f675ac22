"""B8: one preference step (forward + backward) of fuselab's preference trainers vs TRL's on the same model and batch,
at a real vocabulary (Qwen2.5's 151,936 logits). Variants run in fresh subprocesses (peak memory = growth of max RSS
over the models and batch; on a GPU torch.cuda.max_memory_allocated):
  trl_dpo / trl_dpo_pre          TRL DPOTrainer, loss 'sigmoid', live / precomputed reference log-probs
  fuselab_dpo / fuselab_dpo_pre  fuselab PreferenceTrainer, pref_loss 'dpo', live / precomputed reference
  trl_cpo_simpo                  TRL CPOTrainer, loss 'simpo', cpo_alpha=0 (full-logits forward)
  fuselab_simpo                  fuselab PreferenceTrainer, pref_loss 'simpo'
  fuselab_wrpo                   fuselab WRPOTrainer: 3 responses per prompt (source, chosen, rejected), live reference
Each step is the trainer's `compute_loss` + backward on one batch of P pairs x (prompt L + response L) tokens.
CPU: a 2-layer Qwen2 (hidden 64) with the real Qwen tokenizer and V=151,936, 1 pair x (512 + 512).
GPU: Qwen2.5-0.5B's config (random init, bf16), 8 pairs x (512 + 512), MFU from the ANCHORS.md formulas.
Prints a table and writes bench/results/pref.json."""
import os, random, sys, tempfile, warnings
import torch
from harness import measure, run_variants, report, main_or_one

V, L = 151_936, 512
CPU = dict(pairs=1, hidden=64, layers=2, heads=4, kv=2, inter=128, dtype='float32', reps=2)
GPU = dict(pairs=8, hidden=896, layers=24, heads=14, kv=2, inter=4864, dtype='bfloat16', reps=5)
VARIANTS = ('trl_dpo', 'fuselab_dpo', 'trl_dpo_pre', 'fuselab_dpo_pre', 'trl_cpo_simpo', 'fuselab_simpo', 'fuselab_wrpo')

def _words(tok, n=400):
    "Words that are one token each after a space, so texts of k words are exactly k tokens."
    ws = []
    for w in ('the of and to in is was for on that with as by at from his her he she it an are be this which or had not but '
              'have one all were they their been has more when who will no if out so said what up its about into than them can only '
              'other new some could time these two may then do first any my now such like our over man me even most made after also '
              'did many before must through back years where much your way well down should because each just those people how too '
              'little state good very make world still own see men work long get here between both life being under never day same '
              'another know while last might us great old year off come since against go came right used take three').split():
        if len(tok(' ' + w, add_special_tokens=False)['input_ids']) == 1: ws.append(' ' + w)
    return ws

def texts(tok, n_words, rng):
    ws = _words(tok)
    return ''.join(rng.choice(ws) for _ in range(n_words))

def model_and_tok(cfg, dev, seed):
    from transformers import AutoModelForCausalLM, Qwen2Config
    from fuselab.testing import real_tokenizer
    tok = real_tokenizer('qwen')
    c = Qwen2Config(vocab_size=V, hidden_size=cfg['hidden'], intermediate_size=cfg['inter'], num_hidden_layers=cfg['layers'],
                    num_attention_heads=cfg['heads'], num_key_value_heads=cfg['kv'], max_position_embeddings=2048, tie_word_embeddings=True,
                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(c, dtype=getattr(torch, cfg['dtype'])).to(dev)
    return m, tok

def records(tok, pairs):
    rng = random.Random(0)
    return [dict(prompt=texts(tok, L, rng), source_chosen=texts(tok, L - 1, rng), chosen=texts(tok, L - 1, rng), rejected=texts(tok, L - 1, rng))
            for _ in range(pairs)]   # responses: L-1 words + EOS = L tokens

def build(variant, cfg, dev):
    import datasets
    from trl import DPOConfig, DPOTrainer
    from fuselab.preference import PreferenceConfig, PreferenceTrainer
    from fuselab.wrpo import WRPOConfig, WRPOTrainer
    datasets.disable_progress_bars()
    policy, tok = model_and_tok(cfg, dev, 0)
    ref = model_and_tok(cfg, dev, 1)[0].eval()
    recs = records(tok, cfg['pairs'])
    ds = datasets.Dataset.from_list(recs)
    out = tempfile.mkdtemp()
    common = dict(output_dir=out, report_to=[], per_device_train_batch_size=cfg['pairs'], max_length=2 * L + 8, gradient_checkpointing=False,
                  bf16=False, disable_tqdm=True, beta=0.1, use_cpu=dev == 'cpu')
    pre = variant.endswith('_pre')
    if variant.startswith('trl_dpo'):
        t = DPOTrainer(policy, ref_model=None if pre else ref, args=DPOConfig(loss_type=['sigmoid'], precompute_ref_log_probs=pre, **common),
                       train_dataset=ds.remove_columns('source_chosen'), processing_class=tok)
    elif variant == 'trl_cpo_simpo':
        from trl.experimental.cpo import CPOConfig, CPOTrainer
        c = {k: v for k, v in common.items() if k != 'gradient_checkpointing'}
        t = CPOTrainer(policy, args=CPOConfig(loss_type='simpo', cpo_alpha=0.0, simpo_gamma=0.5, max_completion_length=L + 4, **c),
                       train_dataset=ds.remove_columns('source_chosen'), processing_class=tok)
    elif variant == 'fuselab_wrpo':
        t = WRPOTrainer(policy, ref_model=ref, args=WRPOConfig(alpha_schedule='constant', **common), train_dataset=ds, processing_class=tok)
    else:
        loss = 'simpo' if variant == 'fuselab_simpo' else 'dpo'
        t = PreferenceTrainer(policy, ref_model=None if (pre or loss == 'simpo') else ref,
                              args=PreferenceConfig(pref_loss=loss, simpo_gamma=0.5, precompute_ref_log_probs=pre, **common),
                              train_dataset=ds.remove_columns('source_chosen'), processing_class=tok)
    batch = t._prepare_inputs(next(iter(t.get_train_dataloader())))
    n_tok = int(batch['attention_mask'].sum()) if 'attention_mask' in batch else None
    return t, batch, n_tok

def matmul_params(m)->int:
    "Parameters that take part in matmuls: all but the input embedding (counted once, as the LM head, when tied)."
    tot = sum(p.numel() for p in m.parameters())
    return tot if m.config.tie_word_embeddings else tot - m.get_input_embeddings().weight.numel()

def ideal_flops(m, variant, cfg)->float:
    "ANCHORS.md 1.2: 3F(N,T_pol) + F(N_ref,T_pol); no reference term with precomputed log-probs or SimPO."
    c = m.config
    S, N = 2 * L, matmul_params(m)
    n_resp = 3 if variant == 'fuselab_wrpo' else 2
    T = cfg['pairs'] * n_resp * S
    F = 2 * N * T + 2 * c.num_hidden_layers * S * c.num_attention_heads * (c.hidden_size // c.num_attention_heads) * T
    live_ref = variant in ('trl_dpo', 'fuselab_dpo', 'fuselab_wrpo')
    return 3 * F + (F if live_ref else 0)

def one(variant, dev):
    cfg = GPU if dev == 'cuda' else CPU
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)) if dev == 'cpu' else torch.get_num_threads())
    warnings.filterwarnings('ignore')
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    t, batch, n_tok = build(variant, cfg, dev)
    t.model.train()
    params = [p for p in t.model.parameters() if p.requires_grad]
    def step():   # forward + backward of the trainer's own loss (what training_step does, without the optimizer)
        loss = t.compute_loss(t.model, batch)
        t.accelerator.backward(loss)
        return float(loss)
    r = measure(step, params, dev, cfg['reps'])
    r.update(variant=variant, flops=ideal_flops(t.model, variant, cfg))
    if dev == 'cuda': r['mfu'] = r['flops'] / (r['seconds'] * 989e12)
    return r

def main():
    dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    cfg = GPU if dev == 'cuda' else CPU
    rows = run_variants(__file__, VARIANTS, dev)
    # same maths on the same batch: fuselab's losses equal TRL's (tolerance for bf16 on the GPU)
    tol = 2e-2 if dev == 'cuda' else 1e-4
    for a, b in (('fuselab_dpo', 'trl_dpo'), ('fuselab_dpo_pre', 'trl_dpo_pre'), ('fuselab_simpo', 'trl_cpo_simpo')):
        assert abs(rows[a]['value'] - rows[b]['value']) <= tol * max(1.0, abs(rows[b]['value'])), (a, b, rows[a]['value'], rows[b]['value'])
    ratio = lambda a, b, k: rows[b][k] / max(rows[a][k], 1)
    res = dict(workload='B8-cpu' if dev == 'cpu' else 'B8-gpu', device=torch.cuda.get_device_name() if dev == 'cuda' else 'cpu',
               V=V, pairs=cfg['pairs'], prompt_tokens=L, response_tokens=L, hidden=cfg['hidden'], layers=cfg['layers'], dtype=cfg['dtype'],
               rows=rows, versions=dict(torch=torch.__version__, trl=__import__('trl').__version__, transformers=__import__('transformers').__version__))
    for a, b in (('fuselab_dpo', 'trl_dpo'), ('fuselab_dpo_pre', 'trl_dpo_pre'), ('fuselab_simpo', 'trl_cpo_simpo')):
        res[f'{a}_vs_{b}'] = dict(speedup=rows[b]['seconds'] / rows[a]['seconds'], memory_ratio=ratio(a, b, 'peak_extra_bytes'))
    if dev == 'cuda':
        res['ideal_ms'] = {v: rows[v]['flops'] / 989e12 * 1e3 for v in VARIANTS}
    lines = [f"{k}: {v['speedup']:.2f}x time, {v['memory_ratio']:.2f}x less peak memory" for k, v in res.items() if k.endswith(('trl_dpo', '_pre', 'simpo')) and isinstance(v, dict) and 'speedup' in v]
    if dev == 'cuda': lines += [f"MFU {v}: {rows[v]['mfu']:.1%} (ideal {res['ideal_ms'][v]:.1f} ms)" for v in VARIANTS]
    report('pref', rows, res, '\n'.join(lines))

if __name__ == '__main__': main_or_one(one, main)
