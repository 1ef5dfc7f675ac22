"""B7: one DCKD / ADPA step (student forward + backward of the loss) from stored top-k vs the same loss from dense logits,
same student and batch, at a real vocabulary. Variants run in fresh processes (peak = growth of max RSS over the inputs;
on a GPU torch.cuda.max_memory_allocated):
  fuselab_dckd            DistillTrainer('dckd').compute_loss on stored top-k + tail (chunked LM-head pass, no [B,T,V] logits)
  dense_dckd_stored       the released code's path: the same stored top-k, the student's full [B,T,V] logits + log_softmax + gather
  dense_dckd_live         a GKDTrainer-style step: live teacher forward with full logits, top-k taken from them, student full logits
  fuselab_adpa            DistillTrainer('adpa') on stored margins (support = the DPO teacher's top-k)
  dense_adpa_stored       the same margins, the student's full logits
Every variant computes the same loss on the same batch (checked: stored variants exactly, the live one within float16
storage of the teacher's log-probs).
CPU: 2-layer Llama-style student (hidden 128), teacher hidden 256, V = 32,000, 2 pairs x 512 tokens (4 sequences), k = 50.
GPU: Qwen2.5-0.5B student, Qwen2.5-1.5B teacher configs (random init, bf16), V = 151,936, 4 pairs x 1,024 tokens
(8 x 1,024 tokens as ANCHORS.md B7), ideal step time 3F(N_s,T) (+ F(N_t,T) live) at 989 TFLOP/s.
Prints a table and writes bench/results/adpa.json."""
import math, os, sys, warnings
import torch
from harness import measure, run_variants, report, main_or_one

CPU = dict(V=32_000, pairs=2, L=512, k=50, student=dict(hidden=128, layers=2, heads=4, kv=2, inter=256),
           teacher=dict(hidden=256, layers=2, heads=4, kv=2, inter=512), dtype='float32', reps=3)
GPU = dict(V=151_936, pairs=4, L=1024, k=50, student=dict(hidden=896, layers=24, heads=14, kv=2, inter=4864),
           teacher=dict(hidden=1536, layers=28, heads=12, kv=2, inter=8960), dtype='bfloat16', reps=5)
VARIANTS = ('fuselab_dckd', 'dense_dckd_stored', 'dense_dckd_live', 'fuselab_adpa', 'dense_adpa_stored')

def lm(c, V, dtype, dev, seed):
    from transformers import AutoModelForCausalLM, Qwen2Config
    cfg = Qwen2Config(vocab_size=V, hidden_size=c['hidden'], intermediate_size=c['inter'], num_hidden_layers=c['layers'],
                      num_attention_heads=c['heads'], num_key_value_heads=c['kv'], max_position_embeddings=4096, tie_word_embeddings=True)
    torch.manual_seed(seed)
    with torch.device(dev): m = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    return m

PREP = os.environ.get('BENCH_ADPA_PREP', '/tmp/fuselab-bench-adpa.pt')

