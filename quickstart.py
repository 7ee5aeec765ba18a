"""The main job: train a Fashion-MNIST classifier with exp, look at its mistakes, export it, use it.  Run: ./dev main

Each step is a line of the library, as a user would type it:
1. data: `untar_data(URLs.FASHION_MNIST_PNG)` (offline first: Debian's package, the cache, or a verified
   download, written once as training/<class>/*.png, testing/<class>/*.png) and a `DataBlock` over it;
2. a model (the conv net of fastai's MNIST tutorial) and `Learner(...).fit_one_cycle(...)`, printing the epoch table
   and the training speed (images/s);
3. `ClassificationInterpretation`: the most confused classes, a confusion matrix and the top losses as pictures;
4. `learn.export()` (a safe export: JSON description + safetensors weights, no pickle) and `load_learner`, checked
   to predict exactly what the trained learner predicts on the 10,000 test images;
5. `learn_inf.predict('some/image.png')` on image files, as in fastbook's chapter 2.
"""
import argparse, os, time
from pathlib import Path

import torch
from torch import nn

from exp.core import num_cpus
from exp.data import URLs, untar_data
from exp.datablock import CategoryBlock, DataBlock, GrandparentSplitter, get_image_files, parent_label
from exp.export import load_learner
from exp.interpret import ClassificationInterpretation
from exp.convolutions import mnist_convnet
from exp.learner import Learner
import exp.schedules                                 # Learner.fit_one_cycle
from exp.minibatch import accuracy
from exp.vision import ImageBlock, Normalize, PILImageBW


def step(msg, t0=[time.perf_counter()]):
    "Print a step's title with the time since the start."
    print(f'\n[{time.perf_counter() - t0[0]:5.1f} s] {msg}', flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--epochs', type=int, default=3)
    ap.add_argument('--lr', type=float, default=2e-2, help='peak learning rate of the one-cycle schedule')
    ap.add_argument('--bs', type=int, default=256)
    ap.add_argument('--workers', type=int, default=None,
                    help='data-loader worker processes (default: one per CPU, at most 8; see below)')
    ap.add_argument('--out', type=Path, default=Path(os.environ.get('EXP_QUICKSTART_OUT', '~/.exp/quickstart')).expanduser(),
                    help='where the pictures and the export go (default: ~/.exp/quickstart)')
    ap.add_argument('--threads', type=int, default=None, help='torch threads (default: the CPUs the workers leave, at least 1)')
    args = ap.parse_args(argv)
    # This net is small: decoding a 28x28 PNG costs about twice what training on it does. So decoding gets a worker per
    # CPU and training the CPUs left, at least one: on 2 CPUs, 2 workers and 1 thread trained 11,900 images/s, against
    # 8,400 for no workers and 2 threads (bench/RESULTS.md). A worker competing with 2 torch threads for 2 cores made
    # both wait: 5,800. (defaults.num_workers is 0 on small machines for that reason: a library cannot know what
    # the threads will do; a script can.)
    workers = min(8, num_cpus()) if args.workers is None else args.workers
    torch.set_num_threads(args.threads or max(1, num_cpus() - workers))
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    args.out.mkdir(parents=True, exist_ok=True)

    step('1. Data: Fashion-MNIST as PNG files, through a DataBlock')
    path = untar_data(URLs.FASHION_MNIST_PNG)
    fashion = DataBlock(blocks=(ImageBlock(PILImageBW), CategoryBlock), get_items=get_image_files,
                        splitter=GrandparentSplitter(train_name='training', valid_name='testing'),
                        get_y=parent_label, batch_tfms=[Normalize()])
    dls = fashion.dataloaders(path, bs=args.bs, num_workers=workers)
    print(dls)

    step(f'2. Train: the MNIST tutorial conv net, fit_one_cycle({args.epochs}, {args.lr})')
    torch.manual_seed(42)
    learn = Learner(dls, mnist_convnet(), loss_func=nn.CrossEntropyLoss(), metrics=accuracy, path=args.out)
    t0 = time.perf_counter()
    learn.fit_one_cycle(args.epochs, args.lr)
    fit_s = time.perf_counter() - t0
    acc = learn.recorder.values[-1][-1]
    n_img = args.epochs * len(dls.train) * args.bs
    print(f'Fashion-MNIST test accuracy: {acc:.4f}')
    print(f'speed: {n_img / fit_s:,.0f} training images/s ({n_img:,} images in {fit_s:.1f} s, validation passes included; '
          f'{workers} loader workers, {torch.get_num_threads()} torch threads, {learn.precision}, load average '
          f'{os.getloadavg()[0]:.2f})')

    step('3. Interpret: where does the model go wrong?')
    interp = ClassificationInterpretation.from_learner(learn)
    print('most confused (actual, predicted, count):')
    for a, p, n in interp.most_confused()[:5]: print(f'  {a:12s} -> {p:12s} {n}')
    interp.plot_confusion_matrix()
    plt.savefig(args.out / 'confusion_matrix.png', dpi=80); plt.close('all')
    interp.plot_top_losses(5, nrows=1)
    plt.savefig(args.out / 'top_losses.png', dpi=80); plt.close('all')
    print(f'pictures: {args.out / "confusion_matrix.png"}, {args.out / "top_losses.png"}')

    step('4. Export, then load_learner: the same predictions?')
    fname = learn.export()
    print(f'wrote {fname} ({fname.stat().st_size / 1e3:.0f} kB)')
    learn_inf = load_learner(fname)
    items = dls.valid_ds.items
    preds, _ = learn.get_preds()
    preds_inf, _ = learn_inf.get_preds(dl=learn_inf.dls.test_dl(items))
    same = torch.equal(preds_inf, preds)
    print(f'load_learner({fname.name}) on {len(items)} test images: predictions {"identical" if same else "DIFFERENT"} '
          f'(max |difference| {(preds_inf - preds).abs().max().item():.1e})')
    if not same: raise SystemExit('quickstart: the loaded learner does not predict what the trained one does')

    step('5. Predict image files with the loaded learner')
    files = [get_image_files(path / 'testing' / c)[0] for c in list(learn_inf.dls.vocab)[:6]]
    for f in files:
        pred, pred_idx, probs = learn_inf.predict(f)
        print(f'  {f.relative_to(path)}: Prediction: {pred}; Probability: {probs[pred_idx]:.04f}')
    step('done')
    return acc


if __name__ == '__main__':
    main()
