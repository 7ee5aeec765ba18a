#!/usr/bin/env python
"""Training and inference efficiency on this machine: images/s, and the fraction of the machine's own matmul ceiling.

    .venv/bin/python bench/efficiency.py                      # the table (3 models x 28/64 px x 6 configs; ~30 min)
    .venv/bin/python bench/efficiency.py --quick              # tiny sizes, a minute or two: checks that everything runs
    .venv/bin/python bench/efficiency.py --models xresnet_mini --sizes 28 --configs fp32,bf16,bf16+cl
    .venv/bin/python bench/efficiency.py --profile --models convnet,xresnet_mini --sizes 28 --configs fp32,bf16
    .venv/bin/python bench/efficiency.py --bf16-study         # fp32 vs bf16: speed and Fashion-MNIST accuracy
    .venv/bin/python bench/efficiency.py --malloc --models convnet,xresnet_mini --sizes 28 --configs fp32,bf16+cl --bs 256

Models (`--models`): `convnet` (exp.convolutions.mnist_convnet, the quickstart's net; at sizes other than 28 px a
global average pool goes before its final Flatten so that it still gives 10 logits), `xresnet_mini`
(exp.xresnet) and torchvision's `resnet18` (10 classes, its stem conv taking 1 channel). Inputs are random
(N, 1, px, px) float tensors in memory (speed does not depend on the pixel values) served by exp's `TensorLoader`
(shuffled for training: a batch is gathered by index, as in real training).

Configs (`--configs`): `fp32` (`learn.to_fp32()`); `bf16` (autocast: `learn.to_bf16()` /
`torch.autocast('cpu', torch.bfloat16)`); `cl` (channels_last: `learn.to_channelslast()` / the model and each batch
converted by hand); `bf16+cl`; `compile`, `compile+bf16` and `compile+bf16+cl` (`torch.compile(model)` given to the Learner, as
nbs/03b_callbacks.ipynb shows; the first-call (compile) seconds are reported, and a compile that fails or takes
longer than `--compile-timeout` is recorded as such and left out).

For each model, size and config four contenders are timed:
  train exp    `Learner.fit(1)` (fused AdamW, constant lr, Recorder on, no progress bar, no validation) over a TensorLoader
  train hand   the bare loop: forward and loss (autocast if bf16), backward, `torch.optim.AdamW(fused=True).step()`, zero_grad
  infer exp    `learn.get_preds(dl=...)` (no_grad; predictions gathered and softmaxed)
  infer hand   `model.eval()` under `torch.inference_mode()`, the outputs thrown away
All contenders of one model and size are warmed up, then timed in `--rounds` interleaved rounds (the order rotates
each round), so load from other processes hits all of them alike; a contender runs the same number of batches in
every round (calibrated in its warm-up to take about `--seconds`). The table gives the best round's images/s (the
log lines give the median too). The machine's ceiling is timed in the same rounds on the same threads: a square
matmul (`--matmul-n`, default 4096) in fp32 and in bf16 (best over the run). Model FLOPs are counted once per model
and size with `torch.utils.flop_counter.FlopCounterMode` on one batch of the eager fp32 model (forward; plus
backward for training). It counts convolutions and matmuls only (BatchNorm, activations, the optimizer are not
counted), so `% of ceiling` is the useful-work fraction: 100% would be a net made of large matmuls only. fp32
configs are compared with the fp32 ceiling, bf16 ones with the bf16 ceiling.

`--profile` runs `torch.profiler` over `--profile-steps` training steps through exp's Learner (after a warm-up) for
each model, size and config selected, and prints where the CPU time goes: convolutions (forward and backward),
BatchNorm (forward and backward), the optimizer step (and zero_grad), data (the loader's batch gathering), other
(activations, pooling, the loss, autocast's casts, the Learner's own Python), then the top ops by self time.

`--malloc` measures `defaults.keep_freed_memory` (exp.callbacks.KeepFreedMemory, on by default): for each model,
size and config, exp's `Learner.fit(1)` over in-memory batches runs in fresh processes with `EXP_KEEP_FREED_MEMORY=0`
(glibc's malloc as it comes) and `=1`, alternating in `--rounds` rounds (a process each, since the setting cannot be
taken back). Each reports its training images/s, the minor page faults per batch (getrusage) and its peak RSS; the
table gives the best round of each and the ratio.

`--bf16-study` trains the quickstart conv net and xresnet_mini on Fashion-MNIST (`--study-n` training images,
default 20,000; `--study-epochs` of one-cycle AdamW, default 3, lr 1e-2, bs 128; `--study-seeds`, default 0,1) in
fp32 and in bf16 autocast with the same seeds (the same initial weights and the same batch order), and prints the
training seconds and the accuracy on the 10,000 test images, per seed and averaged, with the bf16 speed-up and the
accuracy difference. It refuses to start while the 1-minute load average is >= 1 (`--force` overrides).
"""
from __future__ import annotations

