#!/usr/bin/env python
"""Execute notebooks headless, as tests: `python run_notebook.py [NOTEBOOK ...] [-n N] [--slow] [--save]`.

With no notebook named, every notebook in nbs/ runs. Each notebook runs top to bottom in its own
process with IPython semantics (magics, `!shell`, rich display captured), stops at its first failing
cell, and is reported as `nbs/NN_x.ipynb:cell N:line L` with the cell's source and a traceback whose
library frames are also shown as the notebook cells they were exported from.

Why not a Jupyter kernel per notebook (nbclient, nbdev)? A kernel costs ~1 s to start plus the
imports every notebook repeats (torch alone is ~1 s). Here one warm parent imports torch, IPython and
matplotlib once and builds an IPython shell; each notebook runs in a `fork()` of it, so it starts
with a clean namespace in well under 0.1 s, and nothing leaks between notebooks (separate processes).
Cells are counted from 1 over all cells, markdown included, top to bottom.

Cells whose first line is `#slow` are skipped unless `--slow`; a notebook is slow as a whole with a
first-line `#all_slow` cell or notebook metadata {"exp": {"slow": true}}. Under the runner
EXP_IN_TEST=1 is set, which makes notebook2script.py a no-op.
"""
from __future__ import annotations

import argparse, json, linecache, os, re, select, signal, sys, tempfile, threading, time, traceback
from dataclasses import dataclass, field
from queue import Empty
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from notebook2script import (PROVENANCE_RE, ExportError, all_notebooks, cell_number, cell_source, find_root, first_line,
                             read_notebook, read_settings, rel, write_atomic)

SLOW_RE = re.compile(r'^\s*#\s*\|?\s*slow\s*$')
ALL_SLOW_RE = re.compile(r'^\s*#\s*\|?\s*all_slow\s*$')
WARM_IMPORTS = ('numpy', 'torch', 'torch.nn', 'torch.nn.functional', 'torch.optim', 'torch._dynamo', 'torchvision',
                'torchvision.transforms', 'matplotlib', 'matplotlib.pyplot', 'matplotlib_inline.backend_inline',
                'PIL.Image', 'IPython', 'IPython.display', 'fastprogress', 'safetensors.torch')
# (torch.optim pulls in torch._dynamo, ~2 s: paid once here instead of in every notebook that makes an optimizer.
#  None of these start threads at import, which is what makes forking after them safe.)


@dataclass
class Result:
    "What running one notebook gave: status, timings, a failure report and (for --save) the outputs."
    path: str
    status: str = 'passed'            # passed | failed | skipped
    report: str = ''
    seconds: float = 0.0
    setup_seconds: float = 0.0        # fork to first cell: the runner's fixed cost for this notebook
    cell_times: dict = field(default_factory=dict)    # cell number -> seconds
    slow_skipped: int = 0
    outputs: dict = field(default_factory=dict)       # cell number -> (execution_count, [outputs])

    @property
    def passed(self): return self.status == 'passed'


# ------------------------------------------------------------------ the shell (built in the warm parent)
_SHELL = None


def make_shell():
    "An IPython shell whose display hook and publisher record outputs into `shell.exp_outputs` (one per process)."
    global _SHELL
    if _SHELL is not None:
        _SHELL.exp_outputs = {}
        return _SHELL
    from IPython.core.displayhook import DisplayHook
    from IPython.core.displaypub import DisplayPublisher
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets import Type
    from traitlets.config import Config

    class CaptureHook(DisplayHook):
        "Records a cell's value (what Jupyter shows as Out[n]) as an execute_result."
        def write_output_prompt(self): pass
        def finish_displayhook(self): pass
        def write_format_data(self, format_dict, md_dict=None):
            if WIDGET_MIME in format_dict and 'text/html' not in format_dict:
                html = widget_html(format_dict[WIDGET_MIME].get('model_id'))
                if html: format_dict = {**format_dict, 'text/html': html}
            self.shell.exp_add({'output_type': 'execute_result', 'data': _json_safe_data(format_dict),
                                'metadata': md_dict or {}, 'execution_count': self.shell.execution_count})

    class CapturePublisher(DisplayPublisher):
        "Records display() calls, including display-id updates and clear_output, as Jupyter would."
        def publish(self, data, metadata=None, source=None, *, transient=None, update=False, **kw):
            did = (transient or {}).get('display_id')
            if WIDGET_MIME in data and 'text/html' not in data:          # a static picture of the widget, for saved
                html = widget_html(data[WIDGET_MIME].get('model_id'))    # notebooks and the docs (no widget JS there)
                if html: data = {**data, 'text/html': html}
            out = {'output_type': 'display_data', 'data': _json_safe_data(data), 'metadata': metadata or {}}
            if update and did is not None:
                for cell_outs in self.shell.exp_outputs.values():
                    for o in cell_outs:
                        if o.get('_display_id') == did: o.update(out)
                return
            if did is not None: out['_display_id'] = did
            self.shell.exp_add(out)
        def clear_output(self, wait=False):
            self.shell.exp_outputs[self.shell.exp_cell] = []

    class NotebookShell(InteractiveShell):
        displayhook_class = Type(CaptureHook)
        display_pub_class = Type(CapturePublisher)
        exp_outputs: dict = {}
        exp_cell = 0
        def exp_add(self, out): self.exp_outputs.setdefault(self.exp_cell, []).append(out)
        def showtraceback(self, *a, **k): pass          # we format the error ourselves
        def showsyntaxerror(self, *a, **k): pass
        def showindentationerror(self, *a, **k): pass
        def enable_gui(self, gui=None): pass             # headless: 'inline' needs no event loop

    cfg = Config()
    cfg.HistoryManager.enabled = False                   # no sqlite history file, nothing shared on disk
    cfg.InteractiveShell.colors = 'nocolor'
    shell = NotebookShell.instance(config=cfg)
    shell.exp_outputs = {}
    shell.enable_matplotlib('inline')                    # Jupyter's default: figures shown after each cell
    _SHELL = shell
    return shell


