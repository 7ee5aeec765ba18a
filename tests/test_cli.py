"""The command line: `python -m exp train` on an image folder, `predict` with its export, and one-line errors."""
import contextlib, io, os, pickle, subprocess, sys

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import ROOT
from exp.__main__ import find_splits, main
from exp.export import _pack, read_export

ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT)}


def make_folder(root, n=20, size=16, seed=0, mode='RGB'):
    "`root/light/*.png` and `root/dark/*.png`: `n` random images each."
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == 'RGB' else (size, size)
    for cls, lo, hi in [('light', 150, 255), ('dark', 0, 105)]:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            PIL.Image.fromarray(rng.integers(lo, hi, shape, dtype=np.uint8)).save(root / cls / f'{cls}_{i}.png')
    return root


def cli(*argv, cwd=None):
    "`python -m exp ARGV` in a child process: (status, stdout, stderr)."
    r = subprocess.run([sys.executable, '-m', 'exp', *map(str, argv)], capture_output=True, text=True, cwd=cwd, env=ENV,
                       timeout=120)
    return r.returncode, r.stdout, r.stderr


def run(*argv):
    "`main(ARGV)` in this process: (status, stdout, stderr)."
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e): code = main([str(a) for a in argv])
    return code, o.getvalue(), e.getvalue()


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    "A tiny folder, trained on by a real `python -m exp train` (1 epoch), and the export it wrote."
    root = tmp_path_factory.mktemp('cli')
    folder = make_folder(root / 'shades')
    code, out, err = cli('train', 'shades', '--epochs', 1, '--bs', 8, '--workers', 0, '--out', 'model.pkl', cwd=root)
    assert code == 0, err
    return root, folder, out


def test_train_prints_the_table_and_writes_an_export(trained):
    root, _, out = trained
    lines = out.splitlines()
    assert lines[0] == 'shades: 32 training and 8 validation images (random 20% held out), 2 classes, RGB 16x16'
    assert lines[1].split() == ['epoch', 'train_loss', 'valid_loss', 'accuracy', 'time']
    assert lines[2].split()[0] == '0' and lines[-1].startswith('wrote model.pkl (validation accuracy ')
    from safetensors import safe_open
    with safe_open(str(root / 'model.pkl'), 'pt') as f: assert f.metadata()['format'] == 'exp-export'   # a safetensors file


def test_predict_prints_label_and_probability(trained):
    root, folder, _ = trained
    imgs = [folder / 'light' / 'light_0.png', folder / 'dark' / 'dark_0.png']
    code, out, err = cli('predict', root / 'model.pkl', *imgs)
    assert (code, err) == (0, '')
    rows = [l.split('\t') for l in out.splitlines()]
    assert [r[0] for r in rows] == [str(i) for i in imgs]
    assert all(r[1] in ('dark', 'light') and 0.5 <= float(r[2]) <= 1 for r in rows)
    from exp.export import load_learner
    learn = load_learner(root / 'model.pkl')
    label, idx, probs = learn.predict(imgs[0])
    assert rows[0][1:] == [label, f'{float(probs[idx]):.4f}']


def test_incompatible_export_exits_nonzero_with_one_line(trained):
    root, folder, _ = trained
    h, tensors = read_export(root / 'model.pkl')
    h['format_version'] = 3
    (root / 'future.pkl').write_bytes(_pack(h, tensors))
    code, out, err = cli('predict', root / 'future.pkl', folder / 'dark' / 'dark_1.png')
    assert (code, out) == (1, '')
    assert err.splitlines() == [f'exp predict: {root / "future.pkl"}: written by exp {h["exp_version"]} in export format 3; '
                                f'this exp ({h["exp_version"]}) reads format 2 and older: upgrade exp to load it']


def test_mnist_style_tree_grayscale_in_process(tmp_path):
    torch.set_num_threads(1)
    for split, n in [('training', 12), ('testing', 4)]: make_folder(tmp_path / 'digits' / split, n=n, mode='L')
    assert find_splits(tmp_path / 'digits') == ('training', 'testing')
    code, out, err = run('train', tmp_path / 'digits', '--epochs', 1, '--bs', 8, '--workers', 0, '--size', 12,
                         '--out', tmp_path / 'digits.pkl')
    assert (code, err) == (0, ''), err
    assert '24 training and 8 validation images (training/ and testing/), 2 classes, grayscale 12x12' in out
    code, out, err = run('info', tmp_path / 'digits.pkl')
    assert code == 0 and 'PILImageBW.create' in out and 'classes           2: dark, light' in out


