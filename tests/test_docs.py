"`make docs` works offline: one page per notebook, signatures, plots, vendored KaTeX, no broken local link; README in sync."
import re, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def test_docs_build_offline():
    readme_before = (ROOT/'README.md').read_text()
    r = subprocess.run([sys.executable, 'tools/build_docs.py'], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]      # the script itself fails on a missing page or broken link
    docs = ROOT/'_docs'
    core = (docs/'core.html').read_text()
    assert 'id="chunked_logprobs"' in core and '# (...,H) last hidden states' in core   # show_doc signature with docments
    assert 'site_libs/katex/katex.min.js' in core and (docs/'site_libs/katex/katex.min.js').exists()
    assert 'cdn.jsdelivr.net/npm/katex' not in core                                # maths renders offline
    assert re.search(r'\\\(|\\\[', core)                                          # maths is there to render
    assert 'data:image/png;base64' in (docs/'fusellm.html').read_text()           # the miniature experiment's saved plot
    assert (ROOT/'README.md').read_text() == readme_before, 'README.md is out of date with nbs/index.ipynb: run `make docs` and commit'