WIDGET_MIME = 'application/vnd.jupyter.widget-view+json'


def widget_html(model_id) -> str | None:
    "Static HTML of the live ipywidget `model_id` as it looks now (boxes, labels, buttons, uploads, images, outputs)."
    try:
        import html, base64
        from ipywidgets.widgets import widget as _widget
        w = getattr(_widget, '_instances', {}).get(model_id)    # ipywidgets 8's registry of live widgets
    except ImportError: return None
    if w is None: return None
    esc = html.escape
    def render(w):
        kind = type(w).__name__
        if hasattr(w, 'children'):
            flow = 'row' if kind in ('HBox', 'Box') else 'column'
            return (f'<div style="display:flex;flex-direction:{flow};gap:4px;align-items:flex-start">'
                    + ''.join(render(c) for c in w.children) + '</div>')
        if kind in ('Label', 'HTML'): return f'<span>{w.value if kind == "HTML" else esc(str(w.value))}</span>'
        if kind == 'Button': return f'<button disabled>{esc(w.description)}</button>'
        if kind == 'FileUpload': return f'<button disabled>Upload ({len(w.value)})</button>'
        if kind == 'Dropdown':
            opts = ''.join(f'<option{" selected" if o == w.label else ""}>{esc(str(o))}</option>' for o in w.options)
            return f'<label>{esc(w.description)} <select disabled>{opts}</select></label>'
        if kind == 'Image':
            return f'<img src="data:image/{w.format};base64,{base64.b64encode(bytes(w.value)).decode()}">'
        if kind == 'Output':
            parts = []
            for o in w.outputs:
                d = o.get('data', {})
                if 'image/png' in d: parts.append(f'<img src="data:image/png;base64,{d["image/png"]}">')
                elif 'text/html' in d: parts.append(d['text/html'])
                elif 'text/plain' in d or 'text' in o: parts.append(f'<pre>{esc(d.get("text/plain", o.get("text", "")))}</pre>')
            return '<div>' + ''.join(parts) + '</div>'
        return f'<span>{esc(repr(w))}</span>'
    return render(w)


def _json_safe_data(data: dict) -> dict:
    "Mime bundle values as Jupyter stores them: bytes (e.g. a PIL image's PNG) base64-encoded, the rest JSON."
    import base64
    out = {}
    for k, v in data.items():
        if isinstance(v, (bytes, bytearray, memoryview)): v = base64.b64encode(bytes(v)).decode('ascii')
        elif not isinstance(v, (str, int, float, bool, list, dict, type(None))): v = str(v)
        out[k] = v
    return out


class CellStream:
    "sys.stdout/sys.stderr replacement that appends to the running cell's outputs (merging writes)."
    def __init__(self, shell, name): self.shell, self.name = shell, name
    def write(self, s):
        if not s: return 0
        outs = self.shell.exp_outputs.setdefault(self.shell.exp_cell, [])
        if outs and outs[-1].get('output_type') == 'stream' and outs[-1]['name'] == self.name: outs[-1]['text'] += s
        else: outs.append({'output_type': 'stream', 'name': self.name, 'text': s})
        return len(s)
    def flush(self): pass
    def isatty(self): return False
    def fileno(self): raise OSError('cell output stream has no file descriptor')
    @property
    def encoding(self): return 'utf-8'
    def writable(self): return True