import argparse, contextlib, copy, gc, json, logging, os, platform, signal, statistics, subprocess, sys, time, warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if not (ROOT / 'exp').is_dir(): ROOT = Path.cwd()          # a copy run from elsewhere: the repository is the cwd
sys.path.insert(0, str(ROOT))

import torch
import torch.nn.functional as F
from torch import nn

from exp.callbacks import cpu_flags, native_bf16      # also Learner.to_bf16, to_fp32, to_channelslast
import exp.schedules                                   # noqa: F401  (Learner.fit_one_cycle)
from exp.learner import Learner
from exp.minibatch import DataLoaders, TensorLoader

LR = 1e-3
CONFIGS = ['fp32', 'bf16', 'cl', 'bf16+cl', 'compile', 'compile+bf16', 'compile+bf16+cl']
MODELS = ['convnet', 'xresnet_mini', 'resnet18']


def cpu_description():
    "One line: the CPU model (lscpu's), its bf16-relevant flags, torch's kernel level and whether bf16 is native here."
    name = ''
    try:
        out = subprocess.run(['lscpu'], capture_output=True, text=True, timeout=10).stdout
        name = next((l.split(':', 1)[1].strip() for l in out.splitlines() if l.startswith('Model name')), '')
    except (OSError, subprocess.TimeoutExpired): pass
    have = [f for f in ('avx512f', 'avx512_bf16', 'amx_tile', 'amx_bf16', 'avx512_fp16') if f in cpu_flags()]
    return (f'{name or platform.processor() or platform.machine()}; flags: {" ".join(have) or "no avx512f/avx512_bf16/amx"}; '
            f'torch CPU capability {torch.backends.cpu.get_cpu_capability()}; native_bf16("cpu") = {native_bf16("cpu")}')


# ------------------------------------------------------------------ models and data
def make_model(name, px):
    "A fresh model `name` for (N, 1, px, px) inputs and 10 classes."
    if name == 'convnet':
        from exp.convolutions import mnist_convnet
        m = mnist_convnet()
        if px != 28: m = nn.Sequential(*list(m)[:-1], nn.AdaptiveAvgPool2d(1), nn.Flatten())   # 10 logits at any size
        return m
    if name == 'xresnet_mini':
        from exp.xresnet import xresnet_mini
        return xresnet_mini(c_in=1, n_out=10)
    if name == 'resnet18':
        from torchvision.models import resnet18
        m = resnet18(num_classes=10)
        m.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)          # a 1-channel stem
        return m
    raise ValueError(f'unknown model {name!r}: one of {MODELS}')


def count_flops(model, px, bs):
    "(training FLOPs, inference FLOPs) per image: FlopCounterMode on one batch, forward+backward and forward only."
    from torch.utils.flop_counter import FlopCounterMode
    model = copy.deepcopy(model).train()
    x, y = torch.randn(bs, 1, px, px), torch.randint(0, 10, (bs,))
    with FlopCounterMode(display=False) as fc:
        F.cross_entropy(model(x), y).backward()
    train = fc.get_total_flops()
    model.eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad(): model(x)
    return train / bs, fc.get_total_flops() / bs


