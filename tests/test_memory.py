"""exp.callbacks.KeepFreedMemory: a CPU fit keeps freed memory for the next batch instead of page-faulting it back in.

Each case runs in a fresh interpreter: glibc's malloc settings are per process and cannot be taken back.
"""
import json, os, platform, subprocess, sys

import pytest

from conftest import ROOT

GLIBC = platform.libc_ver()[0] == 'glibc'

FIT = r"""
import json, resource, torch, torch.nn as nn, torch.nn.functional as F
import exp.callbacks                                 # registers the default callbacks
from exp.callback_core import Callback
from exp.learner import Learner
from exp.minibatch import DataLoaders, TensorLoader
torch.manual_seed(0); torch.set_num_threads(1)
x, y = torch.randn(256 * 24, 1, 28, 28), torch.randint(0, 10, (256 * 24,))
model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                      nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
class Faults(Callback):
    "Minor page faults per training batch, from the 7th on (the first ones allocate for the first time)."
    def before_fit(self, learn): self.n, self.f0 = 0, None
    def after_batch(self, learn):
        if not learn.training: return                # validation allocates differently: not counted
        self.n += 1
        if self.n == 6: self.f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        if self.n > 6: self.per_batch = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self.f0) / (self.n - 6)
dls = DataLoaders(TensorLoader(x, y, bs=256), TensorLoader(x[:256], y[:256], bs=256))
f = Faults()
learn = Learner(dls, model, loss_func=F.cross_entropy, lr=0.05, cbs=f, device='cpu')
with learn.no_logging(), learn.no_bar(): learn.fit(1)
print(json.dumps({'faults': f.per_batch, 'weight': model[0].weight.flatten()[:8].tolist()}))
"""


def fit(keep):
    env = {**os.environ, 'EXP_KEEP_FREED_MEMORY': keep, 'PYTHONPATH': str(ROOT)}
    r = subprocess.run([sys.executable, '-c', FIT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason='mallopt is glibc\'s: elsewhere keep_freed_memory does nothing')
def test_a_cpu_fit_stops_page_faulting_its_activations_and_computes_the_same():
    off, on = fit('0'), fit('1')
    assert off['faults'] > 100, off                  # glibc's defaults: the activations are mapped anew every batch
    assert on['faults'] < off['faults'] / 10, (off, on)
    assert on['weight'] == off['weight']             # where the memory comes from changes no number
