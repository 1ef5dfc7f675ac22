"""`fuselab.merge`: SCE and VaRM against element-by-element oracles, the streaming driver against an in-memory merge of
the loaded state dicts (bit for bit, sharded and unsharded, bf16/fp32), truncation, crash + resume, bad input, and the
CLI on a YAML config whose output loads with transformers."""
import json, os, shutil, subprocess, sys
from pathlib import Path
import numpy as np
import pytest, torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file
import fuselab.merge as fm
from fuselab.merge import (MergeConfig, linear_merge, merge_models, sce_coefficients, sce_erase, sce_merge, sce_select,
                           task_arithmetic_merge, task_vectors, varm_merge, varm_weights)

@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    "Tiny tensors: OpenMP threads only add barrier waits (and on a shared 2-core box they double the run time)."
    n = torch.get_num_threads(); torch.set_num_threads(1); yield; torch.set_num_threads(n)

# ---- oracles ----------------------------------------------------------------------------------------------------------

def sce_oracle(base, tensors, tau, mask_in_merge):
    "SCE written out element by element in Python floats (float64)."
    b = base.double().flatten().tolist(); K, n = len(tensors), len(b)
    d = [[t.double().flatten().tolist()[e] - b[e] for e in range(n)] for t in tensors]
    mean = [sum(d[k][e] for k in range(K)) / K for e in range(n)]
    var = [sum((d[k][e] - mean[e]) ** 2 for k in range(K)) / K for e in range(n)]
    if tau < 1:
        kk = int(np.float32(tau) * np.float32(sum(v != 0 for v in var)))      # the reference's float32 product
        keep = set(sorted(range(n), key=lambda e: (-var[e], e))[:kk])
        M = [e in keep for e in range(n)]
    else: M = [True] * n
    raw = [sum(d[k][e] ** 2 for e in range(n) if M[e]) / n for k in range(K)]
    eta = [r / sum(raw) for r in raw] if sum(raw) > 0 else [1 / K] * K
    if mask_in_merge: d = [[d[k][e] if M[e] else 0. for e in range(n)] for k in range(K)]
    out = []
    for e in range(n):
        s = 1 if sum(d[k][e] for k in range(K)) >= 0 else -1
        keep = [k for k in range(K) if (d[k][e] > 0) - (d[k][e] < 0) == s]
        num, den = sum(eta[k] * d[k][e] for k in keep), sum(eta[k] for k in keep)
        out.append(b[e] + num / (den if den != 0 else 1))
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape), eta

def _rand(shape, seed, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)

# ---- per-tensor maths ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('tau', [1., .5, .25, .13, 0.])
@pytest.mark.parametrize('mask_in_merge', [False, True])
@pytest.mark.parametrize('K', [2, 3, 5])
def test_sce_matches_elementwise_oracle(tau, mask_in_merge, K):
    base = _rand((6, 5), 0)
    T = [base + _rand((6, 5), k + 1) * (k + 1) / 4 for k in range(K)]
    ref, eta = sce_oracle(base, T, tau, mask_in_merge)
    torch.testing.assert_close(sce_merge(base, T, tau, mask_in_merge), ref, rtol=0, atol=1e-12)
    M = sce_select(task_vectors(base, T)[1], tau)
    d = task_vectors(base, T)[1]
    torch.testing.assert_close(sce_coefficients(d * M if mask_in_merge else d, None if mask_in_merge else M),
                               torch.tensor(eta, dtype=torch.float64), rtol=0, atol=1e-12)

def test_sce_one_target_returns_that_target():
    base = _rand((33, 7), 1, torch.bfloat16)
    t = (base.float() + 0.01 * _rand((33, 7), 2, torch.float32)).bfloat16()
    for tau in (1., .5, .1):
        assert torch.equal(sce_merge(base, [t], tau), t)                      # FuseChat reference, any τ
    assert torch.equal(sce_merge(base, [t], 1., mask_in_merge=True), t)
    assert torch.equal(sce_merge(base, [t], .5, mask_in_merge=True), base)   # upstream quirk: empty mask, the pivot
    t32, b32 = t.float(), base.float()
    torch.testing.assert_close(sce_merge(b32, [t32], .1), t32, rtol=0, atol=1e-7)

