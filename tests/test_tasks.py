"""Targets beyond one label (issue 17, data side): the FASHION_SCENES data set, masks, points and boxes through every
transform, bb_pad, EXIF orientation, and predict/show_results for masks and points.

Fast (a few seconds): small scene sets written to tmp_path, synthetic images with one marked square."""
import filecmp, json, random

import matplotlib
matplotlib.use('Agg')
import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest
import torch
from torch import nn

import exp.data as D
import exp.interpret                                 # Learner.predict, show_results
from exp.datablock import DataBlock, FuncSplitter, IndexSplitter, collate_samples, get_image_files
from exp.learner import Learner
from exp.vision import (AffineCoordTfm, BBoxBlock, BBoxLabeler, BBoxLblBlock, Dihedral, Flip, ImageBlock, IntToFloatTensor,
                        LabeledBBox, MaskBlock, PILImage, PILImageBW, PILMask, PointBlock, PointScaler, RandPad, RandomResizedCrop,
                        RandomResizedCropGPU, Resize, Rotate, SegmentationDataLoaders, TensorBBox, TensorImage, TensorMask,
                        TensorPoint, ToTensor, Warp, Zoom, bb_pad)

pytestmark = pytest.mark.filterwarnings('ignore:The image decoding and encoding capabilities:DeprecationWarning')


# --- the data set ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def scenes(tmp_path_factory):
    return D.fashion_scenes(tmp_path_factory.mktemp('scenes') / 's', n_train=60, n_valid=20, seed=3)


def _rows(path):
    import csv
    return list(csv.DictReader(open(path / 'labels.csv', newline='')))


def test_scene_layout(scenes):
    rows, items = _rows(scenes), json.loads((scenes / 'items.json').read_text())
    assert len(rows) == 80 and sum(r['is_valid'] == 'True' for r in rows) == 20
    assert (scenes / 'codes.txt').read_text().split() == D.FASHION_SCENES_CODES and len(D.FASHION_SCENES_CODES) == 11
    assert sorted(p.name for p in (scenes / 'images').iterdir()) == sorted(p.name for p in (scenes / 'masks').iterdir())
    assert all(r['fname'].startswith('valid' if r['is_valid'] == 'True' else 'train') for r in rows)
    for r in rows:
        im, m = PIL.Image.open(scenes / 'images' / r['fname']), PIL.Image.open(scenes / 'masks' / r['fname'])
        assert (im.mode, im.size, m.mode, m.size) == ('L', (64, 64), 'L', (64, 64))
        assert 1 <= len(items[r['fname']]) <= 4


def test_masks_agree_with_boxes_and_points(scenes):
    rows, items = _rows(scenes), json.loads((scenes / 'items.json').read_text())
    for r in rows:
        m = np.asarray(PIL.Image.open(scenes / 'masks' / r['fname']))
        im = np.asarray(PIL.Image.open(scenes / 'images' / r['fname']))
        covered = np.zeros(m.shape, bool)
        for it in items[r['fname']]:
            x0, y0, x1, y1 = it['box']
            assert not covered[y0:y1, x0:x1].any()                          # boxes never overlap
            ys, xs = np.nonzero(m[y0:y1, x0:x1] == D.FASHION_SCENES_CODES.index(it['label']))
            assert (xs.min() + x0, ys.min() + y0, xs.max() + 1 + x0, ys.max() + 1 + y0) == (x0, y0, x1, y1)   # tight
            cx, cy = it['centre']
            assert x0 < cx < x1 and y0 < cy < y1 and (cx, cy) == ((x0 + x1) / 2, (y0 + y1) / 2)
            covered[y0:y1, x0:x1] = True
        assert not m[~covered].any() and not im[~covered].any()             # nothing outside the boxes
        assert (im[m > 0] > 32).all()                                        # the mask: the item's pixels above thresh
        assert sorted({D.FASHION_SCENES_CODES[k] for k in np.unique(m) if k}) == r['labels'].split()


def test_same_seed_same_bytes(tmp_path, scenes):
    again = D.fashion_scenes(tmp_path / 'again', n_train=60, n_valid=20, seed=3)
    names = sorted(p.relative_to(scenes).as_posix() for p in scenes.rglob('*') if p.is_file())
    match, mismatch, errors = filecmp.cmpfiles(scenes, again, names, shallow=False)
    assert (len(match), mismatch, errors) == (len(names), [], [])
    other = D.fashion_scenes(tmp_path / 'other', n_train=60, n_valid=20, seed=4)
    assert (other / 'items.json').read_bytes() != (scenes / 'items.json').read_bytes()


