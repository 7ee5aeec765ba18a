#!/usr/bin/env python
"""Training-loop benchmark: exp's Learner against a hand-written PyTorch loop, fastai and PyTorch Lightning.

Every framework trains the same model on in-memory Fashion-MNIST (60k train, 10k valid) for one epoch
of one-cycle AdamW (lr 1e-2, batch 128), with training and validation, a progress bar (written to a
sink, so the bars are drawn but do not flood the output) and validation accuracy. Runs are interleaved
(exp, hand, fastai, lightning, exp, hand, ...) so load from other processes hits all of them alike; the
table gives the minimum and the median seconds per epoch over the repeats, and exp / best peer.

Two models: the fastai v1 MNIST tutorial's conv stack (`seed`, small: the loop's overhead matters)
and a small ResNet (`resnet`, compute-bound). Two input pipelines (`--loaders`):
  own   each framework's usual one: exp's `TensorLoader` (slices whole batches out of the tensors);
        for the peers a torch `DataLoader` over a `TensorDataset` (collates items one by one), as
        their tutorials do;
  same  every framework gets the same `TensorLoader` batches: the loops alone are compared.

Setup, once. The peers live in their own venv, .bench-venv, never in the project's .venv; it reuses
the project's torch (a .pth file adds .venv's site-packages), so pip downloads no second torch:
    .venv/bin/python bench/loop.py --setup
which runs
    python3 -m venv .bench-venv
    echo "import site; site.addsitedir('<.venv's site-packages>')" > .bench-venv/lib/python3.X/site-packages/_exp_venv.pth
    .bench-venv/bin/pip install -r bench/requirements-loop.txt

Run:
    .bench-venv/bin/python bench/loop.py                          # both models, both pipelines, 3 repeats
    .bench-venv/bin/python bench/loop.py --models seed --loaders same --repeats 5
    .bench-venv/bin/python bench/loop.py --models resnet --loaders own --bf16   # + exp with bf16 autocast
Under the project's .venv (no peers installed) only exp and the hand loop run.
"""
from __future__ import annotations

import argparse, contextlib, gc, io, logging, os, statistics, subprocess, sys, time, warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def setup():
    "Create .bench-venv seeing the project's .venv, and install the peers into it."
    venv = ROOT / '.bench-venv'
    site_pkgs = subprocess.check_output([str(ROOT / '.venv/bin/python'), '-c',
                                         'import site; print(site.getsitepackages()[0])'], text=True).strip()
    subprocess.check_call([sys.executable if 'bench-venv' not in sys.executable else 'python3', '-m', 'venv', str(venv)])
    own = subprocess.check_output([str(venv / 'bin/python'), '-c', 'import site; print(site.getsitepackages()[0])'],
                                  text=True).strip()
    Path(own, '_exp_venv.pth').write_text(f"import site; site.addsitedir({site_pkgs!r})\n")
    subprocess.check_call([str(venv / 'bin/pip'), 'install', '-r', str(ROOT / 'bench/requirements-loop.txt')])
    print(f'ready: {venv}/bin/python bench/loop.py')


import torch
import torch.nn.functional as F
from torch import nn

LR, BS = 1e-2, 128


# ------------------------------------------------------------------ models and data
def seed_model():
    "The fastai v1 MNIST tutorial's conv stack (exp.convolutions.mnist_convnet)."
    from exp.convolutions import mnist_convnet
    return mnist_convnet()


class ResBlock(nn.Module):
    def __init__(self, ni, nf, stride):
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(ni, nf, 3, stride, 1, bias=False), nn.BatchNorm2d(nf), nn.ReLU(),
                                   nn.Conv2d(nf, nf, 3, 1, 1, bias=False), nn.BatchNorm2d(nf))
        self.idconv = nn.Sequential(nn.Conv2d(ni, nf, 1, stride, bias=False), nn.BatchNorm2d(nf))
    def forward(self, x): return F.relu(self.convs(x) + self.idconv(x))


