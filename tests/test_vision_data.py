"""Vision data (issue 10): items, labels, splits, image loading, transforms, both data block APIs.

Fast (a few seconds): tiny image folders made here, and an HTTP server on the loopback interface for
`download_images` (good, truncated, non-image and missing files)."""
import functools, http.server, io, json, threading, warnings
from pathlib import Path

import matplotlib
matplotlib.use('Agg')
import numpy as np
import PIL.Image
import pytest
import torch

from exp.core import L, defaults
from exp.datablock import (Category, CategoryBlock, DataBlock, FuncSplitter, GrandparentSplitter, IndexSplitter,
                           RandomSplitter, RegexLabeller, get_image_files, parent_label)
from exp.vision import (ImageBlock, ImageDataLoaders, ImageReadError, Normalize, PILImage, PILImageBW, RandomResizedCrop,
                        Resize, ResizeMethod, TensorImage, ToTensor, aug_transforms, download_images, imagenet_stats,
                        rand_pad, verify_images)
from exp.imagelist import ImageList

# torchvision 0.29 deprecates its image decoders (exp.vision's fast path; PIL takes over if they go)
pytestmark = pytest.mark.filterwarnings('ignore:The image decoding and encoding capabilities:DeprecationWarning')


def _img(w, h, mode='RGB', seed=0):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return PIL.Image.fromarray(a).convert(mode)


@pytest.fixture
def folder(tmp_path):
    "train/valid trees with 2 classes, images of mixed sizes and modes (and one CMYK JPEG)."
    modes = ['RGB', 'L', 'RGBA', 'P', 'CMYK']
    for split, n in [('train', 10), ('valid', 4)]:
        for c, cls in enumerate(['cat', 'dog']):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                im, m = _img(20 + 3 * i, 30 - 2 * i, seed=i + 100 * c), modes[i % len(modes)]
                ext = '.jpg' if m == 'CMYK' else '.png'
                im.convert(m).save(tmp_path / split / cls / f'{cls}_{i}{ext}')
    return tmp_path


# ------------------------------------------------------------------ L, Path.ls, defaults
def test_L_repr_and_indexing():
    t = L(range(12))
    assert repr(t) == '(#12) [0,1,2,3,4,5,6,7,8,9,...]'
    assert repr(L([False, True])) == '(#2) [False,True]'
    assert t[[1, 3]] == [1, 3] and isinstance(t[[1, 3]], L)
    assert t[np.arange(12) > 9] == [10, 11] and t[torch.tensor([0, 2])] == [0, 2]
    assert t.map(lambda x: x + 1)[:2] == [1, 2] and t.filter(lambda x: x > 10) == [11]
    with pytest.raises(IndexError): t[[True, False]]


def test_path_ls_returns_L(folder):
    import exp.data  # noqa: F401  (adds Path.ls)
    ls = folder.ls()
    assert isinstance(ls, L) and [p.name for p in ls] == ['train', 'valid']
    assert len((folder / 'train' / 'cat').ls(n_max=3)) == 3
    assert len((folder / 'train' / 'cat').ls(file_exts='.jpg')) == 2


def test_defaults():
    assert defaults.cmap and defaults.num_workers >= 0 and defaults.cpus >= 1


# ------------------------------------------------------------------ items, labels, splits
def test_get_image_files_sorted_and_folders(folder):
    fs = get_image_files(folder)
    assert len(fs) == 28 and fs == sorted(fs)
    assert len(get_image_files(folder, folders=['valid'])) == 8
    assert parent_label(fs[0]) == 'cat'
    assert RegexLabeller(r'/(\w+)_\d+\.\w+$')(fs[0]) == 'cat'


def test_splitters_deterministic_without_reseeding():
    items = list(range(50))
    torch.manual_seed(0); a = torch.rand(1)
    torch.manual_seed(0); s1 = RandomSplitter(0.2, seed=42)(items); b = torch.rand(1)
    assert torch.equal(a, b), 'RandomSplitter(seed=...) must not reseed the global RNG'
    assert RandomSplitter(0.2, seed=42)(items) == s1 and len(s1[1]) == 10
    assert sorted(s1[0] + s1[1]) == items
    assert FuncSplitter(lambda o: o < 5)(items)[1] == [0, 1, 2, 3, 4]
    assert IndexSplitter([1, 2])(items)[1] == [1, 2]
    assert GrandparentSplitter()([Path('train/a/1.png'), Path('valid/a/2.png')]) == ([0], [1])


