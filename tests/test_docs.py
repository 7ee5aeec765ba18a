"""The documentation site (tools/docs.py), built for real and looked at in a real browser.

- Fixture projects (a tmp dir with settings.ini, two notebooks, a generated library) pin down what a
  page holds: summaries, the API entries with signature, docstring and defining cell, cross-links,
  MathML, rewritten notebook links, and that a public function or class without a docstring fails
  the build naming the notebook and cell.
- The repository's own site is built once per session and checked against the modules' `__all__`.
- The browser test serves both sites on loopback and drives headless Chromium (playwright with the
  system's Debian chromium) through every page from the index: no broken internal link or anchor,
  every image (plots) decoded with a non-zero size, no request leaving loopback, and a screenshot of
  the index. It skips, saying why, with EXP_BROWSER_TESTS=0 or where playwright or chromium is missing
  (`./dev setup` installs both; EXP_CHROMIUM names another chromium binary).
"""
import ast, base64, functools, http.server, io, os, re, shutil, subprocess, sys, threading
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlparse

import nbformat
import pytest
from bs4 import BeautifulSoup
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from conftest import ROOT, write_settings
import notebook2script as n2s

PY = sys.executable
DOCS = ROOT / 'tools' / 'docs.py'
CHROMIUM_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                  '--disable-background-networking', '--disable-component-update', '--disable-sync']


def docs(*args, root=None):
    cmd = [PY, str(DOCS), *args] + (['--root', str(root)] if root else [])
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def soup(path: Path) -> BeautifulSoup:
    return BeautifulSoup(path.read_text(encoding='utf-8'), 'html.parser')


# ------------------------------------------------------------------ fixture projects
def png(w=40, h=24) -> str:
    from PIL import Image
    buf = io.BytesIO()
    Image.new('RGB', (w, h), (200, 40, 40)).save(buf, format='PNG')
    return base64.b64encode(buf.getvalue()).decode()


CORE_CELLS = [
    ('md', '# Core *things*\n\nThe first sentence names `greet`, e.g. with `Greeter.shout()`. A second sentence.'),
    '#export\nimport math\n\nANSWER = 42',                                                                 # cell 2
    '#export\ndef greet(name: str, punct=\'!\') -> str:\n    "Say hello to `name`, then `punct`."\n'
    '    return f"hello {name}{punct}"',                                                                 # cell 3
    ('md', 'Euler: $e^{i\\pi} + 1 = 0$, and $$\\sum_i x_i^2$$\n\n'
           'See [the next notebook](01_more.ipynb#cell-2), `fixlib.core.ANSWER` and `nothing_exported`.'),  # cell 4
    '#export\nclass Greeter:\n    "Greets people."\n    def shout(self, name):\n        "Loudly."\n'
    '        return greet(name).upper()',                                                                # cell 5
    'greet("x")',                                                                                         # cell 6
]


def make_project(root: Path, extra_core_cells=()) -> Path:
    "settings.ini, nbs/00_core.ipynb and nbs/01_more.ipynb (with a saved plot), and the library they export."
    write_settings(root, 'fixlib', 'a fixture project for the docs')
    cells = [new_markdown_cell(c[1]) if isinstance(c, tuple) else new_code_cell(c) for c in [*CORE_CELLS, *extra_core_cells]]
    cells[5].outputs = [new_output('display_data', data={'image/png': png(), 'text/plain': '<Figure size 40x24>'}),
                        new_output('execute_result', data={'text/plain': "'hello x!'"}, execution_count=1)]
    cells[5].execution_count = 1
    more = [new_markdown_cell('# More\n\nUses `core.Greeter` and `twice`; see [core](00_core.ipynb) or `00_core`.'),
            new_code_cell('#export\nfrom fixlib.core import greet\n\ndef twice(x):\n    "Twice `x`."\n    return 2 * x')]
    (root / 'nbs').mkdir(parents=True)
    nbformat.write(new_notebook(cells=cells), root / 'nbs/00_core.ipynb')
    nbformat.write(new_notebook(cells=more), root / 'nbs/01_more.ipynb')
    export(root)
    return root


def export(root: Path):
    "What `notebook2script.py --all` writes, done in-process (cheaper than a subprocess)."
    cfg = n2s.read_settings(root)
    modules, errors, _ = n2s.plan(cfg)
    assert not errors, errors
    for path, text in n2s.expected_files(cfg, modules).items(): n2s.write_atomic(path, text)


@pytest.fixture(scope='module')
def fixture_site(tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp('fixproj'))
    r = docs('--out', str(root / 'site'), root=root)
    assert r.returncode == 0, r.stdout + r.stderr
    return root / 'site'


