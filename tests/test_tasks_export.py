"""Every task exports and predicts (issue 17): label sets, masks, points and numbers round-trip through `learn.export()`,
`load_learner` and `python -m exp predict`; edited descriptions of their targets are refused."""
import contextlib, csv, io, json

import numpy as np
import PIL.Image
import pytest
import torch

from exp.__main__ import main
from exp.datablock import (CategoryBlock, ColReader, ColSplitter, DataBlock, MultiCategory, MultiCategoryBlock,
                           RegressionBlock, TitledFloat)
from exp.export import ExportFormatError, _pack, load_learner, read_export
from exp.losses import BCEWithLogitsLossFlat, CrossEntropyLossFlat, MSELossFlat
from exp.segmentation import unet_learner
from exp.vision import ImageBlock, PILImageBW, PointBlock, Resize, SegmentationDataLoaders, TensorMask, TensorPoint
from exp.vision_learner import vision_learner
from exp.xresnet import xresnet_mini

CODES = ['background', 'square', 'bar']


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    "Small models: one torch thread is as fast, and never oversubscribed on a shared machine."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def scenes(tmp_path_factory):
    "A tiny scenes folder: 24x24 gray canvases with a square (value 220) and/or a bar (value 120), masks, labels.csv, centres."
    root = tmp_path_factory.mktemp('scenes')
    (root / 'images').mkdir(); (root / 'masks').mkdir()
    rng, rows, centres = np.random.default_rng(0), [], {}
    for i in range(40):
        img, mask, labels = np.zeros((24, 24), np.uint8), np.zeros((24, 24), np.uint8), []
        if i % 3 != 2:
            x, y = rng.integers(0, 14, 2)
            img[y:y + 8, x:x + 8], mask[y:y + 8, x:x + 8] = 220, 1
            labels.append('square'); centres[f'{i}.png'] = [x + 4., y + 4.]
        if i % 3 != 0:
            x = int(rng.integers(0, 20))
            img[:, x:x + 3], mask[:, x:x + 3] = 120, 2
            labels.append('bar'); centres.setdefault(f'{i}.png', [x + 1.5, 12.])
        PIL.Image.fromarray(img).save(root / 'images' / f'{i}.png')
        PIL.Image.fromarray(mask).save(root / 'masks' / f'{i}.png')
        rows.append({'fname': f'{i}.png', 'labels': ' '.join(labels), 'is_valid': str(i >= 32)})
    with open(root / 'labels.csv', 'w', newline='') as f:
        w = csv.DictWriter(f, ['fname', 'labels', 'is_valid']); w.writeheader(); w.writerows(rows)
    (root / 'centres.json').write_text(json.dumps(centres))
    return root, rows, centres


def run(*argv):
    "`python -m exp ARGV` in this process: (status, stdout, stderr)."
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e): code = main([str(a) for a in argv])
    return code, o.getvalue(), e.getvalue()


def fitted(learn):
    torch.manual_seed(0)
    learn.fit(1, 1e-2)
    return learn


def same_prediction(a, b):
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor): assert torch.equal(x.as_subclass(torch.Tensor), y.as_subclass(torch.Tensor)) and type(x) is type(y)
        else: assert x == y and type(x) is type(y)


def block(root, y_block, get_y):
    return DataBlock(blocks=(ImageBlock(PILImageBW), y_block), get_x=ColReader('fname', pref=root / 'images'), get_y=get_y,
                     splitter=ColSplitter(), item_tfms=Resize(16))