# ------------------------------------------------------------------ failure reports
class Locator:
    "Maps code locations to notebook cells: executed cells by their compiled name, exp/ lines by provenance."
    def __init__(self, root: Path, lib: Path):
        self.root, self.lib, self.cell_of_code = root, lib.resolve(), {}

    def notebook_cell(self, filename: str, lineno: int):
        "(notebook, cell, line) for a line of an exported module, from the provenance comment above it (by cell id)."
        lines = linecache.getlines(filename)
        for i in range(min(lineno, len(lines)) - 1, -1, -1):
            m = PROVENANCE_RE.match(lines[i].rstrip('\n'))
            if not m: continue
            cell = int(m['cell']) if m['cell'] else cell_number(self.root / m['nb'], m['id'])
            return (m['nb'], cell, lineno - (i + 1) + 1) if cell else None   # +1: the directive line
        return None

    def describe(self, fs) -> str | None:
        "One traceback entry, or None for runner/IPython frames that would only be noise."
        fn = fs.filename
        if fn in self.cell_of_code:
            nb, cell = self.cell_of_code[fn]
            return f'  {nb}:cell {cell}:line {fs.lineno}, in {fs.name}\n    {(fs.line or "").strip()}'
        path = Path(fn)
        if path.resolve() == Path(__file__).resolve() or '/IPython/' in fn: return None
        try: inlib = path.resolve().is_relative_to(self.lib)
        except OSError: inlib = False
        where = rel(path, self.root) if inlib else fn
        extra = ''
        if inlib and (loc := self.notebook_cell(fn, fs.lineno)): extra = f' = {loc[0]}:cell {loc[1]}:line {loc[2]}'
        return f'  {where}:{fs.lineno}, in {fs.name}{extra}\n    {(fs.line or "").strip()}'


def failure_report(nb: str, cell: int, src: str, exc: BaseException, locator: Locator) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    line = next((f.lineno for f in frames if locator.cell_of_code.get(f.filename) == (nb, cell)), None)
    if line is None and isinstance(exc, SyntaxError): line = exc.lineno
    line = line or 1
    lines = src.splitlines() or ['']
    lo, hi = max(1, line - 3), min(len(lines), line + 2)
    around = '\n'.join(f'{"->" if i == line else "  "} {i:3d} | {lines[i - 1]}' for i in range(lo, hi + 1))
    entries = [d for f in frames if (d := locator.describe(f))]
    msg = ''.join(traceback.format_exception_only(type(exc), exc)).rstrip()
    tb = 'Traceback (most recent call last):\n' + '\n'.join(entries) + '\n' if entries else ''
    return f'{nb}:cell {cell}:line {line}\n{around}\n{tb}{msg}'


# ------------------------------------------------------------------ running one notebook (in the child)
def is_slow_cell(cell): return cell.get('cell_type') == 'code' and bool(SLOW_RE.match(first_line(cell_source(cell))))


def is_slow_notebook(nb):
    return bool(nb.metadata.get('exp', {}).get('slow')) or any(
        c.get('cell_type') == 'code' and ALL_SLOW_RE.match(first_line(cell_source(c))) for c in nb.cells)


def run_in_child(shell, nb_path: Path, cfg: dict, slow: bool, threads: int, send) -> Result:
    "Execute one notebook in this (forked) process; `send` reports progress to the parent."
    root = cfg['root']
    name = rel(nb_path, root)
    t0 = time.perf_counter()
    res = Result(name)
    os.environ['EXP_IN_TEST'] = '1'
    os.environ.setdefault('OMP_NUM_THREADS', str(threads))
    # `!python ...` in a cell means this interpreter (its venv), as in an activated venv, not whatever is first on PATH
    os.environ['PATH'] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get('PATH', '')
    try:
        import torch
        torch.set_num_threads(threads)
    except ImportError: pass
    os.chdir(nb_path.parent)
    sys.path.insert(0, str(nb_path.parent))
    sys.stdin = open(os.devnull)
    locator = Locator(root, cfg['lib'])
    orig_code_name = shell.compile.get_code_name
    def code_name(raw, transformed, number):
        fn = orig_code_name(raw, transformed, number)
        locator.cell_of_code[fn] = (name, shell.exp_cell)
        return fn
    shell.compile.get_code_name = code_name
    try: nb = read_notebook(nb_path, root)
    except ExportError as e:
        res.status, res.report = 'failed', str(e)
        return res
    if is_slow_notebook(nb) and not slow:
        res.status, res.report = 'skipped', 'slow notebook (run with --slow)'
        return res
    sys.stdout, sys.stderr = CellStream(shell, 'stdout'), CellStream(shell, 'stderr')
    res.setup_seconds = time.perf_counter() - t0
    count = 0
    for i, cell in enumerate(nb.cells, start=1):
        if cell.get('cell_type') != 'code': continue
        if is_slow_cell(cell) and not slow:
            res.slow_skipped += 1
            continue
        shell.exp_cell = i
        shell.exp_outputs[i] = []
        send({'event': 'cell', 'cell': i})
        src = cell_source(cell)
        c0 = time.perf_counter()
        r = shell.run_cell(src, store_history=True)
        res.cell_times[i] = time.perf_counter() - c0
        count += 1
        res.outputs[i] = (count, shell.exp_outputs.get(i, []))
        err = r.error_before_exec or r.error_in_exec
        if err is not None:
            res.status = 'failed'
            res.report = failure_report(name, i, src, err, locator)
            res.outputs[i][1].append({'output_type': 'error', 'ename': type(err).__name__, 'evalue': str(err),
                                      'traceback': res.report.splitlines()})
            break
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    res.seconds = time.perf_counter() - t0
    return res