def resnet_model():
    "A small ResNet for 28x28 images: a stem and three stride-2 residual blocks (8-16-32-64 channels)."
    return nn.Sequential(nn.Conv2d(1, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         ResBlock(8, 16, 2), ResBlock(16, 32, 2), ResBlock(32, 64, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


MODELS = {'seed': seed_model, 'resnet': resnet_model}


def load_tensors(n_train=None):
    from exp.data import load_fashion_mnist
    xt, yt, xv, yv = load_fashion_mnist()
    if n_train: xt, yt = xt[:n_train], yt[:n_train]
    xt = xt.float().div_(255).unsqueeze(1)
    mean, std = xt.mean(), xt.std()
    return (xt - mean) / std, yt, (xv.float().div_(255).unsqueeze(1) - mean) / std, yv


def make_loaders(kind, data, device):
    "(train, valid) loaders: exp's TensorLoader, or torch DataLoaders over TensorDatasets."
    from exp.minibatch import TensorLoader
    xt, yt, xv, yv = data
    if kind == 'tensor':
        if device.type != 'cpu': xt, yt, xv, yv = (t.to(device) for t in data)
        return TensorLoader(xt, yt, bs=BS, shuffle=True), TensorLoader(xv, yv, bs=2 * BS)
    from torch.utils.data import DataLoader, TensorDataset
    pin = device.type == 'cuda'
    return (DataLoader(TensorDataset(xt, yt), batch_size=BS, shuffle=True, pin_memory=pin),
            DataLoader(TensorDataset(xv, yv), batch_size=2 * BS, pin_memory=pin))


def _sync(device):
    if device.type == 'cuda': torch.cuda.synchronize()


# ------------------------------------------------------------------ the contenders: each returns (seconds, accuracy)
def run_exp(model, train_dl, valid_dl, device, bf16=False):
    import exp.schedules                              # Learner.fit_one_cycle
    from exp.learner import Learner
    from exp.minibatch import DataLoaders, accuracy
    cbs = []
    if bf16:
        from exp.callbacks import MixedPrecision
        cbs.append(MixedPrecision(dtype=torch.bfloat16))
    learn = Learner(DataLoaders(train_dl, valid_dl), model, loss_func=F.cross_entropy, metrics=accuracy, cbs=cbs,
                    device=device)
    try:
        import fastprogress                      # noqa: F401
        learn.progress.mode = 'tty'              # draw the bars although stdout is not a terminal here
    except ImportError: pass                     # (a machine without fastprogress: one line per epoch)
    _sync(device); t0 = time.perf_counter()
    learn.fit_one_cycle(1, LR)
    _sync(device)
    return time.perf_counter() - t0, learn.recorder.values[-1][-1]


def run_hand(model, train_dl, valid_dl, device):
    "The loop people write: torch AdamW and OneCycleLR, a tqdm bar, the running loss read every batch."
    from tqdm import tqdm
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.99), eps=1e-5, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=len(train_dl), pct_start=0.25)
    _sync(device); t0 = time.perf_counter()
    model.train()
    total, n = 0., 0
    for xb, yb in (bar := tqdm(train_dl, leave=False)):
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(); loss.backward(); opt.step(); sched.step()
        total += loss.item() * len(yb); n += len(yb)
        bar.set_postfix(loss=total / n, refresh=False)
    model.eval()
    vloss, correct, nv = 0., 0, 0
    with torch.no_grad():
        for xb, yb in valid_dl:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            out = model(xb)
            vloss += F.cross_entropy(out, yb, reduction='sum').item()
            correct += (out.argmax(1) == yb).sum().item(); nv += len(yb)
    print(f'0 {total / n:.6f} {vloss / nv:.6f} {correct / nv:.6f}')
    _sync(device)
    return time.perf_counter() - t0, correct / nv


def run_fastai(model, train_dl, valid_dl, device):
    "fastai's Learner on the given loaders, as its 'migrating from PyTorch' tutorial does; fastai's own Adam."
    import fastai.callback.schedule                      # noqa: F401  (adds Learner.fit_one_cycle)
    from fastai.basics import DataLoaders as FDataLoaders, Learner as FLearner, accuracy as faccuracy
    dls = FDataLoaders(train_dl, valid_dl, device=device) if device.type != 'cpu' else FDataLoaders(train_dl, valid_dl)
    learn = FLearner(dls, model.to(device), loss_func=F.cross_entropy, metrics=faccuracy)
    _sync(device); t0 = time.perf_counter()
    learn.fit_one_cycle(1, LR)
    _sync(device)
    return time.perf_counter() - t0, float(learn.recorder.values[-1][-1])


def run_lightning(model, train_dl, valid_dl, device):
    "A LightningModule with AdamW + OneCycleLR per step, loss and accuracy logged to the progress bar."
    import lightning as L
    class Lit(L.LightningModule):
        def __init__(self, model, total_steps):
            super().__init__()
            self.model, self.total_steps = model, total_steps
        def training_step(self, batch, i):
            x, y = batch
            loss = F.cross_entropy(self.model(x), y)
            self.log('train_loss', loss, prog_bar=True)
            return loss
        def validation_step(self, batch, i):
            x, y = batch
            out = self.model(x)
            self.log('val_loss', F.cross_entropy(out, y), prog_bar=True)
            self.log('val_acc', (out.argmax(1) == y).float().mean(), prog_bar=True)
        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=LR, betas=(0.9, 0.99), eps=1e-5, weight_decay=0.01)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=self.total_steps, pct_start=0.25)
            return {'optimizer': opt, 'lr_scheduler': {'scheduler': sched, 'interval': 'step'}}
    lit = Lit(model, len(train_dl))
    trainer = L.Trainer(max_epochs=1, accelerator='gpu' if device.type == 'cuda' else 'cpu', devices=1, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                        enable_progress_bar=True)
    _sync(device); t0 = time.perf_counter()
    trainer.fit(lit, train_dl, valid_dl)
    _sync(device)
    return time.perf_counter() - t0, float(trainer.callback_metrics['val_acc'])


