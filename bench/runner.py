"""Per-notebook overhead of run_notebook.py (fork from a warm parent) vs a Jupyter kernel per notebook.

    ./dev bench runner [--n 8]

Two kinds of notebook: trivial ones (a few cells of arithmetic) and torch-importing ones. For each,
the cost that matters is the time *over executing the cells in-process*: we measure that baseline in
an already-warm IPython shell, then run the same N notebooks sequentially (one at a time, so the
numbers are per notebook) through run_notebook's engine and through nbclient (one kernel each, as
nbdev's test runner and `jupyter nbconvert --execute` do), and print the overhead of each and the ratio.
The runner's one-off warm-up (importing torch once for the whole run) is reported separately.
"""
import argparse, logging, sys, tempfile, time
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import run_notebook as rn
from notebook2script import read_settings

KINDS = {
    'trivial': ['x = 1', 'y = sum(range(1000))', 'assert y == 499500'],
    'torch': ['import torch', 'a = torch.randn(64, 64)', 'b = (a @ a).sum()', 'assert b.isfinite()'],
}


def make_project(tmp: Path, kind: str, n: int) -> Path:
    (tmp / 'settings.ini').write_text('[DEFAULT]\nlib_name = benchlib\nlib_path = benchlib\nnbs_path = nbs\n')
    (tmp / 'nbs').mkdir(parents=True)
    for i in range(n):
        nbformat.write(new_notebook(cells=[new_code_cell(c) for c in KINDS[kind]],
                                    metadata={'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}}),
                       tmp / 'nbs' / f'{i:02d}_{kind}.ipynb')
    return tmp


def in_process(kind: str, reps: int = 5) -> float:
    "Seconds to execute the cells in an already-warm shell (torch already imported): the floor."
    shell = rn.make_shell()
    best = float('inf')
    for _ in range(reps):
        t0 = time.perf_counter()
        for c in KINDS[kind]: shell.run_cell(c, store_history=False)
        best = min(best, time.perf_counter() - t0)
    return best


def via_runner(proj: Path) -> tuple[float, float]:
    cfg = read_settings(proj)
    paths = sorted((proj / 'nbs').glob('*.ipynb'))
    t0 = time.perf_counter(); rn.run_notebooks([], cfg); warm = time.perf_counter() - t0   # starts the zygote
    t0 = time.perf_counter()
    results = rn.run_notebooks(paths, cfg, workers=1)
    assert all(r.passed for r in results), [r.report for r in results if not r.passed]
    return (time.perf_counter() - t0) / len(paths), warm


def via_nbclient(proj: Path) -> float:
    from nbclient import NotebookClient
    paths = sorted((proj / 'nbs').glob('*.ipynb'))
    t0 = time.perf_counter()
    for p in paths:
        nb = nbformat.read(p, as_version=4)
        NotebookClient(nb, kernel_name='python3', resources={'metadata': {'path': str(p.parent)}}).execute()
    return (time.perf_counter() - t0) / len(paths)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--n', type=int, default=8, help='notebooks of each kind')
    args = ap.parse_args()
    print(f'{args.n} notebooks of each kind, run one at a time; seconds per notebook\n')
    print(f'{"kind":8s} {"in-process":>10s} {"runner":>8s} {"nbclient":>9s} {"runner overhead":>16s} '
          f'{"kernel overhead":>16s} {"ratio":>6s}')
    warm = 0.0
    for kind in KINDS:
        with tempfile.TemporaryDirectory() as d:
            proj = make_project(Path(d), kind, args.n)
            base = in_process(kind)
            per_runner, w = via_runner(proj)
            warm = max(warm, w)
            per_kernel = via_nbclient(proj)
        o_r, o_k = per_runner - base, per_kernel - base
        print(f'{kind:8s} {base:10.4f} {per_runner:8.4f} {per_kernel:9.3f} {o_r:16.4f} {o_k:16.3f} {o_k / max(o_r, 1e-4):5.0f}x')
    print(f'\nrunner warm-up, paid once per run (imports torch, IPython, matplotlib; builds the shell): {warm:.2f} s'
          f'\ntarget: runner overhead <= 0.1 s per notebook')


if __name__ == '__main__':
    main()