@contextlib.contextmanager
def time_limit(seconds):
    "Raise TimeoutError in this (main) thread if the block runs longer than `seconds` (SIGALRM; no limit without it)."
    if not seconds or not hasattr(signal, 'SIGALRM'):
        yield; return
    def boom(*_): raise TimeoutError(f'longer than {seconds:.0f} s')
    old = signal.signal(signal.SIGALRM, boom)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try: yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ------------------------------------------------------------------ contenders
class Setup:
    "One model under one config, shared by its four contenders (one compiled module, one set of weights)."
    def __init__(self, model_name, px, config, bs):
        self.model_name, self.px, self.config, self.bs = model_name, px, config, bs
        self.bf16, self.cl, self.compiled = 'bf16' in config, config == 'cl' or config.endswith('+cl'), config.startswith('compile')
        torch.manual_seed(0)
        self.eager = make_model(model_name, px)
        self.model = torch.compile(self.eager) if self.compiled else self.eager
        self.note, self.warm_s = None, {}


def make_learner(setup, dl):
    "exp's Learner for `setup`: precision set explicitly (whatever the Learner's default), channels_last if asked."
    learn = Learner(DataLoaders(dl), setup.model, loss_func=nn.CrossEntropyLoss(), lr=LR, device='cpu')
    learn.to_bf16() if setup.bf16 else learn.to_fp32()
    if setup.cl: learn.to_channelslast()
    return learn


class Contender:
    "`run(n_batches)` returns seconds; `phase` is 'train' or 'infer', `fw` 'exp' or 'hand'."
    def __init__(self, setup, phase, fw, data):
        self.setup, self.phase, self.fw, self.data = setup, phase, fw, data
        self.times, self.steps = [], None
        self.learn = self.opt = None

    @property
    def key(self): return (self.setup.model_name, self.setup.px, self.phase, self.setup.config, self.fw)

    def loader(self, n_batches):
        x, y = self.data
        n = n_batches * self.setup.bs
        assert n <= len(x), (n, len(x))
        return TensorLoader(x[:n], y[:n], bs=self.setup.bs, shuffle=self.phase == 'train', drop_last=True)

    def run(self, n_batches):
        dl, s = self.loader(n_batches), self.setup
        if self.fw == 'exp':
            if self.learn is None: self.learn = make_learner(s, dl)
            self.learn.dls = DataLoaders(dl)
            with self.learn.no_bar(), self.learn.no_logging():
                t0 = time.perf_counter()
                if self.phase == 'train': self.learn.fit(1)
                else: self.learn.get_preds(dl=dl)
                return time.perf_counter() - t0
        model = s.model
        if s.cl: s.eager.to(memory_format=torch.channels_last)
        if self.phase == 'train':
            if self.opt is None:
                self.opt = torch.optim.AdamW(s.eager.parameters(), lr=LR, betas=(0.9, 0.99), eps=1e-5, weight_decay=0.01,
                                             fused=True)
            model.train()
            t0 = time.perf_counter()
            for xb, yb in dl:
                if s.cl: xb = xb.contiguous(memory_format=torch.channels_last)
                with torch.autocast('cpu', torch.bfloat16, enabled=s.bf16):
                    loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                self.opt.step()
                self.opt.zero_grad()
            return time.perf_counter() - t0
        model.eval()
        t0 = time.perf_counter()
        with torch.inference_mode(), torch.autocast('cpu', torch.bfloat16, enabled=s.bf16):
            for xb, _ in dl:
                if s.cl: xb = xb.contiguous(memory_format=torch.channels_last)
                model(xb)
        return time.perf_counter() - t0


