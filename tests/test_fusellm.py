"FuseLLM pipeline end to end: real tokenizers, padded vocabularies, resume after SIGKILL, NaN filtering, AvgCE oracle."
import json, math, os, signal, subprocess, sys, time, warnings
from dataclasses import asdict
from pathlib import Path
import numpy as np
import pytest, torch
from transformers.utils import logging as hf_logging
from fuselab.core import IGNORE_INDEX
from fuselab.data import TopKStore
from fuselab.testing import real_tokenizer, tiny_lm, train_tokenizer, skill_data
from fuselab.fusellm import (FuseLLMConfig, FusionArguments, FusionCollator, FusionTrainer, encode, fusellm_run,
                             fusellm_extract, next_token_labels, _train_records)

hf_logging.disable_progress_bar()
TEXTS = ["In 1969, Apollo 11 landed on the Moon; Neil Armstrong's first words were broadcast worldwide.",
         'def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n',
         'Die Katze schläft auf dem Sofa, während es draußen regnet.',
         'The price rose 12.5% to $1,234.56 on 2024-03-01.'] * 2

def _save(model, tok, d):
    model.save_pretrained(d); tok.save_pretrained(d); return str(d)

def _jsonl(path, recs): Path(path).write_text(''.join(json.dumps(r) + '\n' for r in recs)); return str(path)

def test_pipeline_real_tokenizers(tmp_path):
    "GPT-2 BPE and Mistral-v3 SentencePiece (logits padded past the tokenizer, as Qwen ships: the FuseLLM #13 trap) into a Llama target."
    kw = dict(hidden=32, layers=1, heads=2, kv_heads=1)
    llama, gpt2, mis = real_tokenizer('llama'), real_tokenizer('gpt2'), real_tokenizer('mistral-v3')
    tgt = _save(tiny_lm(llama, **kw), llama, tmp_path/'tgt')
    src = dict(gpt2=_save(tiny_lm(gpt2, seed=1, **kw), gpt2, tmp_path/'gpt2'),
               mistral=_save(tiny_lm(mis, seed=2, pad_vocab_to=len(mis) + 64, **kw), mis, tmp_path/'mistral'))
    cfg = FuseLLMConfig(target=tgt, sources=src, data=_jsonl(tmp_path/'d.jsonl', [dict(text=t) for t in TEXTS]),
                        out_dir=str(tmp_path/'run'), k=5, train=dict(max_steps=2, per_device_train_batch_size=4))
    res = fusellm_run(cfg, progress=False)
    assert TopKStore(tmp_path/'run'/'extract'/'mistral').vocab_size == len(mis) + 64
    for n in src:
        a = res['align'][n]
        assert a['sequences'] == len(TEXTS) and a.get('text_mismatch', 0) == 0
        assert a['transferred'] > 0.3 * (a['transferred'] + a['fallback'])     # real tokenizers agree on many tokens
        st = TopKStore(tmp_path/'run'/'align'/f'{n}-fusellm')
        for k in range(len(TEXTS)):
            s = st[k]
            assert s.ids.shape[0] == len(encode(llama, dict(key=k, text=TEXTS[k]))['input_ids'])
            assert s.ids.max() < len(llama)                                  # every id lives in the target vocabulary
    assert res['train']['train_records'] == len(TEXTS)

def test_vocab_width_trap(tmp_path):
    "A model with fewer logits than its tokenizer has tokens is refused at extraction with the fix in the message."
    gpt2 = real_tokenizer('gpt2')
    bad = _save(tiny_lm(len(gpt2) - 10, hidden=32, layers=1, heads=2, kv_heads=1), gpt2, tmp_path/'bad')
    cfg = FuseLLMConfig(target=bad, sources=dict(s=bad), data=_jsonl(tmp_path/'d.jsonl', [dict(text=t) for t in TEXTS[:2]]),
                        out_dir=str(tmp_path/'run'), k=4)
    with pytest.raises(ValueError, match='resize_token_embeddings'): fusellm_extract(cfg, progress=False)

def _tiny_models(d):
    corpus = [r['text'] for r in skill_data('add', 200) + skill_data('reverse', 200)]
    out = {}
    for name, kind in (('a', 'metaspace'), ('b', 'wordpiece'), ('t', 'bytelevel')):
        tok = train_tokenizer(corpus, 150, kind=kind)
        out[name] = _save(tiny_lm(tok, hidden=32, layers=1, heads=2, kv_heads=1, seed=len(out)), tok, d/name)
    return out

def test_nan_ce_filtered_with_count(tmp_path):
    tok = train_tokenizer([r['text'] for r in skill_data('add', 100)], 100)
    enc = [encode(tok, dict(key=i, text=r['text'])) for i, r in enumerate(skill_data('add', 4))]
    st = TopKStore(tmp_path/'s', k=2, vocab_size=len(tok), with_seq=True)
    with st.writer() as w:
        for e, ce in zip(enc, [1.0, float('nan'), 2.0, 3.0]):
            n = len(e['input_ids']); w.add(e['key'], np.zeros((n, 2), np.int32), np.full((n, 2), -0.7, np.float32), seq_value=ce)
    with pytest.warns(UserWarning, match='1 sequence\\(s\\) have a NaN teacher CE'): recs, stats = _train_records(None, [st], enc)
    assert [r['key'] for r in recs] == [0, 2, 3] and stats['dropped_nan_ce'] == 1