# ------------------------------------------------------------------ images: modes, sizes, broken files
def test_create_handles_modes_and_broken_files(tmp_path):
    for m in ['RGB', 'L', 'RGBA', 'P', 'LA', '1']:
        _img(9, 7).convert(m).save(tmp_path / f'{m}.png')
    _img(9, 7).convert('CMYK').save(tmp_path / 'cmyk.jpg')
    for f in get_image_files(tmp_path):
        assert (PILImage.create(f).mode, PILImage.create(f).size) == ('RGB', (9, 7))
        assert PILImageBW.create(f).mode == 'L'
    good = (tmp_path / 'RGB.png').read_bytes()
    (tmp_path / 'cut.png').write_bytes(good[:-30])
    (tmp_path / 'text.png').write_text('not an image')
    for name in ['cut.png', 'text.png', 'missing.png']:
        with pytest.raises(ImageReadError, match=name): PILImage.create(tmp_path / name)
    assert sorted(f.name for f in verify_images(get_image_files(tmp_path))) == ['cut.png', 'text.png']


def test_fast_decode_matches_pil(tmp_path):
    im = _img(31, 17)
    im.save(tmp_path / 'a.png'); im.save(tmp_path / 'a.jpg', quality=90); im.convert('L').save(tmp_path / 'g.png')
    for f, cls in [('a.png', PILImage), ('a.jpg', PILImage), ('g.png', PILImageBW), ('g.png', PILImage)]:
        got = ToTensor()(cls.create(tmp_path / f))
        ref = np.asarray(PIL.Image.open(tmp_path / f).convert(cls._mode))
        ref = torch.from_numpy(ref.copy())
        assert torch.equal(got, ref.permute(2, 0, 1) if ref.ndim == 3 else ref[None]), f


# ------------------------------------------------------------------ download_images on loopback
@pytest.fixture
def server(tmp_path):
    root = tmp_path / 'www'; root.mkdir()
    _img(16, 12).save(root / 'good.png'); _img(20, 10).save(root / 'good2.jpg')
    (root / 'cut.jpg').write_bytes((root / 'good2.jpg').read_bytes()[:200])
    (root / 'page.jpg').write_text('<html>not found</html>')
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args): pass
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{srv.server_address[1]}'
    srv.shutdown(); srv.server_close()


def test_download_images(server, tmp_path):
    urls = [f'{server}/{n}' for n in ['good.png', 'cut.jpg', 'missing.png', 'page.jpg', 'good2.jpg?size=big']]
    dest = tmp_path / 'dl'
    with pytest.warns(UserWarning, match='1 of 5 downloads failed'):
        got = download_images(dest, urls, n_workers=4)
    www = tmp_path / 'www'
    assert [f.read_bytes() for f in got] == [(www / n).read_bytes() for n in ['good.png', 'cut.jpg', 'page.jpg', 'good2.jpg']]
    assert [f.suffix for f in got] == ['.png', '.jpg', '.jpg', '.jpg']                   # kept as downloaded, in URL order
    assert sorted(dest.iterdir()) == sorted(got)                                         # no .part files
    failed = verify_images(got)                                                           # fastbook's next step finds them
    assert failed == [got[1], got[2]]
    failed.map(Path.unlink)
    url_file = tmp_path / 'urls.txt'; url_file.write_text('\n'.join(urls[:1] * 3) + '\n')
    got2 = download_images(tmp_path / 'dl2', url_file, max_pics=2)
    assert len(got2) == 2 and len(set(got2)) == 2 and all(f.suffix == '.png' for f in got2)   # one URL twice: two files
    again = download_images(dest, [f'{server}/good2.jpg', f'{server}/good.png'])      # the same folder: nothing overwritten
    assert again[0].read_bytes() == (www / 'good2.jpg').read_bytes() and again[1].read_bytes() == (www / 'good.png').read_bytes()
    assert sorted(dest.iterdir()) == sorted([got[0], got[3], *again])                     # 2 kept, 2 new
    other = download_images(tmp_path / 'other_class', [f'{server}/good.png'])             # fastbook moves files between
    assert not (dest / other[0].name).exists()                                            # class folders: names never clash


