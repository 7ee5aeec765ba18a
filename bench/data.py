#!/usr/bin/env python
"""Image-loading benchmark: exp's data block APIs (v1 `ImageList` and v2 `DataBlock`) against torchvision's
`ImageFolder` + torch `DataLoader`, and fastai's `DataBlock`.

The job is the same for all: one full pass over Fashion-MNIST's training PNGs (60,000 files,
`untar_data(URLs.FASHION_MNIST_PNG)/training/<class>/*.png`), opened as grayscale, through a
`Resize(28)`-style item transform, as shuffled batches of 128 normalised float images `(128, 1, 28, 28)`
with their labels, on `--device` (default: CPU), with the same number of worker processes for all.

    exp v1        ImageList.from_folder(path, convert_mode='L').split_by_folder(...).label_from_folder()
                  .transform(Resize(28)).databunch(bs=128).normalize(stats)
    exp v2        DataBlock(blocks=(ImageBlock(PILImageBW), CategoryBlock), ..., item_tfms=Resize(28),
                  batch_tfms=Normalize.from_stats(...)).dataloaders(path, bs=128)
    torchvision   ImageFolder(path/'training', loader=<PIL open + convert('L')>,
                  transform=Compose([Resize(28), ToTensor(), Normalize(...)])) + DataLoader(bs=128, shuffle=True)
    fastai        the exp v2 DataBlock, in fastai 2.8 (its own Resize, Normalize, ImageBlock(PILImageBW))

Runs are interleaved (exp v1, exp v2, torchvision, fastai, exp v1, ...) so that load from other
processes hits all of them alike; the table gives the best pass per framework and worker count, and
the ratios exp / torchvision and exp / fastai. Building the loaders (listing 60k files, labels, vocab)
is timed separately and not counted in images/s. Before timing, every file is read once so the OS
page cache holds the dataset for everyone. All main processes use `--threads` torch threads (1).

fastai runs in a child process of its own: importing it patches PIL globally (`Image.Image.size`
becomes a fastcore property, ~1 µs per call, and PIL calls it a lot), which would slow down everyone
else in the same process. It lives in its own venv, never in the project's .venv (the venv
bench/loop.py uses too, seeing the project's torch through a .pth file, so pip downloads no torch):
    .venv/bin/python bench/data.py --setup        # python3 -m venv .bench-venv + pip install fastai==2.8.12
Run (the script sets .bench-venv up by itself the first time, unless --no-setup):
    .venv/bin/python bench/data.py                          # workers 0 and 2, 60k images, 2 repeats
    .venv/bin/python bench/data.py --workers 2 --max-images 10000 --repeats 3
    .venv/bin/python bench/data.py --frameworks exp-v2 torchvision --profile   # + a cProfile of exp's pass
    .venv/bin/python bench/data.py --diagnose --workers 0 1 2                  # workers x main threads, see below
If fastai cannot be installed or imported, the script says so and benchmarks the rest.

Why more workers can lose on a small machine (issue 18), measured by
    .venv/bin/python bench/data.py --diagnose --workers 0 1 2 --main-threads 1 2 --repeats 3
exp-v2's loader alone, and training the quickstart's conv net (and xresnet_mini) through exp's Learner on its batches,
for every pair (worker processes, torch threads in the main process), in turns, with the seconds to the first batch
(worker start-up: a fork and the first batch's IPC) and CPU accounting: the main process's CPU time against the wall
time, the workers' CPU time (reaped children), and CPU microseconds per image over both (above the 0-worker figure:
what the workers cost in fork, pickling and shared-memory IPC of each batch). What it showed on the 2-core machine
(busy, load 2-3, 10k images): loading with 2 workers and 1 main thread ran 1.5-2x faster than without workers, with
the main process at ~10% of a core; the same 2 workers with 2 torch threads in the main process lost most of that
(the main process at 50-120% of a core although it only unpickles and normalises batches: GNU OpenMP threads spin
after each parallel op, and a spinning thread takes the core a worker needs; OMP_WAIT_POLICY=passive removes the
spinning but slows the training ops). Training the quickstart net on 10k images: 1 main thread + 1 or 2 workers
9.1-9.7k images/s; 2 main threads + 1 or 2 workers 4.9-5.6k; 0 workers 6.3-7.0k (1 thread), 8.2k (2 threads).
Rule: torch threads in the main process + worker processes <= cores (the machine's idle cores when it is shared).
"""
from __future__ import annotations