# ------------------------------------------------------------------ the scheduler (in the parent)
def warm_up():
    "Import what notebooks use, once, in the parent: every forked child starts with it loaded."
    import importlib
    os.environ.setdefault('MPLBACKEND', 'Agg')
    for mod in WARM_IMPORTS:
        try: importlib.import_module(mod)
        except ImportError: pass
    import nbformat                                      # compile the notebook schema once, here
    nbformat.validate(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell('1')]))
    return make_shell()


def _jsonable(o):
    return {k: v for k, v in o.items() if not k.startswith('_')}


def default_threads(ncores, workers, load=None):
    """Torch threads per notebook: the cores other processes leave idle (by the load average), shared by `workers`.

    On a busy machine fewer threads are faster: an op's OpenMP threads wait for each other, and one thread
    descheduled by another process stalls them all (measured: a load of 4 on 2 cores made a 2-thread fit 4.7x
    slower than a 1-thread one)."""
    if load is None: load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else 0.
    idle = max(1, min(ncores, int(ncores - load + 0.5)))
    return max(1, idle // workers)


def schedule(paths, cfg, workers=None, slow=False, timeout=None, threads=None, on_result=None) -> list[Result]:
    """Run notebooks `paths`, up to `workers` at a time, each in a fork of *this* process.

    Only call this in a process that has not run torch code yet (GNU OpenMP does not survive a fork
    once its thread pool exists): the command line does, and `run_notebooks` uses a fresh zygote.
    A cell running longer than `timeout` seconds is killed (with its process group) and reported."""
    paths = [Path(p).resolve() for p in paths]
    ncores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    workers = workers or int(cfg.get('workers', 0) or 0) or ncores
    workers = max(1, min(workers, len(paths) or 1))
    timeout = timeout or float(cfg.get('cell_timeout', 900))
    threads = threads or int(os.environ.get('EXP_THREADS', 0)) or default_threads(ncores, workers)
    shell = warm_up()
    for s in (sys.stdout, sys.stderr): s.flush()
    pending, running, results = list(paths), {}, {}
    parent = os.getppid()
    main = threading.current_thread() is threading.main_thread()
    prev_term = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main else None
    try:
        _schedule_loop(pending, running, results, parent, shell, cfg, workers, slow, timeout, threads, on_result)
    finally:                                             # every exit (Ctrl-C, SIGTERM, an error): end every notebook process
        for pid, r in list(running.items()):
            try: os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError: pass
            try: os.waitpid(pid, 0)
            except ChildProcessError: pass
            _finish(r)
        if main: signal.signal(signal.SIGTERM, prev_term)
    return [results[p] for p in paths]


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)                       # so that `finally` blocks run (the default action skips them)