def prepare(cfg, dev):
    "Token batch (chosen/other rows, response = second half) and the teacher's stored rows, computed once in its own process."

    from fuselab.core import chunked_topk, topk_tail_mass, IGNORE_INDEX
    from fuselab.data import lm_hidden_and_head
    g = torch.Generator().manual_seed(0)
    B, L, V, k = cfg['pairs'], cfg['L'], cfg['V'], cfg['k']
    ids = torch.randint(10, V, (2 * B, L), generator=g).to(dev)
    labels = ids.clone(); labels[:, :L // 2] = IGNORE_INDEX
    teacher = lm(cfg['teacher'], V, cfg['dtype'], dev, 1).eval()
    ref = lm(cfg['teacher'], V, cfg['dtype'], dev, 2).eval()
    with torch.no_grad():
        h, W, b = lm_hidden_and_head(teacher, ids, torch.ones_like(ids))
        tk = chunked_topk(h, W, k, bias=b)
        hr, Wr, br = lm_hidden_and_head(ref, ids, torch.ones_like(ids))
        from fuselab.adpa import support_logprobs
        rl = support_logprobs(hr, Wr, tk.ids.long(), br)
    tl16 = tk.logprobs.half().float()                          # what the store keeps (float16 values)
    margin = (tk.logprobs - rl).half().float()
    am = torch.ones_like(ids)
    inputs = dict(chosen_input_ids=ids[:B], chosen_attention_mask=am[:B], chosen_labels=labels[:B],
                  rejected_input_ids=ids[B:], rejected_attention_mask=am[B:], rejected_labels=labels[B:],
                  gen_input_ids=ids[B:], gen_attention_mask=am[B:], gen_labels=labels[B:],
                  chosen_topk_ids=tk.ids[:B], chosen_topk_values=tl16[:B], chosen_topk_tail=topk_tail_mass(tk.logprobs[:B]),
                  rejected_topk_ids=tk.ids[B:], rejected_topk_values=tl16[B:], rejected_topk_tail=topk_tail_mass(tk.logprobs[B:]),
                  gen_topk_ids=tk.ids[B:], gen_topk_values=margin[B:])
    torch.save({k: v.cpu() for k, v in inputs.items()}, PREP)

def dense_loss(model, inputs, kind, teacher=None, k=50, a=None):
    "The same objective from the student's full logits (and, live, the teacher's full logits): the released code's path."
    from fuselab.core import IGNORE_INDEX, masked_mean, topk_tail_mass
    from fuselab.adpa import topk_kl, adpa_loss, dckd_loss
    other = 'rejected' if kind == 'dckd' else 'gen'
    B = inputs['chosen_input_ids'].shape[0]
    ids = torch.cat([inputs['chosen_input_ids'], inputs[f'{other}_input_ids']])
    lab = torch.cat([inputs['chosen_labels'], inputs[f'{other}_labels']])
    lab = torch.cat([lab[:, 1:], lab.new_full((lab.shape[0], 1), IGNORE_INDEX)], 1)
    logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)              # [2B,T,V]
    m = lab != IGNORE_INDEX
    nll = -masked_mean(logp[:B].gather(-1, lab[:B].clamp_min(0)[..., None])[..., 0], m[:B])
    if kind == 'dckd':
        if teacher is not None:                                                     # live teacher, dense logits
            with torch.no_grad():
                tp = torch.log_softmax(teacher(input_ids=ids).logits.float(), -1)
                tv, ti = tp.topk(k, -1)
            rows = dict(ids=ti, vals=tv.half().float(), tail=topk_tail_mass(tv))
        else:
            rows = dict(ids=torch.cat([inputs['chosen_topk_ids'], inputs['rejected_topk_ids']]).long(),
                        vals=torch.cat([inputs['chosen_topk_values'], inputs['rejected_topk_values']]),
                        tail=torch.cat([inputs['chosen_topk_tail'], inputs['rejected_topk_tail']]))
        lq = logp.gather(-1, rows['ids'].long())
        klw, _ = topk_kl(lq[:B], rows['vals'][:B], m[:B], rows['tail'][:B])
        kll, _ = topk_kl(lq[B:], rows['vals'][B:], m[B:], rows['tail'][B:])
        return dckd_loss(nll, klw, kll)
    vals = inputs['gen_topk_values']
    lq = logp[B:].gather(-1, inputs['gen_topk_ids'].long())
    ad, _ = adpa_loss(lq, torch.where(torch.isfinite(vals), vals, 0.), m[B:], torch.isfinite(vals))
    return nll + 1.6 * ad