@pytest.mark.parametrize('shape', [(), (7,), (4, 9), (2, 3, 5)])
def test_coefficients_sum_to_one(shape):
    for seed in range(5):
        base = _rand(shape, seed, torch.float32)
        T = [base + _rand(shape, 10 * seed + k, torch.float32) * (k + 1) for k in range(4)]
        d = task_vectors(base, T)[1]
        for tau in (1., .3, .05):
            eta = sce_coefficients(d, sce_select(d, tau))
            assert eta.shape == (4,) and (eta >= 0).all() and abs(float(eta.sum()) - 1) < 1e-12
        for temp in (None, 1e-3, 10.):
            w = varm_weights(d, temp)
            assert (w >= 0).all() and abs(float(w.sum()) - 1) < 1e-12
    assert sce_coefficients(torch.zeros(3, 4)).tolist() == [1 / 3] * 3        # all updates 0: uniform
    assert varm_weights(torch.zeros(3, 4)).tolist() == [1 / 3] * 3

def test_erase_keeps_only_sign_agreeing_entries():
    d = torch.tensor([[ 2., -1.,  0.,  1., -3.],
                      [-1., -1.,  4., -2., -1.],
                      [ 1.,  5., -1.,  0.,  1.]])
    # column sums: 2, 3, 3, -1, -3  -> consensus signs +, +, +, -, -
    E = sce_erase(d)
    assert E.tolist() == [[True, False, False, False, True],
                          [False, False, True, True, True],
                          [True, True, False, False, False]]
    assert (torch.sign(d)[E] == torch.tensor([1, 1, 1, -1, -1.]).expand_as(d)[E]).all()
    assert not E[d == 0].any()                                                # an exact zero is always erased
    assert sce_erase(torch.tensor([[3.], [-1.], [-1.]])).tolist() == [[True], [False], [False]]   # sum, not vote

def test_sce_tau_one_variants_agree():
    for dt in (torch.float32, torch.bfloat16, torch.float64):
        base = _rand((40, 12), 3, dt)
        T = [(base.double() + _rand((40, 12), 4 + k) * .1).to(dt) for k in range(3)]
        assert torch.equal(sce_merge(base, T, 1.), sce_merge(base, T, 1., mask_in_merge=True))
        assert not torch.equal(sce_merge(base, T, .1), sce_merge(base, T, .1, mask_in_merge=True))   # the flag bites at τ < 1

def test_sce_count_is_the_reference_float32_floor():
    d = _rand((2, 900), 5, torch.float32)
    assert int(sce_select(d, .13).sum()) == 116 and int(.13 * 900) == 117