def _schedule_loop(pending, running, results, parent, shell, cfg, workers, slow, timeout, threads, on_result):
    "The scheduler's loop (see `schedule`): start notebooks, read their messages, enforce timeouts; `running` is shared for cleanup."
    while pending or running:
        if os.getppid() != parent:                       # the process that asked (pytest) is gone: stop, do not orphan
            raise SystemExit('run_notebook: the calling process exited')
        while pending and len(running) < workers:
            path = pending.pop(0)
            rfd, wfd = os.pipe()
            log = tempfile.TemporaryFile()
            pid = os.fork()
            if pid == 0:                                     # the child
                os.close(rfd)
                os.setpgid(0, 0)
                signal.signal(signal.SIGINT, signal.default_int_handler)   # as in a Jupyter kernel, even if we were started
                                                                           # with Ctrl-C ignored (`cmd &` in a script)
                os.dup2(log.fileno(), 1); os.dup2(log.fileno(), 2)   # C-level output goes to a log
                out = os.fdopen(wfd, 'w')
                def send(msg): out.write(json.dumps(msg, default=str) + '\n'); out.flush()
                code = 0
                try:
                    res = run_in_child(shell, path, cfg, slow, threads, send)
                    res.outputs = {k: (n, [_jsonable(o) for o in outs]) for k, (n, outs) in res.outputs.items()}
                    send({'event': 'cell', 'cell': None})    # the cells are done: sending outputs is no cell's time
                    send({'event': 'done', 'result': res.__dict__})
                except BaseException as e:                   # a runner bug: still report it
                    send({'event': 'done', 'result': Result(rel(path, cfg['root']), 'failed',
                          f'{rel(path, cfg["root"])}: runner error: {e!r}').__dict__})
                    code = 1
                finally:
                    try: out.flush()
                    except BaseException: pass
                    os._exit(code)
            os.close(wfd)
            running[pid] = {'path': path, 'fd': rfd, 'buf': bytearray(), 'cell': None, 'since': time.time(),
                            'start': time.time(), 'log': log, 'result': None}
        fds = {r['fd']: pid for pid, r in running.items()}
        ready, _, _ = select.select(list(fds), [], [], 0.2)
        for fd in ready:
            pid = fds[fd]; r = running[pid]
            chunk = os.read(fd, 1 << 20)
            if chunk:
                r['buf'] += chunk                        # a bytearray: appending is linear in the total, however many chunks
                if b'\n' not in chunk: continue          # splitting only when a line ends (a pipe gives 64 KiB a read)
                *lines, rest = bytes(r['buf']).split(b'\n')
                r['buf'] = bytearray(rest)
                for line in lines:
                    msg = json.loads(line)
                    if msg['event'] == 'cell': r['cell'], r['since'] = msg['cell'], time.time()
                    elif msg['event'] == 'done':
                        d = msg['result']
                        d['outputs'] = {int(k): v for k, v in d['outputs'].items()}
                        d['cell_times'] = {int(k): v for k, v in d['cell_times'].items()}
                        r['result'] = Result(**d)
            else:                                            # EOF: the child finished or died
                _, status = os.waitpid(pid, 0)
                results[r['path']] = r['result'] or _crashed(r, status, cfg)
                _finish(r)
                del running[pid]
                if on_result: on_result(results[r['path']])
        now = time.time()
        for pid, r in list(running.items()):
            if r['cell'] is not None and now - r['since'] > timeout:
                try: os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError: pass
                os.waitpid(pid, 0)
                results[r['path']] = _timed_out(r, timeout, cfg)
                _finish(r)
                del running[pid]
                if on_result: on_result(results[r['path']])


_ZYGOTES = {}


def _zygote(env=None):
    "A warm parent in its own fresh process (one per `env`), started once and reused: nothing the caller ran leaks into forks."
    import atexit, subprocess
    key = tuple(sorted((env or {}).items()))
    z = _ZYGOTES.get(key)
    if z is None or z.poll() is not None:
        full = {**{k: v for k, v in os.environ.items() if k != 'EXP_IN_TEST'}, **(env or {})}
        z = _ZYGOTES[key] = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), '--zygote'], env=full,
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        atexit.register(lambda z=z: (z.stdin.close(), z.wait(10)) if z.poll() is None else None)
    return z


def run_notebooks(paths, cfg=None, workers=None, slow=False, timeout=None, threads=None, on_result=None,
                  env=None) -> list[Result]:
    """Run notebooks `paths` (in parallel, each in its own process) from any caller, e.g. pytest.

    The forks come from a zygote process that has imported torch but run nothing, so whatever the
    calling process did (torch ops, threads) cannot affect them. Same engine as the command line.
    `env` adds environment variables (e.g. `ATEN_CPU_CAPABILITY`), set before the zygote imports torch."""
    cfg = cfg or read_settings(find_root())
    z = _zygote(env)
    req = {'paths': [str(Path(p).resolve()) for p in paths], 'root': str(cfg['root']), 'workers': workers,
           'slow': slow, 'timeout': timeout, 'threads': threads}
    z.stdin.write(json.dumps(req) + '\n'); z.stdin.flush()
    results = []
    for line in z.stdout:
        msg = json.loads(line)
        if 'end' in msg: break
        r = Result(**msg['result'])
        r.outputs = {int(k): v for k, v in r.outputs.items()}
        r.cell_times = {int(k): v for k, v in r.cell_times.items()}
        results.append(r)
        if on_result: on_result(r)
    else: raise RuntimeError(f'run_notebook zygote died (exit code {z.wait()})')
    order = {rel(Path(p).resolve(), cfg['root']): i for i, p in enumerate(paths)}
    return sorted(results, key=lambda r: order.get(r.path, 0))


def zygote_main():
    "Serve run requests (JSON lines on stdin), answering results on the original stdout."
    out = os.fdopen(os.dup(1), 'w')
    os.dup2(2, 1)                                        # stray prints must not corrupt the protocol
    warm_up()
    for line in sys.stdin:
        req = json.loads(line)
        cfg = read_settings(Path(req['root']))
        def send(r): out.write(json.dumps({'result': r.__dict__}) + '\n'); out.flush()
        schedule([Path(p) for p in req['paths']], cfg, req['workers'], req['slow'], req['timeout'],
                 req['threads'], on_result=send)
        out.write(json.dumps({'end': True}) + '\n'); out.flush()


def _finish(r):
    os.close(r['fd'])
    r['log'].close()


