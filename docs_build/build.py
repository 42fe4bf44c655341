#!/usr/bin/env python
"""Offline documentation site for weightwatch_nb, without Quarto.

    python docs_build/build.py            # execute + process + render every notebook into _site/
    python docs_build/build.py --jobs 1   # one notebook at a time (default: one per CPU)

Pipeline (see docs_build/README.md for why):
1. discover the notebooks: `nbs/**.ipynb` (library pages, `index.ipynb` is the home page) and
   `tutorials/**.ipynb` (labs; generated learner copies excluded), with nbdev's own `nbglob` rules;
2. execute each one, in its own fresh process, exactly as `nbdev_test` does (execnb `CaptureShell`,
   cwd = the notebook's folder, cells flagged with a `tst_flags` flag, `#| eval: false` cells and
   `nbdev_export()` cells skipped);
3. run nbdev's docs processors (`FilterDefaults`, what `nbdev_proc_nbs` runs for `nbdev_docs`) on the
   executed notebook, so `show_doc` cells are added for every exported symbol; they are executed in the
   notebook's own, already warm, kernel. The processed notebooks are kept in `_proc/_docs_build/`;
4. render each processed notebook with nbconvert's `HTMLExporter` and the small template in
   `docs_build/templates/cells/`, put it in the page shell `docs_build/templates/page.html.j2` (sidebar,
   table of contents), give headings Quarto's (pandoc's) ids so nbdev's `_modidx.py` anchors resolve, and
   make nbdev's doc links and `.ipynb` links relative;
5. add a benchmarks page from `benchmarks/*.md` when there are any;
6. check that every public symbol in `weightwatch_nb/_modidx.py` has its anchor on its page.

Any notebook that fails to execute or to process fails the build (exit status 1) and is named, with
its traceback; the pages of the others are still written so the failure can be inspected.
"""
from __future__ import annotations
import argparse, ast, html, json, multiprocessing, os, re, shutil, sys, time, traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
TEMPLATES = HERE/'templates'
SITE = ROOT/'_site'
PROC = ROOT/'_proc'/'_docs_build'
LAB_DIRS_EXCLUDED = {'learner'}  # generated learner copies of the labs: the solution versions are published

# --------------------------------------------------------------------------------------------------
# Discovery

@dataclass
class Page:
    src: Path | None           # notebook or markdown source (None for generated pages)
    out: str                   # path of the page inside the site, posix, e.g. 'core.html', 'tutorials/quickstart.html'
    section: str               # 'Home', 'Library', 'Labs', 'Benchmarks'
    title: str = ''
    description: str = ''
    error: str = ''            # traceback when the notebook failed
    seconds: float = 0.
    warnings: list = field(default_factory=list)
    ids: set = field(default_factory=set)          # element ids of the rendered page
    source_url: str = ''                           # where the page's source is shown on GitHub (default: src)

    @property
    def proc(self)->Path: return PROC/Path(self.out).with_suffix('.ipynb')
    @property
    def root(self)->str: return '../'*(len(Path(self.out).parts)-1)

def _cfg():
    from nbdev.config import get_config
    return get_config(path=ROOT)

def _html_name(p:Path)->Path:
    "nbdev's (and Quarto's) output name: lower case, numeric prefix dropped (`00_core.ipynb` -> `core.html`)"
    from nbdev.doclinks import _nbpath2html
    return _nbpath2html(p)

def _nbs_in(path:Path, exclude=())->list[Path]:
    from nbdev.doclinks import nbglob
    if not path.exists(): return []
    files = nbglob(path, as_path=True)   # settings.ini `recursive`, skips names starting with _ or .
    return sorted(Path(f).resolve() for f in files
                  if not set(Path(f).resolve().relative_to(path.resolve()).parts[:-1]) & set(exclude))

def discover()->list[Page]:
    cfg = _cfg()
    nbs, pages = Path(cfg.nbs_path), []
    for f in _nbs_in(nbs):
        rel = f.relative_to(nbs.resolve())
        home = rel.as_posix()==cfg.get('readme_nb', 'index.ipynb')
        pages.append(Page(f, _html_name(rel).as_posix(), 'Home' if home else 'Library'))
    tut = ROOT/'tutorials'
    for f in _nbs_in(tut, exclude=LAB_DIRS_EXCLUDED):
        pages.append(Page(f, ('tutorials'/_html_name(f.relative_to(tut.resolve()))).as_posix(), 'Labs'))
    pages.sort(key=lambda p: p.section!='Home')   # home first, then the library in notebook order, then the labs
    if not any(p.section=='Home' for p in pages): sys.exit(f"docs: no {cfg.get('readme_nb','index.ipynb')} in {nbs}: it is the home page")
    seen = {}
    for p in pages:
        if p.out in seen: sys.exit(f"docs: {p.src} and {seen[p.out]} would both be written to {p.out}: rename one")
        seen[p.out] = p.src
    return pages

