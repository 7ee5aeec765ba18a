"""Safe export: `learn.export()` / `load_learner` round-trip, and refuse pickles, edited files and what they cannot describe."""
import json, os, pickle
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from torch import nn

import exp
from exp.datablock import CategoryBlock, DataBlock, RandomSplitter, Transform, get_image_files, parent_label
from exp.export import (ExportDescriptionError, ExportFormatError, _ARCHS, _pack, build_arch, load_learner,
                        read_export, register_arch)
from exp.hooks import get_cnn
from exp.learner import Learner
from exp.minibatch import accuracy
from exp.vision import ImageBlock, Normalize, PILImage, Resize, TensorImage


def make_folder(root, n=20, size=16, seed=0):
    "`root/light/*.png` and `root/dark/*.png`: `n` random RGB images each (one epoch tells them apart)."
    rng = np.random.default_rng(seed)
    for cls, lo, hi in [('light', 150, 255), ('dark', 0, 105)]:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            PIL.Image.fromarray(rng.integers(lo, hi, (size, size, 3), dtype=np.uint8)).save(root / cls / f'{cls}_{i}.png')
    return root


def make_dls(folder, item_tfms=None):
    block = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_image_files, get_y=parent_label,
                      splitter=RandomSplitter(valid_pct=0.25, seed=0), item_tfms=item_tfms or Resize(16),
                      batch_tfms=[Normalize()])
    return block.dataloaders(folder, bs=8, num_workers=0, device='cpu')


def small_cnn(): return get_cnn(nfs=(8, 16), n_out=2, norm=nn.BatchNorm2d, n_in=3)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    "A learner trained one epoch on the tiny folder, and its export (in `learn.path`)."
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp('export')
    dls = make_dls(make_folder(root / 'shades'))
    torch.manual_seed(0)
    learn = Learner(dls, small_cnn(), loss_func=nn.CrossEntropyLoss(), metrics=accuracy, path=root, device='cpu')
    with learn.no_logging(): learn.fit_one_cycle(1, 1e-2)
    learn.export()
    return learn, root / 'export.pkl'


def parts(src):
    "The description and weights of export `src`, read with safetensors' own reader (any safetensors tool can)."
    from safetensors import safe_open
    with safe_open(str(src), 'pt') as f: return json.loads(f.metadata()['description']), {k: f.get_tensor(k) for k in f.keys()}


def edited(src, dst, edit=None):
    "A copy of export `src` at `dst` with its description changed by `edit`, checksummed again: what someone who knows the format could write."
    header, tensors = parts(src)
    if edit: edit(header)
    Path(dst).write_bytes(_pack(header, tensors))
    return dst


# ------------------------------------------------------------------ the round trip
def test_round_trip_predictions_equal(trained):
    learn, fn = trained
    learn_inf = load_learner(fn)
    items = learn.dls.valid_ds.items
    p0, t0 = learn.get_preds()
    p1, t1 = learn_inf.get_preds(dl=learn_inf.dls.test_dl(items))
    assert t1 is None and len(p0) == len(items) == 10
    assert torch.equal(p0, p1)                                            # equal, not merely close
    assert list(learn_inf.dls.vocab) == list(learn.dls.vocab) == ['dark', 'light']
    assert learn_inf.dls.norm_stats == learn.dls.norm_stats
    assert {p.device.type for p in learn_inf.model.parameters()} == {'cpu'}
    assert [m.name for m in learn_inf.metrics] == ['accuracy'] and type(learn_inf.loss_func) is nn.CrossEntropyLoss


def test_fastbook_flow(trained):
    learn, fn = trained
    assert fn in Path(learn.path).ls(file_exts='.pkl')
    learn_inf = load_learner(fn)
    img = learn.dls.valid_ds.items[0]
    label, idx, probs = learn_inf.predict(img)
    assert isinstance(label, str) and label == learn_inf.dls.vocab[idx] and idx.ndim == 0
    assert probs.shape == (2,) and abs(float(probs.sum()) - 1) < 1e-5
    ref = learn.predict(str(img))
    assert ref[0] == label and torch.equal(ref[2], probs)
    upload = {'name': img.name, 'type': 'image/png', 'content': memoryview(img.read_bytes())}   # ipywidgets 8
    for item in [PILImage.create(img), img.read_bytes(), memoryview(img.read_bytes()), upload]:
        l2, i2, p2 = learn_inf.predict(item)
        assert (l2, int(i2)) == (label, int(idx)) and torch.allclose(p2, probs)
    thumb = PILImage.create(img).to_thumb(8, 8)
    assert thumb.size == (8, 8) and type(thumb) is PILImage


