"""Every notebook in nbs/ is a test: executing it top to bottom must pass, under both engines.

`fork` is run_notebook.py's engine on the machine's best CPU kernels; `jupyter` a real ipykernel with torch's
plain kernels (`ATEN_CPU_CAPABILITY=default`): see conftest.py. The test does not look at which engine ran.
"""
import pytest

from conftest import ENGINES, ROOT

NOTEBOOKS = sorted(p for p in (ROOT / 'nbs').glob('*.ipynb') if not p.name.startswith(('.', '_')))


@pytest.mark.parametrize('nb', NOTEBOOKS, ids=[f'nbs/{p.name}' for p in NOTEBOOKS])
@pytest.mark.parametrize('engine', list(ENGINES))
def test_notebook(engine, nb, notebook_results):
    r = notebook_results(engine)[nb]
    if r.status == 'skipped': pytest.skip(f'{r.path}: {r.report}')
    if r.status == 'failed': pytest.fail(r.report, pytrace=False)
    assert r.passed
