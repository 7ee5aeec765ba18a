#!/usr/bin/env python
"""Where a compiled xresnet_mini training step loses time on this CPU: five probes (issue 18, third to fifth passes).

    .venv/bin/python bench/cpu_probes.py conv       # each 3x3 conv: forward, input grad, weight grad (oneDNN) vs a matmul
    .venv/bin/python bench/cpu_probes.py threads    # 1 process x 2 threads vs 2 processes x 1 thread (running at once)
    .venv/bin/python bench/cpu_probes.py kernels    # the compiled step's largest ops and Inductor kernels
    .venv/bin/python bench/cpu_probes.py wrapper    # Inductor's Python wrapper vs its C++ wrapper
    .venv/bin/python bench/cpu_probes.py optimizer  # what Muon's step costs (exp.optimizers.muon_adamw) against AdamW's
    .venv/bin/python bench/cpu_probes.py all

The step is the 60-second recipe's (bench/accuracy.py `--recipe 60s`): xresnet_mini, batches of 128 at 28 px, bf16
autocast, channels_last, torch.compile, fused AdamW (`torch_adamw`), `keep_freed_memory()`; inputs are random tensors in memory.

conv: for every 3x3 convolution of the model (its input and weight shapes, found with a forward hook), the
milliseconds of the forward, of `aten.convolution_backward` asked for the input's gradient only and for the weight's
only, and of the weight's gradient computed another way: one matmul of the output gradient with the input's 3x3
patches (an im2col `as_strided` view of the padded NHWC input, copied once by `reshape`). Medians of 30 calls.

threads: training images/s of the step in one process with 2 threads, in one process with 1 thread, and in two
1-thread processes started at the same time (each on its own batches; their sum). Fresh processes, in turns, best
of `--rounds`. The two-process sum is what the cores can do when no kernel waits for another thread.

kernels: `torch.profiler` over 20 steps, with Inductor's kernel profiling on, so that the fused kernels (BatchNorm,
ReLU, residual adds: one C++ kernel each) are named; the largest entries by self CPU time.

wrapper: training images/s of the step compiled two ways, for the two recipes' nets (xresnet_mini, xresnet_small):
with Inductor's default Python wrapper (generated Python calls each C++ kernel) and with its C++ wrapper
(`options={'cpp_wrapper': True}`). Fresh processes on 2 threads, in turns, best of `--rounds`: runs an hour apart
differ by more than the two wrappers do (the machine's own speed changes), so only a comparison within one run says
which is faster.

optimizer: the cost of `exp.optimizers.muon_adamw` (the 60-second recipe v4's optimizer) against torch's fused AdamW
(`exp.learner.torch_adamw`, v3's), in one process: the optimizer step alone on xresnet_mini's parameters with fixed
random gradients; its Newton-Schulz part (`orthogonalize_all` of the 9 hidden weights), stacked as the optimizer
runs it (its stacks of fewer than 64 rows in fp32), with every stack in bf16 (`fp32_below=0`) and one matrix at a
time; and the whole compiled training step with each optimizer (Muon both ways). Medians of 30 calls,
the optimizers in turns, best of `--rounds`.
"""
import argparse, logging, os, statistics, subprocess, sys, time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from exp.callbacks import keep_freed_memory
from exp.learner import torch_adamw
from exp.optimizers import muon_adamw, orthogonalize_all
from exp.xresnet import xresnet_mini, xresnet_small

ARCHS = {'xresnet_mini': xresnet_mini, 'xresnet_small': xresnet_small}

BS, PX = 128, 28


def step_fn(threads, compile=True, wrapper='python', arch='xresnet_mini', opt_func=torch_adamw):
    "The recipe's training step on one random batch, with `opt_func`'s optimizer: a function doing one step."
    torch.set_num_threads(threads)
    keep_freed_memory()
    torch.manual_seed(0)
    model = ARCHS[arch](c_in=1, n_out=10).to(memory_format=torch.channels_last)
    if compile: model = torch.compile(model, options={'cpp_wrapper': True} if wrapper == 'cpp' else None)
    opt = opt_func(model.parameters(), lr=1e-3)
    x = torch.randn(BS, 1, PX, PX).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (BS,))
    def step():
        with torch.autocast('cpu', torch.bfloat16): loss = F.cross_entropy(model(x), y)
        loss.backward(); opt.step(); opt.zero_grad()
    return step


def ms(f, n=30):
    "Median milliseconds of `n` calls of `f` (after 5 warm-up calls)."
    for _ in range(5): f()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