# --------------------------------------------------------------------------------------------------
# Execute + process (runs in a fresh spawned process per notebook)

def _flags(cfg, key:str='tst_flags')->set:
    "Flags listed under `key` in settings.ini (`tst_flags`, `docs_flags`), accepting space, comma or | separators"
    return set(o for o in re.split(r'[\s,|]+', cfg.get(key, '') or '') if o)

def _flagged(src:Path, flags:set)->int:
    "How many code cells of notebook `src` carry one of `flags`"
    if not flags: return 0
    from execnb.nbio import read_nb
    from nbdev.process import extract_directives
    return sum(1 for c in read_nb(src).cells if c.cell_type=='code' and flags & extract_directives(c, remove=False).keys())

def _make_procs(nb, k):
    "nbdev's docs processors, with show_doc cells executed in the notebook's warm kernel `k`"
    from nbdev.processors import FilterDefaults, add_show_docs, exec_show_docs, _show_docs, _want_doc
    from nbdev.process import Processor
    from execnb.nbio import mk_cell

    class add_method_docs(Processor):
        "Also document the public methods defined in the body of a documented class (nbdev shows top-level defs only)"
        def begin(self):
            cells = self.nb.cells
            shown = {ast.unparse(t.value.args[0]) for c in cells if c.cell_type=='code' and c.source
                     for t in _show_docs(c.parsed_() or []) if t.value.args}
            for cell in reversed([c for c in cells if _want_doc(c)]):
                for node in reversed([o for o in (cell.parsed_() or []) if isinstance(o, ast.ClassDef)]):
                    meths = [f'{node.name}.{m.name}' for m in node.body
                             if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)) and not m.name.startswith('_')
                             and not any(ast.unparse(d).split('.')[-1] in ('setter', 'deleter') for d in m.decorator_list)]
                    meths = [m for m in meths if m not in shown]
                    at = next((i for i,c in enumerate(cells) if c.cell_type=='code' and c.source.strip()==f'show_doc({node.name})'), None)
                    if at is None or not meths: continue
                    for m in reversed(meths):
                        new = mk_cell(f'show_doc({m})')
                        new.has_sd = True
                        cells.insert(at+1, new)
                        shown.add(m)

    class warm_show_docs(Processor):
        "Like nbdev's `exec_show_docs`, but in the kernel that has just executed the whole notebook"
        __name__ = 'exec_show_docs'
        def __init__(self, nb): self.nb = nb
        def begin(self): k.run_cell('from nbdev.showdoc import show_doc')
        def __call__(self, cell):
            if not getattr(self.nb, 'has_docs_', None) or not getattr(cell, 'has_sd', False): return
            if str(getattr(self.nb, 'frontmatter_', {}).get('skip_showdoc', False)).lower() in ('true', '1', 'yes'): return
            k.cell(cell)
            if k.exc: raise RuntimeError(f"show_doc cell failed:\n{cell.source}") from k.exc

    class Procs(FilterDefaults):
        def base_procs(self):
            procs = list(super().base_procs())
            procs.insert(procs.index(add_show_docs)+1, add_method_docs)
            return [warm_show_docs(nb) if p is exec_show_docs else p for p in procs]
    return Procs()

def _mixed_import_cells(nb)->list[int]:
    "Cells that nbdev's own `exec_show_docs` would run out of context (imports mixed with other code: nbdev FAQ)"
    res = []
    for i,c in enumerate(nb.cells):
        if c.cell_type!='code' or 'nbdev_export'+'()' in c.source: continue
        if re.search(r'^\s*#\|\s*(export|exporti|exports|exec_doc)\b|^\s*#\|\s*eval:\s*false', c.source, re.M): continue
        try: tree = ast.parse(re.sub(r'^\s*[%!].*$', '', c.source, flags=re.M))
        except SyntaxError: continue
        nodes = list(ast.walk(tree))
        if any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in nodes) and any(isinstance(n, (ast.Expr, ast.Assign)) for n in nodes): res.append(i)
    return res