def _log_tail(r, n=2000) -> str:
    r['log'].seek(0)
    text = r['log'].read().decode('utf-8', 'replace').strip()
    return f'\nprocess output (tail):\n{text[-n:]}' if text else ''


def _cell_context(path: Path, cell: int | None, cfg) -> str:
    try: src = cell_source(read_notebook(path, cfg['root']).cells[cell - 1]) if cell else ''
    except Exception: src = ''
    return '\n'.join(f'   {i:3d} | {l}' for i, l in enumerate(src.splitlines()[:12], 1))


def _crashed(r, status, cfg) -> Result:
    name, cell = rel(r['path'], cfg['root']), r['cell']
    how = f'killed by signal {os.WTERMSIG(status)}' if os.WIFSIGNALED(status) else f'exited with status {os.WEXITSTATUS(status)}'
    where = f'{name}:cell {cell}' if cell else name
    return Result(name, 'failed', f'{where}: the notebook process {how}\n{_cell_context(r["path"], cell, cfg)}{_log_tail(r)}',
                  seconds=time.time() - r['start'])


def _timed_out(r, timeout, cfg) -> Result:
    name, cell = rel(r['path'], cfg['root']), r['cell']
    return Result(name, 'failed', f'{name}:cell {cell}: timed out after {timeout:g} s (cell killed; raise '
                  f'--timeout or mark the cell #slow)\n{_cell_context(r["path"], cell, cfg)}{_log_tail(r)}',
                  seconds=time.time() - r['start'])


# ------------------------------------------------------------------ the Jupyter engine (a real ipykernel per notebook)
ANSI_RE = re.compile(r'\x1b\[[0-9;]*[A-Za-z]')


def kernel_env(extra=None, threads=1) -> dict:
    "The environment a test kernel starts with: ours, marked as under test, the venv first on PATH, `extra` on top."
    env = {**os.environ, 'EXP_IN_TEST': '1', 'OMP_NUM_THREADS': str(threads), 'EXP_THREADS': str(threads),
           'PATH': os.path.dirname(sys.executable) + os.pathsep + os.environ.get('PATH', '')}
    env.pop('MPLBACKEND', None)                          # a kernel picks the inline backend itself, as in Jupyter
    env.update(extra or {})
    return env


def wait_in_slices(channel, slice_s=0.5):
    """Make `channel.get_msg(timeout)` (an async jupyter_client channel) wait in slices of `slice_s` seconds, same total.

    A zmq socket's file descriptor is edge-triggered: when the client also *sends* on the shell socket while it
    waits on it (nbclient does, to sync an `Output` widget's `clear_output` back to the kernel), the wake-up for
    a reply that has already arrived can be consumed by the send, and one long wait then sleeps until its timeout
    although the reply is there (jupyter/nbclient#312). Measured here: a fastbook-style app cell (07b) passed
    after exactly the 900 s cell timeout. Each new wait re-checks the socket, so slices lose at most `slice_s`."""
    get = channel.get_msg
    async def get_msg(timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0., deadline - time.monotonic())
            try: return await get(timeout=slice_s if left is None else min(slice_s, left))
            except Empty:
                if left is not None and left <= slice_s: raise
    channel.get_msg = get_msg
    return channel


async def _run_in_kernel(nb_path: Path, cfg: dict, slow: bool, timeout: float, env: dict, sockets: str) -> Result:
    """Execute one notebook in a fresh ipykernel (nbclient), cwd its folder, as Jupyter would; stop at the first error.

    The kernel talks to us over Unix sockets named `sockets`-N, one prefix per kernel (ipykernel warns on every start over unencrypted TCP,
    and a socket file is private to this user)."""
    from nbclient import NotebookClient
    from traitlets.config import Config
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
    name = rel(nb_path, cfg['root'])
    res, t0 = Result(name), time.perf_counter()
    try: nb = read_notebook(nb_path, cfg['root'])
    except ExportError as e:
        res.status, res.report = 'failed', str(e)
        return res
    if is_slow_notebook(nb) and not slow:
        res.status, res.report = 'skipped', 'slow notebook (run with --slow)'
        return res
    config = Config()
    config.KernelManager.transport, config.KernelManager.ip = 'ipc', sockets
    client = NotebookClient(nb, timeout=timeout, kernel_name='python3', allow_errors=False, config=config,
                            resources={'metadata': {'path': str(nb_path.parent)}})
    cell_no = None
    try:
        async with client.async_setup_kernel(env=env):
            wait_in_slices(client.kc.shell_channel); wait_in_slices(client.kc.iopub_channel)
            res.setup_seconds = time.perf_counter() - t0
            for i, cell in enumerate(nb.cells, start=1):
                if cell.cell_type != 'code' or not cell.source.strip(): continue
                if is_slow_cell(cell) and not slow:
                    res.slow_skipped += 1
                    continue
                cell_no, c0 = i, time.perf_counter()
                await client.async_execute_cell(cell, i - 1)
                res.cell_times[i] = time.perf_counter() - c0
    except CellExecutionError as e:
        res.status = 'failed'
        src = cell_source(nb.cells[cell_no - 1]).splitlines()
        tb = ANSI_RE.sub('', str(e.traceback or '')).splitlines()
        tail = '\n'.join(tb[-30:]) if tb else f'{e.ename}: {e.evalue}'
        res.report = (f'{name}:cell {cell_no} (Jupyter kernel)\n'
                      + '\n'.join(f'   {j:3d} | {l}' for j, l in enumerate(src[:12], 1)) + f'\nTraceback (last lines):\n{tail}')
    except (CellTimeoutError, TimeoutError):
        res.status, res.report = 'failed', f'{name}:cell {cell_no} (Jupyter kernel): timed out after {timeout:g} s'
    except DeadKernelError as e:
        res.status, res.report = 'failed', f'{name}:cell {cell_no} (Jupyter kernel): the kernel died ({e})'
    except Exception as e:                               # e.g. the kernel could not start
        res.status, res.report = 'failed', f'{name}: Jupyter kernel error at cell {cell_no}: {type(e).__name__}: {e}'
    res.seconds = time.perf_counter() - t0
    return res