# ------------------------------------------------------------------ conv
def conv_shapes():
    "(input shape, conv module) of every 3x3 convolution of xresnet_mini on a batch of BS x 1 x PX x PX."
    model, found = xresnet_mini(c_in=1, n_out=10), []
    hooks = [m.register_forward_hook(lambda m, i, o: found.append((tuple(i[0].shape), m)))
             for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    with torch.no_grad(): model(torch.randn(BS, 1, PX, PX))
    for h in hooks: h.remove()
    return found


def weight_grad_by_matmul(g, x, k, s, p):
    "d(loss)/d(weight) of a k x k conv (stride s, padding p) as one matmul: output grad^T @ the input's patches."
    xp = F.pad(x, (p, p, p, p)).permute(0, 2, 3, 1)                  # NHWC (contiguous for a channels_last x)
    n, H, W, c = xp.shape
    ho, wo = g.shape[-2:]
    patches = xp.as_strided((n, ho, wo, k, k, c), (H * W * c, s * W * c, s * c, W * c, c, 1)).reshape(-1, k * k * c)
    return g.permute(0, 2, 3, 1).reshape(-1, g.shape[1]).t() @ patches  # (c_out, k*k*c_in): the weight in NHWC order


def probe_conv(threads):
    torch.set_num_threads(threads)
    keep_freed_memory()
    print(f'conv: xresnet_mini 3x3 convolutions, batch {BS}, bf16 channels_last, {threads} threads; median ms of 30 calls')
    print('| input | c_out | stride | forward | input grad | weight grad (oneDNN) | weight grad (one matmul) | matmul/oneDNN |')
    print('|---|---:|---:|---:|---:|---:|---:|---:|')
    tot = [0.] * 4
    for shape, conv in conv_shapes():
        s, p = conv.stride[0], conv.padding[0]
        x = torch.randn(shape, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        w = conv.weight.detach().to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        y = F.conv2d(x, w, stride=s, padding=p)
        g = torch.randn_like(y).contiguous(memory_format=torch.channels_last)
        args = (g, x, w, None, (s, s), (p, p), (1, 1), False, (0, 0), 1)
        gw = torch.ops.aten.convolution_backward(*args, (False, True, False))[1]
        mine = weight_grad_by_matmul(g, x, 3, s, p).view(w.shape[0], 3, 3, w.shape[1]).permute(0, 3, 1, 2)
        err = (mine.float() - gw.float()).abs().max().item() / gw.float().abs().max().item()
        assert err < 0.05, f'the matmul weight gradient differs from oneDNN\'s by {err:.3f} (relative) for {shape}'
        t = [ms(lambda: F.conv2d(x, w, stride=s, padding=p)),
             ms(lambda: torch.ops.aten.convolution_backward(*args, (True, False, False))),
             ms(lambda: torch.ops.aten.convolution_backward(*args, (False, True, False))),
             ms(lambda: weight_grad_by_matmul(g, x, 3, s, p))]
        tot = [a + b for a, b in zip(tot, t)]
        print(f'| {shape[1]}x{shape[2]}x{shape[3]} | {w.shape[0]} | {s} | {t[0]:.2f} | {t[1]:.2f} | {t[2]:.2f} | {t[3]:.2f} | '
              f'{t[3] / t[2]:.2f} |', flush=True)
    print(f'| all | | | {tot[0]:.2f} | {tot[1]:.2f} | {tot[2]:.2f} | {tot[3]:.2f} | {tot[3] / tot[2]:.2f} |')


# ------------------------------------------------------------------ threads
def child_threads(threads, seconds, wrapper='python', arch='xresnet_mini'):
    "In a fresh process: warm up, then print the step's images/s over about `seconds`."
    step = step_fn(threads, wrapper=wrapper, arch=arch)
    for _ in range(8): step()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds: step(); n += 1
    print(f'{n * BS / (time.perf_counter() - t0):.1f}', flush=True)


def start(threads, seconds, wrapper='python', arch='xresnet_mini'):
    "A fresh process timing the step (`child_threads`)."
    return subprocess.Popen([sys.executable, __file__, '--child', str(threads), '--seconds', str(seconds),
                             '--wrapper', wrapper, '--arch', arch],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def wait(p):
    "The images/s a `start`ed process printed."
    out, _ = p.communicate()
    if p.returncode: raise RuntimeError(f'a probe process failed (exit {p.returncode})')
    return float(out.split()[-1])


def probe_threads(rounds, seconds):
    start_ = lambda threads: start(threads, seconds)
    runs = {'1 process x 2 threads': lambda: wait(start_(2)),
            '1 process x 1 thread': lambda: wait(start_(1)),
            '2 processes x 1 thread (sum)': lambda: sum(wait(p) for p in [start_(1), start_(1)])}   # both start, then wait
    best = dict.fromkeys(runs, 0.)
    for r in range(rounds):
        for k, run in runs.items(): best[k] = max(best[k], run())
        print(f'round {r + 1}/{rounds} done (load {os.getloadavg()[0]:.2f})', flush=True)
    one = best['1 process x 1 thread']
    print(f'threads: the compiled recipe step (xresnet_mini, batch {BS}, bf16, channels_last); images/s, best of {rounds}')
    print('| run | images/s | vs 1 thread |')
    print('|---|---:|---:|')
    for k, v in best.items(): print(f'| {k} | {v:,.0f} | {v / one:.2f}x |')


# ------------------------------------------------------------------ wrapper
def probe_wrapper(rounds, seconds, threads):
    best = {(arch, wrapper): 0. for arch in ARCHS for wrapper in ('python', 'cpp')}
    for r in range(rounds):
        for arch, wrapper in best: best[arch, wrapper] = max(best[arch, wrapper], wait(start(threads, seconds, wrapper, arch)))
        print(f'round {r + 1}/{rounds} done (load {os.getloadavg()[0]:.2f})', flush=True)
    print(f'wrapper: the compiled recipe step (batch {BS}, bf16, channels_last, {threads} threads); images/s, best of {rounds}')
    print('| net | Python wrapper | C++ wrapper | C++ / Python |')
    print('|---|---:|---:|---:|')
    for arch in ARCHS:
        py, cpp = best[arch, 'python'], best[arch, 'cpp']
        print(f'| {arch} | {py:,.0f} | {cpp:,.0f} | {cpp / py:.2f}x |')


# ------------------------------------------------------------------ kernels
def probe_kernels(threads, top):
    import torch._inductor.config as inductor_config
    inductor_config.cpp.enable_kernel_profile = True               # name each fused C++ kernel in the profile
    step = step_fn(threads)
    for _ in range(8): step()
    from torch.profiler import profile
    with profile() as prof:
        for _ in range(20): step()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    print(f'kernels: 20 compiled recipe steps on {threads} threads, {total / 20e3:.1f} ms of CPU time per step; '
          f'the {top} largest entries by self time')
    print('| op or Inductor kernel | ms per step | share |')
    print('|---|---:|---:|')
    for e in events[:top]:
        name = e.key if len(e.key) <= 110 else e.key[:107] + '...'
        print(f'| `{name}` | {e.self_cpu_time_total / 20e3:.2f} | {e.self_cpu_time_total / total:.1%} |')


# ------------------------------------------------------------------ optimizer
def probe_optimizer(rounds, threads):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = xresnet_mini(c_in=1, n_out=10)
    for p in model.parameters(): p.grad = torch.randn_like(p) * 1e-3
    opt_funcs = {'torch_adamw': torch_adamw, 'muon_adamw': muon_adamw,
                 'muon_adamw, all bf16': partial(muon_adamw, fp32_below=0)}      # every stack in bf16, the small ones too
    opts = {name: f(model.parameters(), lr=1e-6) for name, f in opt_funcs.items()}
    gs = [p.grad.flatten(1) for p in model.parameters() if id(p) in opts['muon_adamw'].hidden]
    rows = {**{f'optimizer step, {name}': opt.step for name, opt in opts.items()},
            f'orthogonalize_all, {len(gs)} matrices stacked': lambda: orthogonalize_all(gs),
            f'orthogonalize_all, {len(gs)} matrices stacked, all bf16': lambda: orthogonalize_all(gs, fp32_below=0),
            f'orthogonalize_all, {len(gs)} matrices one at a time': lambda: [orthogonalize_all([g]) for g in gs],
            **{f'compiled training step, {name}': step_fn(threads, opt_func=f) for name, f in opt_funcs.items()}}
    best = {k: float('inf') for k in rows}
    for r in range(rounds):
        for k, f in rows.items(): best[k] = min(best[k], ms(f))
    print(f'optimizer: xresnet_mini, {threads} threads, median ms of 30 calls, best of {rounds} rounds in turns '
          f'(load {os.getloadavg()[0]:.2f})')
    print('| what | ms |')
    print('|---|---:|')
    for k, v in best.items(): print(f'| {k} | {v:.2f} |')
    a, m = best['compiled training step, torch_adamw'], best['compiled training step, muon_adamw']
    print(f'muon_adamw\'s training step: {m / a:.2f}x torch_adamw\'s ({BS * 1e3 / m:,.0f} against {BS * 1e3 / a:,.0f} images/s)')


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('probe', nargs='?', default='all', choices=['conv', 'threads', 'kernels', 'wrapper', 'optimizer', 'all'])
    ap.add_argument('--threads', type=int, default=2, help='threads for the conv, kernels and wrapper probes (default 2)')
    ap.add_argument('--rounds', type=int, default=2, help='threads, wrapper and optimizer probes: rounds (default 2)')
    ap.add_argument('--seconds', type=float, default=8., help='threads and wrapper probes: seconds each process times (default 8)')
    ap.add_argument('--top', type=int, default=12, help='kernels probe: entries shown (default 12)')
    ap.add_argument('--child', type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument('--wrapper', default='python', help=argparse.SUPPRESS)
    ap.add_argument('--arch', default='xresnet_mini', help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.getLogger('torch.utils.cpp_extension').setLevel(logging.ERROR)   # compile: "no CUDA runtime", expected on a CPU
    if args.child is not None: return child_threads(args.child, args.seconds, args.wrapper, args.arch)
    print(f'torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}', flush=True)
    if args.probe in ('conv', 'all'): probe_conv(args.threads)
    if args.probe in ('threads', 'all'): probe_threads(args.rounds, args.seconds)
    if args.probe in ('kernels', 'all'): probe_kernels(args.threads, args.top)
    if args.probe in ('wrapper', 'all'): probe_wrapper(args.rounds, args.seconds, args.threads)
    if args.probe in ('optimizer', 'all'): probe_optimizer(args.rounds, args.threads)


if __name__ == '__main__':
    main()