import argparse, os, statistics, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BENCH_VENV = ROOT / '.bench-venv'
FASTAI_PIN = 'fastai==2.8.12'
STATS = ([0.2860], [0.3530])          # Fashion-MNIST's training mean and std (fixed, so no one computes them)


# ------------------------------------------------------------------ set-up of the peers' venv
def setup():
    "Create .bench-venv seeing the project's .venv (no second torch download) and install fastai into it."
    site_pkgs = subprocess.check_output([str(ROOT / '.venv/bin/python'), '-c', 'import site; print(site.getsitepackages()[0])'],
                                        text=True).strip()
    if not (BENCH_VENV / 'bin/python').exists():
        subprocess.check_call(['python3', '-m', 'venv', str(BENCH_VENV)])
    own = subprocess.check_output([str(BENCH_VENV / 'bin/python'), '-c', 'import site; print(site.getsitepackages()[0])'],
                                  text=True).strip()
    Path(own, '_exp_venv.pth').write_text(f"import site; site.addsitedir({site_pkgs!r})\n")
    subprocess.check_call([str(BENCH_VENV / 'bin/pip'), 'install', '-q', FASTAI_PIN])


def fastai_ok(python):
    try: return subprocess.run([str(python), '-c', 'import fastai.vision.all'], capture_output=True, timeout=300).returncode == 0
    except (OSError, subprocess.TimeoutExpired): return False


def fastai_python(args):
    "The python of .bench-venv if it can import fastai (setting the venv up once if allowed), else None."
    py = BENCH_VENV / 'bin/python'
    if py.exists() and fastai_ok(py): return py
    if args.no_setup: return None
    print(f'fastai is not installed: setting up {BENCH_VENV.name} ({FASTAI_PIN}, once)...', flush=True)
    try: setup()
    except (subprocess.CalledProcessError, OSError) as e:
        print(f'fastai: set-up failed ({e})', flush=True)
        return None
    return py if fastai_ok(py) else None


def run_child(py, fw, workers, args):
    "One pass of `fw` in a fresh process of interpreter `py`: (images, seconds, build seconds)."
    cmd = [str(py), __file__, '--child', fw, '--workers', str(workers), '--max-images', str(args.max_images),
           '--bs', str(args.bs), '--device', args.device, '--threads', str(args.threads)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    line = next((l for l in r.stdout.splitlines() if l.startswith('RESULT ')), None)
    if r.returncode or line is None: raise RuntimeError(f'{fw} child failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}')
    n, secs, build = line.split()[1:]
    return int(n), float(secs), float(build)


# ------------------------------------------------------------------ the contenders
def make_exp_v1(path, bs, workers, device):
    from exp.imagelist import ImageList
    from exp.vision import Resize
    ll = (ImageList.from_folder(path, convert_mode='L', include=['training', 'testing'])
          .split_by_folder(train='training', valid='testing').label_from_folder())
    data = ll.transform([Resize(28)]).databunch(bs=bs, num_workers=workers, device=device).normalize(STATS)
    return data.train


def make_exp_v2(path, bs, workers, device):
    from exp.datablock import CategoryBlock, DataBlock, GrandparentSplitter, get_image_files, parent_label
    from exp.vision import ImageBlock, Normalize, PILImageBW, Resize
    dblock = DataBlock(blocks=(ImageBlock(PILImageBW), CategoryBlock), get_items=get_image_files,
                       splitter=GrandparentSplitter(train_name='training', valid_name='testing'), get_y=parent_label,
                       item_tfms=Resize(28), batch_tfms=Normalize.from_stats(*STATS))
    return dblock.dataloaders(path, bs=bs, num_workers=workers, device=device).train


class _ToDevice:
    "torchvision's batches, moved to `device` as a training loop would (a no-op on the CPU)."
    def __init__(self, dl, device): self.dl, self.device = dl, device
    def __len__(self): return len(self.dl)
    def __iter__(self):
        for xb, yb in self.dl: yield xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)


def _open_gray(p):
    from PIL import Image
    with open(p, 'rb') as f: return Image.open(f).convert('L')


def make_torchvision(path, bs, workers, device):
    import torch
    from torchvision import datasets, transforms as T
    tfm = T.Compose([T.Resize(28), T.ToTensor(), T.Normalize(*STATS)])
    ds = datasets.ImageFolder(str(path / 'training'), transform=tfm, loader=_open_gray)
    dl = torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=True, num_workers=workers, drop_last=True,
                                     pin_memory=str(device).startswith('cuda'))
    return _ToDevice(dl, device)


