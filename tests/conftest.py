"""pytest wiring: notebooks are test items, run in parallel by run_notebook.py's engine.

`pytest -k 03` selects notebooks by path; all selected notebooks run once, together, in forks of
this (warm) process; each item then reports its notebook's result with the `nb:cell:line` report.
"""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_settings(root: Path, lib: str, description: str, **extra) -> Path:
    "A fixture project's settings.ini (library `lib`, notebooks in nbs/), with `extra` settings; returns `root`."
    root.mkdir(parents=True, exist_ok=True)
    lines = ['[DEFAULT]', f'lib_name = {lib}', f'lib_path = {lib}', 'nbs_path = nbs', f'version = {extra.pop("version", "0.0.1")}',
             f'description = {description}', *(f'{k} = {v}' for k, v in extra.items())]
    (root / 'settings.ini').write_text('\n'.join(lines) + '\n')
    return root


def pytest_addoption(parser):
    parser.addoption('--slow', action='store_true', help='also run cells and notebooks marked #slow')
    parser.addoption('--nb-workers', type=int, default=None, help='notebooks run at once (default: cores)')


@pytest.fixture(scope='session')
def notebook_results(request):
    "Run every selected notebook item once (in parallel) and hand out the results by path."
    import run_notebook
    from notebook2script import find_root, read_settings
    cfg = read_settings(find_root(ROOT))
    selected = [item.callspec.params['nb'] for item in request.session.items
                if getattr(item, 'originalname', None) == 'test_notebook']
    results = run_notebook.run_notebooks(selected, cfg, request.config.getoption('--nb-workers'),
                                         slow=request.config.getoption('--slow'))
    by_path = {p: r for p, r in zip(selected, results)}
    summary = run_notebook.summarize(results, max((r.seconds for r in results), default=0))
    request.config._exp_nb_summary = summary
    return by_path


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    summary = getattr(config, '_exp_nb_summary', None)
    if summary:   # the per-notebook timings, without the runner's own closing line (pytest has its own)
        terminalreporter.write_sep('-', 'notebook timings')
        terminalreporter.write_line('\n'.join(summary.strip().splitlines()[:-1]))