def run_in_kernels(paths, cfg=None, workers=None, slow=False, timeout=None, threads=None, env=None,
                   on_result=None) -> list[Result]:
    """Run notebooks `paths` through real Jupyter kernels (nbclient + ipykernel), `workers` at a time.

    What users run: a kernel per notebook, its cwd the notebook's folder, the inline backend, HTML progress
    bars, widgets. Slower to start than the fork engine (~1 s a kernel plus the imports), so the test suite
    uses it as the second pass that proves a notebook is not green only under our runner."""
    import asyncio
    cfg = cfg or read_settings(find_root())
    paths = [Path(p).resolve() for p in paths]
    ncores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    workers = max(1, min(workers or int(cfg.get('workers', 0) or 0) or ncores, len(paths) or 1))
    timeout = timeout or float(cfg.get('cell_timeout', 900))
    threads = threads or int(os.environ.get('EXP_THREADS', 0)) or default_threads(ncores, workers)
    kenv = kernel_env(env, threads)
    sockdir = tempfile.TemporaryDirectory(prefix='exp-kernels-')

    async def main():
        sem = asyncio.Semaphore(workers)
        loop, parent = asyncio.get_running_loop(), os.getppid()
        def watch():                                     # the caller is gone: stop, and shut the kernels down
            if os.getppid() != parent: raise SystemExit('run_notebook: the calling process exited')
            loop.call_later(0.5, watch)
        if os.getppid() != 1: loop.call_later(0.5, watch)
        async def one(i, p):                             # each kernel its own socket names: two starting at once
            async with sem:                              # would otherwise pick the same free numbers
                r = await _run_in_kernel(p, cfg, slow, timeout, kenv, os.path.join(sockdir.name, f'k{i}'))
            if on_result: on_result(r)
            return r
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(paths)))
    main_thread = threading.current_thread() is threading.main_thread()
    prev = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main_thread else None
    try: return list(asyncio.run(main()))               # on Ctrl-C or SIGTERM asyncio cancels the runs: kernels shut down
    finally:
        if main_thread: signal.signal(signal.SIGTERM, prev)
        sockdir.cleanup()


# ------------------------------------------------------------------ --save
def save_outputs(path: Path, res: Result, cfg: dict) -> bool:
    """Write executed outputs back into the notebook, minus volatile metadata (so re-runs do not churn diffs).

    Cells that did not run (slow ones skipped) keep the outputs they had."""
    import nbformat
    nb = read_notebook(path, cfg['root'])
    for i, cell in enumerate(nb.cells, start=1):
        cell.metadata.pop('execution', None)
        cell.metadata.pop('ExecuteTime', None)
        if cell.cell_type != 'code': continue
        if i in res.outputs:
            count, outs = res.outputs[i]
            cell.execution_count = count
            cell.outputs = [nbformat.from_dict(_clean_output(o, count)) for o in outs]
    nb.metadata = nbformat.from_dict({
        'kernelspec': {'display_name': 'Python 3', 'language': 'python', 'name': 'python3'},
        'language_info': {'name': 'python'}, **({'exp': nb.metadata['exp']} if 'exp' in nb.metadata else {})})
    text = nbformat.writes(nb) + '\n'
    return write_atomic(path, text)


def _clean_output(o, count):
    o = dict(o)
    if o['output_type'] == 'execute_result': o['execution_count'] = count
    if o['output_type'] == 'stream':                      # keep what a terminal would show after \r redraws
        text = o['text'].replace('\r\n', '\n')
        o['text'] = '\n'.join(line.rstrip('\r').rsplit('\r', 1)[-1] for line in text.split('\n'))
    if o['output_type'] in ('display_data', 'execute_result'):
        o['data'] = {k: v for k, v in o['data'].items() if k != 'application/vnd.jupyter.widget-view+json'} or o['data']
    return o