def make_fastai(path, bs, workers, device):
    from fastai.vision.all import (CategoryBlock, DataBlock, GrandparentSplitter, ImageBlock, Normalize, PILImageBW, Resize,
                                   get_image_files, parent_label)
    dblock = DataBlock(blocks=(ImageBlock(PILImageBW), CategoryBlock), get_items=get_image_files,
                       splitter=GrandparentSplitter(train_name='training', valid_name='testing'), get_y=parent_label,
                       item_tfms=Resize(28), batch_tfms=Normalize.from_stats(*STATS, cuda=False))
    return dblock.dataloaders(path, bs=bs, num_workers=workers, device=device).train


FRAMEWORKS = {'exp-v1': make_exp_v1, 'exp-v2': make_exp_v2, 'torchvision': make_torchvision, 'fastai': make_fastai}


def one_pass(dl, max_images, device):
    "Iterate `dl` once (or until `max_images`); returns (images, seconds). Checks what comes out."
    import torch
    n, t0 = 0, time.perf_counter()
    for xb, yb in dl:
        if n == 0:
            assert xb.shape[1:] == (1, 28, 28) and xb.dtype == torch.float32, (xb.shape, xb.dtype)
            assert xb.device.type == torch.device(device).type, xb.device
        n += len(xb)
        if max_images and n >= max_images: break
    if torch.device(device).type == 'cuda': torch.cuda.synchronize()
    return n, time.perf_counter() - t0


def warm_cache(path):
    "Read every training file once, so the page cache holds the dataset for every contender."
    t0, n = time.perf_counter(), 0
    for p in sorted((path / 'training').glob('*/*.png')):
        with open(p, 'rb') as f: n += len(f.read())
    return time.perf_counter() - t0, n


# ------------------------------------------------------------------ --diagnose: workers vs main-process threads
class _Capped:
    "The first `n_batches` batches of `dl` (a Learner needs `len`)."
    def __init__(self, dl, n_batches): self.dl, self.n_batches = dl, n_batches
    def __len__(self): return min(self.n_batches, len(self.dl))
    def __iter__(self):
        for i, b in enumerate(self.dl):
            if i >= len(self): return
            yield b


def _cpu_children():
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)          # reaped children: the workers of finished passes
    return r.ru_utime + r.ru_stime


