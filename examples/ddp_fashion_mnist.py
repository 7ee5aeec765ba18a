#!/usr/bin/env python
"""Train a Fashion-MNIST classifier with exp's Learner, in one process or several: the same code either way.

    python examples/ddp_fashion_mnist.py                                      # one process
    torchrun --standalone --nproc_per_node=2 examples/ddp_fashion_mnist.py     # two, on this machine
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        examples/ddp_fashion_mnist.py                                         # 16 GPUs on two machines

Processes talk through gloo on CPUs and NCCL on GPUs (one GPU each). `--bs` is the batch of the whole
group: with N processes each takes bs/N items of every batch, so the run takes the same steps as one
process would. `--checkpoint` saves a checkpoint after every epoch, `--resume NAME` goes on from one,
`--ctrl-c-at E,B[,R]` sends a SIGINT (what Ctrl-C sends) after training batch B of epoch E (to rank R
only), to try both. With `--out DIR`, rank 0 writes the final weights (DIR/models/final.pth), the
predictions (DIR/preds.pth) and a summary (DIR/summary.json).
"""
import argparse, json, os, signal, sys, time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from exp.checkpoint import Checkpoint
from exp.distributed import replica_max_diff
import exp.callbacks                                  # Learner.save
import exp.schedules                                  # Learner.fit_one_cycle
from exp.callback_core import Callback
from exp.convolutions import mnist_convnet
from exp.learner import Learner
from exp.minibatch import DataLoaders, TensorLoader, accuracy, fashion_mnist_dls
from exp.torch_core import Flatten, num_distrib, rank_distrib


def get_model(name):
    "`convnet`: 03_learner's conv net (with BatchNorm); `mlp`: one hidden layer of 64 (no batch statistics)."
    if name == 'convnet': return mnist_convnet()
    return nn.Sequential(Flatten(), nn.Linear(28 * 28, 64), nn.ReLU(), nn.Linear(64, 10))


class CtrlCAt(Callback):
    "Send this process a SIGINT after training batch `batch` of epoch `epoch`, in process `rank` only (all if None)."
    def __init__(self, epoch, batch, rank=None): self.epoch, self.batch, self.rank = epoch, batch, rank
    def after_batch(self, learn):
        if learn.training and (learn.epoch, learn.iter) == (self.epoch, self.batch) and self.rank in (None, rank_distrib()):
            os.kill(os.getpid(), signal.SIGINT)


def parse(argv=None):
    "The command line."
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--model', choices=['convnet', 'mlp'], default='convnet')
    ap.add_argument('--data', choices=['tensors', 'datablock'], default='tensors',
                    help='in-memory tensors, or a DataBlock over the PNG files (decoded by each process)')
    ap.add_argument('--n-train', type=int, default=12000, help='training images used (of 60,000)')
    ap.add_argument('--n-valid', type=int, default=10000, help='validation images used (of 10,000)')
    ap.add_argument('--bs', type=int, default=128, help='the global batch size')
    ap.add_argument('--epochs', type=int, default=2)
    ap.add_argument('--lr', type=float, default=1e-2, help='one-cycle peak learning rate')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--threads', type=int, default=None, help='torch threads per process')
    ap.add_argument('--checkpoint', action='store_true', help='save a checkpoint after every epoch')
    ap.add_argument('--resume', default=None, help='go on from this checkpoint')
    ap.add_argument('--ctrl-c-at', default=None, metavar='E,B[,R]', help='send a SIGINT after batch B of epoch E (rank R)')
    ap.add_argument('--out', default=None, help='folder for the results (rank 0 writes them)')
    return ap.parse_args(argv)


def get_dls(args):
    "The first `n_train` training and `n_valid` test images: tensors in memory, or PNG files through a DataBlock."
    if args.data == 'tensors':
        dls = fashion_mnist_dls(bs=args.bs, n_train=args.n_train)
        return DataLoaders(dls.train, TensorLoader(*(t[:args.n_valid] for t in dls.valid.tensors), bs=dls.valid.bs))
    from exp.data import URLs, untar_data
    from exp.datablock import CategoryBlock, DataBlock, GrandparentSplitter, get_image_files, parent_label
    from exp.vision import ImageBlock, Normalize, PILImageBW
    limit = {'training': args.n_train, 'testing': args.n_valid}
    def first_files(path):                         # the PNGs are numbered per split: 00000.png, 00001.png...
        return get_image_files(path).filter(lambda f: int(f.stem) < limit[f.parent.parent.name])
    block = DataBlock(blocks=(ImageBlock(PILImageBW), CategoryBlock), get_items=first_files, get_y=parent_label,
                      splitter=GrandparentSplitter(train_name='training', valid_name='testing'),
                      batch_tfms=Normalize(0.286, 0.353))
    return block.dataloaders(untar_data(URLs.FASHION_MNIST_PNG), bs=args.bs, num_workers=0, device='cpu')


def main(argv=None):
    "Train, evaluate, and report from rank 0."
    args = parse(argv)
    if args.threads: torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dls = get_dls(args)
    learn = Learner(dls, get_model(args.model), loss_func=nn.CrossEntropyLoss(), metrics=accuracy, path=args.out or '.')
    cbs = [Checkpoint()] if args.checkpoint else []
    if args.ctrl_c_at: cbs.append(CtrlCAt(*map(int, args.ctrl_c_at.split(','))))
    with learn.distrib_ctx():
        rank, world = rank_distrib(), num_distrib()
        if rank == 0: print(f'{world} process(es), {learn.device}, global batch {args.bs}', flush=True)
        t0 = time.perf_counter()
        learn.fit_one_cycle(args.epochs, args.lr, cbs=cbs, resume=args.resume)
        seconds = time.perf_counter() - t0
        preds, targs = learn.get_preds()
        valid = learn.validate()
        summary = {'world_size': world, 'seconds': seconds, 'interrupted': learn.interrupted,
                   'values': learn.recorder.values, 'losses': learn.recorder.losses, 'valid': valid,
                   'accuracy_of_preds': (preds.argmax(1) == targs).float().mean().item(), 'n_preds': len(preds)}
        if world > 1:
            summary['replica_max_diff'] = replica_max_diff(learn.model)
            everyone = [None] * world
            dist.all_gather_object(everyone, [learn.recorder.values, valid])
            summary['same_numbers_everywhere'] = all(e == everyone[0] for e in everyone)
        if rank == 0:
            print(f"trained in {seconds:.1f} s; accuracy {summary['accuracy_of_preds']:.4f} on {len(preds)} validation images",
                  flush=True)
            if world > 1:
                print(f"replicas' weights differ by at most {summary['replica_max_diff']}; "
                      f"every process reports the same numbers: {summary['same_numbers_everywhere']}", flush=True)
        if args.out:
            learn.save('final', with_opt=False)
            if rank == 0:
                torch.save({'preds': preds, 'targs': targs}, Path(args.out) / 'preds.pth')
                (Path(args.out) / 'summary.json').write_text(json.dumps(summary))


if __name__ == '__main__':
    main()