def execute_and_process(src:str, dst:str, run_flags=())->dict:
    "Execute notebook `src` like `nbdev_test --flags run_flags`, run nbdev's docs processors on it, write it to `dst`"
    os.chdir(ROOT)
    os.environ['IN_TEST'] = '1'
    os.environ.setdefault('MPLBACKEND', 'Agg')
    from execnb.nbio import read_nb, write_nb
    from execnb.shell import CaptureShell
    from nbdev.process import extract_directives
    from nbdev.frontmatter import FrontmatterProc
    from nbdev.process import NBProcessor
    from fastcore.xtras import working_directory
    start, src, cfg = time.time(), Path(src), _cfg()
    res = dict(error='', warnings=[], title='', description='')
    nb = read_nb(src)
    if mixed := _mixed_import_cells(nb):
        res['warnings'].append(f"cells {mixed} mix imports with other code: `nbdev_docs` (Quarto) would execute them "
                               "without the rest of the notebook; put imports in cells of their own")
    fm = getattr(NBProcessor(src, procs=FrontmatterProc, process=True).nb, 'frontmatter_', {})
    flags = _flags(cfg) - set(run_flags)
    def skip(cell):
        if cell.cell_type!='code': return True
        if 'nbdev_export'+'(' in cell.source: return True
        d = extract_directives(cell, remove=False)
        if d.get('eval:', [''])[0].lower()=='false': return True
        return bool(flags & d.keys())
    k = CaptureShell(src)
    if str(fm.get('skip_exec', False)).lower() not in ('true', '1', 'yes'):
        try:
            with working_directory(src.parent): k.run_all(nb, exc_stop=True, preproc=skip)
        except Exception:
            res['error'] = k.prettytb(fname=src.relative_to(ROOT))
    if not res['error']:
        try:
            _make_procs(nb, k)(nb)
            fm = getattr(nb, 'frontmatter_', {}) or {}
        except Exception as e:
            res['error'] = f"nbdev docs processing failed in {src.relative_to(ROOT)}:\n" + ''.join(traceback.format_exception(e))
    nb.metadata.pop('widgets', None)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    write_nb(nb, dst)
    res.update(title=str(fm.get('title', '') or ''), description=str(fm.get('description', '') or ''),
               seconds=time.time()-start)
    return res

# --------------------------------------------------------------------------------------------------
# Rendering

def pandoc_id(text:str)->str:
    "Pandoc's (so Quarto's, so nbdev's `_modidx.py`) automatic identifier for a heading's text"
    s = ''.join(c for c in text.lower() if c.isalnum() or c in '_-.' or c.isspace())
    s = '-'.join(s.split())
    s = re.sub(r'^[^a-zA-Z\u00C0-\uFFFF]+', '', s)
    return s or 'section'

_re_qopt = re.compile(r'^\s*#\|\s*([\w-]+)\s*:\s*(.*?)\s*$')
_re_progress = re.compile(r'^\s*(\S.*?:)?\s*\d+%\|.*\|\s*\d+/\d+\s*\[.*\]\s*$')

def _drop_progress(o)->bool:
    "Strip tqdm progress bars from a stderr stream (they say nothing to a reader); True if nothing is left"
    if o.get('output_type')!='stream' or o.get('name')!='stderr': return False
    text = ''.join(o['text']) if isinstance(o['text'], list) else o['text']
    lines = [l for l in re.split(r'[\r\n]', text) if l.strip() and not _re_progress.match(l)]
    o['text'] = '\n'.join(lines) + ('\n' if lines else '')
    return not lines

_re_attr_link = re.compile(r'\[([^\]]+)\]\(([^)\s]+)\)\{([^}]*)\}')

def _pandoc_md(md:str)->str:
    "The bits of Pandoc markdown that nbdev's `show_doc` writes and mistune does not read"
    def link(m):
        attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', m.group(3)))
        classes = ' '.join(c[1:] for c in m.group(3).split() if c.startswith('.'))
        extra = ''.join(f' {k}="{html.escape(v)}"' for k, v in attrs.items() if k in ('target', 'title', 'rel'))
        if 'float:right' in attrs.get('style', '').replace(' ', ''): classes = (classes + ' float-right').strip()
        return f'<a href="{html.escape(m.group(2))}"{extra}' + (f' class="{classes}"' if classes else '') + f'>{m.group(1)}</a>'
    md = _re_attr_link.sub(link, md)
    # `### Directions.__len__`: in a heading an identifier is literal, not emphasis
    return re.sub(r'^(#{1,6}\s.*)$', lambda m: re.sub(r'(?<!\\)_', r'\_', m.group(1)), md, flags=re.M)

