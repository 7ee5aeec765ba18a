"""pytest wiring: notebooks are test items, each run by two engines on two CPU kernel levels.

`pytest -k 03` selects notebooks by path. Every selected notebook runs twice:
- `fork`: run_notebook.py's engine (forks of a warm process, in parallel), on the machine's best CPU kernels;
- `jupyter`: a real ipykernel per notebook through nbclient (what users run), with torch's plain C++ kernels
  (`ATEN_CPU_CAPABILITY=default`, no AVX2/AVX-512 vectorisation).
So a notebook is green only if it passes in Jupyter as well as under our runner, and only if its
comparisons hold whatever rounding the CPU's kernels do (CONTRIBUTING.md says why). Each item reports its
notebook's result with the `nb:cell:line` report. `--nb-engines fork` runs one engine only.

Notebooks run against a data cache that has been used: the Fashion-MNIST PNG tree holds a `models/`
folder with a saved model in it, as after fastai's tutorials (`learn.save`), so that no notebook relies on
the tree being pristine.
"""
import sys, time
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
    parser.addoption('--nb-engines', default='fork,jupyter', help='notebook engines, comma-separated (fork, jupyter)')


# engine -> the environment its notebooks run with (the CPU kernel level: none set means the machine's best)
ENGINES = {'fork': {}, 'jupyter': {'ATEN_CPU_CAPABILITY': 'default'}}


def pytest_collection_modifyitems(config, items):
    "Deselect the notebook items of engines not asked for (`--nb-engines`)."
    engines = set(config.getoption('--nb-engines').split(','))
    keep = [i for i in items if getattr(i, 'callspec', None) is None or i.callspec.params.get('engine', 'fork') in engines]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep


def used_data_cache():
    "Make the PNG tree look as a user's does after fastai's tutorials: a `models/` folder with a saved model in it."
    import torch
    from exp.data import URLs, untar_data
    models = untar_data(URLs.FASHION_MNIST_PNG) / 'models'
    models.mkdir(exist_ok=True)
    if not (models / 'stage-1.pth').exists(): torch.save({'model': torch.nn.Linear(2, 2).state_dict()}, models / 'stage-1.pth')


@pytest.fixture(scope='session')
def notebook_results(request):
    "`results(engine)`: run every selected notebook item of `engine` once (in parallel), results by path."
    import run_notebook
    from notebook2script import find_root, read_settings
    cfg = read_settings(find_root(ROOT))
    cache, summaries = {}, {}
    request.config._exp_nb_summaries = summaries

    def results(engine):
        if engine in cache: return cache[engine]
        if not cache: used_data_cache()
        selected = [item.callspec.params['nb'] for item in request.session.items
                    if getattr(item, 'originalname', None) == 'test_notebook' and item.callspec.params['engine'] == engine]
        run = run_notebook.run_in_kernels if engine == 'jupyter' else run_notebook.run_notebooks
        t0 = time.time()
        res = run(selected, cfg, request.config.getoption('--nb-workers'), slow=request.config.getoption('--slow'),
                  env=ENGINES[engine])
        cache[engine] = {p: r for p, r in zip(selected, res)}
        level = ENGINES[engine].get('ATEN_CPU_CAPABILITY', 'best')
        summaries[f'{engine} engine, CPU kernels: {level}'] = run_notebook.summarize(res, time.time() - t0)
        return cache[engine]
    return results


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for title, summary in getattr(config, '_exp_nb_summaries', {}).items():
        # the per-notebook timings, without the runner's own closing line (pytest has its own)
        terminalreporter.write_sep('-', f'notebook timings: {title}')
        terminalreporter.write_line('\n'.join(summary.strip().splitlines()[:-1]))