RUNNERS = {'exp': run_exp, 'hand': run_hand, 'fastai': run_fastai, 'lightning': run_lightning}


def available(name):
    mod = {'fastai': 'fastai', 'lightning': 'lightning', 'hand': 'tqdm'}.get(name)
    if mod is None: return True
    try: __import__(mod)
    except ImportError: return False
    return True


# ------------------------------------------------------------------ driver
def one_run(name, model_name, loader, data, device, bf16=False):
    torch.manual_seed(0)
    model = MODELS[model_name]().to(device)
    own = loader == 'own'
    train_dl, valid_dl = make_loaders('tensor' if (name == 'exp' or not own) else 'torch', data, device)
    gc.collect()
    sink = open(os.devnull, 'w')
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        secs, acc = RUNNERS[name](model, train_dl, valid_dl, device, **({'bf16': True} if bf16 else {}))
    sink.close()
    return secs, acc


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--setup', action='store_true', help='create .bench-venv with the peers, then exit')
    ap.add_argument('--models', default='seed,resnet')
    ap.add_argument('--loaders', default='own,same')
    ap.add_argument('--frameworks', default='exp,hand,fastai,lightning')
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--threads', type=int, default=None, help='torch threads (default: torch\'s, all cores)')
    ap.add_argument('--bf16', action='store_true', help='also time exp with bf16 autocast (MixedPrecision)')
    ap.add_argument('--n-train', type=int, default=None, help='train on the first N images (default all 60k)')
    args = ap.parse_args(argv)
    if args.setup: return setup()
    for name in ('lightning', 'lightning.pytorch', 'lightning.pytorch.utilities.rank_zero', 'lightning.fabric',
                 'pytorch_lightning', 'fastai'):
        logging.getLogger(name).setLevel(logging.ERROR)
    if args.threads: torch.set_num_threads(args.threads)
    from exp.torch_core import default_device
    device = default_device()
    frameworks = [f for f in args.frameworks.split(',') if available(f)]
    missing = [f for f in args.frameworks.split(',') if f not in frameworks]
    data = load_tensors(args.n_train)
    print(f'device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, '
          f'{len(data[0])} train images; load average before: {os.getloadavg()[0]:.2f}'
          + (f'; not installed here: {", ".join(missing)}' if missing else ''), flush=True)
    results = {}
    for model_name in args.models.split(','):
        for loader in args.loaders.split(','):
            jobs = [(f, False) for f in frameworks] + ([('exp', True)] if args.bf16 else [])
            for r in range(args.repeats):
                for f, bf16 in jobs:
                    secs, acc = one_run(f, model_name, loader, data, device, bf16)
                    key = (model_name, loader, f + (' bf16' if bf16 else ''))
                    results.setdefault(key, []).append((secs, acc))
                    print(f'  {model_name:6s} {loader:4s} {key[2]:10s} run {r + 1}: {secs:6.2f} s  acc {acc:.4f}', flush=True)
    print(f'\nload average after: {os.getloadavg()[0]:.2f}\n')
    print(f'{"model":7s} {"loader":6s} {"framework":10s} {"min s":>7s} {"median":>7s} {"acc":>7s}  exp/this')
    for model_name in args.models.split(','):
        for loader in args.loaders.split(','):
            rows = {k[2]: v for k, v in results.items() if k[:2] == (model_name, loader)}
            exp_min = min(s for s, _ in rows['exp']) if 'exp' in rows else None
            for f, v in rows.items():
                mins = min(s for s, _ in v)
                ratio = f'{exp_min / mins:6.2f}x' if exp_min else ''
                print(f'{model_name:7s} {loader:6s} {f:10s} {mins:7.2f} {statistics.median(s for s, _ in v):7.2f} '
                      f'{statistics.mean(a for _, a in v):7.4f}  {ratio}')
            peers = [min(s for s, _ in v) for f, v in rows.items() if f in ('hand', 'fastai', 'lightning')]
            if exp_min and peers:
                print(f'{model_name:7s} {loader:6s} exp / best peer: {exp_min / min(peers):.2f}')
            if 'exp bf16' in rows and exp_min:
                print(f'{model_name:7s} {loader:6s} bf16 speed-up (exp fp32 / exp bf16): '
                      f'{exp_min / min(s for s, _ in rows["exp bf16"]):.2f}x')
            print()


if __name__ == '__main__':
    sys.exit(main())