# ------------------------------------------------------------------ command line
def summarize(results: list[Result], wall: float, save_note: str = '') -> str:
    p = sum(r.status == 'passed' for r in results)
    f = sum(r.status == 'failed' for r in results)
    s = sum(r.status == 'skipped' for r in results)
    slow = sum(r.slow_skipped for r in results)
    lines = ['', 'notebook                                   status     seconds  setup ms']
    for r in sorted(results, key=lambda r: -r.seconds):
        lines.append(f'{r.path:42s} {r.status:8s} {r.seconds:9.2f} {1000 * r.setup_seconds:8.1f}')
    cells = sorted(((t, r.path, c) for r in results for c, t in r.cell_times.items()), reverse=True)[:5]
    if cells:
        lines.append('slowest cells: ' + ', '.join(f'{nb}:cell {c} {t:.1f}s' for t, nb, c in cells))
    ran = [r for r in results if r.status != 'skipped']
    if ran:
        lines.append(f'runner overhead per notebook (fork to first cell): '
                     f'mean {1000 * sum(r.setup_seconds for r in ran) / len(ran):.1f} ms; wall {wall:.1f} s')
    if slow: lines.append(f'{slow} slow cell(s) skipped (run with --slow)')
    if save_note: lines.append(save_note)
    lines.append(f'{p} passed, {f} failed, {s} skipped')
    return '\n'.join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('notebooks', nargs='*', help='notebooks to run (default: all of nbs/)')
    ap.add_argument('--all', action='store_true', help='run every notebook in nbs/ (the default)')
    ap.add_argument('-n', '--workers', type=int, default=None, help='notebooks run at once (default: cores)')
    ap.add_argument('--slow', action='store_true', help='also run cells and notebooks marked slow')
    ap.add_argument('--timeout', type=float, default=None, help='seconds a cell may run (default: settings.ini)')
    ap.add_argument('--save', action='store_true', help='write outputs back into the notebooks that passed')
    ap.add_argument('--threads', type=int, default=None,
                    help='torch threads per notebook (default: $EXP_THREADS, else the idle cores / workers)')
    ap.add_argument('--engine', choices=('fork', 'jupyter'), default='fork',
                    help='fork: forks of a warm process (fast, the default); jupyter: a real ipykernel per notebook')
    ap.add_argument('--cpu', default=None, metavar='LEVEL',
                    help='ATEN_CPU_CAPABILITY for the notebooks (default, avx2, avx512...): torch\'s CPU kernel level')
    ap.add_argument('--root', type=Path, help='project root (default: nearest folder with settings.ini)')
    ap.add_argument('--zygote', action='store_true', help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.zygote: return zygote_main()
    cfg = read_settings(find_root(args.root, course_ok=True))      # no settings.ini: a course folder, notebooks here
    paths = []
    for a in args.notebooks or []:
        cands = [Path(a), cfg['root'] / a, cfg['nbs'] / a, cfg['nbs'] / f'{a}.ipynb']
        p = next((c for c in cands if c.is_file()), None)
        if p is None: ap.error(f'{a}: no such notebook')
        paths.append(p)
    if not paths: paths = all_notebooks(cfg)
    t0 = time.time()
    def show(r: Result):
        tag = {'passed': 'ok  ', 'failed': 'FAIL', 'skipped': 'skip'}[r.status]
        print(f'{tag} {r.path} ({r.seconds:.1f} s)' + (f' [{r.report}]' if r.status == 'skipped' else ''), flush=True)
        if r.status == 'failed': print('\n' + r.report + '\n', flush=True)
    if args.engine == 'jupyter':
        if args.save: ap.error('--save takes the fork engine\'s outputs; run it without --engine jupyter')
        results = run_in_kernels(paths, cfg, args.workers, args.slow, args.timeout, args.threads,
                                 env={'ATEN_CPU_CAPABILITY': args.cpu} if args.cpu else None, on_result=show)
    else:
        if args.cpu: os.environ['ATEN_CPU_CAPABILITY'] = args.cpu      # read when torch first dispatches, after the fork
        results = schedule(paths, cfg, args.workers, args.slow, args.timeout, args.threads, on_result=show)
    note = ''
    if args.save:
        saved = [r.path for p, r in zip(paths, results) if r.passed and save_outputs(p, r, cfg)]
        note = f'saved outputs into {len(saved)} notebook(s)' + ('; failed notebooks left as they were'
                                                                  if any(r.status == 'failed' for r in results) else '')
    print(summarize(results, time.time() - t0, note))
    return 1 if any(r.status == 'failed' for r in results) else 0


if __name__ == '__main__':
    sys.exit(main())