def test_other_recipe_refused_and_failed_build_leaves_nothing(tmp_path, scenes, monkeypatch):
    with pytest.raises(ValueError, match='pass another dest'): D.fashion_scenes(scenes, n_train=61, n_valid=20, seed=3)
    def boom(*a, **k): raise RuntimeError('disk full')
    monkeypatch.setattr(D, '_write_scenes', boom)
    with pytest.raises(RuntimeError, match='disk full'): D.fashion_scenes(tmp_path / 'broken', n_train=5, n_valid=2)
    assert [p.name for p in tmp_path.iterdir() if 'broken' in p.name and not p.name.endswith('.lock')] == []


def test_untar_data_name(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(D, 'fashion_scenes', lambda dest=None: seen.append(dest) or dest)
    assert D.untar_data(D.URLs.FASHION_SCENES, data=tmp_path) == tmp_path / 'fashion_scenes'
    assert D.URLs.name_of(D.URLs.FASHION_SCENES) == 'FASHION_SCENES'


# --- masks and points move with the image ----------------------------------------------------------------------------

def _marked(W=40, H=30, at=(17, 13)):
    a = np.zeros((H, W), np.uint8)
    x, y = at
    a[y - 1:y + 2, x - 1:x + 2] = 1
    return PILImage.create(np.stack([a * 255] * 3, -1)), PILMask.create(a), TensorPoint.create([[x + .5, y + .5]])


def _on_mark(img, mask, pt):
    x, y = pt.as_subclass(torch.Tensor).reshape(-1).floor().long().tolist()
    if not (0 <= x < mask.shape[-1] and 0 <= y < mask.shape[-2]): return None
    return bool(mask[y, x] == 1) and bool(img[0, y, x] > 0.5 * img.max())


@pytest.mark.parametrize('tfm', [Resize(32), Resize(24, 'squish'), Resize(32, 'pad', 'zeros'), Resize((50, 20)),
                                 Resize((30, 40)), RandomResizedCrop(24, min_scale=0.35)], ids=repr)
def test_item_transforms_move_points_and_masks(tfm):
    random.seed(0)
    scaler, res = PointScaler(), []
    for _ in range(20):
        s = ToTensor()(scaler(tfm(_marked(), split_idx=0), split_idx=0))
        img, mask, pt = scaler.decode(s)
        assert type(mask) is TensorMask and set(mask.unique().tolist()) <= {0, 1}
        res.append(_on_mark(img, mask, pt))
    assert res.count(False) == 0 and res.count(True) >= 10, res


def _batch(n=16):
    scaler = PointScaler()
    return IntToFloatTensor()(collate_samples([ToTensor()(scaler(_marked(), split_idx=0)) for _ in range(n)]))


@pytest.mark.parametrize('tfm', [Flip(p=1), Dihedral(p=1), Rotate(45, p=1), Zoom(1.2, 1.5, p=1), Warp(0.4, p=1),
                                 AffineCoordTfm([RandomResizedCropGPU(0.5), Rotate(30, p=1)], size=24),
                                 AffineCoordTfm([Rotate(30, p=1)], size=(20, 30), align_corners=False),
                                 RandPad(4, (30, 40))], ids=lambda t: t.name)
def test_batch_transforms_move_points_and_masks(tfm):
    torch.manual_seed(0)
    imgs, masks, pts = tfm(_batch(), split_idx=0)
    assert (type(masks), masks.dtype, type(pts)) == (TensorMask, torch.int64, TensorPoint)
    assert set(masks.unique().tolist()) <= {0, 1}                           # nearest-neighbour: codes only
    size = torch.tensor([masks.shape[-1], masks.shape[-2]])
    res = [_on_mark(i, m, (p.as_subclass(torch.Tensor) + 1) * size / 2) for i, m, p in zip(imgs, masks, pts)]
    assert res.count(False) == 0 and res.count(True) >= 12, res


def test_unmoved_point_is_off_the_mark():
    b = _batch()
    imgs, masks, _ = Flip(p=1)(b, split_idx=0)
    assert _on_mark(imgs[0], masks[0], (b[2][0].as_subclass(torch.Tensor) + 1) * torch.tensor([40, 30]) / 2) is False


def test_validation_leaves_masks_and_points_alone():
    b = _batch(4)
    out = AffineCoordTfm([Rotate(30, p=1)])(b, split_idx=1)
    assert all(o is i for o, i in zip(out, b))


def test_mask_and_image_of_different_sizes_refused():
    img, mask, _ = _marked()
    with pytest.raises(ValueError, match='different sizes'): Resize(16)((img, PILMask.create(np.zeros((5, 5), np.uint8))))


def test_points_need_their_image():
    with pytest.raises(ValueError, match='need their image'): PointScaler()((TensorPoint.create([1, 2]),))
    with pytest.raises(ValueError, match=r'\(x, y\) pairs'): TensorPoint.create([1, 2, 3])


def test_point_scaler_round_trip_and_y_first():
    img = PILImage.create(np.zeros((30, 40, 3), np.uint8))
    s = PointScaler()((img, TensorPoint.create([[0, 0], [40, 30], [10, 15]])))
    assert torch.equal(s[1].as_subclass(torch.Tensor), torch.tensor([[-1., -1.], [1., 1.], [-0.5, 0.]]))
    back = PointScaler().decode((ToTensor()(img), s[1]))[1]
    assert torch.allclose(back.as_subclass(torch.Tensor), torch.tensor([[0., 0.], [40., 30.], [10., 15.]]))
    yx = PointScaler(y_first=True)((img, TensorPoint.create([[15, 10]])))[1]
    assert torch.equal(yx.as_subclass(torch.Tensor), torch.tensor([[-0.5, 0.]]))


def test_palette_mask_keeps_indices(tmp_path):
    a = np.array([[0, 1], [2, 3]], np.uint8)
    p = PIL.Image.fromarray(a, mode='P')
    p.putpalette([255, 255, 255, 10, 10, 10, 200, 0, 0, 0, 0, 200] + [0] * (252 * 3))   # colours unrelated to codes
    p.save(tmp_path / 'm.png')
    assert np.array_equal(np.asarray(PILMask.create(tmp_path / 'm.png')), a)
    assert not np.array_equal(np.asarray(PILImageBW.create(tmp_path / 'm.png')), a)     # an image: its colours' gray


# --- EXIF orientation ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('orientation', [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize('ext', ['.jpg', '.png'])
def test_exif_orientation_applied(tmp_path, orientation, ext):
    a = np.zeros((20, 40), np.uint8)
    a[:6, :10] = 255                                        # a mark in one corner tells every orientation apart
    exif = PIL.Image.Exif()
    exif[0x0112] = orientation
    fn = tmp_path / f'o{orientation}{ext}'
    PIL.Image.fromarray(a).save(fn, exif=exif.tobytes())
    want = np.asarray(PIL.ImageOps.exif_transpose(PIL.Image.open(fn)).convert('L')).astype(float)
    got = np.asarray(PILImageBW.create(fn)).astype(float)
    assert got.shape == ((40, 20) if orientation >= 5 else (20, 40))
    assert np.abs(got - want).max() == 0
    assert got[:6, :10].mean() > 200 if orientation == 1 else True


# --- learners on scenes: loss, c, predict, show_results --------------------------------------------------------------

def test_mask_and_point_learners(scenes):
    items = json.loads((scenes / 'items.json').read_text())
    files = get_image_files(scenes / 'images')
    codes = (scenes / 'codes.txt').read_text().split()
    sdls = SegmentationDataLoaders.from_label_func(scenes, files, lambda o: scenes / 'masks' / o.name, codes=codes,
                                                   img_cls=PILImageBW, valid_pct=0.25, seed=0, bs=8, num_workers=0,
                                                   item_tfms=Resize(32), device='cpu')
    assert (sdls.c, type(sdls.loss_func).__name__, sdls.loss_func.axis) == (11, 'CrossEntropyLossFlat', 1)
    learn = Learner(sdls, nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 11, 1)))
    mask, dec, probs = learn.predict(files[0])
    assert (type(mask), mask.shape, probs.shape) == (TensorMask, (32, 32), (11, 32, 32))
    assert torch.equal(mask.as_subclass(torch.Tensor), probs.argmax(0))
    learn.show_results(max_n=2)

    singles = [f for f in files if len(items[f.name]) == 1]
    pdls = DataBlock(blocks=(ImageBlock(PILImageBW), PointBlock), get_y=lambda o: items[o.name][0]['centre'],
                     splitter=FuncSplitter(lambda o: o.name.startswith('valid')), item_tfms=Resize(32)).dataloaders(
                         singles, bs=4, num_workers=0, device='cpu')
    assert (pdls.c, type(pdls.loss_func).__name__) == (2, 'MSELossFlat')
    plearn = Learner(pdls, nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 2)))
    pt, _, out = plearn.predict(singles[0])
    assert type(pt) is TensorPoint and torch.allclose(pt.as_subclass(torch.Tensor), (out.reshape(1, 2) + 1) * 16)
    plearn.show_results(max_n=2)