# ------------------------------------------------------------------ the DataBlock API
def test_datablock_mixed_images(folder):
    dblock = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_image_files,
                       splitter=GrandparentSplitter(), get_y=parent_label, item_tfms=Resize(16),
                       batch_tfms=[*aug_transforms(mult=2), Normalize.from_stats(*imagenet_stats)])
    dls = dblock.dataloaders(folder, bs=4, num_workers=0, device='cpu')
    assert dls.vocab == ['cat', 'dog'] and dls.c == 2 and len(dls.train_ds) == 20 and len(dls.valid_ds) == 8
    xb, yb = dls.one_batch()
    assert isinstance(xb, TensorImage) and xb.shape == (4, 3, 16, 16) and xb.dtype == torch.float32
    assert yb.dtype == torch.int64 and xb.device.type == 'cpu'
    v1, v2 = dls.valid.one_batch(), dls.valid.one_batch()
    assert torch.equal(v1[0], v2[0]), 'validation is never augmented'
    dec = dls.valid.decode_batch(v1, max_n=2)
    assert dec[0][0].dtype == torch.uint8 and isinstance(dec[0][1], Category)
    dls.show_batch(max_n=4); dls.valid.show_batch(max_n=2, nrows=1); dls.train.show_batch(unique=True, max_n=4)
    spec = json.loads(json.dumps(dls.spec()))
    back = ImageDataLoaders.from_spec(spec, device='cpu')
    files = get_image_files(folder / 'valid')[:3]
    assert torch.allclose(back.test_dl(files).one_batch()[0], dls.test_dl(files).one_batch()[0])
    assert back.vocab == dls.vocab and back.norm_stats == dls.norm_stats


def test_workers_give_the_same_batches(folder):
    dls = ImageDataLoaders.from_folder(folder, item_tfms=Resize(12, ResizeMethod.Squish), bs=3, num_workers=0, device='cpu')
    a = [b for b in dls.valid]
    b = [b for b in dls.valid.new(num_workers=2)]
    assert len(a) == len(b) == 3
    for (xa, ya), (xb, yb) in zip(a, b): assert torch.equal(xa, xb) and torch.equal(ya, yb) and type(xb) is TensorImage


def test_broken_and_empty_reported(folder):
    (folder / 'train' / 'cat' / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n garbage')
    (folder / 'train' / 'bird').mkdir()
    with pytest.warns(UserWarning, match='empty class folder.*bird'):
        dls = ImageDataLoaders.from_folder(folder, item_tfms=Resize(8), bs=32, num_workers=0, device='cpu')
    with pytest.raises(ImageReadError, match='broken.png'): list(dls.train)
    with pytest.raises(Exception, match='broken.png'): list(dls.train.new(num_workers=2))
    with pytest.warns(UserWarning, match='broken.png'):
        n = sum(len(x) for x, y in dls.train.new(skip_errors=True, drop_last=False))
    assert n == 20
    with pytest.raises(FileNotFoundError, match='no such folder'): ImageDataLoaders.from_folder(folder, valid='test')


def test_from_name_func_bool_labels(folder):
    fnames = get_image_files(folder)
    def label_func(fname): return fname.name[0] == 'c'
    dls = ImageDataLoaders.from_name_func(folder, fnames, label_func, item_tfms=RandomResizedCrop(10), bs=4,
                                          num_workers=0, device='cpu', seed=1)
    assert repr(dls.vocab) == '(#2) [False,True]'
    assert dls.one_batch()[0].shape == (4, 3, 10, 10)


# ------------------------------------------------------------------ the v1 API, and the Learner on it
def test_v1_imagelist_to_learner(folder):
    from exp.learner import Learner
    from exp.minibatch import accuracy
    il = ImageList.from_folder(folder, convert_mode='L')
    ll = il.split_by_folder(train='train', valid='valid').label_from_folder()
    x, y = ll.train[0]
    assert repr(x).startswith('Image (1, ') and repr(y) == 'Category cat'
    data = ll.transform(([Resize(12), *rand_pad(padding=2, size=12, mode='zeros')], [Resize(12)])).databunch(
        bs=8, num_workers=0, device='cpu').normalize()
    assert type(data.train_ds).__name__ == 'LabelList' and len(data.valid_ds) == 8
    assert [type(t).__name__ for t in data.valid.after_batch] == ['IntToFloatTensor', 'Normalize']
    xb, yb = data.one_batch()
    assert xb.shape == (8, 1, 12, 12)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(144, 2))
    learn = Learner(data, model, loss_func=torch.nn.CrossEntropyLoss(), metrics=accuracy)
    with learn.no_logging(), learn.no_bar(): learn.fit(1, 1e-2)
    assert learn.recorder.values[-1][-1] is not None


def test_empty_class_folder_is_reported_by_both_apis(folder):
    (folder / 'train' / 'bird').mkdir()                                  # a class whose images were all deleted
    (folder / 'train' / 'bird' / '.DS_Store').write_bytes(b'')           # hidden files do not count
    msg = r'1 empty class folder\(s\), no images, so no class: train/bird'
    with pytest.warns(UserWarning, match=msg):
        ImageList.from_folder(folder).split_by_folder().label_from_folder()
    with pytest.warns(UserWarning, match=msg):
        dls = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_image_files, splitter=GrandparentSplitter(),
                        get_y=parent_label, item_tfms=Resize(16)).dataloaders(folder, bs=4, num_workers=0, device='cpu')
    assert list(dls.vocab) == ['cat', 'dog']
