"""The precision a Learner runs in by default (exp.callbacks: native_bf16, defaults.precision, DefaultPrecision).

What decides it depends on the process's environment (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, EXP_PRECISION are read
when torch starts or when exp.callbacks is imported), so those cases run in a fresh interpreter each. No timings here:
bench/efficiency.py measures what bf16 buys.
"""
import json, os, subprocess, sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exp.core import defaults
from exp.callback_core import Callback
from exp.callbacks import DefaultPrecision, MixedPrecision, auto_precision, cpu_flags, native_bf16
from exp.learner import Learner
from exp.minibatch import DataLoaders, TensorLoader

PROBE = """
import json, torch
from torch import nn
from exp.core import defaults
from exp.callback_core import Callback
from exp.callbacks import native_bf16, auto_precision
from exp.learner import Learner
from exp.minibatch import DataLoaders, TensorLoader
x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 2, (32,))
dls = DataLoaders(TensorLoader(x, y, bs=16), TensorLoader(x, y, bs=16))
conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
learn = Learner(dls, conv, loss_func=nn.CrossEntropyLoss(), device='cpu')
try: precision = learn.precision
except ValueError as e: precision = 'error: ' + str(e)
print(json.dumps({'native': native_bf16('cpu'), 'capability': torch.backends.cpu.get_cpu_capability(),
                  'setting': defaults.precision, 'precision': precision}))
"""


def probe(**env):
    "Run PROBE in a fresh interpreter with `env` added; its JSON answer."
    full = {k: v for k, v in os.environ.items() if k not in ('ATEN_CPU_CAPABILITY', 'ONEDNN_MAX_CPU_ISA', 'EXP_PRECISION')}
    r = subprocess.run([sys.executable, '-c', PROBE], env={**full, **env}, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


HAS_BF16_UNITS = bool({'amx_bf16', 'avx512_bf16'} & cpu_flags())


def test_plain_kernels_mean_fp32():
    "ATEN_CPU_CAPABILITY=default (the test suite's Jupyter pass): no native bf16, so 'auto' trains in fp32."
    res = probe(ATEN_CPU_CAPABILITY='default', EXP_PRECISION='auto')
    assert res['capability'] == 'DEFAULT'
    assert res['native'] is False
    assert res['precision'] == 'fp32'


def test_onednn_below_bf16_means_fp32():
    res = probe(ONEDNN_MAX_CPU_ISA='AVX2', EXP_PRECISION='auto')
    assert res['native'] is False and res['precision'] == 'fp32'


def test_auto_follows_the_hardware():
    res = probe(EXP_PRECISION='auto')
    assert res['native'] == (HAS_BF16_UNITS and res['capability'] not in ('DEFAULT', 'NO AVX'))
    assert res['precision'] == ('bf16' if res['native'] else 'fp32')


def test_env_setting_and_bad_value():
    assert probe(EXP_PRECISION='bf16')['precision'] == 'bf16'            # asked for: whatever the CPU
    assert probe(EXP_PRECISION='fp32')['precision'] == 'fp32'
    res = probe(EXP_PRECISION='half')
    assert res['precision'].startswith('error: ') and "'half'" in res['precision'], res


@pytest.fixture
def precision_setting():
    "Restore defaults.precision after the test."
    old = defaults.precision
    yield
    defaults.precision = old


def small_learner(model=None, seed=0, **kwargs):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(96, 1, 8, 8, generator=g), torch.randint(0, 2, (96,), generator=g)
    dls = DataLoaders(TensorLoader(x[:64], y[:64], bs=16, shuffle=True), TensorLoader(x[64:], y[64:], bs=16))
    model = model or nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                   nn.Linear(4, 2))
    return Learner(dls, model, loss_func=F.cross_entropy, device='cpu', **kwargs)


def test_fp32_default_is_exactly_no_callback(precision_setting):
    "With 'fp32' the default callback changes nothing: the same weights, bit for bit, as a learner without it."
    defaults.precision = 'fp32'
    a, b = small_learner(), small_learner().to_fp32()
    assert any(isinstance(cb, DefaultPrecision) for cb in a.cbs) and not any(isinstance(cb, MixedPrecision) for cb in b.cbs)
    torch.manual_seed(5)
    with a.no_logging(): a.fit(2, lr=1e-2)
    torch.manual_seed(5)
    with b.no_logging(): b.fit(2, lr=1e-2)
    for p, q in zip(a.model.parameters(), b.model.parameters()): assert torch.equal(p, q)
    assert a.precision == b.precision == 'fp32' and a.default_precision.ran == 'fp32'


