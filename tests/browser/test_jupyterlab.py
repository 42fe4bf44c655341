"""JupyterLab in a real browser: start JupyterLab on loopback on a free port, open a copy of
`widget_demo.ipynb` in headless Chromium, run all cells from the Run menu, wait for the kernel to be idle,
then use the library's widgets as a user does: click a `DirectionsBrowser` view and see the kernel redraw
it; type a prompt into a `MonitorView`, press Scan and read the verdict. Screenshots go to
`_site/screenshots/` (or $WW_SCREENSHOT_DIR). The server and its kernels are always shut down."""
import json, os, secrets, shutil, signal, socket, subprocess, sys, time, urllib.request
from pathlib import Path
import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
NOTEBOOK = 'widget_demo.ipynb'
TIMEOUT_MS = 180_000   # kernel start imports torch and transformer-lens: slow on a busy 2-core runner

def _free_port()->int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def _get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r: return r.status, r.read()

def _children(pid):
    try:
        import psutil
        return psutil.Process(pid).children(recursive=True)
    except Exception: return []

@pytest.fixture(scope='module')
def jupyterlab(tmp_path_factory, browser):
    "JupyterLab serving a temporary copy of the test notebook; yields (base_url, token, workdir)"
    tmp_path = tmp_path_factory.mktemp('jupyterlab')
    work, home = tmp_path/'work', tmp_path/'jupyter'
    work.mkdir()
    shutil.copy(HERE/NOTEBOOK, work/NOTEBOOK)
    settings = home/'lab-settings'/'@jupyterlab'
    for ext, name, value in [  # no news or update checks (network, toasts over the notebook); no kernel dialog
            ('apputils-extension', 'notification', {'fetchNews': 'false', 'checkForUpdates': False}),
            ('notebook-extension', 'tracker', {'autoStartDefaultKernel': True})]:
        (settings/ext).mkdir(parents=True, exist_ok=True)
        (settings/ext/f'{name}.jupyterlab-settings').write_text(json.dumps(value))
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, 'JUPYTER_CONFIG_DIR': str(home/'config'), 'JUPYTER_DATA_DIR': str(home/'data'),
           'JUPYTER_RUNTIME_DIR': str(home/'runtime'), 'JUPYTERLAB_SETTINGS_DIR': str(home/'lab-settings'),
           'JUPYTERLAB_WORKSPACES_DIR': str(home/'workspaces'), 'JUPYTER_PLATFORM_DIRS': '1'}
    env.pop('MPLBACKEND', None)   # the kernel should use the inline backend, as a user's does
    cmd = [sys.executable, '-m', 'jupyterlab', '--no-browser', '--ServerApp.ip=127.0.0.1', f'--ServerApp.port={port}',
           '--ServerApp.port_retries=0', f'--IdentityProvider.token={token}', f'--ServerApp.root_dir={work}',
           '--ServerApp.allow_root=True', '--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate']
    log = open(tmp_path/'jupyterlab.log', 'w')
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f'http://127.0.0.1:{port}'
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with {proc.returncode}:\n{(tmp_path/'jupyterlab.log').read_text()[-3000:]}")
            try:
                if _get(f'{base}/api/status?token={token}')[0]==200: break
            except OSError: pass
            if time.time() > deadline: pytest.fail(f"JupyterLab did not answer on {base} in 120 s")
            time.sleep(0.5)
        yield base, token, work
    finally:
        kids = _children(proc.pid)
        try: urllib.request.urlopen(urllib.request.Request(f'{base}/api/shutdown?token={token}', method='POST'), timeout=10)
        except OSError: pass
        try: proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try: proc.wait(10)
            except subprocess.TimeoutExpired: os.killpg(proc.pid, signal.SIGKILL); proc.wait(10)
        for k in kids:          # kernels run in sessions of their own
            try: k.kill()
            except Exception: pass
        log.close()

def _wait_for_kernel(page, base, token, timeout=TIMEOUT_MS/1000):
    "Until the notebook's kernel is idle and the page's websocket is connected to it (running cells earlier does nothing)"
    deadline = time.time() + timeout
    while time.time() < deadline:
        dialog = page.locator('.jp-Dialog button', has_text='Select')   # a kernel dialog, should one still show
        if dialog.count(): dialog.first.click()
        sessions = json.loads(_get(f'{base}/api/sessions?token={token}')[1])
        k = sessions[0]['kernel'] if sessions else {}
        if k.get('execution_state')=='idle' and k.get('connections', 0) >= 1 and page.evaluate(
                "() => (document.querySelector('.jp-Notebook-ExecutionIndicator') || {dataset: {}}).dataset.status === 'idle'"): return
        time.sleep(0.5)
    pytest.fail(f"the kernel did not become ready in {timeout:.0f} s: sessions {sessions}")

_ALL_RAN = """() => {
  const p = [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell .jp-InputPrompt')]
              .map(e => e.textContent.trim());
  return p.length > 0 && p.every(t => /^\\[\\d+\\]:$/.test(t));
}"""