@pytest.mark.parametrize('kind', ['normal', 'ties', 'mostly_zero', 'adversarial'])
def test_select_matches_a_full_topk_on_large_tensors(kind):
    "sce_select's sample-bracket k-th largest (and its bisection fallback) gives the mask a full sort would."
    from fuselab.merge import _kth_largest
    g, n = torch.Generator().manual_seed(7), 150_000           # > 65536: the sampled path
    v = dict(normal=lambda: torch.randn(n, generator=g).square(), ties=lambda: torch.randint(0, 6, (n,), generator=g).float(),
             mostly_zero=lambda: torch.where(torch.rand(n, generator=g) < .9, 0., torch.rand(n, generator=g)),
             adversarial=lambda: torch.where(torch.arange(n) % 5 == 0, 0., 1. + torch.arange(n) / n))[kind]()   # the strided sample sees only zeros
    bits = v.view(torch.int32)
    for k in (1, 1000, n // 10, int(torch.count_nonzero(v))):
        assert _kth_largest(bits, k) == int(bits.topk(k).values.min()), k
    d = torch.stack([v.sqrt(), -v.sqrt()])                      # two targets whose variance is v (same ordering, same ties)
    for tau in (.01, .1, .5):
        M = sce_select(d, tau)
        var = d.var(0, correction=0)
        k = int(np.float32(tau) * np.float32(int(torch.count_nonzero(var))))
        thr = var.topk(k).values.min() if k else None
        assert int(M.sum()) == k and (k == 0 or (bool((var[M] >= thr).all()) and bool((var[~M] <= thr).all())))
        if k: assert bool(M[(var > thr)].all())                         # everything strictly above the k-th is selected
        tie = (var == thr).nonzero()[:, 0] if k else None
        if k: assert M[tie].tolist() == sorted(M[tie].tolist(), reverse=True)   # ties: lowest indices first

def test_varm_weights_equal_the_formula():
    base = torch.tensor([[1., 2.], [3., 4.]])
    T1 = base + torch.tensor([[1., -1.], [1., -1.]])       # mean squared update 1
    T2 = base + torch.tensor([[0., 2.], [0., -2.]])        # (0 + 4 + 0 + 4) / 4 = 2
    T3 = base.clone()                                      # 0: untouched, weight 0 (the scripts would go uniform)
    w = varm_weights(task_vectors(base, [T1, T2, T3])[1])
    torch.testing.assert_close(w, torch.tensor([1 / 3, 2 / 3, 0.], dtype=torch.float64))
    torch.testing.assert_close(varm_merge(base, [T1, T2, T3]), T1 / 3 + 2 * T2 / 3)
    sm = torch.softmax(torch.tensor([1., 2., 0.], dtype=torch.float64) / .5, 0)
    torch.testing.assert_close(varm_weights(task_vectors(base, [T1, T2, T3])[1], .5), sm)
    torch.testing.assert_close(varm_merge(base, [T1, T2, T3], .5), sum(float(s) * t for s, t in zip(sm, (T1, T2, T3))))

def test_linear_and_task_arithmetic_by_hand():
    a, b, v = torch.tensor([1., 3.]), torch.tensor([5., -1.]), torch.tensor([1., 1.])
    assert linear_merge([a, b], [1, 3]).tolist() == [4., 0.]
    assert task_arithmetic_merge(v, [a, b], [1., .5], scale=2.).tolist() == [5., 3.]   # (1,1) + 2((0,2) + .5(4,-2))
    assert task_arithmetic_merge(v.bfloat16(), [a.bfloat16(), b.bfloat16()]).dtype == torch.bfloat16

def test_nonfinite_delta_names_tensor_and_model():
    base = torch.zeros(3, 3)
    bad = base.clone(); bad[1, 2] = float('inf')
    for f in (lambda: sce_merge(base, [base + 1, bad], name='lm_head.weight', labels=['t1', 't2']),
              lambda: varm_merge(base, [base + 1, bad], name='lm_head.weight', labels=['t1', 't2']),
              lambda: linear_merge([base + 1, bad], name='lm_head.weight', labels=['t1', 't2'])):
        with pytest.raises(ValueError, match=r'lm_head\.weight: .*t2 has 1 non-finite value'): f()
    with pytest.raises(ValueError, match='the base has 1 non-finite'): sce_merge(bad, [base], name='w')

# ---- the streaming driver ---------------------------------------------------------------------------------------------

def _save(folder, sd, shard='5GB', **config):
    folder = Path(folder); folder.mkdir(parents=True)
    save_torch_state_dict(sd, folder, max_shard_size=shard)
    (folder/'config.json').write_text(json.dumps({'model_type': 'toy', 'architectures': ['Toy'], **config}))
    (folder/'tokenizer_config.json').write_text('{"model_max_length": 64}')
    return str(folder)

def _toy(dtype, seed=0, vocab=24, extra=0, like=None, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    if like is None:
        sd = {'model.embed_tokens.weight': torch.randn(vocab + extra, 8, generator=g), 'lm_head.weight': torch.randn(vocab + extra, 8, generator=g),
              'model.norm.weight': torch.ones(8), 'model.pos_ids': torch.arange(8)}
        for i in range(2):
            sd[f'model.layers.{i}.self_attn.q_proj.weight'] = torch.randn(8, 8, generator=g)
            sd[f'model.layers.{i}.mlp.up_proj.weight'] = torch.randn(16, 8, generator=g)
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    sd = {k: (v.float() + scale * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() else v.clone() for k, v in like.items()}
    for k in ('model.embed_tokens.weight', 'lm_head.weight'):
        if extra: sd[k] = torch.cat([sd[k], torch.randn(extra, 8, generator=g).to(sd[k].dtype)])
    return sd

def _load_dir(d):
    out = {}
    for f in sorted(Path(d).glob('*.safetensors')): out.update(load_file(f))
    return out

FUNCS = dict(linear=lambda b, T, w, p: linear_merge(T, w, **p, dtype=b.dtype),
             task_arithmetic=lambda b, T, w, p: task_arithmetic_merge(b, T, w, **p),
             varm=lambda b, T, w, p: varm_merge(b, T, **p),
             sce=lambda b, T, w, p: sce_merge(b, T, **p))
PARAMS = dict(linear=dict(normalize=True), task_arithmetic=dict(scale=.7, normalize=False), varm=dict(temperature=None),
              sce=dict(select_topk=.3, mask_in_merge=False))

@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float32])
@pytest.mark.parametrize('method', list(FUNCS))
def test_streaming_sharded_equals_in_memory(tmp_path, dtype, method):
    piv = _toy(dtype)
    sds = [_toy(dtype, 1, like=piv), _toy(dtype, 2, like=piv, extra=5), _toy(dtype, 3, like=piv)]
    base = _save(tmp_path/'pivot', piv, shard=500)                 # sharded: several files + index
    paths = [_save(tmp_path/'t0', sds[0], shard=1500), _save(tmp_path/'t1', sds[1]), _save(tmp_path/'t2', sds[2], shard=700)]
    assert (tmp_path/'pivot'/'model.safetensors.index.json').exists() and (tmp_path/'t1'/'model.safetensors').exists()
    assert len(list((tmp_path/'pivot').glob('*.safetensors'))) >= 3
    w = [1., .5, 2.] if method in ('linear', 'task_arithmetic') else None
    models = [dict(model=p, parameters=dict(weight=x)) if w else dict(model=p) for p, x in zip(paths, w or [None] * 3)]
    models = ([dict(model=base, parameters=dict(weight=1.))] if method == 'linear' else []) + models
    cfg = dict(merge_method=method, base_model=base, models=models, parameters=PARAMS[method], out_shard_size=1200)
    res = merge_models(cfg, tmp_path/'out', progress=False)
    assert res['shards'] > 1 and (tmp_path/'out'/'model.safetensors.index.json').exists() and res['state'] == 'new'
    idx = json.loads((tmp_path/'out'/'model.safetensors.index.json').read_text())
    assert set(idx['weight_map']) == set(piv) and all((tmp_path/'out'/f).exists() for f in idx['weight_map'].values())
    got = _load_dir(tmp_path/'out')
    assert set(got) == set(piv)
    lin = [piv] + sds if method == 'linear' else sds
    wts = ([1.] + w) if method == 'linear' else w
    for n, v in piv.items():
        if not v.is_floating_point(): assert torch.equal(got[n], v); continue
        T = [sd[n][:v.shape[0]] for sd in lin]
        ref = FUNCS[method](v, T, wts, PARAMS[method])
        assert got[n].dtype == dtype and torch.equal(got[n], ref), n
    assert res['truncated'] == ['lm_head.weight', 'model.embed_tokens.weight']
    assert sorted(os.listdir(tmp_path/'out')) == sorted(['config.json', 'tokenizer_config.json', 'fuselab_merge.json',
                                                         'model.safetensors.index.json', *set(idx['weight_map'].values())])
    rec = json.loads((tmp_path/'out'/'fuselab_merge.json').read_text())
    if method in ('varm', 'sce'): assert all(abs(sum(s['coef']) - 1) < 1e-9 for s in rec['tensors'].values() if 'coef' in s)

def test_unsharded_float64_and_dtype_override(tmp_path):
    piv = _toy(torch.float64); t = [_toy(torch.float64, k, like=piv) for k in (1, 2)]
    cfg = dict(merge_method='sce', base_model=_save(tmp_path/'p', piv), models=[_save(tmp_path/f't{k}', s) for k, s in enumerate(t)])
    res = merge_models(cfg, tmp_path/'o64', progress=False)
    assert res['shards'] == 1 and (tmp_path/'o64'/'model.safetensors').exists() and not (tmp_path/'o64'/'model.safetensors.index.json').exists()
    got = load_file(tmp_path/'o64'/'model.safetensors')
    n = 'model.layers.0.mlp.up_proj.weight'
    assert got[n].dtype == torch.float64 and torch.equal(got[n], sce_merge(piv[n], [s[n] for s in t]))
    merge_models(dict(cfg, dtype='bfloat16'), tmp_path/'o16', progress=False, device='cpu')
    got = load_file(tmp_path/'o16'/'model.safetensors')
    assert got[n].dtype == torch.bfloat16 and torch.equal(got[n], sce_merge(piv[n], [s[n] for s in t], dtype=torch.bfloat16))
    assert got['model.pos_ids'].dtype == torch.int64                        # integer buffers keep their dtype

def test_pivot_listed_among_models_is_not_a_target(tmp_path):
    piv = _toy(torch.float32); t = _toy(torch.float32, 1, like=piv)
    p, q = _save(tmp_path/'p', piv), _save(tmp_path/'t', t)
    r1 = merge_models(dict(merge_method='sce', base_model=Path(p), models=[Path(p), q]), tmp_path/'a', progress=False)   # Paths work too
    assert r1['models'] == [str(Path(q).resolve())]
    assert torch.equal(_load_dir(tmp_path/'a')['lm_head.weight'], t['lm_head.weight'])   # one target: SCE returns it

def test_shape_mismatch_error_or_skip(tmp_path):
    piv = _toy(torch.float32); a, b = _toy(torch.float32, 1, like=piv), _toy(torch.float32, 2, like=piv)
    n = 'model.layers.1.mlp.up_proj.weight'
    b[n] = torch.randn(20, 8)
    cfg = dict(merge_method='sce', base_model=_save(tmp_path/'p', piv), models=[_save(tmp_path/'a', a), _save(tmp_path/'b', b)])
    with pytest.raises(ValueError, match=rf"tensor '{n}': models\[1\].model .* has shape \(20, 8\) but the base has \(16, 8\); set shape_mismatch: skip"):
        merge_models(cfg, tmp_path/'o', progress=False)
    assert not (tmp_path/'o').exists()                                    # refused while planning, before any write
    res = merge_models(dict(cfg, shape_mismatch='skip'), tmp_path/'o', progress=False)
    assert res['skipped'] == [n]
    got = _load_dir(tmp_path/'o')
    assert torch.equal(got[n], sce_merge(piv[n], [a[n]]))                   # merged without the mismatching model
    m = 'model.layers.0.mlp.up_proj.weight'
    assert torch.equal(got[m], sce_merge(piv[m], [a[m], b[m]]))

def test_embedding_smaller_than_pivot_is_an_error(tmp_path):
    piv = _toy(torch.float32, extra=3); t = _toy(torch.float32, 1, like=_toy(torch.float32))
    cfg = dict(merge_method='varm', base_model=_save(tmp_path/'p', piv), models=[_save(tmp_path/'t', t)])
    with pytest.raises(ValueError, match="lm_head.weight'.*a smaller one cannot be"): merge_models(cfg, tmp_path/'o', progress=False)

def test_structural_errors_name_tensor_and_model(tmp_path):
    piv = _toy(torch.float32); t = _toy(torch.float32, 1, like=piv)
    p = _save(tmp_path/'p', piv)
    miss = dict(t); del miss['model.layers.1.self_attn.q_proj.weight']
    cfg = dict(merge_method='sce', base_model=p, models=[_save(tmp_path/'t', t), _save(tmp_path/'miss', miss)])
    with pytest.raises(ValueError, match=r"tensor 'model.layers.1.self_attn.q_proj.weight' is missing from models\[1\].model"):
        merge_models(cfg, tmp_path/'o', progress=False)
    extra = dict(t, **{'model.layers.2.mlp.up_proj.weight': torch.zeros(16, 8)})
    with pytest.raises(ValueError, match=r"models\[0\].model .* has tensor 'model.layers.2.mlp.up_proj.weight' that the base lacks"):
        merge_models(dict(cfg, models=[_save(tmp_path/'extra', extra)]), tmp_path/'o', progress=False)
    other = _save(tmp_path/'other', t, model_type='other')
    with pytest.raises(ValueError, match=r"models\[0\].model .* has model_type='other' but the base has 'toy'"):
        merge_models(dict(cfg, models=[other]), tmp_path/'o', progress=False)
    tied = _save(tmp_path/'tied', t, tie_word_embeddings=True)
    (tmp_path/'p'/'config.json').write_text(json.dumps(dict(model_type='toy', architectures=['Toy'], tie_word_embeddings=False)))
    with pytest.raises(ValueError, match='tie_word_embeddings=True but the base has False'):
        merge_models(dict(cfg, models=[tied]), tmp_path/'o', progress=False)

def test_nonfinite_checkpoint_fails_without_a_loadable_output(tmp_path):
    piv = _toy(torch.bfloat16); t = _toy(torch.bfloat16, 1, like=piv)
    t['model.norm.weight'][3] = float('nan')
    cfg = dict(merge_method='sce', base_model=_save(tmp_path/'p', piv), models=[_save(tmp_path/'a', _toy(torch.bfloat16, 2, like=piv)), _save(tmp_path/'t', t)])
    with pytest.raises(ValueError, match=r'model.norm.weight: the delta of models\[1\].model has 1 non-finite value'):
        merge_models(cfg, tmp_path/'o', progress=False)
    assert not any((tmp_path/'o'/f).exists() for f in ('config.json', 'fuselab_merge.json', 'model.safetensors'))
    t['model.norm.weight'][3] = 1.                                        # fixed and saved again: the unfinished run starts over
    shutil.rmtree(tmp_path/'t'); _save(tmp_path/'t', t)
    with pytest.warns(UserWarning, match='unfinished run of another merge'): res = merge_models(cfg, tmp_path/'o', progress=False)
    assert res['state'] == 'new' and (tmp_path/'o'/'fuselab_merge.json').exists()

def test_missing_paths_name_the_config_key(tmp_path):
    piv = _toy(torch.float32); p = _save(tmp_path/'p', piv); t = _save(tmp_path/'t', _toy(torch.float32, 1, like=piv))
    with pytest.raises(FileNotFoundError, match=r"models\[1\].model: no such folder '.*nope'"):
        merge_models(dict(merge_method='sce', base_model=p, models=[t, str(tmp_path/'nope')]), tmp_path/'o', progress=False)
    with pytest.raises(FileNotFoundError, match=r"base_model: no such folder"):
        merge_models(dict(merge_method='sce', base_model=str(tmp_path/'gone'), models=[t]), tmp_path/'o', progress=False)
    with pytest.raises(FileNotFoundError, match=r"merge config '.*missing.yml' not found"):
        merge_models(tmp_path/'missing.yml', tmp_path/'o')
    sh = _save(tmp_path/'sh', piv, shard=900); next(Path(sh).glob('model-00002-*.safetensors')).unlink()
    with pytest.raises(FileNotFoundError, match=r"base_model: model.safetensors.index.json in .* lists model-00002-of-"):
        merge_models(dict(merge_method='sce', base_model=sh, models=[t]), tmp_path/'o', progress=False)
    (tmp_path/'empty').mkdir()
    with pytest.raises(FileNotFoundError, match=r"models\[0\].model: no \*.safetensors in"):
        merge_models(dict(merge_method='sce', base_model=p, models=[str(tmp_path/'empty')]), tmp_path/'o', progress=False)

def test_config_errors_list_the_valid_choices(tmp_path):
    with pytest.raises(ValueError, match=r"merge_method='ties' is unknown: use one of \['linear', 'task_arithmetic', 'varm', 'sce'\]"):
        MergeConfig.from_dict(dict(merge_method='ties', base_model='p', models=['a']))
    with pytest.raises(ValueError, match=r"sce: unknown parameter\(s\) \['density'\]; valid: \['mask_in_merge', 'select_topk'\]"):
        MergeConfig.from_dict(dict(merge_method='sce', base_model='p', models=['a'], parameters=dict(density=.5)))
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['weight'\].*goes under models\[i\].parameters"):
        MergeConfig.from_dict(dict(merge_method='linear', models=['a'], parameters=dict(weight=1)))
    with pytest.raises(ValueError, match=r"select_topk=2 must be a number in \[0, 1\]"):
        MergeConfig.from_dict(dict(merge_method='sce', base_model='p', models=['a'], parameters=dict(select_topk=2)))
    (tmp_path/'c.yml').write_text('merge_method: sce\nbase_model: p\nmodels: [a]\nslices: []\n')
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['slices'\]"): MergeConfig.from_yaml(tmp_path/'c.yml')

def test_crash_then_resume_equals_a_fresh_run(tmp_path, monkeypatch):
    piv = _toy(torch.bfloat16); sds = [_toy(torch.bfloat16, k, like=piv) for k in (1, 2)]
    cfg = dict(merge_method='sce', base_model=_save(tmp_path/'p', piv), models=[_save(tmp_path/f't{k}', s) for k, s in enumerate(sds)],
               out_shard_size=700)
    real, calls = fm.merge_tensor, []
    def crash_at_4(*a, **k):
        calls.append(k['name'])
        if len(calls) == 4: raise KeyboardInterrupt('killed')
        return real(*a, **k)
    monkeypatch.setattr(fm, 'merge_tensor', crash_at_4)
    with pytest.raises(KeyboardInterrupt): merge_models(cfg, tmp_path/'o', progress=False)
    left = sorted(os.listdir(tmp_path/'o'))
    assert 'fuselab_merge.json' not in left and 'config.json' not in left and 'model.safetensors.index.json' not in left
    assert not [f for f in left if '.tmp-' in f]                            # the unfinished shard was dropped
    done = [f for f in left if f.startswith('model-')]
    assert done                                                            # at least one whole shard survived
    (tmp_path/'o'/'.model-00003-of-00003.safetensors.tmp-999999').write_bytes(b'half')   # as a SIGKILL would leave it
    calls.clear(); monkeypatch.setattr(fm, 'merge_tensor', lambda *a, **k: calls.append(k['name']) or real(*a, **k))
    res = merge_models(cfg, tmp_path/'o', progress=False)
    assert res['state'] == 'resume' and res['resumed_shards'] == len(done) and len(calls) < res['n_tensors']
    assert not [f for f in os.listdir(tmp_path/'o') if f.startswith('.')]
    fresh = merge_models(cfg, tmp_path/'fresh', progress=False)
    a, b = _load_dir(tmp_path/'o'), _load_dir(tmp_path/'fresh')
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert fresh['tensors'] == res['tensors']
    assert merge_models(cfg, tmp_path/'o', progress=False)['state'] == 'done'
    with pytest.raises(FileExistsError, match='not empty'): merge_models(dict(cfg, dtype='float32'), tmp_path/'o', progress=False)
    assert merge_models(dict(cfg, dtype='float32'), tmp_path/'o', progress=False, overwrite=True)['state'] == 'new'
    with pytest.raises(ValueError, match='is \\(or contains\\) the input folder'):
        merge_models(cfg, tmp_path/'p', progress=False, overwrite=True)

# ---- CLI + transformers ------------------------------------------------------------------------------------------------

def _llama(tie, seed, vocab):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()

def _perturbed(model, seed, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters(): p.add_(scale * torch.randn(p.shape, generator=g))
    return model

def test_cli_yaml_tied_llama_loads_with_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from fuselab.testing import train_tokenizer
    tok = train_tokenizer(['merge these models please'] * 20, 300)
    piv = _llama(True, 0, len(tok)); piv.save_pretrained(tmp_path/'pivot'); tok.save_pretrained(tmp_path/'pivot')
    for k in (1, 2):
        m = _perturbed(_llama(True, 0, len(tok)), k); m.save_pretrained(tmp_path/f't{k}')
    assert 'lm_head.weight' not in load_file(tmp_path/'pivot'/'model.safetensors')       # tied: absent from the file
    (tmp_path/'cfg.yml').write_text('merge_method: sce\nbase_model: pivot\nmodels:\n  - model: pivot\n  - model: t1\n  - model: t2\n'
                                    'parameters: {select_topk: 0.5}\ndtype: bfloat16\nout_dir: merged\n')
    (tmp_path/'cwd').mkdir()
    r = subprocess.run([str(Path(sys.executable).parent/'fuselab'), 'merge', str(tmp_path/'cfg.yml'), '--quiet'], cwd=tmp_path/'cwd',
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.stdout.startswith('new: sce of 2 model(s) into ') and str(tmp_path/'merged') in r.stdout
    out = AutoModelForCausalLM.from_pretrained(tmp_path/'merged')
    assert AutoTokenizer.from_pretrained(tmp_path/'merged').get_vocab() == tok.get_vocab()
    assert out.lm_head.weight.data_ptr() == out.model.embed_tokens.weight.data_ptr() and out.dtype == torch.bfloat16
    sds = [load_file(tmp_path/d/'model.safetensors') for d in ('pivot', 't1', 't2')]
    for n, p in out.state_dict().items():
        if n == 'lm_head.weight': continue
        assert torch.equal(p, sce_merge(sds[0][n], [sds[1][n], sds[2][n]], .5, dtype=torch.bfloat16)), n

def test_dict_config_untied_llama_with_grown_vocab(tmp_path):
    "The FuseChat notebook's call: a plain dict with absolute paths, save_pretrained checkpoints, untied lm_head."
    from transformers import AutoModelForCausalLM
    from fuselab.testing import tiny_lm
    piv = tiny_lm(96, hidden=32, layers=1, heads=2, kv_heads=1); piv.save_pretrained(tmp_path/'pivot')
    t1 = _perturbed(tiny_lm(96, hidden=32, layers=1, heads=2, kv_heads=1), 1); t1.save_pretrained(tmp_path/'t1')
    t2 = _perturbed(tiny_lm(96, hidden=32, layers=1, heads=2, kv_heads=1), 2); t2.resize_token_embeddings(100); t2.save_pretrained(tmp_path/'t2')
    res = merge_models(dict(merge_method='varm', base_model=str(tmp_path/'pivot'), models=[str(tmp_path/'t1'), str(tmp_path/'t2')]),
                       str(tmp_path/'merged'), progress=False)
    assert res['truncated'] == ['lm_head.weight', 'model.embed_tokens.weight']
    out = AutoModelForCausalLM.from_pretrained(tmp_path/'merged')
    assert out.config.vocab_size == 96 and out.lm_head.weight.data_ptr() != out.model.embed_tokens.weight.data_ptr()
    sd1, sd2 = t1.state_dict(), t2.state_dict()
    for n, p in out.state_dict().items():
        assert torch.equal(p, varm_merge(piv.state_dict()[n], [sd1[n], sd2[n][:p.shape[0]]])), n