def matmul_gflops(n, dtype, reps=3):
    "GFLOP/s of the fastest of `reps` (n, n) @ (n, n) products in `dtype` (after one untimed)."
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = float('inf')
    for _ in range(reps):
        t0 = time.perf_counter(); torch.mm(a, b); best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


# ------------------------------------------------------------------ the efficiency table
def warm_up(c, args):
    "Warm contender `c` up (compiling if it is compiled) and calibrate its batches per round; None or an error line."
    s = c.setup
    try:
        with warnings.catch_warnings(), time_limit(args.compile_timeout if s.compiled else None):
            warnings.simplefilter('ignore')
            t0 = time.perf_counter()
            c.run(2)                                       # first calls: compiles; allocator, oneDNN primitives
            s.warm_s[c.phase, c.fw] = time.perf_counter() - t0
            per = c.run(args.warm_batches) / args.warm_batches
    except Exception as e:                                 # a compile error or a timeout: recorded, left out
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ''
        if s.compiled: torch._dynamo.reset()
        return f'{s.model_name} {s.px}px {s.config}: {c.phase} {c.fw} warm-up failed: {type(e).__name__}: {msg}'
    c.steps = max(args.min_batches, min(args.max_batches, round(args.seconds / max(per, 1e-6))))


def measure(args):
    results, flops, notes = {}, {}, []
    ceiling = {torch.float32: [], torch.bfloat16: []}
    n = args.matmul_n
    for dt in ceiling: ceiling[dt].append(matmul_gflops(n, dt))
    for px in args.sizes:
        x_all = torch.randn(args.max_batches * args.bs, 1, px, px)
        y_all = torch.randint(0, 10, (len(x_all),))
        for model_name in args.models:
            flops[model_name, px] = count_flops(make_model(model_name, px), px, args.bs)
            contenders = []
            for config in args.configs:
                s = Setup(model_name, px, config, args.bs)
                group = [Contender(s, ph, fw, (x_all, y_all)) for ph in ('train', 'infer') for fw in ('exp', 'hand')]
                for c in group:
                    s.note = warm_up(c, args)
                    if s.note: break
                if s.note:
                    notes.append(s.note); print('  ' + s.note, flush=True); continue
                if s.compiled:
                    notes.append(f'{model_name} {px}px {config}: first two batches (compile included) ' +
                                 ', '.join(f'{ph} {fw} {t:.1f} s' for (ph, fw), t in s.warm_s.items()))
                contenders += group
            print(f'{model_name} {px}px: {len(contenders)} contenders warmed up (load {os.getloadavg()[0]:.2f}); '
                  f'timing {args.rounds} round(s)...', flush=True)
            for r in range(args.rounds):
                k = (r * 3) % max(1, len(contenders))
                for c in contenders[k:] + contenders[:k]:
                    c.times.append(c.steps * args.bs / c.run(c.steps))
                for dt in ceiling: ceiling[dt].append(matmul_gflops(n, dt, reps=1))
            for c in contenders:
                results[c.key] = c.times
                print(f'  {" ".join(map(str, c.key))}: {c.steps} batches/round, images/s best {max(c.times):,.0f} '
                      f'median {statistics.median(c.times):,.0f}', flush=True)
            del contenders; gc.collect()
            if any(c.startswith('compile') for c in args.configs): torch._dynamo.reset()
        del x_all, y_all; gc.collect()
    return results, flops, {dt: max(v) for dt, v in ceiling.items()}, notes