@pytest.fixture(scope='module')
def shots():
    d = Path(os.environ.get('WW_SCREENSHOT_DIR', ROOT/'_site'/'screenshots'))
    d.mkdir(parents=True, exist_ok=True)
    return d

@pytest.fixture(scope='module')
def lab(jupyterlab, browser, shots):
    "The test notebook open in JupyterLab, all cells run from the Run menu; yields (page, uncaught page errors)"
    base, token, work = jupyterlab
    ctx = browser.new_context(viewport={'width': 1400, 'height': 1100})
    page = ctx.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors = []
    page.on('pageerror', lambda e: errors.append(str(e)))
    try:
        page.goto(f'{base}/lab/tree/{NOTEBOOK}?token={token}', wait_until='domcontentloaded')
        page.wait_for_selector('.jp-NotebookPanel .jp-Notebook .jp-CodeCell')
        _wait_for_kernel(page, base, token)
        page.locator('.lm-MenuBar-itemLabel', has_text='Run').first.click()
        page.locator('.lm-Menu-itemLabel', has_text='Run All Cells').first.click()
        page.wait_for_function(_ALL_RAN)
        page.wait_for_selector('.jp-Notebook-ExecutionIndicator[data-status="idle"]')
        yield page, errors
    except Exception:
        page.screenshot(path=str(shots/'jupyterlab-failure.png'))
        raise
    finally: ctx.close()

def _shot(page, locator, path):
    locator.scroll_into_view_if_needed()
    page.screenshot(path=str(path))

def test_all_cells_run_without_errors(lab, shots):
    page, errors = lab
    tracebacks = page.locator('.jp-OutputArea-output', has_text='Traceback')
    if tracebacks.count(): page.screenshot(path=str(shots/'jupyterlab-failure.png'))
    assert tracebacks.count()==0, f"a cell failed:\n{tracebacks.first.inner_text()[:3000]}"
    assert page.locator('.jp-OutputArea-output .jupyter-widgets').count() >= 2, "no widget was rendered"
    assert not errors, f"uncaught errors in JupyterLab: {errors}"

def test_directions_browser_redraws_on_click(lab, shots):
    page, _ = lab
    box = page.locator('.jupyter-widgets.widget-vbox', has=page.locator('.widget-toggle-buttons')).first
    box.wait_for(state='visible')
    status = page.locator('.widget-html', has_text='ww-status')
    assert 'view=spectrum' in status.inner_text()
    out = box.locator('.widget-output')
    page.wait_for_function("(o) => o.textContent.trim() || o.querySelector('img')", arg=out.element_handle())
    try:
        assert out.locator('img').count(), (
            f"DirectionsBrowser's Output widget shows {out.inner_text().strip()[:80]!r} instead of the plot: in a fresh "
            "kernel nothing has registered IPython's PNG formatter for matplotlib `Figure` (pyplot's inline backend does "
            "that only once pyplot draws), so `display(fig)` prints the repr. nbdev_test cannot see this: execnb's "
            "CaptureShell turns the inline backend on itself.")
        before = out.locator('img').first.get_attribute('src')
        # change a control: the kernel redraws into the Output widget and updates the status line
        box.locator('.widget-toggle-button', has_text='heatmap').click()
        page.wait_for_function("() => [...document.querySelectorAll('.widget-html')].some(e => e.textContent.includes('view=heatmap'))")
        assert 'ΔW' in status.inner_text()          # the heatmap's title, read from the figure the kernel drew
        page.wait_for_function("""([o, before]) => { const i = o.querySelector('img');
                                   return i && i.getAttribute('src') !== before && i.complete && i.naturalWidth > 0; }""",
                               arg=[out.element_handle(), before])
        assert 'mod-active' in box.locator('.widget-toggle-button', has_text='heatmap').get_attribute('class')
    finally: _shot(page, box, shots/'jupyterlab-directions-browser.png')

def test_monitor_view_flags_a_typed_prompt(lab, shots):
    page, _ = lab
    box = page.locator('.jupyter-widgets.widget-vbox', has=page.locator('.widget-textarea')).first
    box.wait_for(state='visible')
    text, scan, verdict = box.locator('textarea'), box.locator('button', has_text='Scan'), box.locator('.widget-html').last
    try:
        for prompt, expect in [('the base # model', 'FLAGGED'), ('the base model', 'within range')]:
            text.fill('')
            text.type(prompt)                         # real key presses
            text.press('Tab')                         # leave the field: the Textarea syncs its value to the kernel
            scan.click()
            page.wait_for_function("([v, e]) => v.textContent.includes(e)", arg=[verdict.element_handle(), expect])
            assert expect in verdict.inner_text()
            if expect=='FLAGGED': _shot(page, box, shots/'jupyterlab-monitor-flagged.png')
    finally: _shot(page, box, shots/'jupyterlab-monitor.png')