def test_header_fields_and_no_device(trained):
    learn, fn = trained
    header, tensors = read_export(fn)
    assert (header['format'], header['format_version'], header['exp_version']) == ('exp-export', 2, exp.__version__)
    assert set(tensors) == set(learn.model.state_dict())
    text = json.dumps(header)
    assert 'cuda' not in text and 'device' not in text
    assert {t.device.type for t in tensors.values()} == {'cpu'}
    again = fn.with_name('again.pkl')
    learn.export(again.name)
    assert again.read_bytes() == fn.read_bytes()                           # deterministic: nothing volatile inside


def test_bf16_model_comes_back_bf16(trained, tmp_path):
    learn, _ = trained
    half = Learner(learn.dls, small_cnn().to(torch.bfloat16), loss_func=nn.CrossEntropyLoss(), path=tmp_path)
    half.model.load_state_dict(learn.model.state_dict())
    half.export()
    assert {p.dtype for p in load_learner(tmp_path / 'export.pkl').model.parameters()} == {torch.bfloat16}


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA: exported from a GPU learner, loaded on the CPU')
def test_gpu_export_loads_on_cpu(trained, tmp_path):
    learn, _ = trained
    gl = Learner(learn.dls, small_cnn(), loss_func=nn.CrossEntropyLoss(), path=tmp_path, device='cuda')
    gl.model.load_state_dict(learn.model.state_dict())
    gl.export()
    inf = load_learner(tmp_path / 'export.pkl')
    assert {p.device.type for p in inf.model.parameters()} == {'cpu'}
    items = learn.dls.valid_ds.items
    assert torch.allclose(inf.get_preds(dl=inf.dls.test_dl(items))[0], learn.get_preds()[0], atol=1e-5)


# ------------------------------------------------------------------ unsafe files are refused, and nothing runs
class Payload:
    "Unpickling this creates `marker`: code run by loading a file."
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (Path.touch, (Path(self.marker),))


def test_pickle_with_reduce_payload_is_refused_and_never_run(tmp_path):
    marker = tmp_path / 'PWNED'
    (tmp_path / 'export.pkl').write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ExportFormatError, match='not an exp export .looks like a Python pickle; refusing to load it because '
                                                 'unpickling can run arbitrary code.'):
        load_learner(tmp_path / 'export.pkl')
    assert not marker.exists()
    pickle.loads((tmp_path / 'export.pkl').read_bytes())                   # the payload is real: unpickling runs it
    assert marker.exists()


def test_torch_save_and_fastai_style_exports_are_refused(tmp_path):
    marker = tmp_path / 'PWNED'
    torch.save({'learner': Payload(marker)}, tmp_path / 'export.pkl')
    with pytest.raises(ExportFormatError, match='a zip holding a Python pickle'): load_learner(tmp_path / 'export.pkl')
    assert not marker.exists()
    (tmp_path / 'old.pkl').write_bytes(pickle.dumps({'a': 1}, protocol=0))
    with pytest.raises(ExportFormatError, match='looks like a Python pickle'): load_learner(tmp_path / 'old.pkl')


def test_other_files_are_named_and_refused(tmp_path):
    from safetensors.torch import save_file
    (tmp_path / 'empty.pkl').write_bytes(b'')
    (tmp_path / 'notes.pkl').write_text('hello')
    save_file({'w': torch.zeros(2)}, tmp_path / 'bare.pkl')
    for name, msg in [('empty.pkl', 'an empty file'), ('notes.pkl', 'looks like a text file'),
                      ('bare.pkl', 'bare safetensors file')]:
        with pytest.raises(ExportFormatError, match=msg) as e: load_learner(tmp_path / name)
        assert str(e.value).startswith(str(tmp_path / name))
    with pytest.raises(FileNotFoundError, match='missing.pkl: no such file'): load_learner(tmp_path / 'missing.pkl')
    with pytest.raises(IsADirectoryError, match='is a folder'): load_learner(tmp_path)


def _set(path, value):
    def edit(h):
        d = h
        for k in path[:-1]: d = d[k]
        d[path[-1]] = value
    return edit


