#!/usr/bin/env python
"""Should a Learner train in bf16 by itself? The measurements behind `defaults.precision` (exp.callbacks, 03b).

    .venv/bin/python bench/precision.py speed                       # models of every size on 28 px, 128 images a step
    PX=64 BS=64 .venv/bin/python bench/precision.py speed resnet18,xresnet_mini,xresnet18,convnet
    .venv/bin/python bench/precision.py accuracy convnet 3 0,1,2    # Fashion-MNIST test accuracy, fp32 vs bf16
    .venv/bin/python bench/precision.py accuracy xresnet_mini 3 0,1,2

`speed`: one training step (forward and loss under autocast, backward, AdamW, zero_grad) of random (BS, 1, PX, PX)
batches, in fp32, bf16 autocast, channels_last and both, for each model; the four are timed in turns, 8 rounds of
about 0.3 s each, the best round kept, so other processes' load hits all four alike; printed: images/s and the
ratios to fp32, with each model's matrix arithmetic per image (torch.utils.flop_counter, forward + backward).
`accuracy`: `fit_one_cycle(EPOCHS, 1e-2)` of exp's Learner on the 60,000 training images in memory (batch 128),
`learn.to_fp32()` against `learn.to_bf16()` from the same seed (same initial weights, same batch order), the
validation accuracy on the 10,000 test images after the last epoch; who goes first alternates with the seed.
Timings in the accuracy runs mean little on a shared machine; the accuracies do not depend on the load.
"""
import copy, os, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import exp.schedules                                  # Learner.fit_one_cycle
from exp.callbacks import native_bf16                 # also Learner.to_bf16, to_fp32
from exp.convolutions import mnist_convnet
from exp.hooks import get_cnn
from exp.learner import Learner, torch_adamw
from exp.minibatch import accuracy, fashion_mnist_dls
from exp.xresnet import xresnet18, xresnet_mini, xresnet_small


def resnet18():
    import torchvision
    m = torchvision.models.resnet18(num_classes=10)
    m.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    return m


MODELS = {'mlp': lambda: nn.Sequential(nn.Flatten(), nn.LazyLinear(128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)),
          'convnet': mnist_convnet, 'cnn8-64': lambda: get_cnn((8, 16, 32, 64), norm=nn.BatchNorm2d),
          'xresnet_mini': xresnet_mini, 'xresnet_small': xresnet_small, 'resnet18': resnet18,
          'xresnet18': lambda: xresnet18(c_in=1, n_out=10)}


def speed(names, threads=2):
    torch.set_num_threads(threads)
    bs, px = int(os.environ.get('BS', 128)), int(os.environ.get('PX', 28))
    x, y = torch.randn(bs, 1, px, px), torch.randint(0, 10, (bs,))
    print(f'{threads} threads, batches of {bs} at {px} px; native_bf16: {native_bf16("cpu")}; load {os.getloadavg()[0]:.2f}')
    for name in names:
        torch.manual_seed(0)
        base = MODELS[name]()
        if px != 28 and name == 'convnet': base = nn.Sequential(*list(base)[:-1], nn.AdaptiveAvgPool2d(1), nn.Flatten())
        base(x[:2])                                    # materialise lazy layers
        with FlopCounterMode(display=False) as fc: base(x[:4]).sum().backward()
        mfl = fc.get_total_flops() / 4 / 1e6
        vs = {}
        for v in ('fp32', 'bf16', 'cl', 'bf16+cl'):
            m, cl = copy.deepcopy(base), 'cl' in v
            if cl: m = m.to(memory_format=torch.channels_last)
            vs[v] = (m, torch_adamw(m.parameters()), 'bf16' in v, cl)
        def step(v):
            m, opt, bf, cl = vs[v]
            xx = x.contiguous(memory_format=torch.channels_last) if cl else x
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf): loss = F.cross_entropy(m(xx), y)
            loss.backward(); opt.step(); opt.zero_grad()
        for v in vs: step(v); step(v)
        t = time.perf_counter(); step('fp32'); k = max(1, round(0.3 / (time.perf_counter() - t)))
        best = {v: 0. for v in vs}
        for r in range(8):
            for v in list(vs)[r % 4:] + list(vs)[:r % 4]:
                t = time.perf_counter()
                for _ in range(k): step(v)
                best[v] = max(best[v], k * bs / (time.perf_counter() - t))
        print(f'{name:14s} {mfl:7.1f} MFLOP/img train | ' + ' '.join(f'{v} {best[v]:7,.0f}' for v in vs) +
              f' | bf16/fp32 {best["bf16"] / best["fp32"]:.2f}  bf16+cl/fp32 {best["bf16+cl"] / best["fp32"]:.2f}  '
              f'load {os.getloadavg()[0]:.2f}', flush=True)


def accuracy_runs(name, epochs, seeds, threads=2):
    torch.set_num_threads(threads)
    dls = fashion_mnist_dls(bs=128)
    res = {'fp32': [], 'bf16': []}
    for seed in seeds:
        for prec in (('fp32', 'bf16') if seed % 2 == 0 else ('bf16', 'fp32')):
            torch.manual_seed(seed)
            learn = Learner(dls, MODELS[name](), loss_func=nn.CrossEntropyLoss(), metrics=accuracy, device='cpu')
            learn.to_bf16() if prec == 'bf16' else learn.to_fp32()
            t = time.perf_counter()
            with learn.no_logging(), learn.no_bar(): learn.fit_one_cycle(epochs, 1e-2)
            acc = learn.recorder.values[-1][-1]
            res[prec].append(acc)
            print(f'{name} {prec} seed {seed}: acc {acc:.4f} in {time.perf_counter() - t:.1f} s ({epochs} epochs) '
                  f'load {os.getloadavg()[0]:.2f}', flush=True)
    print(' '.join(f'{k}: mean {sum(v) / len(v):.4f}' for k, v in res.items()))


if __name__ == '__main__':
    what = sys.argv[1] if len(sys.argv) > 1 else 'speed'
    if what == 'speed': speed(sys.argv[2].split(',') if len(sys.argv) > 2 else list(MODELS))
    elif what == 'accuracy': accuracy_runs(sys.argv[2], int(sys.argv[3]), [int(s) for s in sys.argv[4].split(',')])
    else: sys.exit(__doc__)