def test_fixture_site_pages_summaries_and_api(fixture_site):
    assert sorted(p.name for p in fixture_site.iterdir()) == [
        '.exp-docs', '00_core.html', '01_more.html', 'api.html', 'index.html', 'site.css']
    index = soup(fixture_site / 'index.html')
    rows = index.select('table.exp-index tbody tr')
    assert [r.select_one('a.exp-nb')['href'] for r in rows] == ['00_core.html', '01_more.html']   # course order
    assert rows[0].select_one('a.exp-nb').decode_contents() == 'Core <em>things</em>'             # first heading
    summary = rows[0].select_one('td.exp-prose')
    assert summary.get_text() == 'The first sentence names greet, e.g. with Greeter.shout().'      # first sentence
    assert summary.select_one('a.exp-xref')['href'] == 'api.html#fixlib.core.greet'
    assert [a['href'] for a in rows[1].select('td.exp-prose a')] == [
        'api.html#fixlib.core.Greeter', 'api.html#fixlib.more.twice', '00_core.html', '00_core.html']

    api = soup(fixture_site / 'api.html')
    greet = api.find(id='fixlib.core.greet')
    assert greet.select_one('.exp-sig').get_text() == "greet(name: str, punct='!') -> str"
    assert greet.select_one('.exp-docstring').get_text().strip() == 'Say hello to name, then punct.'
    assert greet.select_one('a.exp-src')['href'] == '00_core.html#cell-3'
    answer = api.find(id='fixlib.core.ANSWER')
    assert answer.select_one('.exp-sig').get_text() == 'ANSWER = 42'
    assert answer.select_one('a.exp-src')['href'] == '00_core.html#cell-2'
    shout = api.find(id='fixlib.core.Greeter.shout')
    assert shout.get_text(' ', strip=True) == 'shout(name)'                      # show_doc style: no self
    assert api.find(id='fixlib.core.Greeter').select_one('a.exp-src')['href'] == '00_core.html#cell-5'
    assert api.find(id='fixlib.more.twice').select_one('a.exp-src')['href'] == '01_more.html#cell-2'


def test_fixture_notebook_pages(fixture_site):
    core = soup(fixture_site / '00_core.html')
    assert [a['id'] for a in core.select('a.exp-cell-anchor')] == [f'cell-{i}' for i in range(1, 7)]
    md = core.find(id='cell-4').find_next_sibling('div')
    assert md.find('math', attrs={'display': 'inline'}) and md.find('math', attrs={'display': 'block'})
    assert '$' not in md.get_text()                                          # no TeX left for MathJax
    hrefs = {a.get_text(): a['href'] for a in md.find_all('a')}
    assert hrefs['the next notebook'] == '01_more.html#cell-2'             # .ipynb links go to the pages
    assert hrefs['fixlib.core.ANSWER'] == 'api.html#fixlib.core.ANSWER'   # backticked names link to the API
    assert 'nothing_exported' not in hrefs
    assert core.find(id='cell-3').find_next_sibling('p', class_='exp-defines').a['href'] == 'api.html#fixlib.core.greet'
    assert core.find('img', src=re.compile('^data:image/png;base64,'))    # the saved plot, inline
    more = soup(fixture_site / '01_more.html')
    assert {a.get_text(): a['href'] for a in more.select('a.exp-xref')}.items() >= {
        'core.Greeter': 'api.html#fixlib.core.Greeter', 'twice': 'api.html#fixlib.more.twice'}.items()
    assert more.find('a', string='core')['href'] == '00_core.html'
    assert more.find('code', string='00_core').parent['href'] == '00_core.html'        # a notebook's name: its page
    assert more.select_one('nav a.exp-prev')['href'] == '00_core.html'


def test_no_external_assets(fixture_site, real_site):
    "Nothing on any page is fetched from outside the site: no CDN script, stylesheet, image or frame."
    tag = re.compile(r'<(script|link|img|iframe|source|video|audio)\b[^>]*?\s(?:src|href)\s*=\s*["\']?([^"\'\s>]+)', re.I)
    for site in (fixture_site, real_site):
        for page in site.glob('*.html'):
            for name, url in tag.findall(page.read_text(encoding='utf-8')):
                assert not re.match(r'^([a-z][a-z0-9+.-]*:)?//', url, re.I), f'{page.name}: external <{name}> {url}'


