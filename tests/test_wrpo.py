"""WRPO: the trainer against TRL's DPOTrainer at α=0, the α schedule over a real run, and the data pipeline
(sources -> Target-SFT -> target samples -> records -> WRPO) on tiny models, resumed to the same dataset."""
import copy, json, os, shutil, subprocess, sys
from pathlib import Path
import pytest
import torch

pytest.importorskip('trl')
import datasets
from trl import DPOConfig, DPOTrainer
from fuselab.testing import train_tokenizer, tiny_lm, skill_data
from fuselab.wrpo import WRPOConfig, WRPOTrainer, WRPORunConfig, wrpo_run, wrpo_alpha
from fuselab.fusechat3 import skill_reward

datasets.disable_progress_bars()
CORPUS = [r['text'] for s in ('add', 'reverse') for r in skill_data(s, 200, seed=1)]

@pytest.fixture(scope='module')
def tok(): return train_tokenizer(CORPUS, 200)

def _recs():
    return [dict(prompt=r['prompt'], source_chosen=f" {r['answer']}", chosen=f" {r['answer'][:-1]}", rejected=' 7') for r in skill_data('add', 6, seed=2)]

def _first_loss(t): return float(t.compute_loss(t.model, t._prepare_inputs(next(iter(t.get_train_dataloader())))).detach())

@pytest.mark.parametrize('beta', [0.1, 1.0])
def test_alpha0_equals_trl_dpo(tok, tmp_path, beta):
    "WRPO with α ≡ 0 is TRL DPOTrainer's sigmoid loss on (chosen, rejected), same policy, reference and batch."
    pol, ref = tiny_lm(tok, hidden=32, seed=3), tiny_lm(tok, hidden=32, seed=4)
    ds = datasets.Dataset.from_list(_recs())
    kw = dict(output_dir=str(tmp_path), beta=beta, per_device_train_batch_size=6, report_to=[], bf16=False, gradient_checkpointing=False, max_length=64)
    w = WRPOTrainer(copy.deepcopy(pol), ref_model=copy.deepcopy(ref), args=WRPOConfig(alpha=0.0, alpha_schedule='constant', **kw), train_dataset=ds, processing_class=tok)
    t = DPOTrainer(copy.deepcopy(pol), ref_model=copy.deepcopy(ref), args=DPOConfig(loss_type=['sigmoid'], **kw), train_dataset=ds.remove_columns('source_chosen'), processing_class=tok)
    assert _first_loss(w) == pytest.approx(_first_loss(t), rel=1e-5, abs=1e-6)

