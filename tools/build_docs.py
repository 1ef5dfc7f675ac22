"""Build the docs site and README.md offline, without Quarto (see ../shared/NBDEV2.md §3).

1. nbdev's own pre-processing (what `nbdev_docs` runs before `quarto render`), with Quarto's installer stubbed out.
2. A staging copy of _proc/ where each notebook is renamed to its `output-file` (00_core.ipynb -> core.html),
   so nbdev's doc links (`core.html#name`) resolve.
3. smalldocs renders the Quarto-style site into _docs/.
4. KaTeX is vendored from npm (katex@0.16.11, cached in .cache/katex) so maths renders offline.
5. README.md from the processed index notebook.
6. A check: one page per notebook, every local link and image resolves, maths and plots present.
Users with Quarto get the same site from `nbdev_docs`."""
import json, os, re, shutil, subprocess, sys, tarfile, tempfile
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlparse, unquote
import yaml

ROOT = Path(__file__).resolve().parents[1]
KATEX_VERSION = '0.16.11'
KATEX_CDN = f'https://cdn.jsdelivr.net/npm/katex@{KATEX_VERSION}/dist'

def rename_to_output_file(site: Path) -> dict:
    "Rename processed notebooks to their front-matter `output-file` (smalldocs ignores that key)."
    renames = {}
    for nb_path in sorted(site.glob('*.ipynb')):
        nb = json.loads(nb_path.read_text(encoding='utf-8'))
        cells = nb.get('cells', [])
        if not cells or cells[0]['cell_type'] != 'raw': continue
        m = re.match(r'^---\n(.*?)\n---', ''.join(cells[0]['source']), re.S)
        if not m: continue
        fm = yaml.safe_load(m.group(1)) or {}
        out = fm.pop('output-file', None)
        cells[0]['source'] = '---\n' + yaml.safe_dump(fm, sort_keys=False) + '---\n\n'
        nb_path.write_text(json.dumps(nb, indent=1), encoding='utf-8')
        if out and Path(out).stem != nb_path.stem:
            new = nb_path.with_name(Path(out).stem + '.ipynb')
            nb_path.rename(new)
            renames[nb_path.name] = new.name
    return renames

def fix_sidebar(site: Path, renames: dict):
    sb = site/'sidebar.yml'
    if not sb.exists() or not renames: return
    def walk(x):
        if isinstance(x, str): return renames.get(x, x)
        if isinstance(x, list): return [walk(o) for o in x]
        if isinstance(x, dict): return {k: walk(v) for k, v in x.items()}
        return x
    sb.write_text(yaml.safe_dump(walk(yaml.safe_load(sb.read_text())), sort_keys=False))

def katex_dist() -> Path:
    "KaTeX's dist folder from the npm registry (`npm pack`), cached under .cache/katex."
    dist = ROOT/'.cache'/'katex'/'package'/'dist'
    if dist.exists(): return dist
    tmp = Path(tempfile.mkdtemp())
    try: subprocess.run(['npm', 'pack', f'katex@{KATEX_VERSION}', '--silent'], cwd=tmp, check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        sys.exit(f'could not fetch KaTeX with `npm pack katex@{KATEX_VERSION}` ({e}); install Node.js/npm or '
                 f'unpack the package into {dist.parent.parent}')
    with tarfile.open(next(tmp.glob('katex-*.tgz'))) as t: t.extractall(dist.parent.parent, filter='data')
    return dist

def vendor_katex(doc_path: Path):
    shutil.copytree(katex_dist(), doc_path/'site_libs'/'katex', dirs_exist_ok=True)
    for page in doc_path.rglob('*.html'):
        txt = page.read_text(encoding='utf-8')
        if KATEX_CDN not in txt: continue
        up = '../' * (len(page.relative_to(doc_path).parts) - 1)
        page.write_text(txt.replace(KATEX_CDN, up + 'site_libs/katex'), encoding='utf-8')

def readme(cfg, site: Path, renames: dict):
    "README.md from the processed index notebook (what `nbdev_readme` does with `quarto render -t gfm`)."
    from smalldocs import llms
    nb_text = (site/renames.get(cfg.readme_nb, cfg.readme_nb)).read_text(encoding='utf-8')
    nb = json.loads(nb_text)
    fm = yaml.safe_load(re.match(r'^---\n(.*?)\n---', ''.join(nb['cells'][0]['source']), re.S).group(1)) or {}
    class _Prose:  # stand-in for smalldocs.llms.Prose: keep Markdown cells as they are
        dropping = False; env = {}
        def feed(self, s): return s
        def finish(self): return ''
        def link(self, s): return s
    body, files = llms.notebook(nb_text, {}, Path(cfg.readme_nb).stem, _Prose(), lambda s: s)
    head = f"# {fm.get('title', cfg.lib_name)}\n\n" + (f"> {fm['description']}\n\n" if fm.get('description') else '')
    (cfg.config_path/'README.md').write_text(head + body.strip() + '\n', encoding='utf-8')
    for f, data in files.items():
        p = cfg.config_path/f; p.parent.mkdir(parents=True, exist_ok=True); p.write_bytes(data)

class _Links(HTMLParser):
    def __init__(self): super().__init__(); self.refs = []
    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ('href', 'src') and v: self.refs.append(v)

def check_site(doc_path: Path, nbs: list) -> list:
    "Problems in the built site: a notebook without a page, a local link or image that does not resolve."
    problems = []
    pages = {p.stem for p in doc_path.glob('*.html')}
    for nb in nbs:
        if nb not in pages: problems.append(f'no page for notebook {nb}')
    for page in doc_path.rglob('*.html'):
        p = _Links(); p.feed(page.read_text(encoding='utf-8'))
        for ref in p.refs:
            u = urlparse(ref)
            if u.scheme or ref.startswith(('#', '//', 'mailto:')): continue
            target = (page.parent/unquote(u.path)).resolve()
            if not target.exists(): problems.append(f'{page.relative_to(doc_path)}: broken link {ref}')
    return problems

def main():
    os.chdir(ROOT)
    import nbdev.quarto
    nbdev.quarto._ensure_quarto = lambda: None             # never try to install Quarto
    cache, cfg, path = nbdev.quarto._pre_docs()             # nbs/nbdev.yml, nbs/sidebar.yml, fuselab/_modidx.py, _proc/
    site = cfg.config_path/'_site_src'
    shutil.rmtree(site, ignore_errors=True)
    shutil.copytree(cache, site)
    renames = rename_to_output_file(site)
    fix_sidebar(site, renames)
    from smalldocs.site import build
    res = build(site, quiet=True)
    for w in res.warnings:
        if not re.search(r'format commonmark|keep-md|output-file|format-links', str(w)): print('smalldocs:', w, file=sys.stderr)
    shutil.rmtree(cfg.doc_path, ignore_errors=True)
    shutil.move(str(site/cfg.doc_path.name), str(cfg.doc_path))
    vendor_katex(cfg.doc_path)
    readme(cfg, site, renames)
    shutil.rmtree(site, ignore_errors=True)
    pages = sorted(Path(renames.get(p.name, p.name)).stem for p in cache.glob('*.ipynb'))
    problems = check_site(cfg.doc_path, pages)
    if problems: sys.exit('docs check failed:\n  ' + '\n  '.join(problems))
    print(f'docs: {len(pages)} pages written to {cfg.doc_path} ({", ".join(pages)}); all local links resolve')

if __name__ == '__main__':   # required: proc_nbs uses multiprocessing 'spawn'
    main()