def test_user_errors_are_one_line_naming_the_file(trained, tmp_path):
    root, folder, _ = trained
    (tmp_path / 'notes.txt').write_text('not an image')
    (tmp_path / 'pickled.pkl').write_bytes(pickle.dumps({'x': 1}))
    img = folder / 'light' / 'light_3.png'
    cases = [(('train', tmp_path / 'nowhere'), f'exp train: {tmp_path / "nowhere"}: no such folder'),
             (('train', tmp_path / 'notes.txt'), f'exp train: {tmp_path / "notes.txt"}: not a folder'),
             (('train', tmp_path), f'exp train: {tmp_path}: no image files found'),
             (('predict', root / 'model.pkl', tmp_path / 'notes.txt'), f'exp predict: {tmp_path / "notes.txt"}: cannot read image'),
             (('predict', root / 'model.pkl', tmp_path / 'gone.png'), f'exp predict: {tmp_path / "gone.png"}: no such file'),
             (('predict', tmp_path / 'missing.pkl', img), f'exp predict: {tmp_path / "missing.pkl"}: no such file'),
             (('predict', tmp_path / 'pickled.pkl', img), f'exp predict: {tmp_path / "pickled.pkl"}: not an exp export (looks like a Python pickle'),
             (('predict', img, img), f'exp predict: {img}: not an exp export'),
             (('train', folder, '--arch', 'nonet', '--workers', 0), "exp train: --arch nonet: not 'cnn'")]
    for argv, start in cases:
        code, out, err = run(*argv)
        assert code == 1, (argv, out, err)
        assert len(err.splitlines()) == 1 and err.startswith(start), (argv, err)


def test_one_bad_image_does_not_stop_the_others(trained, tmp_path):
    root, folder, _ = trained
    (tmp_path / 'notes.txt').write_text('not an image')
    img = folder / 'dark' / 'dark_2.png'
    code, out, err = run('predict', root / 'model.pkl', tmp_path / 'notes.txt', img)
    assert code == 1 and out.startswith(f'{img}\t') and len(err.splitlines()) == 1


def test_usage_errors_exit_2():
    with contextlib.redirect_stderr(io.StringIO()) as e, pytest.raises(SystemExit) as ex: main(['predict'])
    assert ex.value.code == 2 and 'the following arguments are required' in e.getvalue()


# ------------------------------------------------------------------ hostile images (issue 14)
def crash_png():
    "The 69-byte PNG that made libpng inside torchvision kill the process: an 8-bit RGB 64×64 header, pixel data cut short."
    import struct, zlib
    def chunk(kind, body): return struct.pack('>I', len(body)) + kind + body + struct.pack('>I', zlib.crc32(kind + body))
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', 64, 64, 8, 2, 0, 0, 0))
            + chunk(b'IDAT', zlib.compress(b'\0' * 100)) + chunk(b'IEND', b''))


def test_crash_png_is_one_error_and_the_next_image_is_predicted(trained, tmp_path):
    root, folder, _ = trained
    bad = tmp_path / 'crash.png'; bad.write_bytes(crash_png())
    assert len(bad.read_bytes()) == 69
    good = folder / 'dark' / 'dark_1.png'
    code, out, err = cli('predict', root / 'model.pkl', bad, good)
    assert code == 1, (code, out, err)                                  # a failure, not a signal (139 = SIGSEGV)
    assert out.startswith(f'{good}\tdark\t') and err.splitlines() == [f'exp predict: {bad}: cannot read image (' +
                                                                        err.split(': cannot read image (', 1)[1].rstrip()]


def test_a_loader_over_a_folder_with_a_crash_png_names_it(tmp_path):
    "A data loader over such a folder raises ImageReadError naming the file (or skips it), in a child process: no crash."
    folder = make_folder(tmp_path / 'f', n=4)
    (folder / 'dark' / 'crash.png').write_bytes(crash_png())
    code = ('from exp.all import *\n'
            f'dls = ImageDataLoaders.from_folder({str(folder)!r}, valid_pct=0.01, seed=0, bs=16, num_workers=0)\n'
            'try:\n    [b for b in dls.train] + [b for b in dls.valid]\n'
            'except ImageReadError as e: print("named:", "crash.png" in str(e))\n'
            f'dls = ImageDataLoaders.from_folder({str(folder)!r}, valid_pct=0.01, seed=0, bs=16, num_workers=0, skip_errors=True)\n'
            'import warnings; warnings.simplefilter("ignore")\n'
            'print("skipped:", sum(len(b[0]) for b in dls.train) + sum(len(b[0]) for b in dls.valid))\n')
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert 'named: True' in r.stdout and 'skipped: 8' in r.stdout, r.stdout
