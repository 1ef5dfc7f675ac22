"Top-k store robustness: killed writers, corrupt shards, resumable extraction; schema errors."
import json, os, signal, subprocess, sys, textwrap, time
from pathlib import Path
import numpy as np, pytest, torch
from fuselab.data import TopKStore, StoreError, TopKCollator, extract_topk

def _fill(path, n_seq, shard_tokens, k=4, V=50, seed=0):
    rng = np.random.default_rng(seed)
    st = TopKStore(path, k=k, vocab_size=V, with_tail=True)
    data = {}
    with st.writer(shard_tokens=shard_tokens) as w:
        for key in range(n_seq):
            T = int(rng.integers(1, 9))
            data[key] = (rng.integers(0, V, (T, k)), np.log(rng.dirichlet(np.ones(k + 1), T)[:, :k]), rng.random(T))
            w.add(key, *data[key])
    return st, data

def test_roundtrip_many_shards(tmp_path):
    st, data = _fill(tmp_path/'s', 200, shard_tokens=64)
    re = TopKStore(tmp_path/'s', verify=True)
    assert len(re) == 200 and len(re.shards) > 5
    for key, (i, v, t) in data.items():
        s = re[key]
        np.testing.assert_array_equal(s.ids, i); np.testing.assert_allclose(s.logprobs, v, atol=2e-3, rtol=2e-3)
        np.testing.assert_allclose(s.tail, t, atol=1e-3)
    assert re.bytes_per_token() == 4 * 6 + 2

WRITER = textwrap.dedent('''
    import sys, time, numpy as np
    from fuselab.data import TopKStore
    st = TopKStore(sys.argv[1], k=4, vocab_size=50)
    rng = np.random.default_rng(0)
    with st.writer(shard_tokens=40) as w:
        for key in range(100000):
            w.add(key, rng.integers(0, 50, (8, 4)), np.log(rng.dirichlet(np.ones(5), 8)[:, :4]))
            if key % 5 == 4: print(key, flush=True)
''')

def test_killed_writer_leaves_only_complete_shards(tmp_path):
    "SIGKILL a writer mid-run: the store reopens with complete shards only, resumes, and no key is lost or doubled."
    p = subprocess.Popen([sys.executable, '-c', WRITER, str(tmp_path/'s')], stdout=subprocess.PIPE, text=True)
    for _ in range(40): p.stdout.readline()           # ~40 shards written
    os.kill(p.pid, signal.SIGKILL); p.wait()
    st = TopKStore(tmp_path/'s', verify=True)
    done = st.done_keys()
    assert len(done) >= 150 and done == set(range(len(done)))   # a prefix of keys, shard-aligned
    assert not list((tmp_path/'s').glob('*.tmp-*'))             # the dead writer's partial shard was removed
    with st.writer() as w:                                      # resume
        for key in range(len(done), len(done) + 10): w.add(key, np.zeros((2, 4), int), np.full((2, 4), -2.0))
    assert TopKStore(tmp_path/'s').done_keys() == set(range(len(done) + 10))

def test_corrupt_shard_detected_by_crc(tmp_path):
    st, _ = _fill(tmp_path/'s', 20, shard_tokens=30)
    f = sorted((tmp_path/'s').glob('shard-*'))[1]/'ids.npy'
    b = bytearray(f.read_bytes()); b[-1] ^= 0xFF; f.write_bytes(bytes(b))   # same size, flipped bits
    TopKStore(tmp_path/'s')                                                 # size check alone passes
    with pytest.raises(StoreError, match='truncated or corrupt: delete .*shard-00001'): TopKStore(tmp_path/'s', verify=True)

def test_missing_manifest_and_truncated_header(tmp_path):
    _fill(tmp_path/'s', 10, shard_tokens=1000)
    d = tmp_path/'s'/'shard-00000'
    (d/'keys.npy').write_bytes(b'\x93NUMPY')                               # truncated inside the header
    with pytest.raises(StoreError, match='keys.npy is truncated or corrupt'): TopKStore(tmp_path/'s')
    (d/'manifest.json').unlink()
    with pytest.raises(StoreError, match='has no manifest.json'): TopKStore(tmp_path/'s')

def test_no_store_without_shape_info(tmp_path):
    with pytest.raises(StoreError, match='pass k= and vocab_size='): TopKStore(tmp_path/'nothing')

def test_nan_logprobs_rejected(tmp_path):
    st = TopKStore(tmp_path/'s', k=2, vocab_size=10)
    with pytest.raises(ValueError, match='NaN'): st.writer().add(0, np.zeros((1, 2), int), np.array([[np.nan, -1.]]))

def test_extract_rejects_vocab_mismatch(tmp_path):
    from fuselab.testing import tiny_lm
    m = tiny_lm(300)
    with pytest.raises(ValueError, match='tokenizer has 301 tokens'):
        extract_topk(m, [dict(key=0, input_ids=[1, 2])], TopKStore(tmp_path/'s', k=2, vocab_size=301), progress=False)
