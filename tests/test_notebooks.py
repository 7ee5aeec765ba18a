"Every notebook in nbs/ is a test: executing it top to bottom must pass."
import pytest

from conftest import ROOT

NOTEBOOKS = sorted(p for p in (ROOT / 'nbs').glob('*.ipynb') if not p.name.startswith(('.', '_')))


@pytest.mark.parametrize('nb', NOTEBOOKS, ids=[f'nbs/{p.name}' for p in NOTEBOOKS])
def test_notebook(nb, notebook_results):
    r = notebook_results[nb]
    if r.status == 'skipped': pytest.skip(f'{r.path}: {r.report}')
    if r.status == 'failed': pytest.fail(r.report, pytrace=False)
    assert r.passed
