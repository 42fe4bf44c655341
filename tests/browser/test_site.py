"""The built docs site (`_site/`, from `python docs_build/build.py`) in headless Chromium: every page loads
without console errors or requests leaving the machine, every internal link and anchor resolves, every image
loads, every page has the sidebar, every public symbol of `_modidx.py` has its API entry; screenshots of the
home page and of an API page go to `_site/screenshots/`."""
import importlib.util, json, sys
from pathlib import Path
from urllib.parse import urlsplit, unquote
import pytest

ROOT = Path(__file__).resolve().parents[2]

_PAGE_INFO = """() => ({
  ids: [...document.querySelectorAll('[id]')].map(e => e.id)
        .concat([...document.querySelectorAll('a[name]')].map(e => e.getAttribute('name'))),
  links: [...document.querySelectorAll('a[href]')].map(a => ({href: a.href, raw: a.getAttribute('href'),
          text: a.textContent.trim().slice(0, 60)})),
  sidebar: [...document.querySelectorAll('nav.sidebar a[href]')].map(a => a.href),
  images: [...document.images].map(i => ({src: (i.getAttribute('src') || '').slice(0, 100),
           ok: i.complete && i.naturalWidth > 0})),
  h1: (document.querySelector('main h1') || {}).textContent || '',
})"""

def _build_module():
    spec = importlib.util.spec_from_file_location('ww_docs_build', ROOT/'docs_build'/'build.py')
    mod = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

@pytest.fixture(scope='module')
def crawl(site_dir, site_url, browser):
    "Load every page of the site once; record what each page contains and every error it produced"
    pages = sorted(p.relative_to(site_dir).as_posix() for p in site_dir.rglob('*.html') if 'screenshots' not in p.parts)
    origin = site_url.rstrip('/')
    ctx = browser.new_context(viewport={'width': 1280, 'height': 900})
    external, info, errors = [], {}, {}
    def route(r):
        u = r.request.url
        if u.startswith(origin + '/'): return r.continue_()
        external.append(u); r.abort()
    ctx.route('**/*', route)
    try:
        for rel in pages:
            page, errs = ctx.new_page(), []
            page.on('console', lambda m, errs=errs: errs.append(f'console {m.type}: {m.text}') if m.type=='error' else None)
            page.on('pageerror', lambda e, errs=errs: errs.append(f'uncaught error: {e}'))
            page.on('requestfailed', lambda r, errs=errs: errs.append(f'request failed: {r.url} ({r.failure})'))
            page.on('response', lambda r, errs=errs: errs.append(f'HTTP {r.status}: {r.url}') if r.status >= 400 else None)
            resp = page.goto(site_url + rel, wait_until='load')
            if resp is None or not resp.ok: errs.append(f'HTTP {resp.status if resp else "no response"} for the page itself')
            info[rel], errors[rel] = page.evaluate(_PAGE_INFO), errs
            page.close()
    finally: ctx.close()
    return dict(pages=pages, info=info, errors=errors, external=external, origin=origin, site_dir=site_dir)

def _target(crawl, href):
    "Site-relative path of a same-origin href, or None for an external link"
    u = urlsplit(href)
    if f'{u.scheme}://{u.netloc}' != crawl['origin']: return None, None
    path = unquote(u.path).lstrip('/')
    if path=='' or path.endswith('/'): path += 'index.html'
    return path, unquote(u.fragment)

def test_site_has_home_library_and_api_pages(crawl):
    pages = crawl['pages']
    assert 'index.html' in pages, pages
    assert len(pages) >= 2, f"only {pages}: a library notebook page is missing"

def test_every_page_loads_without_errors(crawl):
    bad = {p: e for p, e in crawl['errors'].items() if e}
    assert not bad, "pages with console errors, failed requests or HTTP errors:\n" + json.dumps(bad, indent=1)

def test_no_page_needs_the_network(crawl):
    assert not crawl['external'], f"the offline site requested resources from outside: {sorted(set(crawl['external']))}"

def test_every_page_has_the_sidebar(crawl):
    everything = set(crawl['pages'])
    for rel, i in crawl['info'].items():
        linked = {_target(crawl, h)[0] for h in i['sidebar']}
        assert i['sidebar'], f"{rel} has no navigation sidebar"
        assert everything <= linked, f"{rel}: the sidebar does not link {sorted(everything - linked)}"
        assert i['h1'].strip(), f"{rel} has no title"

def test_internal_links_and_anchors_resolve(crawl):
    site_dir, broken = crawl['site_dir'], []
    for rel, i in crawl['info'].items():
        for l in i['links']:
            path, frag = _target(crawl, l['href'])
            if path is None: continue
            if path in crawl['info']:
                if frag and frag not in crawl['info'][path]['ids']:
                    broken.append(f"{rel}: {l['raw']!r} ({l['text']!r}): no #{frag} on {path}")
            elif not (site_dir/path).is_file():
                broken.append(f"{rel}: {l['raw']!r} ({l['text']!r}): no such file {path}")
    assert not broken, f"{len(broken)} broken internal links:\n" + '\n'.join(broken)

def test_every_image_loads(crawl):
    bad = [f"{rel}: {im['src']}" for rel, i in crawl['info'].items() for im in i['images'] if not im['ok']]
    assert not bad, "images that did not load:\n" + '\n'.join(bad)

def test_every_public_symbol_has_an_api_entry(crawl):
    "Every public name in weightwatch_nb/_modidx.py has its show_doc anchor where nbdev's index says"
    missing = []
    for sym, url in _build_module().public_symbols().items():
        page, _, anchor = url.partition('#')
        ids = crawl['info'].get(page, {}).get('ids')
        if ids is None: missing.append(f"{sym}: no page {page}"); continue
        cls = anchor.rsplit('.', 1)[0] if anchor.endswith('__') else None   # a dunder method may be covered by its class
        if anchor not in ids and cls not in ids: missing.append(f"{sym}: no #{anchor} on {page}")
    assert not missing, "exported symbols without an API entry:\n" + '\n'.join(missing)

def test_screenshots(crawl, site_url, browser, screenshot_dir):
    api = sorted({u.partition('#')[0] for u in _build_module().public_symbols().values()} & set(crawl['pages']))
    assert api, "no API page to screenshot"
    api_page = 'core.html' if 'core.html' in api else api[0]
    ctx = browser.new_context(viewport={'width': 1280, 'height': 900})
    try:
        for rel, name in [('index.html', 'home.png'), (api_page, f"api-{Path(api_page).stem}.png")]:
            page = ctx.new_page()
            page.goto(site_url + rel, wait_until='load')
            page.screenshot(path=str(screenshot_dir/name), full_page=True)
            assert (screenshot_dir/name).stat().st_size > 10_000, f"{name} looks empty"
            page.close()
    finally: ctx.close()