def inline_md(s:str)->str:
    "Title and description from the frontmatter: escaped, with `code` spans"
    return re.sub(r'`([^`]+)`', r'<code>\1</code>', html.escape(s))

def _prepare(nb)->tuple[dict, object]:
    "Apply the Quarto cell options nbdev's processors leave in the source; return (frontmatter, nb)"
    import yaml
    fm, cells = {}, []
    for c in nb.cells:
        src = c.get('source', '')
        if c.cell_type=='raw' and src.lstrip().startswith('---'):
            try: fm.update(yaml.safe_load(src.strip().strip('-')) or {})
            except Exception: pass
            continue
        if c.cell_type=='markdown': c.source = _re_attr_link.sub(lambda m: f'[{m.group(1)}]({m.group(2)})', src)
        if c.get('outputs'): c.outputs = [o for o in c.outputs if not _drop_progress(o)]
        for o in c.get('outputs', []):
            d = o.get('data', {})
            if 'text/markdown' in d:
                d['text/markdown'] = _pandoc_md(''.join(d['text/markdown']) if isinstance(d['text/markdown'], list) else d['text/markdown'])
        if c.cell_type=='code':
            lines, opts = src.splitlines(), {}
            while lines and (m := _re_qopt.match(lines[0])):
                opts[m.group(1)] = m.group(2).strip('"\''); lines.pop(0)
            c.source = '\n'.join(lines)
            if opts.get('include')=='false': continue
            if opts.get('output')=='false': c.outputs = []
            if opts.get('echo')=='false' or not c.source.strip(): c.metadata.setdefault('transient', {})['remove_source'] = True
            if 'code-fold' in opts:
                c.metadata['code_fold'] = opts['code-fold']
                c.metadata['code_summary'] = opts.get('code-summary', 'Code')
            if c.metadata.get('transient', {}).get('remove_source') and not c.get('outputs'): continue
        cells.append(c)
    nb.cells = cells
    return fm, nb

def _exporter():
    from nbconvert import HTMLExporter
    e = HTMLExporter(template_name='cells', extra_template_basedirs=[str(TEMPLATES)])
    e.exclude_input_prompt = e.exclude_output_prompt = True
    e.embed_images = True
    return e

@dataclass
class Site:
    pages: list
    cfg: object
    files: dict = field(default_factory=dict)      # resolved source path -> site path, for copied files
    by_src: dict = field(default_factory=dict)     # resolved source path -> Page
    def __post_init__(self): self.by_src = {p.src.resolve(): p for p in self.pages if p.src}
    @property
    def doc_url(self)->str:
        return (self.cfg.get('doc_host', '').rstrip('/') + '/' + self.cfg.get('doc_baseurl', '').strip('/')).rstrip('/') + '/'
    @property
    def repo_url(self)->str: return f"{self.cfg.get('git_url', '').rstrip('/')}/blob/{self.cfg.get('branch', 'main')}/"

    def rel(self, frm:Page, target:str)->str:
        "Relative href from page `frm` to site path `target`"
        return frm.root + target

    def fix_link(self, page:Page, href:str)->str:
        if not href or href.startswith(('#', 'mailto:', 'data:', 'javascript:')): return href
        if href.startswith(self.doc_url): return self.rel(page, href[len(self.doc_url):] or 'index.html')
        u = urlsplit(href)
        if u.scheme or u.netloc or not u.path or page.src is None: return href
        target = (page.src.parent/u.path).resolve()
        frag = f'#{u.fragment}' if u.fragment else ''
        if target in self.by_src: return self.rel(page, self.by_src[target].out) + frag
        if target in self.files: return self.rel(page, self.files[target]) + frag
        if target.exists() and ROOT in target.parents:   # a repository file that is not a page: link to it on GitHub
            return self.repo_url + target.relative_to(ROOT).as_posix() + frag
        return href

    def nav(self, page:Page)->str:
        out, sections = ['<ul class="nav">'], {}
        for p in self.pages: sections.setdefault(p.section, []).append(p)
        for sec, ps in sections.items():
            if sec=='Home':
                for p in ps: out.append(self._item(page, p, 'Home'))
                continue
            out.append(f'<li class="nav-section"><span>{html.escape(sec)}</span><ul>')
            out += [self._item(page, p, p.title) for p in ps]
            out.append('</ul></li>')
        out.append('</ul>')
        return '\n'.join(out)

    def _item(self, page, p, label):
        cls = ' class="active" aria-current="page"' if p is page else ''
        return f'<li><a href="{self.rel(page, p.out)}"{cls}>{html.escape(label or p.out)}</a></li>'