def test_avgce_loss_matches_dense_oracle(tmp_path):
    tok = train_tokenizer([r['text'] for r in skill_data('add', 100)], 100)
    model = tiny_lm(tok, hidden=32, layers=1, heads=2, kv_heads=1).double()
    enc = [encode(tok, dict(key=i, text=r['text'])) for i, r in enumerate(skill_data('add', 5))]
    from fuselab.data import extract_topk
    stores = [extract_topk(tiny_lm(tok, hidden=32, layers=1, heads=2, kv_heads=1, seed=s), enc,
                           TopKStore(tmp_path/f's{s}', k=3, vocab_size=len(tok), with_seq=True), progress=False) for s in (1, 2, 3)]
    batch = FusionCollator(stores, tok.pad_token_id)(enc)
    args = FusionArguments(output_dir=str(tmp_path/'o'), lmbda=0.3, fusion='avgCE', report_to='none', use_cpu=True)
    loss = FusionTrainer(model=model, args=args).compute_loss(model, batch)
    z = model(input_ids=batch['input_ids'], attention_mask=batch['attention_mask']).logits
    lab = next_token_labels(batch['labels']); m = lab != IGNORE_INDEX
    logq = z.log_softmax(-1)
    clm = -(logq.gather(-1, lab.clamp_min(0)[..., None])[..., 0] * m).sum() / m.sum()
    w = torch.softmax(torch.exp(-batch['teacher_ce'].double()), 1)          # [code] softmax over rewards exp(-CE)
    P = torch.zeros_like(z)
    for b in range(len(enc)):
        for t in range(3):
            p = batch['teacher_logprobs'][b, t].double().softmax(-1).nan_to_num(0.)
            P[b].scatter_add_(-1, batch['teacher_ids'][b, t].long(), w[b, t] * p)
    soft = (-(P * logq).sum(-1) * m).sum() / m.sum()
    torch.testing.assert_close(loss.double(), 0.3 * clm + 0.7 * soft, rtol=1e-6, atol=1e-6)

def test_cli_resumes_after_sigkill(tmp_path):
    "Kill `fuselab fusellm run` once a training checkpoint exists; the rerun resumes from it and re-extracts nothing."
    m = _tiny_models(tmp_path)
    data = _jsonl(tmp_path/'d.jsonl', [dict(text=r['text']) for r in skill_data('add', 40, 3) + skill_data('reverse', 40, 3)])
    (tmp_path/'cfg.yml').write_text(f"""target: t
sources: {{a: a, b: b}}
data: d.jsonl
out_dir: run
k: 4
align: pta
train: {{max_steps: 100, save_steps: 20, per_device_train_batch_size: 8, logging_steps: 20}}
""")
    cmd = [str(Path(sys.executable).parent/'fuselab'), 'fusellm', 'run', str(tmp_path/'cfg.yml'), '--quiet']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    t0, ck = time.time(), tmp_path/'run'/'train'/'fused'/'checkpoint-20'
    while not (ck/'trainer_state.json').exists() and p.poll() is None and time.time() - t0 < 300: time.sleep(0.2)
    assert p.poll() is None, 'the run ended before a checkpoint appeared: ' + p.stdout.read().decode()[-2000:]
    p.send_signal(signal.SIGKILL); p.wait()                          # possibly in the middle of saving a later checkpoint
    assert not (tmp_path/'run'/'train'/'fused'/'final').exists()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path/'run'/'train'/'fused'/'results.json').read_text())
    assert res['resumed_from'].startswith('checkpoint-') and int(res['resumed_from'].split('-')[1]) >= 20
    assert "'new': 0" in r.stdout                                           # extraction had finished: nothing redone
    assert (tmp_path/'run'/'train'/'fused'/'final'/'model.safetensors').exists()
    assert TopKStore(tmp_path/'run'/'align'/'a-pta').done_keys() == set(range(80))

def test_partial_checkpoint_is_skipped(tmp_path):
    "A checkpoint folder without trainer_state.json (killed while saving) is not resumed from."
    from fuselab.fusellm import last_checkpoint
    for n, whole in ((20, True), (40, True), (60, False)):
        (tmp_path/f'checkpoint-{n}').mkdir()
        if whole: (tmp_path/f'checkpoint-{n}'/'trainer_state.json').write_text('{}')
    with pytest.warns(UserWarning, match='ignoring 1 partial checkpoint'): assert last_checkpoint(tmp_path).endswith('checkpoint-40')
    assert last_checkpoint(tmp_path/'nothing') is None