def test_multilabel(scenes, tmp_path):
    root, rows, _ = scenes
    dls = block(root, MultiCategoryBlock, ColReader('labels', label_delim=' ')).dataloaders(rows, bs=8, num_workers=0, device='cpu')
    learn = fitted(vision_learner(dls, xresnet_mini, pretrained=False, path=tmp_path))
    learn.export()
    inf = load_learner(tmp_path / 'export.pkl')
    img = root / 'images' / rows[-1]['fname']
    same_prediction(learn.predict(img), inf.predict(img))
    labels, decided, probs = inf.predict(img)
    assert type(labels) is MultiCategory and list(labels) == [v for v, d in zip(dls.vocab, decided) if d]
    assert type(inf.loss_func) is BCEWithLogitsLossFlat and list(inf.dls.vocab) == ['bar', 'square']
    code, out, err = run('predict', tmp_path / 'export.pkl', img)
    name, shown, ps = out.rstrip('\n').split('\t')
    assert (code, err, name, shown) == (0, '', str(img), ';'.join(labels))
    assert [float(p) for p in ps.split(';') if p] == pytest.approx([float(p) for p, d in zip(probs, decided) if d], abs=1e-4)
    assert 'MultiCategorize, OneHotEncode' in run('info', tmp_path / 'export.pkl')[1]


def test_segmentation(scenes, tmp_path):
    root, rows, _ = scenes
    fnames = [root / 'images' / r['fname'] for r in rows]
    dls = SegmentationDataLoaders.from_label_func(root, fnames, lambda o: o.parent.parent / 'masks' / o.name, codes=CODES,
                                                  img_cls=PILImageBW, item_tfms=Resize(16), bs=8, seed=0, num_workers=0,
                                                  device='cpu')
    learn = fitted(unet_learner(dls, xresnet_mini, pretrained=False, path=tmp_path))
    learn.export('unet.pkl')
    inf = load_learner(tmp_path / 'unet.pkl')
    assert inf.model.arch_spec['name'] == 'unet_model' and type(inf.loss_func) is CrossEntropyLossFlat and inf.loss_func.axis == 1
    assert list(inf.dls.vocab) == CODES and inf.dls.c == 3
    mask, dec, probs = inf.predict(fnames[0])
    assert type(mask) is TensorMask and mask.shape == (16, 16) and probs.shape == (3, 16, 16)
    same_prediction(learn.predict(fnames[0]), (mask, dec, probs))
    code, out, err = run('predict', tmp_path / 'unet.pkl', fnames[0], fnames[1], '--masks', tmp_path / 'out')
    assert (code, err) == (0, '')
    first = out.splitlines()[0].split('\t')
    shares = dict(c.rsplit(':', 1) for c in first[1].split())
    assert sum(map(float, shares.values())) == pytest.approx(1, abs=0.01)
    saved = np.asarray(PIL.Image.open(first[2]))
    assert saved.shape == (16, 16) and np.array_equal(saved, mask.numpy())       # the mask the learner predicted, as codes
    assert set(shares) == {CODES[k] for k in np.unique(saved)}


def test_points(scenes, tmp_path):
    root, rows, centres = scenes
    dls = block(root, PointBlock, lambda r: [centres[r['fname']]]).dataloaders(rows, bs=8, num_workers=0, device='cpu')
    assert dls.c == 2 and type(dls.loss_func) is MSELossFlat
    learn = fitted(vision_learner(dls, xresnet_mini, pretrained=False, y_range=(-1, 1), path=tmp_path))
    learn.export('points.pkl')
    inf = load_learner(tmp_path / 'points.pkl')
    img = root / 'images' / rows[-1]['fname']
    same_prediction(learn.predict(img), inf.predict(img))
    pt = inf.predict(img)[0]
    assert type(pt) is TensorPoint and pt.shape == (1, 2) and 0 <= pt.min() and pt.max() <= 16
    code, out, err = run('predict', tmp_path / 'points.pkl', img)
    x, y = map(float, out.split('\t')[1].split(','))
    assert (code, err) == (0, '') and (x, y) == pytest.approx(pt[0].tolist(), abs=0.01)