def test_alpha_reaches_max_on_last_step(tok, tmp_path):
    "α logged at every optimizer step: 0 on the first, α_max on the last (default schedule), with gradient accumulation."
    from transformers import TrainerCallback
    seen = []
    class Log(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and 'alpha' in logs: seen.append((state.global_step, logs['alpha']))
    args = WRPOConfig(output_dir=str(tmp_path), alpha=0.3, per_device_train_batch_size=2, gradient_accumulation_steps=3, max_steps=5, logging_steps=1,
                      report_to=[], learning_rate=1e-3, save_strategy='no', gradient_checkpointing=False, max_length=64, disable_tqdm=True)
    WRPOTrainer(tiny_lm(tok, hidden=32, seed=3), ref_model=tiny_lm(tok, hidden=32, seed=4), args=args, train_dataset=datasets.Dataset.from_list(_recs()),
                processing_class=tok, callbacks=[Log()]).train()
    assert [s for s, _ in seen] == [1, 2, 3, 4, 5]
    assert seen[0][1] == 0.0 and seen[-1][1] == pytest.approx(0.3, abs=1e-7)
    assert [a for _, a in seen] == pytest.approx([wrpo_alpha(s, 5, 0.3) for s in range(5)], abs=1e-7)

@pytest.fixture(scope='module')
def world(tmp_path_factory):
    "Two random tiny sources with their own tokenizers, a tiny target, 'add' prompts (math domain) and the rule-based reward."
    d = tmp_path_factory.mktemp('world')
    paths = {}
    for name, (V, seed) in {'s1': (150, 1), 's2': (220, 2), 'target': (180, 3)}.items():
        t = train_tokenizer(CORPUS, V)
        tiny_lm(t, hidden=32, seed=seed).save_pretrained(d/name); t.save_pretrained(d/name)
        paths[name] = str(d/name)
    data = d/'prompts.jsonl'
    data.write_text(''.join(json.dumps(dict(key=f'p{i}', prompt=r['prompt'], domain='general', answer=r['answer'])) + '\n'
                            for i, r in enumerate(skill_data('add', 12, seed=5))))
    return paths, str(data)

def _cfg(world, out):
    paths, data = world
    opts = dict(n={'default': 3}, max_new_tokens=4, temperature=1.0, top_p=1.0, kwargs=dict(batch_size=32))
    return WRPORunConfig(sources={'s1': paths['s1'], 's2': paths['s2']}, target=paths['target'], data=data, out_dir=str(out), scorer=skill_reward,
                         chat=False, source_defaults=opts, target_sampling=dict(max_new_tokens=4, kwargs=dict(batch_size=32), n={'default': 3}, temperature=1.0, top_p=1.0),
                         sft=dict(max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=1e-3, save_steps=2, max_length=48),
                         wrpo=dict(max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=1, learning_rate=1e-3, save_steps=2, max_length=48,
                                   beta=0.1, logging_steps=1))

def test_pipeline_resumes_to_the_same_dataset(world, tmp_path):
    "Stages sources -> sft -> target -> build -> train; rerunning (through the CLI) after losing derived files gives byte-identical records, and train is a no-op."
    cfg = _cfg(world, tmp_path/'run')
    res = wrpo_run(cfg, progress=False)
    b = tmp_path/'run'/'build'
    recs = [json.loads(l) for l in (b/'wrpo.jsonl').read_text().splitlines()]
    assert res['sources']['sft'] + res['sources']['preference'] == 12 - sum(res['sources']['no_source_best'].values())
    assert res['build']['records'] == len(recs) > 0
    for r in recs:
        assert r['chosen_reward'] > r['rejected_reward'] and {'source_chosen', 'chosen', 'rejected', 'prompt'} <= set(r)
    # the source best is the best over all sources' scored samples
    scores = {n: {json.loads(l)['key']: json.loads(l) for l in (tmp_path/'run'/'sources'/'score'/f'{n}.jsonl').read_text().splitlines()} for n in ('s1', 's2')}
    for r in recs: assert r['source_reward'] == pytest.approx(max(x for n in scores for x in scores[n][r['key']]['rewards'] if x is not None))
    log = res['train']['log']
    assert [round(h['alpha'], 6) for h in log] == [round(wrpo_alpha(s, 2, 0.1), 6) for s in range(2)]
    first = {f: (b/f).read_bytes() for f in ('sft.jsonl', 'pref_prompts.jsonl', 'wrpo.jsonl')}
    # lose the derived files (keep the generation caches): the rerun must rebuild the same records
    for f in ('sft.jsonl', 'pref_prompts.jsonl', 'source_best.jsonl', 'wrpo.jsonl'): (b/f).unlink()
    shutil.rmtree(tmp_path/'run'/'target'/'score')
    import yaml
    d = {k: v for k, v in cfg.__dict__.items()}
    d['scorer'] = 'fuselab.fusechat3:skill_reward'
    (tmp_path/'wrpo.yml').write_text(yaml.safe_dump(d))
    env = dict(os.environ, HF_HUB_OFFLINE='1', TOKENIZERS_PARALLELISM='false')
    r = subprocess.run([str(Path(sys.executable).parent/'fuselab'), 'wrpo', 'run', str(tmp_path/'wrpo.yml'), '--quiet'], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {f: (b/f).read_bytes() for f in first} == first
    assert json.loads((tmp_path/'run'/'wrpo'/'results.json').read_text())['log'] == log   # finished training is not redone

def test_config_errors(world, tmp_path):
    paths, data = world
    with pytest.raises(ValueError, match='sft_fraction=1.5'): WRPORunConfig(sources={'s1': paths['s1']}, target=paths['target'], data=data, scorer=skill_reward, sft_fraction=1.5)
    with pytest.raises(ValueError, match='no reward'):
        from fuselab.wrpo import wrpo_sources
        wrpo_sources(WRPORunConfig(sources={'s1': paths['s1']}, target=paths['target'], data=data, out_dir=str(tmp_path)), progress=False)
    cfg = _cfg(world, tmp_path/'x')
    from fuselab.wrpo import wrpo_target, wrpo_train
    with pytest.raises(FileNotFoundError, match='run the sft stage first'): wrpo_target(cfg, progress=False)
    with pytest.raises(FileNotFoundError, match='run the sft stage first'): wrpo_train(cfg, progress=False)
