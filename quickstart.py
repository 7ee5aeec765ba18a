"""The main job: train a Fashion-MNIST classifier with exp, then use it.  Run: ./dev main [--epochs N]

Steps (each one a line of the library, as a user would type them):
1. data: Fashion-MNIST, offline first (Debian's package, the cache, or a verified download);
2. a model: the conv stack from fastai's MNIST tutorial (stride-2 convs + BatchNorm + ReLU);
3. `Learner(...).fit_one_cycle(...)`, printing the epoch table;
4. use it: accuracy on the 10,000 test images, and predictions for a few of them by class name.
"""
import argparse, time

import torch

from exp.data import FASHION_MNIST_CLASSES
from exp.learner import Learner, fashion_mnist_dls, mnist_convnet
from exp.minibatch import accuracy


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--epochs', type=int, default=3)
    ap.add_argument('--lr', type=float, default=0.1, help='peak learning rate of the one-cycle schedule')
    ap.add_argument('--bs', type=int, default=128)
    args = ap.parse_args(argv)
    torch.manual_seed(42)

    dls = fashion_mnist_dls(bs=args.bs)
    learn = Learner(dls, mnist_convnet(), loss_func=torch.nn.CrossEntropyLoss(), metrics=accuracy)
    t0 = time.time()
    learn.fit_one_cycle(args.epochs, args.lr)
    print(f'trained {args.epochs} epochs in {time.time() - t0:.1f} s')

    learn.model.eval()
    xb, yb = next(iter(dls.valid))
    with torch.no_grad(): probs = learn.model(xb[:8]).softmax(-1)
    print('\nfirst test images:')
    for p, y in zip(probs, yb[:8]):
        i = int(p.argmax())
        print(f'  predicted {FASHION_MNIST_CLASSES[i]:12s} ({float(p[i]):.2f})   actual {FASHION_MNIST_CLASSES[int(y)]}')
    loss, acc = learn.validate()[:2]
    print(f'\nFashion-MNIST test accuracy: {acc:.4f}')
    return acc


if __name__ == '__main__':
    main()