def print_table(args, results, flops, ceiling, notes):
    cf, cb = ceiling[torch.float32], ceiling[torch.bfloat16]
    print(f'\nmatmul ceiling ({args.matmul_n}x{args.matmul_n}, {torch.get_num_threads()} threads, best over the run): '
          f'fp32 {cf:,.0f} GFLOP/s, bf16 {cb:,.0f} GFLOP/s (bf16/fp32 {cb / cf:.1f}x)')
    print(f'batch size {args.bs}; best of {args.rounds} round(s); GFLOP/img: convolutions and matmuls (FlopCounterMode), '
          f'training = forward + backward; "vs fp32": exp\'s images/s over exp fp32\'s\n')
    print('| model | px | phase | config | exp img/s | hand img/s | exp/hand | vs fp32 | GFLOP/img | exp GFLOP/s '
          '| exp % of ceiling | hand % of ceiling |')
    print('|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|')
    for model_name in args.models:
        for px in args.sizes:
            for phase in ('train', 'infer'):
                base = results.get((model_name, px, phase, 'fp32', 'exp'))
                for config in args.configs:
                    e, h = results.get((model_name, px, phase, config, 'exp')), results.get((model_name, px, phase, config, 'hand'))
                    if not e or not h:
                        print(f'| {model_name} | {px} | {phase} | {config} | failed | failed | | | | | | |'); continue
                    e, h = max(e), max(h)
                    fl = flops[model_name, px][0 if phase == 'train' else 1] / 1e9
                    ceil = cb if 'bf16' in config else cf
                    vs = f'{e / max(base):.2f}x' if base else ''
                    print(f'| {model_name} | {px} | {phase} | {config} | {e:,.0f} | {h:,.0f} | {e / h:.2f} | {vs} | {fl:.4f} | '
                          f'{e * fl:,.1f} | {100 * e * fl / ceil:.1f}% | {100 * h * fl / ceil:.1f}% |')
    if notes:
        print('\nnotes:')
        for line in notes: print(f'- {line}')


# ------------------------------------------------------------------ --profile: where a training step's time goes
GROUPS = ['convolutions', 'BatchNorm', 'optimizer step', 'data', 'other']


class LabelledLoader:
    "A loader whose batch fetching shows in the profiler as a range named 'data'."
    def __init__(self, dl): self.dl = dl
    def __len__(self): return len(self.dl)
    def __iter__(self):
        it = iter(self.dl)
        while True:
            with torch.profiler.record_function('data'):
                try: b = next(it)
                except StopIteration: return
            yield b


def classify(ev):
    "The group of a profiler event, from its own name and its ancestors' (outer ranges first: optimizer, data)."
    names, e = [], ev
    while e is not None:
        names.append(e.name); e = e.cpu_parent
    for n in names:
        if n.startswith('Optimizer.'): return 'optimizer step'     # torch's optimizers: Optimizer.step#X.step, zero_grad
        if n == 'data': return 'data'
    for n in names:                          # nearest first: aten::convolution_backward, ConvolutionBackward0, ...
        low = n.lower()
        if 'conv' in low: return 'convolutions'
        if 'batch_norm' in low or 'batchnorm' in low: return 'BatchNorm'
    return 'other'


def profile(args):
    from torch.profiler import ProfilerActivity, profile as tprofile
    for px in args.sizes:
        x_all = torch.randn(args.profile_steps * args.bs, 1, px, px)
        y_all = torch.randint(0, 10, (len(x_all),))
        for model_name in args.models:
            for config in args.configs:
                s = Setup(model_name, px, config, args.bs)
                c = Contender(s, 'train', 'exp', (x_all, y_all))
                args_w = copy.copy(args); args_w.warm_batches = min(5, args.profile_steps)
                if err := warm_up(c, args_w):
                    print(f'\n{err}'); continue
                learn = c.learn
                learn.dls = DataLoaders(LabelledLoader(c.loader(args.profile_steps)))
                with tprofile(activities=[ProfilerActivity.CPU]) as prof:
                    t0 = time.perf_counter()
                    with learn.no_bar(), learn.no_logging(): learn.fit(1)
                    wall = time.perf_counter() - t0
                events = prof.events()
                tot = {g: 0. for g in GROUPS}
                for ev in events: tot[classify(ev)] += ev.self_cpu_time_total
                total = sum(tot.values())
                print(f'\n### {model_name} {px}px {config}: {args.profile_steps} training steps of bs {args.bs} through '
                      f"exp's Learner: {wall:.2f} s wall, {args.profile_steps * args.bs / wall:,.0f} img/s under the "
                      f'profiler, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}\n')
                print('| where | ms/step | share |\n|---|---:|---:|')
                for g in GROUPS: print(f'| {g} | {tot[g] / 1e3 / args.profile_steps:.2f} | {100 * tot[g] / total:.1f}% |')
                print(f'| profiled total (self CPU time) | {total / 1e3 / args.profile_steps:.2f} | |')
                print(f'| wall | {wall * 1e3 / args.profile_steps:.2f} | |')
                top = {}
                for ev in events: top[ev.name] = top.get(ev.name, 0) + ev.self_cpu_time_total
                print('\ntop ops by self CPU time: ' + ', '.join(
                    f'{k} {100 * v / total:.1f}%' for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:10]))
                if s.compiled: torch._dynamo.reset()
        del x_all, y_all; gc.collect()