def ideal_flops(student, teacher, cfg, live):
    "ANCHORS.md 1.2: 3F(N_s,T) + F(N_t,T) with a live teacher; matmul params count the tied LM head once."
    def F(m, T):
        c, N = m.config, sum(p.numel() for p in m.parameters())
        return 2 * N * T + 2 * c.num_hidden_layers * cfg['L'] * c.num_attention_heads * (c.hidden_size // c.num_attention_heads) * T
    T = 2 * cfg['pairs'] * cfg['L']
    return 3 * F(student, T) + (F(teacher, T) if live else 0)

def one(variant, dev):
    cfg = GPU if dev == 'cuda' else CPU
    if dev == 'cpu': torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    warnings.filterwarnings('ignore')
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    from fuselab.adpa import DistillConfig, DistillTrainer
    inputs = {k: v.to(dev) for k, v in torch.load(PREP).items()}
    live = variant == 'dense_dckd_live'
    teacher = lm(cfg['teacher'], cfg['V'], cfg['dtype'], dev, 1).eval() if live else None
    student = lm(cfg['student'], cfg['V'], cfg['dtype'], dev, 0).train()
    kind = 'dckd' if 'dckd' in variant else 'adpa'
    if variant.startswith('fuselab'):
        import tempfile
        args = DistillConfig(output_dir=tempfile.mkdtemp(), report_to=[], distill_loss=kind, use_cpu=dev == 'cpu', bf16=False,
                             gradient_checkpointing=False, disable_tqdm=True, chunk_size=1024)
        t = DistillTrainer(student, args=args, train_dataset=[0], processing_class=None)
        fn = lambda: t.compute_loss(student, inputs)
    else: fn = lambda: dense_loss(student, inputs, kind, teacher, cfg['k'])
    def step():
        loss = fn(); loss.backward(); return float(loss)
    r = measure(step, list(student.parameters()), dev, cfg['reps'])
    r.update(variant=variant, flops=ideal_flops(student, teacher, cfg, live))
    if dev == 'cuda': r['mfu'] = r['flops'] / (r['seconds'] * 989e12)
    return r

def main():
    dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    cfg = GPU if dev == 'cuda' else CPU
    import subprocess
    subprocess.run([sys.executable, __file__, '--prep', dev], check=True)
    rows = run_variants(__file__, VARIANTS, dev)
    tol = 2e-2 if dev == 'cuda' else 1e-4
    agree = {f'{a}={b}': abs(rows[a]['value'] - rows[b]['value']) <= t * max(1.0, abs(rows[b]['value']))
             for a, b, t in (('fuselab_dckd', 'dense_dckd_stored', tol), ('fuselab_adpa', 'dense_adpa_stored', tol), ('fuselab_dckd', 'dense_dckd_live', 5e-2))}
    res = dict(workload='B7-cpu' if dev == 'cpu' else 'B7-gpu', device=torch.cuda.get_device_name() if dev == 'cuda' else 'cpu',
               V=cfg['V'], pairs=cfg['pairs'], tokens_per_sequence=cfg['L'], k=cfg['k'], student=cfg['student'], teacher=cfg['teacher'],
               dtype=cfg['dtype'], rows=rows, same_loss=agree, versions=dict(torch=torch.__version__, transformers=__import__('transformers').__version__))
    lines = []
    for a, b in (('fuselab_dckd', 'dense_dckd_stored'), ('fuselab_dckd', 'dense_dckd_live'), ('fuselab_adpa', 'dense_adpa_stored')):
        r = dict(speedup=rows[b]['seconds'] / rows[a]['seconds'], memory_ratio=rows[b]['peak_extra_bytes'] / max(rows[a]['peak_extra_bytes'], 1))
        res[f'{a}_vs_{b}'] = r
        lines.append(f"{a} vs {b}: {r['speedup']:.2f}x time, {r['memory_ratio']:.2f}x less peak memory")
    if dev == 'cuda':
        res['ideal_ms'] = {v: rows[v]['flops'] / 989e12 * 1e3 for v in VARIANTS}
        lines += [f"MFU {v}: {rows[v]['mfu']:.1%} (ideal {res['ideal_ms'][v]:.1f} ms, measured {rows[v]['seconds'] * 1e3:.1f} ms)" for v in VARIANTS]
    lines.append(f"same loss on the same batch: {agree}")
    report('adpa', rows, res, '\n'.join(lines))
    if not all(agree.values()): sys.exit(f'the variants disagree on the loss: {agree}')

if __name__ == '__main__':
    if sys.argv[1:2] == ['--prep']: prepare(GPU if sys.argv[2] == 'cuda' else CPU, sys.argv[2])
    else: main_or_one(one, main)