def test_bf16_setting_runs_bf16_and_keeps_fp32_weights(precision_setting):
    defaults.precision = 'bf16'
    seen = []
    class Seen(Callback):
        def after_pred(self, learn): seen.append(learn.pred.dtype)
    learn = small_learner(cbs=Seen())
    assert learn.precision == 'bf16'
    preds, _ = learn.get_preds()                   # before any fit: the callback decides per call
    assert preds.dtype == torch.float32 and seen[-1] == torch.bfloat16
    with learn.no_logging(): learn.fit(1)
    assert learn.default_precision.ran == 'bf16' and learn.scaler is None
    assert next(learn.model.parameters()).dtype == torch.float32
    learn.to_fp32()                                # the opt-out
    assert learn.precision == 'fp32' and not any(isinstance(cb, MixedPrecision) for cb in learn.cbs)


def test_auto_rule(precision_setting):
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten())
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    assert auto_precision(conv, 'cpu') == ('bf16' if native_bf16('cpu') else 'fp32')
    assert auto_precision(mlp, 'cpu') == 'fp32'                  # measured slower in bf16 (bench/RESULTS.md)
    assert auto_precision(conv, 'meta') == 'fp32'
    defaults.precision = 'auto'
    assert small_learner(model=mlp).precision == 'fp32'
    assert small_learner().precision == auto_precision(conv, 'cpu')
    learn = small_learner().to_bf16()              # an explicit choice replaces the default callback
    assert [type(cb) for cb in learn.cbs if isinstance(cb, MixedPrecision)] == [MixedPrecision]
    assert learn.precision == 'bf16'


def test_a_callback_replacing_a_step_still_does(precision_setting):
    "The default callback comes first in order, so a step another callback replaces stays replaced (as without it)."
    defaults.precision = 'bf16'
    calls = []
    class MyPred(Callback):
        def get_pred(self, learn): calls.append(1); learn.pred = learn.model(*learn.xb)
    learn = small_learner(cbs=MyPred())
    with learn.no_logging(): learn.fit(1)
    assert len(calls) == len(learn.dls.train) + len(learn.dls.valid)


def test_auto_says_what_it_chose(precision_setting, capsys):
    "With 'auto' the first fit of a learner prints which precision it picked and why (once); other settings print nothing."
    defaults.precision = 'auto'
    learn = small_learner()
    with learn.no_bar():
        learn.fit(1); learn.fit(1)
    said = [l for l in capsys.readouterr().out.splitlines() if l.startswith("defaults.precision = 'auto'")]
    assert len(said) == 1 and f'training in {learn.precision}' in said[0], said
    defaults.precision = 'fp32'
    with learn.no_bar(): learn.fit(1)
    assert "defaults.precision" not in capsys.readouterr().out


WITHOUT_CALLBACKS = """
import json, warnings, torch
from torch import nn
from exp.learner import Learner
from exp.minibatch import DataLoaders, TensorLoader
{extra}
x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
learn = Learner(DataLoaders(TensorLoader(x, y, bs=16)), nn.Linear(4, 2), loss_func=nn.CrossEntropyLoss(), device='cpu')
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter('always')
    with learn.no_logging(), learn.no_bar(): learn.fit(1)
print(json.dumps([str(m.message) for m in w]))
"""


@pytest.mark.parametrize('extra, warned', [('', True), ('import exp.callbacks', False)])
def test_a_precision_setting_nothing_applies_is_said(extra, warned):
    "EXP_PRECISION=bf16 with only exp.learner imported: the fit warns that it runs in fp32; with exp.callbacks, it does not."
    env = {**os.environ, 'EXP_PRECISION': 'bf16', 'PYTHONPATH': str(ROOT)}
    r = subprocess.run([sys.executable, '-c', WITHOUT_CALLBACKS.format(extra=extra)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    said = [m for m in json.loads(r.stdout.strip().splitlines()[-1]) if 'defaults.precision' in m]
    assert bool(said) == warned, r.stdout
    if warned: assert "'bf16'" in said[0] and 'import exp.callbacks' in said[0]