# ------------------------------------------------------------------ --bf16-study: should the Learner default to bf16?
def study(args):
    from exp.convolutions import mnist_convnet
    from exp.data import load_fashion_mnist
    from exp.xresnet import xresnet_mini
    load = os.getloadavg()[0]
    print(cpu_description())
    print(f'load average (1 min) {load:.2f}; {torch.get_num_threads()} threads; torch {torch.__version__}', flush=True)
    if load >= 1.0 and not args.force:
        print('the machine is busy (load >= 1): timings would mean nothing. Run again when it is quiet, or pass --force.')
        return 1
    xt, yt, xv, yv = load_fashion_mnist()
    xt, yt = xt[:args.study_n], yt[:args.study_n]
    xt = xt.float().div_(255).unsqueeze(1)
    mean, std = xt.mean(), xt.std()
    xt, xv = (xt - mean) / std, (xv.float().div_(255).unsqueeze(1) - mean) / std
    nets = {'convnet': mnist_convnet, 'xresnet_mini': lambda: xresnet_mini(c_in=1, n_out=10)}
    names = [m for m in args.models if m in nets] or list(nets)
    for name in names:                                   # warm-up: the first fit in a process pays oneDNN's set-up
        for prec in ('fp32', 'bf16'):
            learn = Learner(DataLoaders(TensorLoader(xt[:4 * args.bs], yt[:4 * args.bs], bs=args.bs)), nets[name](),
                            loss_func=nn.CrossEntropyLoss(), device='cpu')
            learn.to_bf16() if prec == 'bf16' else learn.to_fp32()
            with learn.no_bar(), learn.no_logging(): learn.fit(1); learn.get_preds(dl=TensorLoader(xv[:1000], yv[:1000], bs=1000))
    res = {}
    for seed in args.study_seeds:
        for name in names:
            for prec in (['fp32', 'bf16'] if seed % 2 == 0 else ['bf16', 'fp32']):     # who goes first alternates
                torch.manual_seed(seed)
                dls = DataLoaders(TensorLoader(xt, yt, bs=args.bs, shuffle=True, drop_last=True))   # no validation in fit
                learn = Learner(dls, nets[name](), loss_func=nn.CrossEntropyLoss(), lr=args.study_lr, device='cpu')
                learn.to_bf16() if prec == 'bf16' else learn.to_fp32()
                l0 = os.getloadavg()[0]
                with learn.no_bar(), learn.no_logging():
                    t0 = time.perf_counter()
                    learn.fit_one_cycle(args.study_epochs, args.study_lr)
                    secs = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    preds, targs = learn.get_preds(dl=TensorLoader(xv, yv, bs=1000))
                    eval_s = time.perf_counter() - t0
                acc = (preds.argmax(1) == targs).float().mean().item()
                res[name, prec, seed] = (secs, acc, eval_s)
                print(f'  {name:12s} {prec} seed {seed}: training {secs:6.1f} s, test pass {eval_s:4.2f} s, '
                      f'test accuracy {acc:.4f} (load {l0:.2f})', flush=True)
    print(f'\n{args.study_epochs} epochs of one-cycle AdamW (lr {args.study_lr}) on {len(xt):,} images, bs {args.bs}, '
          f'{torch.get_num_threads()} threads; test: 10,000 images\n')
    print('| model | seed | fp32 train s | bf16 train s | speed-up | fp32 test s | bf16 test s | fp32 acc | bf16 acc | bf16 - fp32 |')
    print('|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|')
    for name in names:
        rows = [(s, res[name, 'fp32', s], res[name, 'bf16', s]) for s in args.study_seeds]
        for s, (f, fa, fe), (b, ba, be) in rows + [('mean', *[tuple(statistics.mean(v) for v in zip(*[r[i] for r in rows]))
                                                            for i in (1, 2)])]:
            print(f'| {name} | {s} | {f:.1f} | {b:.1f} | {f / b:.2f}x | {fe:.2f} | {be:.2f} | {fa:.4f} | {ba:.4f} | '
                  f'{100 * (ba - fa):+.2f} pt |')
    print(f'\nload average after: {os.getloadavg()[0]:.2f}')