EDITS = {
    'unknown transform': (_set(['dls', 'spec', 'batch_tfms', 0], {'name': 'exp.torch_core.save_atomic', 'args': {'obj': 1, 'path': 'x'}}),
                          None, "unknown transform 'exp.torch_core.save_atomic'"),
    'transform nested in args': (_set(['dls', 'spec', 'batch_tfms', 0], {'name': 'exp.vision.AffineCoordTfm',
                                  'args': {'tfms': [{'func': 'os.system'}]}}), None, "unknown function 'os.system'"),
    'function from the file': (_set(['dls', 'spec', 'x_tfms', 0, 0], {'func': 'builtins.eval'}), None, "unknown function 'builtins.eval'"),
    'newer format': (_set(['format_version'], 3), None, 'in export format 3; this exp .* reads format 2 and older: upgrade exp'),
    'bogus version': (_set(['format_version'], '1'), None, "format_version '1' is not one exp ever wrote"),
    'other format': (_set(['format'], 'something-else'), None, "its header says format 'something-else'"),
    'unknown layer': (_set(['model', 'sequential', 0, 1, 'sequential', 0, 1, 'layer'], 'subprocess.Popen'), None,
                      "unknown layer 'subprocess.Popen'"),
    'unknown architecture': (_set(['model'], {'arch': 'NoSuchNet', 'kwargs': {}}), None, "register_arch\\('NoSuchNet', factory\\)"),
    'huge model': (_set(['model', 'sequential', 0, 1, 'sequential', 0, 1, 'args', 'out_channels'], 10 ** 6), None,
                   'the weights do not fit the described model'),
    'unknown loss': (_set(['loss_func'], {'loss': 'os.remove'}), None, "unknown loss function 'os.remove'"),
    'unknown loaders': (_set(['dls', 'class'], 'exp.learner.Learner'), None, "unknown loaders class 'exp.learner.Learner'"),
    'bad transform args': (_set(['dls', 'spec', 'item_tfms', 0, 'args'], {'size': 'big', 'method': 'crop'}), None,
                           'the data pipeline cannot be rebuilt'),
}


@pytest.mark.parametrize('what', list(EDITS))
def test_edited_exports_are_refused_clearly(trained, tmp_path, what):
    edit, _, msg = EDITS[what]
    bad = edited(trained[1], tmp_path / 'export.pkl', edit)
    with pytest.raises(ExportFormatError, match=msg) as e: load_learner(bad)
    assert str(e.value).startswith(str(bad)) and '\n' not in str(e.value)


def test_damaged_containers(trained, tmp_path):
    good = trained[1].read_bytes()
    (tmp_path / 'cut.pkl').write_bytes(good[:40])
    (tmp_path / 'json.pkl').write_bytes(good.replace(b'"format":"exp-export"', b'"format":"exp-export'))
    (tmp_path / 'tiny.pkl').write_bytes(good[:10])
    (tmp_path / 'short.pkl').write_bytes(good[:-100])
    for name, msg in [('cut.pkl', 'damaged or truncated'), ('json.pkl', 'not valid JSON'), ('tiny.pkl', 'damaged or truncated'),
                      ('short.pkl', 'the weights cannot be read')]:
        with pytest.raises(ExportFormatError, match=msg): load_learner(tmp_path / name)


def test_any_edit_is_refused_weights_or_description(trained, tmp_path):
    "The digest covers the description and the weights: a changed statistic, label or weight is refused, not loaded quietly."
    good = trained[1].read_bytes()
    header, _ = parts(trained[1])
    label = header['dls']['spec']['vocab'][0]
    norm = next(t for t in header['dls']['spec']['batch_tfms'] if t['name'].endswith('Normalize'))
    mean = json.dumps(norm['args']['mean'][0])
    edits = {'label': good.replace(label.encode(), label.upper().encode(), 1),
             'normalization': good.replace(mean.encode(), mean.replace(mean[2], str((int(mean[2]) + 1) % 10), 1).encode(), 1),
             'weights': good[:-4] + b'\0\0\0\1'}
    for what, data in edits.items():
        assert data != good and len(data) == len(good), what
        (tmp_path / f'{what}.pkl').write_bytes(data)
        with pytest.raises(ExportFormatError, match='do not match their SHA-256 checksum'): load_learner(tmp_path / f'{what}.pkl')


def test_safetensors_tools_read_it_and_version_1_still_loads(trained, tmp_path):
    "An export is a standard safetensors file; a file in the first format (magic, JSON header, weights) still loads."
    import hashlib, struct
    from safetensors import safe_open
    from safetensors.torch import save as st_save
    from exp.export import _MAGIC
    learn, fn = trained
    with safe_open(str(fn), 'pt') as f:
        meta = f.metadata()
        assert meta['format'] == 'exp-export' and meta['format_version'] == '2' and len(meta['sha256']) == 64
        assert set(f.keys()) == set(learn.model.state_dict())
    header, tensors = parts(fn)
    header['format_version'] = 1
    payload = st_save(tensors)
    header['weights'] = {'bytes': len(payload), 'sha256': hashlib.sha256(payload).hexdigest()}
    hb = json.dumps(header).encode()
    (tmp_path / 'v1.pkl').write_bytes(_MAGIC + struct.pack('<Q', len(hb)) + hb + payload)
    old = load_learner(tmp_path / 'v1.pkl')
    items = learn.dls.valid_ds.items
    assert torch.equal(old.get_preds(dl=old.dls.test_dl(items))[0], load_learner(fn).get_preds(dl=old.dls.test_dl(items))[0])


