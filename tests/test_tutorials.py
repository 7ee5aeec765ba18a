"""The tutorials users come from, typed as written with `from exp.all import *`: each notebook in tests/tutorials/ is a test.

fastai v1's MNIST tutorial, fastai v2's pets tutorial, fastbook chapter 2, course-v3 lesson 8's tooling, and plain
PyTorch handed to exp's Learner (/work/shared/user-flows.md), ported line by line with local stand-in data (the
machine is offline; each notebook's first cells say what stands in for what). Every line runs as typed: a line
that fails is a bug in exp, fixed in the library, never worked around in the tutorial.

The selected tutorials run once, in parallel, in real Jupyter kernels (run_notebook.run_in_kernels: a kernel per
notebook, cwd the notebook's folder, as Jupyter runs them). Each notebook writes only under its own temporary folder.
`pytest tests/test_tutorials.py -k pets` runs one.
"""
import time

import pytest

from conftest import ROOT

TUTORIALS = sorted((ROOT / 'tests' / 'tutorials').glob('*.ipynb'))


@pytest.fixture(scope='session')
def tutorial_results(request):
    "Run every selected tutorial once (in parallel, Jupyter kernels); their results by path."
    import run_notebook
    from notebook2script import find_root, read_settings
    cfg = read_settings(find_root(ROOT))
    selected = [item.callspec.params['nb'] for item in request.session.items
                if getattr(item, 'originalname', None) == 'test_tutorial']
    t0 = time.time()
    res = run_notebook.run_in_kernels(selected, cfg, request.config.getoption('--nb-workers'),
                                      slow=request.config.getoption('--slow'))
    summaries = getattr(request.config, '_exp_nb_summaries', None)     # printed at the end by conftest.py
    if summaries is None: request.config._exp_nb_summaries = summaries = {}
    summaries['tutorials, jupyter engine'] = run_notebook.summarize(res, time.time() - t0)
    return dict(zip(selected, res))


@pytest.mark.parametrize('nb', TUTORIALS, ids=[f'tutorials/{p.name}' for p in TUTORIALS])
@pytest.mark.parametrize('engine', ['jupyter'])          # so that `--nb-engines fork` leaves these out
def test_tutorial(engine, nb, tutorial_results):
    r = tutorial_results[nb]
    if r.status == 'skipped': pytest.skip(f'{r.path}: {r.report}')
    if r.status == 'failed': pytest.fail(r.report, pytrace=False)
    assert r.passed