def _finish(site:Site, page:Page, body_html:str, shell)->str:
    "Fill the page shell, then fix heading ids and links, and build the table of contents"
    from bs4 import BeautifulSoup
    doc = shell.render(page=page, site=site, nav=site.nav(page), body=body_html, root=page.root,
                       title=page.title or site.cfg.get('title', ''), site_title=site.cfg.get('title', ''),
                       title_html=inline_md(page.title or site.cfg.get('title', '')), description_html=inline_md(page.description),
                       description=page.description, repo=site.cfg.get('git_url', ''),
                       source=page.source_url or ((site.repo_url + page.src.relative_to(ROOT).as_posix()) if page.src else ''))
    soup = BeautifulSoup(doc, 'html.parser')
    main = soup.find('main')
    used = {t['id'] for t in soup.find_all(id=True) if not t.find_parent('main')}
    used |= {t['id'] for t in main.find_all(id=True) if t.name not in ('h1', 'h2', 'h3', 'h4', 'h5', 'h6')}
    toc = []
    for h in main.find_all(['h1', 'h2', 'h3', 'h4', 'h5', 'h6']):
        for a in h.find_all('a', class_='anchor-link'): a.decompose()
        base = pandoc_id(h.get_text(' ', strip=True))
        ident, n = base, 0
        while ident in used: n += 1; ident = f'{base}-{n}'
        used.add(ident); h['id'] = ident
        a = soup.new_tag('a', href=f'#{ident}', attrs={'class': 'anchor-link', 'aria-label': 'link to this section'})
        a.string = '#'
        h.append(a)
        if h.name in ('h2', 'h3') and not h.find_parent(class_='title-block'):
            toc.append((h.name, ident, h.get_text(' ', strip=True).rstrip('#').strip()))
    for t in soup.find_all(['a', 'link'], href=True): t['href'] = site.fix_link(page, t['href'])
    for t in soup.find_all(['img', 'script'], src=True): t['src'] = site.fix_link(page, t['src'])
    nav = soup.find(id='toc')
    if nav is not None:
        if toc:
            ul = BeautifulSoup('<h2>On this page</h2><ul>' + ''.join(
                f'<li class="toc-{n}"><a href="#{i}">{html.escape(t)}</a></li>' for n,i,t in toc) + '</ul>', 'html.parser')
            nav.append(ul)
        else: nav.decompose()
    page.ids = used
    return str(soup)

def _render_notebook(page:Page, exporter)->str:
    from execnb.nbio import read_nb
    import nbformat
    nb = read_nb(page.proc)
    fm, nb = _prepare(nb)
    page.title = page.title or str(fm.get('title', '') or '')
    page.description = page.description or str(fm.get('description', '') or '')
    # nbconvert wants plain nbformat nodes (multi-line strings joined, no execnb attributes)
    nbj = json.loads(json.dumps(nb, default=lambda o: dict(o) if hasattr(o, 'keys') else str(o)))
    for c in nbj['cells']:
        for k in [k for k in c if k.endswith('_')]: c.pop(k)
    nbj = nbformat.reads(json.dumps(nbj), as_version=4)
    body, _ = exporter.from_notebook_node(nbj, resources={'metadata': {'path': str(page.src.parent), 'name': page.src.stem}})
    if page.error:
        body = ('<div class="build-error"><p><strong>This notebook failed to build.</strong></p>'
                f'<pre>{html.escape(page.error)}</pre></div>') + body
    return body