# ------------------------------------------------------------------ what export refuses to write
class TinyNet(nn.Module):
    def __init__(self, n_out=2):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3), nn.Linear(4, n_out)
    def forward(self, x): return self.head(self.conv(x).mean((2, 3)))


def test_custom_model_is_refused_at_export_time(trained, tmp_path):
    learn, _ = trained
    lrn = Learner(learn.dls, nn.Sequential(nn.Identity(), TinyNet()), loss_func=nn.CrossEntropyLoss(), path=tmp_path)
    with pytest.raises(ExportDescriptionError, match=r"model.1 is a test_export.TinyNet, .*register_arch\('TinyNet', factory\)"):
        lrn.export()
    assert list(tmp_path.iterdir()) == []


def test_custom_transform_is_refused_at_export_time(trained, tmp_path):
    class Invert(Transform):
        order = 5
        input_types = (TensorImage,)
        def encodes(self, x): return 255 - x
    learn, _ = trained
    folder = Path(learn.dls.valid_ds.items[0]).parent.parent
    dls = make_dls(folder, item_tfms=[Resize(16), Invert()])
    lrn = Learner(dls, small_cnn(), loss_func=nn.CrossEntropyLoss(), path=tmp_path)
    with pytest.raises(ExportDescriptionError, match="unknown transform '.*Invert'"): lrn.export()
    assert not (tmp_path / 'export.pkl').exists()


def test_modified_after_build_arch_is_refused(trained, tmp_path):
    learn, _ = trained
    m = build_arch('torchvision.resnet18', num_classes=2)
    m.fc = nn.Linear(512, 3)
    lrn = Learner(learn.dls, m, loss_func=nn.CrossEntropyLoss(), path=tmp_path)
    with pytest.raises(ExportDescriptionError, match='does not rebuild it'): lrn.export()


def test_registered_architecture_round_trip(trained, tmp_path):
    learn, _ = trained
    register_arch('TinyNet', TinyNet)
    try:
        lrn = Learner(learn.dls, build_arch('TinyNet', n_out=2), loss_func=nn.CrossEntropyLoss(), path=tmp_path)
        lrn.export()
        inf = load_learner(tmp_path / 'export.pkl')
        assert inf.model.arch_spec == {'name': 'TinyNet', 'kwargs': {'n_out': 2}}
        items = learn.dls.valid_ds.items
        assert torch.equal(inf.get_preds(dl=inf.dls.test_dl(items))[0], lrn.get_preds()[0])
    finally: _ARCHS.pop('TinyNet', None)
    with pytest.raises(ExportFormatError, match=r"register_arch\('TinyNet', factory\) before"): load_learner(tmp_path / 'export.pkl')


def test_undescribable_loss_warns_and_loads(trained, tmp_path):
    learn, _ = trained
    lrn = Learner(learn.dls, small_cnn(), loss_func=nn.CrossEntropyLoss(weight=torch.ones(2)), path=tmp_path)
    with pytest.warns(UserWarning, match='cannot be described as data'): lrn.export()
    assert type(load_learner(tmp_path / 'export.pkl').loss_func) is nn.CrossEntropyLoss


def test_writes_are_atomic(trained, monkeypatch):
    learn, fn = trained
    before = fn.read_bytes()
    def fail(a, b): raise OSError('disk full (simulated)')
    monkeypatch.setattr(os, 'replace', fail)
    with pytest.raises(OSError, match='disk full'): learn.export()
    monkeypatch.undo()
    assert fn.read_bytes() == before
    assert not [p for p in fn.parent.iterdir() if p.name.endswith('.tmp')]


def test_only_rank_0_writes_the_export(trained, monkeypatch):
    learn, _ = trained
    monkeypatch.setenv('RANK', '1'); monkeypatch.setenv('WORLD_SIZE', '2')
    assert learn.export('rank1.pkl') == learn.path / 'rank1.pkl' and not (learn.path / 'rank1.pkl').exists()
    monkeypatch.setenv('RANK', '0')
    learn.export('rank0.pkl')
    assert (learn.path / 'rank0.pkl').exists()
