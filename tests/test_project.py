"""The repository itself: exp/ matches the notebooks, every module imports alone, settings stay in sync."""
import ast, configparser, json, os, re, subprocess, sys, tomllib

import pytest

from conftest import ROOT

PY = sys.executable
MODULES = sorted(p.relative_to(ROOT).with_suffix('').as_posix().replace('/', '.')
                 for p in (ROOT / 'exp').rglob('*.py') if p.name != '__init__.py' and '__pycache__' not in p.parts)


def settings():
    cp = configparser.ConfigParser(); cp.read(ROOT / 'settings.ini')
    return cp['DEFAULT']


def test_exp_is_up_to_date_with_the_notebooks():
    r = subprocess.run([PY, 'notebook2script.py', '--check'], cwd=ROOT, capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != 'EXP_IN_TEST'})
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize('mod', MODULES)
def test_module_imports_alone_without_gpu_side_effects(mod):
    "A fresh interpreter, no GPU visible: import, resolve every name in __all__, touch no CUDA."
    code = (f'import importlib, torch; m = importlib.import_module({mod!r}); '
            'missing = [n for n in m.__all__ if not hasattr(m, n)]; '
            'assert not missing, f"__all__ names not defined: {missing}"; '
            'assert not torch.cuda.is_initialized(), "CUDA initialised at import"')
    env = {**os.environ, 'CUDA_VISIBLE_DEVICES': ''}
    r = subprocess.run([PY, '-c', code], cwd='/', capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]


def exp_imports(path):
    "(module-level exp modules imported, [(line, module) imported inside a function or class body]) of one module file."
    tree = ast.parse(path.read_text())
    def names(node):
        if isinstance(node, ast.ImportFrom) and node.module and (node.module == 'exp' or node.module.startswith('exp.')):
            return [node.module] if node.module != 'exp' else [f'exp.{a.name}' for a in node.names]
        if isinstance(node, ast.Import): return [a.name for a in node.names if a.name.startswith('exp.')]
        return []
    top = {n for node in tree.body for n in names(node)}
    nested = [(node.lineno, n) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
              for node in ast.walk(fn) for n in names(node)]
    return top, nested


def module_graph():
    return {m: {i for i in exp_imports(ROOT / (m.replace('.', '/') + '.py'))[0] if i in MODULES} for m in MODULES}


def test_module_graph_has_no_cycle():
    "Layers, low to high: each module imports only modules below it, so the graph of top-level imports is acyclic."
    graph, state, cycles = module_graph(), {}, []
    def visit(m, stack):
        state[m] = 'open'
        for d in sorted(graph[m]):
            if state.get(d) == 'open': cycles.append(' -> '.join(stack[stack.index(d):] + [d]) if d in stack else f'{m} -> {d}')
            elif d not in state: visit(d, stack + [d])
        state[m] = 'done'
    for m in MODULES:
        if m not in state: visit(m, [m])
    assert not cycles, 'import cycles among exp modules:\n' + '\n'.join(cycles)
    # and the layering the library is built on: nothing below the Learner knows about it or about vision
    low = ['exp.core', 'exp.test', 'exp.torch_core', 'exp.callback_core', 'exp.metrics', 'exp.minibatch', 'exp.data']
    def reach(m, seen=None):
        seen = set() if seen is None else seen
        for d in graph[m]:
            if d not in seen: seen.add(d); reach(d, seen)
        return seen
    for m in low:
        assert not reach(m) & {'exp.learner', 'exp.vision', 'exp.datablock'}, f'{m} depends on {reach(m)}'
    assert not reach('exp.datablock') & {'exp.learner', 'exp.vision'}, reach('exp.datablock')


def test_no_exp_import_inside_a_function():
    "No import of an exp module inside a function (the way to dodge a cycle); the command line alone defers its imports, for start-up time."
    bad = [f'{p.relative_to(ROOT)}:{line}: {mod}' for p in sorted((ROOT / 'exp').rglob('*.py')) if p.name != '__main__.py'
           for line, mod in exp_imports(p)[1]]
    assert not bad, 'imports inside functions:\n' + '\n'.join(bad)