def _benchmarks_page(site_dir:Path, files:dict)->tuple[Page, str] | None:
    bdir = ROOT/'benchmarks'
    mds = sorted(bdir.glob('*.md')) if bdir.exists() else []
    if not mds: return None
    from nbconvert.filters.markdown_mistune import markdown2html_mistune
    parts = []
    for md in mds:
        text = md.read_text()
        if not re.match(r'\s*#\s', text): parts.append(f'<h2>{html.escape(md.stem)}</h2>')
        else: text = re.sub(r'^(\s*)#(\s)', r'\1##\2', text, count=1)   # the page has the one h1
        rendered = markdown2html_mistune(text)
        parts.append(f'<section class="benchmark jp-RenderedHTMLCommon jp-RenderedMarkdown" data-source="benchmarks/{md.name}">{rendered}</section>')
    for f in bdir.rglob('*'):   # figures and data referenced by the results
        if f.is_file() and f.suffix!='.md':
            (site_dir/'benchmarks'/f.relative_to(bdir)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, site_dir/'benchmarks'/f.relative_to(bdir))
            files[f.resolve()] = 'benchmarks/' + f.relative_to(bdir).as_posix()
    page = Page(bdir/'index.md', 'benchmarks.html', 'Benchmarks', 'Benchmarks',   # src: links resolve against benchmarks/
                f'Results from {", ".join(m.name for m in mds)} in benchmarks/')
    cfg = _cfg()
    page.source_url = f"{cfg.get('git_url', '').rstrip('/')}/tree/{cfg.get('branch', 'main')}/benchmarks"
    return page, '\n'.join(parts)

def _assets(site_dir:Path):
    "One shared stylesheet: JupyterLab's notebook CSS as nbconvert ships it, pygments, and the site's own"
    from pygments.formatters import HtmlFormatter
    a = site_dir/'assets'; a.mkdir(parents=True, exist_ok=True)
    static = next(Path(p)/'lab'/'static' for p in _template_roots() if (Path(p)/'lab'/'static'/'index.css').exists())
    css = [(static/'index.css').read_text(), (static/'theme-light.css').read_text(),
           HtmlFormatter(style='default').get_style_defs('.highlight')]
    (a/'jupyter.css').write_text('\n'.join(css))
    shutil.copy2(HERE/'static'/'site.css', a/'site.css')

def _template_roots()->list[str]:
    from jupyter_core.paths import jupyter_path
    return jupyter_path('nbconvert', 'templates')

# --------------------------------------------------------------------------------------------------
# API completeness

def public_symbols()->dict[str, str]:
    "Public symbols of `_modidx.py` -> the page#anchor nbdev records for them (private names are internal)"
    ns = {}
    exec((ROOT/_cfg().lib_path.name/'_modidx.py').read_text(), ns)
    res = {}
    for mod, syms in ns['d']['syms'].items():
        for sym, (url, _) in syms.items():
            parts = sym[len(mod)+1:].split('.')
            if any(p.startswith('_') and not (p.startswith('__') and p.endswith('__')) for p in parts): continue
            res[sym] = url
    return res

def check_api(pages:list)->list[str]:
    "Every public symbol's anchor exists on its page; a dunder method may resolve to its class"
    ids, missing = {p.out: p.ids for p in pages}, []
    failed = {p.out for p in pages if p.error}   # a failed notebook is reported as such, not symbol by symbol
    for sym, url in public_symbols().items():
        pg, _, anchor = url.partition('#')
        if pg in failed: continue
        if pg not in ids: missing.append(f'{sym}: no page {pg}'); continue
        alt = anchor.rsplit('.', 1)[0] if re.search(r'\.__\w+__$', anchor) else None
        if anchor not in ids[pg] and alt not in ids[pg]: missing.append(f'{sym}: no #{anchor} on {pg}')
    return missing