def _diag_run(dl0, workers, threads, n_images, model, device):
    """One pass of exp-v2's loader with `workers` worker processes and `threads` torch threads in the main process,
    loading only (`model` None) or training `model` (a fresh one) through exp's Learner on the batches. Returns a dict:
    images/s, seconds to the first batch, main-process CPU seconds, workers' CPU seconds, images."""
    import torch
    from torch import nn
    torch.set_num_threads(threads)
    dl = _Capped(dl0.new(num_workers=workers), max(1, n_images // dl0.bs))
    kid0, cpu0, t0 = _cpu_children(), time.process_time(), time.perf_counter()
    first, n = None, 0
    if model is None:
        for xb, yb in dl:
            if first is None: first = time.perf_counter() - t0
            n += len(xb)
    else:
        from exp.callback_core import Callback
        from exp.learner import Learner
        from exp.minibatch import DataLoaders
        import exp.callbacks                                      # noqa: F401  (to_fp32)
        class First(Callback):
            def before_batch(self, learn):
                nonlocal first, n
                if first is None: first = time.perf_counter() - t0
                n += len(learn.xb[0])
        torch.manual_seed(0)
        learn = Learner(DataLoaders(dl), DIAG_MODELS[model](), loss_func=nn.CrossEntropyLoss(), lr=1e-2, device=device,
                        cbs=First())
        learn.to_fp32()                                           # whatever precision the Learner would pick by itself
        with learn.no_bar(), learn.no_logging(): learn.fit(1)
    wall = time.perf_counter() - t0
    main_cpu = time.process_time() - cpu0
    return dict(rate=n / wall, first=first, main_cpu=main_cpu, wall=wall, kids=_cpu_children() - kid0, n=n)


def _convnet():
    from exp.convolutions import mnist_convnet
    return mnist_convnet()


def _xresnet_mini():
    from exp.xresnet import xresnet_mini
    return xresnet_mini(c_in=1, n_out=10)


DIAG_MODELS = {'convnet': _convnet, 'xresnet_mini': _xresnet_mini}


def diagnose(path, args):
    """Why extra worker processes do not pay on a small machine: every (workers, main-process threads) pair, loading
    only and training the quickstart's model (and xresnet_mini) on the batches, timed in turns with CPU accounting."""
    import torch
    from exp.core import defaults, num_cpus
    dl0 = make_exp_v2(path, args.bs, 0, args.device)
    n_img = args.max_images or 20_000
    combos = [(w, t) for w in args.workers for t in args.main_threads]
    modes = ['load'] + [m for m in args.train_models if m]
    for m in modes[1:]: _diag_run(dl0, 0, max(args.main_threads), 2 * args.bs, m, args.device)    # warm-up (oneDNN)
    print(f'\n--diagnose: {n_img} images per pass, bs {args.bs}, {num_cpus()} CPUs (defaults.num_workers = '
          f'{defaults.num_workers}), {args.repeats} interleaved repeat(s); load average {os.getloadavg()[0]:.2f}', flush=True)
    res = {}
    for rep in range(args.repeats):
        jobs = [(mode, w, t) for mode in modes for w, t in combos]
        k = (rep * 5) % len(jobs)
        for mode, w, t in jobs[k:] + jobs[:k]:
            r = _diag_run(dl0, w, t, n_img, None if mode == 'load' else mode, args.device)
            res.setdefault((mode, w, t), []).append(r)
            print(f'  {mode:12s} workers={w} threads={t}: {r["rate"]:8,.0f} images/s, first batch {1e3 * r["first"]:5.0f} ms, '
                  f'main CPU {r["main_cpu"]:5.2f} s, workers CPU {r["kids"]:5.2f} s (load {os.getloadavg()[0]:.2f})', flush=True)
    torch.set_num_threads(args.threads)
    print('\n| mode | workers | main threads | images/s (best) | median | first batch ms | main process CPU / wall '
          '| workers CPU s | CPU us/image |')
    print('|---|---:|---:|---:|---:|---:|---:|---:|---:|')
    for mode in modes:
        for w, t in combos:
            rs = res[mode, w, t]
            b = max(rs, key=lambda r: r['rate'])
            print(f'| {mode} | {w} | {t} | {b["rate"]:,.0f} | {statistics.median(r["rate"] for r in rs):,.0f} | '
                  f'{1e3 * b["first"]:.0f} | {100 * b["main_cpu"] / b["wall"]:.0f}% | {b["kids"]:.2f} | '
                  f'{1e6 * (b["main_cpu"] + b["kids"]) / b["n"]:.0f} |')
        best = max(combos, key=lambda c: max(r['rate'] for r in res[mode, c[0], c[1]]))
        print(f'| {mode}: fastest | {best[0]} | {best[1]} | | | | | | |')
    print('\nReading it: "main process CPU / wall" near 100% with workers means the main process is busy (training, or '
          'OpenMP threads spinning between ops: with 2 torch threads in the main process it stays ~50-120% even when '
          'it only receives batches); "CPU us/image" above the 0-worker figure is what workers cost '
          '(fork, pickling and shared-memory IPC of each batch, a busier scheduler).')


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--workers', type=int, nargs='+', default=[0, 2], help='worker processes (each value is run for all)')
    ap.add_argument('--repeats', type=int, default=2, help='passes per framework and worker count (best one reported)')
    ap.add_argument('--max-images', type=int, default=0, help='stop a pass after this many images (0: the full 60k)')
    ap.add_argument('--bs', type=int, default=128)
    ap.add_argument('--device', default='cpu', help="where batches must end up ('cpu', 'cuda')")
    ap.add_argument('--frameworks', nargs='+', default=list(FRAMEWORKS), choices=list(FRAMEWORKS))
    ap.add_argument('--threads', type=int, default=1, help='torch intra-op threads in the main process (same for all)')
    ap.add_argument('--setup', action='store_true', help='create .bench-venv with fastai and exit')
    ap.add_argument('--no-setup', action='store_true', help='do not try to install fastai')
    ap.add_argument('--profile', action='store_true', help="print a cProfile of exp-v2's first pass (no workers)")
    ap.add_argument('--diagnose', action='store_true',
                    help='exp-v2 only: every (--workers, --main-threads) pair, loading and training, with CPU accounting')
    ap.add_argument('--main-threads', type=int, nargs='+', default=[1, 2], help='--diagnose: torch threads in the main process')
    ap.add_argument('--train-models', nargs='*', default=['convnet', 'xresnet_mini'], choices=list(DIAG_MODELS),
                    help='--diagnose: models trained on the batches (none: loading only)')
    ap.add_argument('--child', choices=list(FRAMEWORKS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.setup:
        setup(); print(f'ready: .venv/bin/python bench/data.py'); return
    import torch
    torch.set_num_threads(args.threads)
    from exp.data import URLs, untar_data
    path = untar_data(URLs.FASHION_MNIST_PNG)
    if args.diagnose:
        secs, nbytes = warm_cache(path)
        print(f'python {sys.executable}; torch {torch.__version__}; {os.cpu_count()} CPUs; page cache warmed '
              f'({nbytes / 1e6:.0f} MB in {secs:.1f} s)', flush=True)
        return diagnose(path, args)
    if args.child:                                       # one pass in this fresh process (fastai)
        t0 = time.perf_counter()
        dl = FRAMEWORKS[args.child](path, args.bs, args.workers[0], args.device)
        build_s = time.perf_counter() - t0
        n, s = one_pass(dl, args.max_images, args.device)
        print(f'RESULT {n} {s} {build_s}'); return
    fa_wanted = 'fastai' in args.frameworks
    fa_py = fastai_python(args) if fa_wanted else None
    if fa_wanted and fa_py is None:
        print('*** fastai could not be installed or imported: it is left out of this run '
              '(try: .venv/bin/python bench/data.py --setup) ***', flush=True)
        args.frameworks = [f for f in args.frameworks if f != 'fastai']
    secs, nbytes = warm_cache(path)
    print(f'python {sys.executable}; torch {torch.__version__}; {os.cpu_count()} CPUs; device {args.device}; '
          f'torch threads {args.threads}; page cache warmed ({nbytes / 1e6:.0f} MB in {secs:.1f} s)', flush=True)

    loaders, build = {}, {}
    for fw in args.frameworks:
        for w in args.workers:
            if fw == 'fastai': continue                  # built in its child process, each pass
            t0 = time.perf_counter()
            loaders[fw, w] = FRAMEWORKS[fw](path, args.bs, w, args.device)
            build[fw, w] = time.perf_counter() - t0
    if args.profile and 'exp-v2' in args.frameworks:
        import cProfile, pstats
        dl = loaders['exp-v2', args.workers[0]].new(num_workers=0)
        pr = cProfile.Profile(); pr.enable(); one_pass(dl, min(args.max_images or 20000, 20000), args.device); pr.disable()
        pstats.Stats(pr).sort_stats('tottime').print_stats(18)
    best = {}
    for rep in range(args.repeats):
        for w in args.workers:
            k = rep % len(args.frameworks)                    # a different framework goes first in each repeat
            for fw in args.frameworks[k:] + args.frameworks[:k]:
                if fw == 'fastai': n, s, build[fw, w] = run_child(fa_py, fw, w, args)
                else: n, s = one_pass(loaders[fw, w], args.max_images, args.device)
                rate = n / s
                print(f'  pass {rep + 1}: {fw:12s} workers={w}: {n} images in {s:6.2f} s = {rate:8,.0f} images/s', flush=True)
                best[fw, w] = max(best.get((fw, w), 0), rate)

    print(f'\nbest of {args.repeats} pass(es), {args.max_images or "all"} images, bs {args.bs}, device {args.device}')
    head = f'{"framework":12s} {"workers":>7s} {"images/s":>10s} {"build s":>8s} {"/ torchvision":>14s} {"/ fastai":>9s}'
    print(head); print('-' * len(head))
    for w in args.workers:
        for fw in args.frameworks:
            r = best[fw, w]
            tv, fa = best.get(('torchvision', w)), best.get(('fastai', w))
            print(f'{fw:12s} {w:7d} {r:10,.0f} {build[fw, w]:8.1f} {r / tv if tv else float("nan"):14.2f} '
                  f'{r / fa if fa else float("nan"):9.2f}')
    if fa_wanted and fa_py is None: print('(fastai: not installed, see above)')
    if 'fastai' in args.frameworks: print(f'(fastai ran in {fa_py}, one fresh process per pass)')


if __name__ == '__main__':
    main()
