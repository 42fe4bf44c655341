"""Fixtures for the real-browser tests: headless Chromium (Debian's /usr/bin/chromium) driven by Playwright.

These tests skip, saying why, when Chromium, Playwright or the built site (`_site/`) is missing, so a plain
`pytest tests` passes on a machine without them. CI sets `WW_REQUIRE_BROWSER_TESTS=1`, which turns every
such skip into a failure. Install what they need with `.ci/browser-setup`.
"""
import functools, http.server, os, threading
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[2]
SITE = Path(os.environ.get('WW_SITE_DIR', ROOT/'_site'))
CHROMIUM = os.environ.get('WW_CHROMIUM', '/usr/bin/chromium')
CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--disable-background-networking',
                 '--disable-component-update', '--disable-sync', '--no-first-run']
REQUIRED = os.environ.get('WW_REQUIRE_BROWSER_TESTS', '') not in ('', '0', 'false', 'no')

def unavailable(reason:str):
    "Skip, or fail when CI requires the browser tests to run"
    if REQUIRED: pytest.fail(f"{reason} (WW_REQUIRE_BROWSER_TESTS is set, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)

@pytest.fixture(scope='session')
def browser():
    "A headless Chromium, shared by the session; closed at the end, also after failures"
    try: from playwright.sync_api import sync_playwright
    except ImportError: unavailable("the `playwright` Python package is not installed (run .ci/browser-setup)")
    if not Path(CHROMIUM).exists(): unavailable(f"no Chromium at {CHROMIUM} (run .ci/browser-setup, or set WW_CHROMIUM)")
    pw = sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try: yield b
        finally: b.close()
    finally: pw.stop()

class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args): pass

@pytest.fixture(scope='session')
def site_dir():
    if not (SITE/'index.html').exists():
        unavailable(f"the docs site is not built ({SITE.relative_to(ROOT) if ROOT in SITE.parents else SITE}/index.html missing: "
                    "run `python docs_build/build.py`)")
    return SITE

@pytest.fixture(scope='session')
def site_url(site_dir):
    "`_site/` served over loopback by http.server in a thread"
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(_QuietHandler, directory=str(site_dir)))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try: yield f'http://127.0.0.1:{srv.server_address[1]}/'
    finally:
        srv.shutdown(); srv.server_close(); t.join(5)

@pytest.fixture(scope='session')
def screenshot_dir(site_dir):
    d = Path(os.environ.get('WW_SCREENSHOT_DIR', site_dir/'screenshots'))
    d.mkdir(parents=True, exist_ok=True)
    return d
