"The offline tokenizers all load and tokenize real text; tiny models are sized to them."
import pytest, torch
from fuselab.testing import REAL_TOKENIZERS, real_tokenizer, tiny_lm
from fuselab.core import check_vocab_width

TEXT = "Optimal transport aligns tokenizers: naïve café, 12345 tokens!\n  def f(x): return x**2"
SIZES = {'gpt2': 50257, 'llama': 32000, 'mistral-v3': 32768, 'qwen': 151646, 'deepseek': 129280, 'bert': 30522, 'cl100k': 100257}

@pytest.mark.parametrize('name', sorted(REAL_TOKENIZERS))
def test_real_tokenizer_loads_offline(name):
    tok = real_tokenizer(name)
    assert len(tok) >= SIZES[name] and tok.pad_token is not None
    ids = tok(TEXT, add_special_tokens=False)['input_ids']
    assert 15 < len(ids) < 40
    if name != 'bert': assert tok.decode(ids) == TEXT      # WordPiece lower-cases and strips accents

def test_markers_differ_between_families():
    pieces = {n: real_tokenizer(n).convert_ids_to_tokens(real_tokenizer(n)(' transport', add_special_tokens=False)['input_ids'])
              for n in ('gpt2', 'llama', 'bert')}
    assert pieces['gpt2'][0].startswith('Ġ') and pieces['llama'][-1] == '▁transport' and pieces['bert'] == ['transport']

def test_tiny_lm_sized_to_real_tokenizer_with_padding():
    tok = real_tokenizer('llama')
    m = tiny_lm(tok, 'mistral', hidden=32, layers=1, heads=2, kv_heads=1, pad_vocab_to=32064)
    assert check_vocab_width(len(tok), m.config.vocab_size) == 32064
    with pytest.raises(ValueError, match='tokenizer has 32000 tokens but'): check_vocab_width(len(tok), 31999)