def test_regression(scenes, tmp_path):
    root, rows, _ = scenes
    dls = block(root, RegressionBlock, lambda r: float(len(r['labels'].split()))).dataloaders(rows, bs=8, num_workers=0, device='cpu')
    learn = fitted(vision_learner(dls, xresnet_mini, pretrained=False, y_range=(0, 3), path=tmp_path))
    learn.export('count.pkl')
    inf = load_learner(tmp_path / 'count.pkl')
    img = root / 'images' / rows[0]['fname']
    same_prediction(learn.predict(img), inf.predict(img))
    value = inf.predict(img)[0]
    assert type(value) is TitledFloat and 0 <= value <= 3 and inf.model.arch_spec['kwargs']['y_range'] == [0, 3]
    code, out, err = run('predict', tmp_path / 'count.pkl', img)
    assert (code, err) == (0, '') and float(out.split('\t')[1]) == pytest.approx(value, abs=1e-4)


@pytest.fixture(scope='module')
def exported(scenes, tmp_path_factory):
    "A multi-label export (its description has y_tfms and batch types) to edit."
    root, rows, _ = scenes
    path = tmp_path_factory.mktemp('edited')
    dls = block(root, MultiCategoryBlock, ColReader('labels', label_delim=' ')).dataloaders(rows, bs=8, num_workers=0, device='cpu')
    vision_learner(dls, xresnet_mini, pretrained=False, path=path).export()
    return path / 'export.pkl', root / 'images' / rows[0]['fname']


def edited(src, dst, edit):
    header, tensors = read_export(src)
    edit(header['dls']['spec'])
    dst.write_bytes(_pack(header, tensors))
    return dst


@pytest.mark.parametrize('edit, message', [
    (lambda s: s['y_tfms'][0].append({'func': 'builtins.eval'}), "unknown function 'builtins.eval'"),
    (lambda s: s['y_tfms'][0].insert(0, {'name': 'os.system', 'args': {}}), "unknown transform 'os.system'"),
    (lambda s: s.update(y_tfms='MultiCategorize'), 'no valid y_tfms'),
    (lambda s: s['types'].__setitem__(1, 'builtins.object'), "unknown tensor type 'builtins.object'"),
    (lambda s: s['types'].__setitem__(0, 'exp.datablock.Categorize'), "unknown tensor type 'exp.datablock.Categorize'"),
])
def test_edited_target_description_is_refused(exported, tmp_path, edit, message):
    src, _ = exported
    bad = edited(src, tmp_path / 'bad.pkl', edit)
    with pytest.raises(ExportFormatError, match=message.replace('(', r'\(')): load_learner(bad)


def test_description_without_targets_still_loads(exported, tmp_path):
    "Exports written before targets were described (vocab only) load as classifiers of that vocab, as they did."
    src, img = exported
    old = edited(src, tmp_path / 'old.pkl', lambda s: (s.pop('y_tfms'), s.pop('types')))
    inf = load_learner(old)
    assert list(inf.dls.vocab) == ['bar', 'square'] and inf.dls.c == 2
    assert type(inf.dls.valid.dataset.tfms[1].fs[0]).__name__ == 'Categorize'


def test_a_classifier_records_its_targets_too(scenes, tmp_path):
    root, rows, _ = scenes
    dls = block(root, CategoryBlock, lambda r: r['labels'].split()[0]).dataloaders(rows, bs=8, num_workers=0, device='cpu')
    learn = vision_learner(dls, xresnet_mini, pretrained=False, path=tmp_path)
    learn.export()
    spec = read_export(tmp_path / 'export.pkl')[0]['dls']['spec']
    assert spec['y_tfms'] == [[{'name': 'exp.datablock.Categorize', 'args': {'vocab': ['bar', 'square'], 'sort': True, 'add_na': False}}]]
    assert spec['types'] == ['exp.vision.TensorImage', None]
    img = root / 'images' / rows[0]['fname']
    label, idx, probs = load_learner(tmp_path / 'export.pkl').predict(img)
    assert (label, int(idx)) == learn.predict(img)[:2] and label in ('bar', 'square')
