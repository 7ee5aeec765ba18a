#!/usr/bin/env python
"""The quickstart's training speed and accuracy under other settings (issue 18: workers, threads, batch size, precision).

    .venv/bin/python bench/quickstart_speed.py speed 1:1:128:fp32,2:1:128:fp32,0:2:128:fp32,2:1:256:fp32 3
    .venv/bin/python bench/quickstart_speed.py accuracy 128:0.01,256:0.01,256:0.02

`speed WORKERS:THREADS:BS:PRECISION,... ROUNDS`: one `Learner.fit(1)` of the quickstart's net (mnist_convnet) over the
first 20,000 training PNGs through the quickstart's DataBlock, with that many loader workers, torch threads in the main
process, batch size and precision; the configurations run in turns, ROUNDS times, and the best training images/s of
each is printed with all of them. `accuracy BS:LR,...`: `fit_one_cycle(3, LR)` at batch size BS on the images in
memory (the same pixels), seeds 0, 1 and 2, the test accuracy after the last epoch.
"""
import itertools, os, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch
from torch import nn

import exp.schedules                                  # Learner.fit_one_cycle
import exp.callbacks                                  # Learner.to_bf16, to_fp32
from exp.convolutions import mnist_convnet
from exp.data import URLs, untar_data
from exp.datablock import CategoryBlock, DataBlock, GrandparentSplitter, get_image_files, parent_label
from exp.learner import Learner
from exp.minibatch import DataLoaders, accuracy, fashion_mnist_dls
from exp.vision import ImageBlock, Normalize, PILImageBW


class Capped:
    "The first `n` images' worth of batches of `dl`."
    def __init__(self, dl, n): self.dl, self.n = dl, n
    def __len__(self): return self.n // self.dl.bs
    def __iter__(self): return itertools.islice(iter(self.dl), len(self))


def speed(configs, rounds, n=20_000):
    path = untar_data(URLs.FASHION_MNIST_PNG)
    db = DataBlock(blocks=(ImageBlock(PILImageBW), CategoryBlock), get_items=get_image_files,
                   splitter=GrandparentSplitter(train_name='training', valid_name='testing'), get_y=parent_label,
                   batch_tfms=[Normalize()])
    dls = {bs: db.dataloaders(path, bs=bs, num_workers=0) for bs in {c[2] for c in configs}}
    def run(w, t, bs, prec):
        torch.set_num_threads(t); torch.manual_seed(0)
        dl = Capped(dls[bs].train.new(num_workers=w), n)
        learn = Learner(DataLoaders(dl), mnist_convnet(), loss_func=nn.CrossEntropyLoss(), lr=1e-2, device='cpu')
        learn.to_bf16() if prec == 'bf16' else learn.to_fp32()
        t0 = time.perf_counter()
        with learn.no_bar(), learn.no_logging(): learn.fit(1)
        return len(dl) * bs / (time.perf_counter() - t0)
    res = {c: [] for c in configs}
    for r in range(rounds):
        k = r % len(configs)
        for c in configs[k:] + configs[:k]: res[c].append(run(*c))
    for c, v in res.items():
        print(f'workers {c[0]} threads {c[1]} bs {c[2]} {c[3]}: best {max(v):8,.0f} images/s, all ' + ' '.join(f'{x:,.0f}' for x in v))
    print(f'load average after: {os.getloadavg()[0]:.2f}')


def accuracy_runs(configs):
    torch.set_num_threads(1)
    for bs, lr in configs:
        accs = []
        for seed in (0, 1, 2):
            torch.manual_seed(seed)
            learn = Learner(fashion_mnist_dls(bs=bs), mnist_convnet(), loss_func=nn.CrossEntropyLoss(), metrics=accuracy,
                            device='cpu')
            with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(3, lr)
            accs.append(learn.recorder.values[-1][-1])
        print(f'bs {bs} lr {lr}: ' + ' '.join(f'{a:.4f}' for a in accs) + f' mean {sum(accs) / 3:.4f}', flush=True)


if __name__ == '__main__':
    if len(sys.argv) < 3: sys.exit(__doc__)
    if sys.argv[1] == 'speed':
        cfgs = [tuple(int(v) if v.isdigit() else v for v in c.split(':')) for c in sys.argv[2].split(',')]
        speed(cfgs, int(sys.argv[3]) if len(sys.argv) > 3 else 3)
    elif sys.argv[1] == 'accuracy':
        accuracy_runs([(int(c.split(':')[0]), float(c.split(':')[1])) for c in sys.argv[2].split(',')])
    else: sys.exit(__doc__)