# --------------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--jobs', type=int, default=os.cpu_count() or 1, help='notebooks executed at once (default: CPUs)')
    ap.add_argument('--out', default=str(SITE), help='output folder (default: _site/)')
    ap.add_argument('--render-only', action='store_true',
                    help='reuse the notebooks executed by the last build (_proc/_docs_build/): for work on the templates')
    ap.add_argument('--flags', default=None,
                    help="tst_flags whose cells run anyway, like `nbdev_test --flags` (default: settings.ini docs_flags; '' for none)")
    args = ap.parse_args(argv)
    t0 = time.time()
    os.chdir(ROOT)
    site_dir = Path(args.out).resolve()
    pages = discover()
    print(f"docs: {len(pages)} notebooks: " + ', '.join(p.src.relative_to(ROOT).as_posix() for p in pages), flush=True)
    manifest = PROC/'manifest.json'
    run_flags = _flags(_cfg(), 'docs_flags') if args.flags is None else set(re.split(r'[\s,|]+', args.flags)) - {''}
    if unknown := run_flags - _flags(_cfg()): sys.exit(f"docs: --flags {' '.join(sorted(unknown))}: not in settings.ini tst_flags ({_cfg().get('tst_flags', '')})")
    if args.render_only:
        if not manifest.exists(): sys.exit("docs: --render-only needs a previous full build (no _proc/_docs_build/manifest.json)")
        done = json.loads(manifest.read_text())
        pages = [p for p in pages if p.out in done]
        for p in pages: p.error, p.warnings, p.title, p.description, p.seconds = done[p.out]
    else:
        if PROC.exists(): shutil.rmtree(PROC)
        PROC.mkdir(parents=True)
        jobs = max(1, min(args.jobs, len(pages)))
        # torch's threads per notebook: together no more than the cores (oversubscribed, small models spin-wait for
        # each other's threads, up to 10x slower here); spawned workers inherit the environment
        os.environ.setdefault('OMP_NUM_THREADS', str(max(1, (os.cpu_count() or 1) // jobs)))
        ctx = multiprocessing.get_context('spawn')
        kw = dict(max_tasks_per_child=1) if sys.version_info >= (3, 11) else {}
        if run_flags: print(f"docs: cells flagged {' '.join(sorted(run_flags))} are executed too", flush=True)
        # the notebooks with such cells are the long ones (that is why they are flagged): start them first, so the
        # others fill the remaining workers instead of one long notebook running alone at the end
        order = sorted(pages, key=lambda p: -_flagged(p.src, run_flags))
        with ProcessPoolExecutor(jobs, mp_context=ctx, **kw) as ex:
            futs = {ex.submit(execute_and_process, str(p.src), str(p.proc), sorted(run_flags)): p for p in order}
            for f in as_completed(futs):
                p = futs[f]
                try: r = f.result()
                except Exception as e: r = dict(error=f'{p.src}: worker crashed: {e!r}', warnings=[], title='', description='', seconds=0)
                p.error, p.warnings, p.title, p.description, p.seconds = r['error'], r['warnings'], r['title'], r['description'], r.get('seconds', 0)
                print(f"docs: {'FAILED' if p.error else 'ok    '} {p.seconds:6.1f}s {p.src.relative_to(ROOT)}", flush=True)
                for w in p.warnings: print(f"docs:   warning: {p.src.relative_to(ROOT)}: {w}", flush=True)
        manifest.write_text(json.dumps({p.out: [p.error, p.warnings, p.title, p.description, p.seconds] for p in pages}, indent=1))
    t_exec = time.time()-t0

    import jinja2
    if site_dir.exists(): shutil.rmtree(site_dir)
    site_dir.mkdir(parents=True)
    _assets(site_dir)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=False)
    shell = env.get_template('page.html.j2')
    exporter = _exporter()
    bodies = {}
    for p in pages:
        if not p.proc.exists(): bodies[p.out] = f'<div class="build-error"><pre>{html.escape(p.error)}</pre></div>'; continue
        bodies[p.out] = _render_notebook(p, exporter)
    files = {}
    bench = _benchmarks_page(site_dir, files)
    if bench:
        pages.append(bench[0]); bodies[bench[0].out] = bench[1]
    for p in pages:
        if p.section=='Home' and not p.title: p.title = _cfg().get('title', 'Home')
        p.title = p.title or Path(p.out).stem
    site = Site(pages, _cfg(), files)
    for p in pages:
        out = site_dir/p.out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(_finish(site, p, bodies[p.out], shell))
    (site_dir/'.nojekyll').write_text('')

    failed = [p for p in pages if p.error]
    missing = check_api(pages)
    print(f"docs: {len(pages)} pages in {site_dir.relative_to(ROOT) if ROOT in site_dir.parents else site_dir} "
          f"(execution {t_exec:.0f}s, total {time.time()-t0:.0f}s)")
    if failed:
        for p in failed: sys.stderr.write(f"\n{p.error}\n")
        sys.stderr.write("\ndocs build FAILED: these notebooks did not execute:\n\t" +
                         '\n\t'.join(str(p.src.relative_to(ROOT)) for p in failed) + '\n')
    if missing:
        sys.stderr.write("\ndocs build FAILED: exported symbols without an API entry (add `show_doc(NAME)` after the "
                         "cell that defines it, or make it private with a leading underscore):\n\t" + '\n\t'.join(missing) + '\n')
    return 1 if failed or missing else 0

if __name__ == '__main__': sys.exit(main())
