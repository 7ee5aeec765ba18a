"""Fashion-MNIST accuracy record on this machine's CPU: the best test accuracy in a fixed training time.

    ./dev bench accuracy                    # the 60-second recipe
    ./dev bench accuracy --recipe 10min     # the 10-minute recipe
    ./dev bench accuracy --recipe all --seed 1

Each recipe trains an XResNet from exp.xresnet on the 60,000 training images held in memory (TensorLoader, no
image decoding), with one-cycle AdamW driven by the clock (exp.xresnet.TimeBudget: the schedule warms up, peaks
and anneals over the time budget, whatever the machine's speed today), bf16 autocast and channels_last
(exp.callbacks), label smoothing and flips; it is then evaluated on the 10,000 test images, plain and with
test-time flips (exp.vision_learner.flip_tta). Training seconds are measured in-process around `fit` (no validation
runs during training); evaluation is timed separately. The script prints the machine's load (the 1-minute load
average before and after), since on a shared 2-core machine that, more than anything, sets how many batches fit in
the budget.

How the recipes were chosen: widths, depths, learning rates, weight decay, label smoothing, shift augmentation and
batch size were swept on a GPU (accuracy after a given number of epochs does not depend on the device), and the
cost of an epoch of each candidate was measured on this CPU. Small convolutions and BatchNorm are memory-bound
here, so an epoch of any model up to the 32/64/128 widths of `xresnet_mini` costs about the same; wider or deeper
models gain accuracy per epoch but cost 2 to 10 times more per epoch. Short budgets do best without shift
augmentation (flips only) and with a high peak learning rate (2e-2 for a minute, 1e-2 for ten); longer ones gain
from 1-pixel shifts.
"""
import argparse, os, platform, sys, time
from pathlib import Path

import torch
from torch import nn

from exp.callbacks import ChannelsLast, MixedPrecision
from exp.data import load_fashion_mnist
import exp.schedules                                  # Learner.fit_one_cycle
from exp.learner import Learner
from exp.minibatch import DataLoaders, TensorLoader
from exp.vision_learner import flip_tta
from exp.xresnet import BatchFlipShift, TimeBudget, xresnet_mini, xresnet_small

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from run_notebook import default_threads            # the cores other processes leave idle (by the load average)

RECIPES = {
    '60s': dict(arch='xresnet_mini', seconds=59.0, bs=256, lr=2e-2, wd=0.05, label_smoothing=0.1, flip=0.5, pad=0,
                bf16=True, channels_last=True, tta=True, target=0.930),
    '10min': dict(arch='xresnet_small', seconds=595.0, bs=256, lr=1e-2, wd=0.05, label_smoothing=0.1, flip=0.5, pad=1,
                  bf16=True, channels_last=True, tta=True, target=0.945),
}
ARCHS = {'xresnet_mini': xresnet_mini, 'xresnet_small': xresnet_small}


def fashion_mnist_loaders(bs, flip, pad):
    "Normalised in-memory Fashion-MNIST: a shuffled training loader with batch flips/shifts, and the test set."
    xt, yt, xv, yv = load_fashion_mnist()
    xt = xt.float().div_(255).unsqueeze(1)
    mean, std = xt.mean().item(), xt.std().item()
    xt, xv = (xt - mean) / std, (xv.float().div_(255).unsqueeze(1) - mean) / std
    aug = BatchFlipShift(p=flip, pad=pad, fill=-mean / std)       # the shifted-in border is background (0)
    train = DataLoaders(TensorLoader(xt, yt, bs=bs, shuffle=True, drop_last=True, tfm=aug))   # no validation in fit
    return train, TensorLoader(xv, yv, bs=1000)


def run(name, seed=0, seconds=None):
    "Train recipe `name` once; return a dict with the recipe, the training seconds, the batches done and the accuracies."
    r = dict(RECIPES[name])
    if seconds is not None: r['seconds'] = seconds
    torch.manual_seed(seed)
    dls, test = fashion_mnist_loaders(r['bs'], r['flip'], r['pad'])
    cbs = ([MixedPrecision(torch.bfloat16)] if r['bf16'] else []) + ([ChannelsLast()] if r['channels_last'] else [])
    learn = Learner(dls, ARCHS[r['arch']](c_in=1, n_out=10), loss_func=nn.CrossEntropyLoss(label_smoothing=r['label_smoothing']),
                    lr=r['lr'], wd=r['wd'], cbs=cbs, device='cpu')
    clock = TimeBudget(r['seconds'])
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    with learn.no_logging(): learn.fit_one_cycle(10_000, r['lr'], cbs=clock)
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    probs, targs = flip_tta(learn, dl=test)
    plain, _ = learn.get_preds(dl=test)
    eval_s = time.perf_counter() - t1
    return dict(recipe=name, seed=seed, settings=r, train_s=train_s, eval_s=eval_s, batches=clock.n_batches,
                epochs=clock.n_batches * r['bs'] / len(dls.train.tensors[0]), acc=(plain.argmax(1) == targs).float().mean().item(),
                acc_tta=(probs.argmax(1) == targs).float().mean().item(), load=(load0, os.getloadavg()[0]))


def report(res):
    r = res['settings']
    acc = res['acc_tta'] if r['tta'] else res['acc']
    verdict = 'reached' if acc >= r['target'] and res['train_s'] <= r['seconds'] + 1 + (0 if r['seconds'] < 100 else 5) else 'NOT reached'
    print(f"\n== recipe {res['recipe']} (seed {res['seed']}) ==")
    print(f"recipe: {r['arch']}(c_in=1, n_out=10), bs {r['bs']}, one-cycle AdamW lr_max {r['lr']}, wd {r['wd']}, "
          f"label smoothing {r['label_smoothing']}, flips p={r['flip']}, shifts up to {r['pad']} px, "
          f"{'bf16 autocast, ' if r['bf16'] else ''}{'channels_last, ' if r['channels_last'] else ''}"
          f"schedule over a {r['seconds']:.0f} s budget (TimeBudget){', test-time flips' if r['tta'] else ''}")
    print(f"training: {res['train_s']:.1f} s, {res['batches']} batches = {res['epochs']:.2f} epochs; evaluation {res['eval_s']:.1f} s")
    print(f"test accuracy: {res['acc']:.4f} plain, {res['acc_tta']:.4f} with flip TTA (target {r['target']:.3f}: {verdict})")
    print(f"load average (1 min) before/after: {res['load'][0]:.2f} / {res['load'][1]:.2f} on {os.cpu_count()} cores; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--recipe', default='60s', choices=[*RECIPES, 'all'])
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--seconds', type=float, default=None, help='override the time budget (for a quick try)')
    ap.add_argument('--threads', type=int, default=None, help='torch threads (default: auto, see default_threads)')
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads or default_threads(os.cpu_count() or 1, 1))
    for name in (RECIPES if args.recipe == 'all' else [args.recipe]):
        report(run(name, args.seed, args.seconds))
        sys.stdout.flush()


if __name__ == '__main__':
    main()