# --- boxes -----------------------------------------------------------------------------------------------------------

def _boxed(W=40, H=30, box=(12, 9, 24, 16)):
    a = np.zeros((H, W), np.uint8)
    x0, y0, x1, y1 = box
    a[y0:y1, x0:x1] = 1
    return PILImage.create(np.stack([a * 255] * 3, -1)), PILMask.create(a), TensorBBox.create([box])


def _fits(mask, bb, tol=1.):
    ys, xs = torch.nonzero(torch.as_tensor(mask) == 1, as_tuple=True)
    x0, y0, x1, y1 = bb.as_subclass(torch.Tensor).reshape(-1).tolist()
    inside = bool((xs >= x0 - tol).all() and (xs + 1 <= x1 + tol).all() and (ys >= y0 - tol).all() and (ys + 1 <= y1 + tol).all())
    return inside, (x1 - x0) * (y1 - y0) / len(xs)


@pytest.mark.parametrize('tfm', [Resize(32), Resize(24, 'squish'), Resize(32, 'pad', 'zeros'), RandomResizedCrop(24, min_scale=0.6)], ids=repr)
def test_item_transforms_move_boxes(tfm):
    random.seed(0)
    scaler = PointScaler()
    for _ in range(10):
        _, mask, bb = scaler.decode(ToTensor()(scaler(tfm(_boxed(), split_idx=0), split_idx=0)))
        assert type(bb) is TensorBBox
        inside, ratio = _fits(mask, bb)
        assert inside and ratio < 1.3


