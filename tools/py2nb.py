"""Convert between a percent-format script and a notebook (authoring aid; the notebook stays the source of truth).
Cells start with `# %%` (code) or `# %% [markdown]` (markdown; each line prefixed with `# `).
Usage: python tools/py2nb.py X.py [nbs/X.ipynb]   write the notebook (outputs dropped; run tools/run_nbs.py after)
       python tools/py2nb.py nbs/X.ipynb [X.py]   write the script back from a notebook"""
import re, sys
from pathlib import Path
import nbformat

def py2nb(src:Path, dst:Path):
    cells, kind, buf = [], None, []
    def close():
        if kind is None: return
        text = '\n'.join(buf).strip('\n')
        if kind == 'markdown': cells.append(nbformat.v4.new_markdown_cell(re.sub(r'^# ?', '', text, flags=re.M)))
        else: cells.append(nbformat.v4.new_code_cell(text))
    for line in src.read_text().splitlines():
        m = re.match(r'^# %%( \[markdown\])?\s*$', line)
        if m: close(); kind, buf = ('markdown' if m.group(1) else 'code'), []
        else: buf.append(line)
    close()
    nb = nbformat.v4.new_notebook(cells=cells, metadata=dict(kernelspec=dict(display_name='python3', language='python', name='python3')))
    nbformat.write(nb, dst)

def nb2py(src:Path, dst:Path):
    nb, out = nbformat.read(src, as_version=4), []
    for c in nb.cells:
        if c.cell_type == 'markdown': out += ['# %% [markdown]', *[('# ' + l).rstrip() for l in c.source.splitlines()], '']
        else: out += ['# %%', c.source, '']
    dst.write_text('\n'.join(out))

if __name__ == '__main__':
    src = Path(sys.argv[1])
    if src.suffix == '.py': py2nb(src, Path(sys.argv[2]) if len(sys.argv) > 2 else Path('nbs')/(src.stem + '.ipynb'))
    else: nb2py(src, Path(sys.argv[2]) if len(sys.argv) > 2 else Path(src.stem + '.py'))