def test_learner_methods_do_not_depend_on_import_order():
    "In a fresh interpreter `from exp.all import *` gives the Learner every method later modules add, whatever is imported first."
    methods = ['fit', 'fit_one_cycle', 'fit_flat_cos', 'lr_find', 'save', 'load', 'to_fp16', 'to_bf16', 'fine_tune',
               'freeze', 'unfreeze', 'summary', 'predict', 'get_preds', 'tta', 'show_results', 'export', 'distrib_ctx',
               'show_training_loop']
    code = ('import exp.learner, exp.all\nmissing = [m for m in %r if not callable(getattr(exp.learner.Learner, m, None))]\n'
            'assert not missing, missing\nassert exp.learner.Learner.resume_cb is exp.all.Resume\n'
            'assert exp.all.StopOnInterrupt in exp.all.defaults.callbacks' % methods)
    r = subprocess.run([PY, '-c', code], cwd='/', capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


TRAIN_A_PLAIN_LEARNER = """
import sys, torch
from torch import nn
torch.set_num_threads(1)
if sys.argv[1] == 'all': import exp.all
from exp.learner import Learner
from exp.minibatch import fashion_mnist_dls
torch.manual_seed(0)
dls = fashion_mnist_dls(bs=64, n_train=512)
model = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), lr=1e-2, wd=0.1)
with learn.no_logging(): learn.fit(1)
torch.save(model.state_dict(), sys.argv[2])
"""


def test_a_plain_learner_trains_the_same_whatever_was_imported(tmp_path):
    """The same Learner, seed and data in two fresh interpreters, one having imported exp.all first: the same weights, exactly.

    (A default callback registered by a module's import once made this differ: the test suite's one-process runs trained
    differently from the same script in a subprocess.)"""
    out = {}
    for which in ('learner', 'all'):
        out[which] = tmp_path / f'{which}.pth'
        r = subprocess.run([PY, '-c', TRAIN_A_PLAIN_LEARNER, which, str(out[which])], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, 'PYTHONPATH': str(ROOT)})
        assert r.returncode == 0, r.stderr[-2000:]
    import torch
    a, b = (torch.load(out[k], weights_only=True) for k in ('learner', 'all'))
    assert a.keys() == b.keys()
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert not changed, f'weights differ after importing exp.all: {changed}'


def test_public_names_have_docstrings():
    "Every public function and class exported has at least a one-line docstring (the docs need it)."
    missing = []
    for p in sorted((ROOT / 'exp').rglob('*.py')):
        tree = ast.parse(p.read_text())
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith('_'):
                if not ast.get_docstring(node): missing.append(f'{p.relative_to(ROOT)}:{node.lineno} {node.name}')
    assert not missing, 'public names without a docstring:\n' + '\n'.join(missing)


def test_pyproject_mirrors_settings():
    s = settings()
    pp = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']
    assert pp['name'] == s['lib_name'] and pp['description'] == s['description']
    assert pp['dependencies'] == s['requirements'].split()
    assert pp['optional-dependencies']['dev'] == s['dev_requirements'].split()
    assert pp['requires-python'] == '>=' + s['min_python']
    import exp
    assert exp.__version__ == s['version']


def test_constraints_pin_every_requirement_as_settings_do():
    "constraints.txt (what ./dev setup installs with) pins every requirement, and agrees with settings.ini's own pins."
    lock = {}
    for line in (ROOT / 'constraints.txt').read_text().splitlines():
        if line and not line.startswith('#'):
            name, version = line.split('==')
            lock[re.sub(r'[-_.]+', '-', name).lower()] = version
    for req in settings()['requirements'].split() + settings()['dev_requirements'].split():
        name, _, pin = req.partition('==')
        key = re.sub(r'[-_.]+', '-', name).lower()
        assert key in lock, f'{name} is not in constraints.txt (run ./dev lock)'
        if pin: assert lock[key] == pin, f'{name}: settings.ini pins {pin}, constraints.txt {lock[key]}'
    import torch
    assert torch.__version__.split('+')[0] == lock['torch'], 'the installed torch is not the locked one (run ./dev setup)'


def test_torch_pair_is_pinned_together():
    "torchvision wheels are built against one torch: the pins must move together."
    reqs = dict(r.split('==') for r in settings()['requirements'].split() if '==' in r)
    tv_minor = int(reqs['torchvision'].split('.')[1])
    assert reqs['torch'].startswith(f'2.{tv_minor - 15}.'), reqs      # torchvision 0.N pairs with torch 2.(N-15)


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / 'README.md').read_text()
    blocks = re.findall(r'```(?:bash|sh)?\n(.*?)```', readme, re.S)
    first = [l.split('#')[0].strip() for l in blocks[0].splitlines() if l.strip() and not l.startswith('#')]
    assert first[:2] == ['./dev main', './dev test'], first
    assert './dev test' in (ROOT / '.ci/run').read_text()


def test_notebooks_are_clean():
    "Saved notebooks carry no volatile metadata and no error outputs."
    for p in sorted((ROOT / 'nbs').glob('*.ipynb')):
        nb = json.loads(p.read_text())
        assert set(nb['metadata']) <= {'kernelspec', 'language_info', 'exp'}, f'{p.name}: {set(nb["metadata"])}'
        for i, c in enumerate(nb['cells'], 1):
            assert 'execution' not in c.get('metadata', {}), f'{p.name}: cell {i}: timing metadata'
            assert not any(o.get('output_type') == 'error' for o in c.get('outputs', [])), f'{p.name}: cell {i}: error output'