# ------------------------------------------------------------------ driver

# ------------------------------------------------------------------ keep_freed_memory on and off
def malloc_child(args):
    "One process, one setting (EXP_KEEP_FREED_MEMORY from the parent): time exp's fit; print one JSON line."
    import resource                                     # Unix only: the rest of this script runs anywhere
    model_name, px, config = args.malloc_child.split(':')
    s = Setup(model_name, int(px), config, args.bs)
    x, y = torch.randn(args.bs * 400, 1, int(px), int(px)), torch.randint(0, 10, (args.bs * 400,))
    def fit(n):
        dl = TensorLoader(x[:n * args.bs], y[:n * args.bs], bs=args.bs, shuffle=True, drop_last=True)
        learn = make_learner(s, dl)
        with learn.no_bar(), learn.no_logging():
            f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            learn.fit(1)
            return time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    t, _ = fit(args.warm_batches)                       # warm-up, and a calibration of the batch count
    n = max(20, min(400, round(args.seconds * args.warm_batches / max(t, 1e-6))))   # at least 20: a steady state
    t, faults = fit(n)
    print(json.dumps(dict(ips=n * args.bs / t, faults=faults / n, rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                          batches=n)))


def malloc_study(args):
    "Fresh processes with keep_freed_memory off and on, alternating; a table of images/s, page faults, peak RSS."
    rows = []
    for m in args.models:
        for px in args.sizes:
            for c in args.configs:
                got = {'0': [], '1': []}
                for r in range(args.rounds):
                    for keep in (('0', '1') if r % 2 == 0 else ('1', '0')):
                        env = {**os.environ, 'EXP_KEEP_FREED_MEMORY': keep, 'PYTHONPATH': str(ROOT)}
                        cmd = [sys.executable, __file__, '--malloc-child', f'{m}:{px}:{c}', '--bs', str(args.bs),
                               '--seconds', str(args.seconds), '--threads', str(torch.get_num_threads())]
                        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
                        if out.returncode: sys.exit(f'{m} {px} px {c}: the child failed:\n{out.stderr[-2000:]}')
                        got[keep].append(json.loads(out.stdout.strip().splitlines()[-1]))
                        print(f'  {m} {px} px {c} keep={keep}: {got[keep][-1]}', flush=True)
                off, on = (max(got[k], key=lambda g: g['ips']) for k in '01')
                rows.append((m, px, c, off, on))
    print(f'\nbatch size {args.bs}; best of {args.rounds} round(s), each a fresh process; load average now {os.getloadavg()[0]:.2f}')
    print('| model | px | config | img/s glibc default | img/s keep_freed_memory | ratio | page faults/batch default | '
          'with keep | peak RSS MB default | with keep |')
    print('|---|---:|---|---:|---:|---:|---:|---:|---:|---:|')
    for m, px, c, off, on in rows:
        print(f"| {m} | {px} | {c} | {off['ips']:,.0f} | {on['ips']:,.0f} | {on['ips'] / off['ips']:.2f}x | "
              f"{off['faults']:,.0f} | {on['faults']:,.0f} | {off['rss']:,.0f} | {on['rss']:,.0f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--threads', type=int, default=None, help='torch threads (default: every CPU this process may use)')
    ap.add_argument('--quick', action='store_true', help='tiny sizes and one round: checks that everything runs')
    ap.add_argument('--models', default=','.join(MODELS), help=f'comma-separated, of {MODELS}')
    ap.add_argument('--sizes', default='28,64', help='input sizes in pixels, comma-separated')
    ap.add_argument('--configs', default=None, help=f'comma-separated, of {CONFIGS} (default: all; --quick: fp32,bf16,cl)')
    ap.add_argument('--bs', type=int, default=128)
    ap.add_argument('--rounds', type=int, default=None, help='interleaved timing rounds, the best reported (default 3; --quick: 1)')
    ap.add_argument('--seconds', type=float, default=1.5, help='about how long one contender runs per round')
    ap.add_argument('--matmul-n', type=int, default=4096, help='size of the square matmul that measures the ceiling')
    ap.add_argument('--compile-timeout', type=float, default=300., help='give a torch.compile warm-up up after this many seconds')
    ap.add_argument('--profile', action='store_true', help='profile training steps (instead of the table)')
    ap.add_argument('--profile-steps', type=int, default=30)
    ap.add_argument('--bf16-study', action='store_true', help='fp32 vs bf16: speed and Fashion-MNIST accuracy')
    ap.add_argument('--study-n', type=int, default=20_000)
    ap.add_argument('--study-epochs', type=int, default=3)
    ap.add_argument('--study-lr', type=float, default=1e-2)
    ap.add_argument('--study-seeds', default='0,1')
    ap.add_argument('--force', action='store_true', help='--bf16-study: run even on a busy machine')
    ap.add_argument('--malloc', action='store_true', help='keep_freed_memory off and on, in fresh processes')
    ap.add_argument('--malloc-child', default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from exp.core import num_cpus
    torch.set_num_threads(args.threads or num_cpus())
    logging.getLogger('torch.utils.cpp_extension').setLevel(logging.ERROR)     # "no CUDA runtime": expected on a CPU
    args.models = args.models.split(',')
    args.sizes = [int(s) for s in args.sizes.split(',')]
    args.configs = (args.configs or ('fp32,bf16,cl' if args.quick else ','.join(CONFIGS))).split(',')
    args.study_seeds = [int(s) for s in args.study_seeds.split(',')]
    if bad := [c for c in args.configs if c not in CONFIGS]: ap.error(f'unknown configs {bad}: choose from {CONFIGS}')
    if bad := [m for m in args.models if m not in MODELS]: ap.error(f'unknown models {bad}: choose from {MODELS}')
    args.warm_batches, args.min_batches, args.max_batches = 3, 3, 200
    if not args.quick: args.rounds = args.rounds or 3
    if args.quick:
        args.bs, args.rounds, args.seconds, args.matmul_n = min(args.bs, 32), args.rounds or 1, 0.1, min(args.matmul_n, 512)
        args.warm_batches, args.min_batches, args.max_batches = 2, 2, 6
        args.profile_steps, args.study_n, args.study_epochs = min(args.profile_steps, 4), min(args.study_n, 1000), 1
        args.study_seeds = args.study_seeds[:1]
    if args.bf16_study: return study(args)
    if args.malloc_child: return malloc_child(args)
    if args.malloc: return malloc_study(args)
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; load average '
          f'{os.getloadavg()[0]:.2f}\n{cpu_description()}', flush=True)
    if args.profile: return profile(args)
    res = measure(args)
    print_table(args, *res)
    print(f'\nload average after: {os.getloadavg()[0]:.2f}')


if __name__ == '__main__':
    sys.exit(main())
