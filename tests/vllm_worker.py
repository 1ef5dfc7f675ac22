"""Runs fuselab.gen's vLLM backend in .venv-vllm (vLLM cannot share the main venv) and writes its results as JSON.

Driven by tests/test_gen.py: `.venv-vllm/bin/python tests/vllm_worker.py SPEC.json OUT.json MODE`, where SPEC holds the
model directories and the prompts and MODE is `inproc` (engine core in this process: every case) or `mp` (engine core in
a separate process, weights cross by RPC: greedy + weight refresh only). One engine is started, used, then refreshed in
place with the weights of a second model (`update_weights`, no restart) and used again. vLLM spawns workers, hence `main()`."""
import json, os, sys, time
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('VLLM_CPU_KVCACHE_SPACE', '1')      # GiB of KV cache on CPU


def samples(outs):
    return [[s.to_dict() for s in o] for o in outs]


def main(spec_path, out_path, mode='inproc'):
    from transformers import AutoModelForCausalLM
    from fuselab.gen import VLLMGenerator, Sampling
    spec, res, t = json.loads(open(spec_path).read()), {}, time.time()
    gen = VLLMGenerator(spec['model_a'], dtype='float32', enforce_eager=True, gpu_memory_utilization=0.25,
                        max_model_len=256, max_num_seqs=16, seed=0, in_process=mode == 'inproc')
    res['engine_start_s'] = time.time() - t
    greedy = Sampling(temperature=0, max_new_tokens=spec['max_new_tokens'], logprobs=3)
    t = time.time()
    res['greedy_raw'] = samples(gen.generate(spec['raw'], greedy, progress=False))
    if mode == 'inproc':
      res['greedy_chat'] = samples(gen.generate(spec['chat'], greedy, prefill=spec['prefill'], progress=False))
      res['greedy_stop'] = samples(gen.generate(spec['raw'], Sampling(temperature=0, max_new_tokens=spec['max_new_tokens'], stop=tuple(spec['stop'])), progress=False))
      sampled = Sampling(n=4, temperature=2.0, top_k=20, max_new_tokens=8, seed=3)   # hot (vLLM's maximum): the test model is peaked
      res['sampled_a'] = samples(gen.generate(spec['raw'], sampled, progress=False))
      res['sampled_b'] = samples(gen.generate(spec['raw'][::-1], sampled, progress=False))[::-1]   # other batch order, same seeds
    res['generate_s'] = time.time() - t
    t = time.time()
    res['n_tensors'] = gen.update_weights(AutoModelForCausalLM.from_pretrained(spec['model_b'], dtype='float32'))
    res['update_s'] = time.time() - t
    res['version'] = gen.version
    res['greedy_raw_after'] = samples(gen.generate(spec['raw'], greedy, progress=False))
    with open(out_path + '.tmp', 'w') as f: json.dump(res, f)
    os.replace(out_path + '.tmp', out_path)


if __name__ == '__main__':
    main(*sys.argv[1:4])