def test_missing_docstring_fails_naming_notebook_and_cell(tmp_path):
    root = make_project(tmp_path / 'proj', extra_core_cells=[
        '#export\ndef undocumented(x): return x',                                    # cell 7
        '#export\nclass Bare:\n    def m(self): "Methods need none."',               # cell 8
        '#export\nfrom dataclasses import dataclass\n@dataclass\nclass Point:\n    x: int = 0',   # cell 9
        '#export\nsquare = lambda x: x * x\nLIMIT = 3'])                              # cell 10: constants need none
    r = docs('--out', str(tmp_path / 'site'), root=root)
    assert r.returncode == 1, r.stdout + r.stderr
    assert 'nbs/00_core.ipynb: cell 7: fixlib.core.undocumented: public function without a docstring' in r.stderr
    assert 'nbs/00_core.ipynb: cell 8: fixlib.core.Bare: public class without a docstring' in r.stderr
    assert 'nbs/00_core.ipynb: cell 9: fixlib.core.Point: public class without a docstring' in r.stderr
    assert 'nbs/00_core.ipynb: cell 10: fixlib.core.square: public function without a docstring' in r.stderr
    assert 'LIMIT' not in r.stderr and 'greet' not in r.stderr
    assert not (tmp_path / 'site').exists()                                        # nothing written


def test_stale_library_and_foreign_out_dir_fail(tmp_path):
    root = make_project(tmp_path / 'proj')
    (tmp_path / 'mine').mkdir(); (tmp_path / 'mine/notes.txt').write_text('keep me')
    r = docs('--out', str(tmp_path / 'mine'), root=root)
    assert r.returncode != 0 and 'is not a site this tool built' in r.stderr
    assert (tmp_path / 'mine/notes.txt').read_text() == 'keep me'
    nb = nbformat.read(root / 'nbs/01_more.ipynb', as_version=4)
    nb.cells.append(new_code_cell('#export\ndef thrice(x):\n    "Three times `x`."\n    return 3 * x'))
    nbformat.write(nb, root / 'nbs/01_more.ipynb')
    r = docs('--out', str(tmp_path / 'site'), root=root)
    assert r.returncode == 1 and 'fixlib/more.py: differs from its notebook' in r.stderr, r.stderr


# ------------------------------------------------------------------ the repository's own site
@pytest.fixture(scope='session')
def real_site(tmp_path_factory):
    out = tmp_path_factory.mktemp('real') / '_site'
    r = docs('--out', str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    print(r.stdout)
    return out


def test_real_site_documents_every_public_name_at_its_cell(real_site):
    api = soup(real_site / 'api.html')
    notebooks = sorted(p.name for p in (ROOT / 'nbs').glob('*.ipynb') if not p.name.startswith(('.', '_')))
    index = soup(real_site / 'index.html')
    assert [a['href'] for a in index.select('a.exp-nb')] == [Path(n).stem + '.html' for n in notebooks]
    checked = 0
    for path in sorted((ROOT / 'exp').rglob('*.py')):
        if path.name == '__init__.py': continue
        src = path.read_text()
        tree = ast.parse(src)
        names = next(ast.literal_eval(n.value) for n in tree.body
                     if isinstance(n, ast.Assign) and getattr(n.targets[0], 'id', '') == '__all__')
        mod = 'exp.' + path.relative_to(ROOT / 'exp').with_suffix('').as_posix().replace('/', '.')
        assert api.find(id=mod), mod
        lines = src.splitlines()
        for name in names:
            entry = api.find(id=f'{mod}.{name}')
            assert entry is not None, f'{mod}.{name} missing from api.html'
            line = max((n.lineno for n in ast.walk(tree)                    # its last top-level definition
                        if (isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name and n.col_offset == 0)
                        or (isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ast.Store) and n.col_offset == 0)),
                       default=None)
            if line is None: continue                                       # defined inside an if/try: not checked here
            prov = next(re.match(r'# %% (\S+) \(id: ([^)]+)\)', l) for l in reversed(lines[:line]) if l.startswith('# %% '))
            cell = n2s.cell_number(ROOT / prov.group(1), prov.group(2))         # provenance names the cell by its id
            want = f'{Path(prov.group(1)).stem}.html#cell-{cell}'
            assert entry.select_one('a.exp-src')['href'] == want, (mod, name)
            checked += 1
    assert checked > 0


# ------------------------------------------------------------------ in a real browser
@pytest.fixture(scope='session')
def chromium() -> str:
    "The chromium binary, or a skip that says what is missing (asked first: no site is built for nothing)."
    if os.environ.get('EXP_BROWSER_TESTS') == '0':
        pytest.skip('browser test off: EXP_BROWSER_TESTS=0')
    try: import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip('browser test needs the playwright package: ./dev setup installs it (dev_requirements)')
    exe = os.environ.get('EXP_CHROMIUM') or shutil.which('chromium') or shutil.which('chromium-browser')
    if not exe:
        pytest.skip("browser test needs chromium: ./dev setup installs Debian's chromium when run as root "
                    "(apt-get install chromium), or set EXP_CHROMIUM")
    return exe


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a): pass


class Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address): pass          # a browser hanging up is no news


def serve(directory: Path):
    "A static file server on loopback, in a thread; returns (server, base URL)."
    srv = Server(('127.0.0.1', 0), functools.partial(Quiet, directory=str(directory)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f'http://127.0.0.1:{srv.server_address[1]}/'


IMAGES_JS = '''() => Array.from(document.images).map(i => { const r = i.getBoundingClientRect();
    return {src: i.currentSrc.slice(0, 40), complete: i.complete, w: i.naturalWidth, h: i.naturalHeight,
            bw: r.width, bh: r.height}; })'''
MATH_JS = '''() => Array.from(document.getElementsByTagName('math')).map(m => {
    const r = m.getBoundingClientRect(); return [r.width, r.height]; })'''


def crawl(context, base: str) -> dict:
    "Load the index and every page reachable from it; check links, anchors, images, math; report."
    problems, outside, pages, links = [], [], {}, []
    def route(r):
        url = r.request.url
        if urlparse(url).scheme in ('data', 'blob', 'about') or urlparse(url).hostname == '127.0.0.1': r.continue_()
        else:
            outside.append(url); r.abort()
    context.route('**/*', route)
    page = context.new_page()
    page.on('pageerror', lambda e: problems.append(f'script error: {e}'))
    page.on('requestfailed', lambda q: problems.append(f'request failed: {q.url[:80]} ({q.failure})'))
    page.on('response', lambda r: r.status >= 400 and problems.append(f'HTTP {r.status}: {r.url}'))
    todo, images, maths = [base + 'index.html'], 0, 0
    while todo:
        url = todo.pop(0)
        if url in pages: continue
        resp = page.goto(url, wait_until='load')
        if resp is None or not resp.ok: continue              # reported by the response handler and as a broken link
        page.wait_for_function('Array.from(document.images).every(i => i.complete)')
        ids = set(page.eval_on_selector_all('[id]', 'els => els.map(e => e.id)'))
        pages[url] = ids
        for img in page.evaluate(IMAGES_JS):
            images += 1
            if not (img['complete'] and img['w'] > 0 and img['h'] > 0 and img['bw'] > 0 and img['bh'] > 0):
                problems.append(f'{url}: image not rendered: {img}')
        for w, h in page.evaluate(MATH_JS):
            maths += 1
            if not (w > 0 and h > 0): problems.append(f'{url}: math not rendered ({w}x{h})')
        for href in page.eval_on_selector_all('a[href]', 'els => els.map(a => a.href)'):
            target, frag = urldefrag(href)
            if not target.startswith(base): continue          # external links are fine to have, just not to load
            links.append((url, target, frag))
            if target.endswith('.html') and target not in pages: todo.append(target)
    for src, target, frag in links:
        if target not in pages:
            problems.append(f'{src}: broken link to {target}')
        elif frag and frag not in pages[target] and unquote(frag) not in pages[target]:   # as browsers look it up
            problems.append(f'{src}: broken anchor {target}#{frag}')
    page.close()
    return dict(pages=pages, links=links, images=images, maths=maths, problems=problems, outside=outside)


def test_site_in_headless_chromium(chromium, fixture_site, real_site, tmp_path):
    from playwright.sync_api import sync_playwright
    image_outputs = sum(1 for p in (ROOT / 'nbs').glob('*.ipynb') for c in nbformat.read(p, as_version=4).cells
                        for o in c.get('outputs', []) if {'image/png', 'image/jpeg', 'image/svg+xml'} & set(o.get('data', {})))
    servers = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
            for site, want_images in ((fixture_site, 1), (real_site, image_outputs)):
                srv, base = serve(site); servers.append(srv)
                context = browser.new_context(viewport={'width': 1280, 'height': 900})
                got = crawl(context, base)
                html_pages = {base + p.name for p in site.glob('*.html')}
                assert set(got['pages']) == html_pages, 'pages not reachable from the index'
                assert not got['problems'], '\n'.join(got['problems'][:30])
                assert not got['outside'], f'requests left loopback: {got["outside"][:10]}'
                assert got['images'] >= want_images, (got['images'], want_images)
                assert len(got['links']) > len(html_pages)
                if site == fixture_site: assert got['maths'] == 2
                else:
                    page = context.new_page()
                    page.goto(base + 'index.html', wait_until='load')
                    shot = tmp_path / 'index.png'
                    page.screenshot(path=str(shot), full_page=True)
                    data = shot.read_bytes()
                    assert data.startswith(b'\x89PNG') and len(data) > 10_000
                    print(f'screenshot of the index: {shot}')
                context.close()
            browser.close()
    finally:
        for srv in servers: srv.shutdown(); srv.server_close()