@pytest.mark.parametrize('tfm', [Flip(p=1), Dihedral(p=1), Rotate(30, p=1), Warp(0.3, p=1),
                                 AffineCoordTfm([Zoom(1.2, 1.4, p=1)], size=24), RandPad(3, (30, 40))], ids=lambda t: t.name)
def test_batch_transforms_move_boxes(tfm):
    torch.manual_seed(0)
    scaler = PointScaler()
    b = IntToFloatTensor()(collate_samples([ToTensor()(scaler(_boxed(), split_idx=0)) for _ in range(8)]))
    _, masks, bbs = tfm(b, split_idx=0)
    assert type(bbs) is TensorBBox and bbs.shape == (8, 1, 4)
    size = torch.tensor([masks.shape[-1], masks.shape[-2]] * 2)
    for m, bb in zip(masks, bbs):
        inside, ratio = _fits(m, (bb.as_subclass(torch.Tensor) + 1) * size / 2)
        assert inside and ratio < (2.5 if tfm.name in ('Rotate', 'Warp') else 1.3)


def test_bb_pad_and_labeler():
    s1 = (TensorImage(torch.zeros(1, 4, 4)), TensorBBox.create([[-0.5, -0.5, 0.5, 0.5], [0.2, 0.2, 1.5, 0.9], [1.2, 0, 1.6, 1]]),
          torch.tensor([1, 2, 3]))
    s2 = (TensorImage(torch.zeros(1, 4, 4)), TensorBBox.create([[0, 0, 1, 1]]), torch.tensor([2]))
    p1, p2 = bb_pad([s1, s2])
    assert torch.equal(p1[1].as_subclass(torch.Tensor), torch.tensor([[-0.5, -0.5, 0.5, 0.5], [0.2, 0.2, 1., 0.9]]))
    assert torch.equal(p1[2], torch.tensor([1, 2])) and torch.equal(p2[2], torch.tensor([2, 0]))
    assert type(p2[1]) is TensorBBox and torch.equal(p2[1].as_subclass(torch.Tensor)[1], torch.zeros(4))
    img, lb, idx = BBoxLabeler(vocab=['#na#', 'a', 'b']).decode(p2)
    assert type(lb) is LabeledBBox and lb.lbl == ['b'] and torch.equal(idx, torch.tensor([2]))
    with pytest.raises(ValueError, match=r'\[x0, y0, x1, y1\]'): TensorBBox.create([1, 2, 3])


def test_box_block_on_scenes(scenes):
    items = json.loads((scenes / 'items.json').read_text())
    files = get_image_files(scenes / 'images')
    block = DataBlock(blocks=(ImageBlock(PILImageBW), BBoxBlock, BBoxLblBlock), n_inp=1,
                      get_y=[lambda o: [it['box'] for it in items[o.name]], lambda o: [it['label'] for it in items[o.name]]],
                      splitter=FuncSplitter(lambda o: o.name.startswith('valid')), item_tfms=Resize(32))
    dls = block.dataloaders(files, bs=6, num_workers=0, device='cpu')
    assert dls.vocab[0] == '#na#'
    xb, bb, lb = dls.valid.one_batch()
    counts = [len(items[f.name]) for f in dls.valid_ds.items[:6]]
    assert (type(bb), bb.shape, lb.shape) == (TensorBBox, (6, max(counts), 4), (6, max(counts)))
    assert lb.ne(0).sum(1).tolist() == counts
    dec = dls.valid.decode_batch((xb, bb, lb), max_n=6)
    for s, f in zip(dec, dls.valid_ds.items[:6]):
        assert s[1].lbl == [it['label'] for it in items[f.name]]
        assert torch.allclose(s[1].as_subclass(torch.Tensor), torch.tensor([it['box'] for it in items[f.name]]) / 2, atol=1e-4)
    assert dls.test_dl(files[:3]).one_batch()[0].shape == (3, 1, 32, 32)     # images alone: bb_pad leaves them be
    dls.show_batch(max_n=2)
