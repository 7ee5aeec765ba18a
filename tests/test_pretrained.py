"""Pretrained weights for vision_learner, offline: torchvision's real loading code on a checkpoint written into a
temporary torch hub cache, a fast clear failure when the file is missing, and weights from a local file."""
import socket

import pytest
import torch
from torch import nn

import exp.vision_learner as vl
from exp.learner import Learner
from exp.minibatch import DataLoaders, TensorLoader
from exp.vision_learner import (cnn_learner, hub_checkpoint_path, arch_weights, resnet18, resnet34, vision_learner)
from exp.xresnet import xresnet_mini


def tensor_dls(n=32, c=3, size=32, n_classes=4, seed=0):
    "In-memory loaders of random images (the model code paths do not care what the pixels are)."
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, c, size, size, generator=g), torch.randint(0, n_classes, (n,), generator=g)
    return DataLoaders(TensorLoader(x, y, bs=8, shuffle=True), TensorLoader(x, y, bs=16))


@pytest.fixture
def hub(tmp_path, monkeypatch):
    "An empty torch hub cache in a temporary TORCH_HOME, and no route to the internet (as on this machine and offline users')."
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    real = socket.socket.connect
    def offline(self, addr, *a, **k):
        if isinstance(addr, tuple) and addr[0] in ('127.0.0.1', 'localhost'): return real(self, addr, *a, **k)
        raise OSError(101, 'Network is unreachable')
    monkeypatch.setattr(socket.socket, 'connect', offline)
    return tmp_path


def write_checkpoint(arch, seed=1):
    "A randomly initialised `arch` state dict saved under the exact file name torchvision expects in the cache."
    path = hub_checkpoint_path(arch_weights(arch))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    state = arch().state_dict()
    torch.save(state, path)
    return path, state


def test_checkpoint_path_follows_torch_home(hub):
    p = hub_checkpoint_path(arch_weights(resnet18))
    assert p == hub / 'torch_home' / 'hub' / 'checkpoints' / 'resnet18-f37072fd.pth'
    assert hub_checkpoint_path(arch_weights(resnet34)).name == 'resnet34-b627a593.pth'


def test_cached_checkpoint_loads_through_torchvision(hub):
    path, state = write_checkpoint(resnet18)
    learn = vision_learner(tensor_dls(), resnet18, n_out=4, normalize=False)
    body = learn.model[0]
    names = [n for n, _ in resnet18().named_children()][:8]          # body child i is the model's child names[i]
    loaded = {f'{names[int(k.split(".")[0])]}.{k.split(".", 1)[1]}': v for k, v in body.state_dict().items()}
    assert set(loaded) == {k for k in state if not k.startswith('fc.')}
    for k, v in loaded.items(): assert torch.equal(v, state[k]), k
    assert learn.frozen_idx == 2 and not body[0].weight.requires_grad and body[1].weight.requires_grad
    assert learn.model(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def test_missing_checkpoint_offline_fails_with_instructions(hub):
    with pytest.raises(FileNotFoundError) as e: vision_learner(tensor_dls(), resnet34, n_out=4)
    msg = str(e.value)
    assert str(hub / 'torch_home' / 'hub' / 'checkpoints' / 'resnet34-b627a593.pth') in msg
    assert 'pretrained=False' in msg and "pretrained='path" in msg and 'https://download.pytorch.org/models/' in msg
    assert 'could not be downloaded' in msg and not list((hub / 'torch_home' / 'hub' / 'checkpoints').iterdir())


@pytest.fixture
def weights_server(tmp_path):
    "A web server on 127.0.0.1 serving resnet18 weights: whole, cut short, with the wrong content, or not at all; counts GETs."
    import functools, hashlib, http.server, io, threading
    torch.manual_seed(5)
    buf = io.BytesIO(); torch.save(resnet18().state_dict(), buf); good = buf.getvalue()
    prefix = hashlib.sha256(good).hexdigest()[:8]
    files = {f'/resnet18-{prefix}.pth': good, f'/cut/resnet18-{prefix}.pth': good,
             f'/wrong/resnet18-{prefix}.pth': good[:-10] + b'0123456789'}
    hits = []
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a): pass
        def do_GET(self):
            hits.append(self.path)
            body = files.get(self.path)
            if body is None: self.send_error(404); return
            self.send_response(200); self.send_header('Content-Length', str(len(body))); self.end_headers()
            self.wfile.write(body[:len(body) // 2] if self.path.startswith('/cut/') else body)
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{srv.server_address[1]}', prefix, good, hits
    srv.shutdown(); srv.server_close()


def test_pretrained_weights_download_once_checked_and_atomic(hub, weights_server):
    "The download goes through torch.hub's downloader (progress, hash prefix): a good file lands once; bad ones leave nothing."
    from types import SimpleNamespace
    base, prefix, good, hits = weights_server
    cache = hub / 'torch_home' / 'hub' / 'checkpoints'
    for sub, why in [('cut/', 'IncompleteRead|hash'), ('wrong/', 'hash'), ('missing/', '404')]:
        w = SimpleNamespace(url=f'{base}/{sub}resnet18-{prefix}.pth')
        with pytest.raises(FileNotFoundError, match=why) as e: vl.download_pretrained(w, progress=False, name='resnet18')
        assert w.url in str(e.value) and str(cache / f'resnet18-{prefix}.pth') in str(e.value)
        assert not cache.exists() or list(cache.iterdir()) == [], f'{sub}: something was left in the cache'
    w = SimpleNamespace(url=f'{base}/resnet18-{prefix}.pth')
    path = vl.download_pretrained(w, progress=False)
    assert path == cache / f'resnet18-{prefix}.pth' and path.read_bytes() == good and list(cache.iterdir()) == [path]
    n = len(hits)
    assert vl.download_pretrained(w, progress=False) == path and len(hits) == n          # once: the cache is used after
    model = resnet18()
    model.load_state_dict(torch.load(path, weights_only=True))                            # what torchvision then loads


def test_grayscale_input_sums_the_pretrained_stem(hub):
    _, state = write_checkpoint(resnet18, seed=3)
    learn = cnn_learner(tensor_dls(c=1), resnet18, n_out=4, normalize=False)            # n_in read from a batch
    conv = learn.model[0][0]
    assert conv.in_channels == 1
    torch.testing.assert_close(conv.weight, state['conv1.weight'].sum(1, keepdim=True))


def test_imagenet_normalisation_added_once_for_pretrained(hub, tmp_path):
    from PIL import Image
    from exp.vision import ImageDataLoaders, Resize, imagenet_stats
    write_checkpoint(resnet18)
    for cls in ('a', 'b'):
        (tmp_path / 'imgs' / cls).mkdir(parents=True)
        for i in range(6): Image.new('RGB', (40, 40), (40 * i, 20, 200 if cls == 'a' else 0)).save(tmp_path / 'imgs' / cls / f'{i}.png')
    dls = ImageDataLoaders.from_folder(tmp_path / 'imgs', valid_pct=0.25, seed=0, item_tfms=Resize(32), bs=4, num_workers=0)
    assert dls.norm_stats is None
    vision_learner(dls, resnet18, pretrained=False)
    assert dls.norm_stats is None                                     # no ImageNet weights, no ImageNet statistics
    learn = vision_learner(dls, resnet18)
    assert dls.norm_stats == tuple(imagenet_stats) and learn.dls.c == 2
    vision_learner(dls, resnet18)
    assert sum(type(t).__name__ == 'Normalize' for t in dls.train.after_batch) == 1


def test_local_weights_file(tmp_path):
    torch.manual_seed(0)
    src = xresnet_mini(n_out=7)
    torch.save(src.state_dict(), tmp_path / 'plain.pth')
    learn = vision_learner(tensor_dls(c=1, size=28), xresnet_mini, n_out=4, pretrained=str(tmp_path / 'plain.pth'))
    for (k, v), w in zip(learn.model[0].state_dict().items(), list(src.state_dict().values())):
        assert torch.equal(v, w), k
    assert learn.frozen_idx == 1                                      # pretrained from a file: frozen too
    # what Learner.save writes for a vision_learner model (body '0.', head '1.', with the optimizer) loads as well
    learn.path = tmp_path
    learn.save('stage1')
    again = vision_learner(tensor_dls(c=1, size=28), xresnet_mini, n_out=4, pretrained=tmp_path / 'models' / 'stage1.pth')
    for k, v in again.model[0].state_dict().items(): assert torch.equal(v, learn.model[0].state_dict()[k]), k
    with pytest.raises(ValueError, match='not in the file'):
        vision_learner(tensor_dls(c=1, size=28), vl.resnet18, n_out=4, pretrained=str(tmp_path / 'plain.pth'))


def test_summary_after_freeze_to(hub):
    write_checkpoint(resnet18)
    learn = vision_learner(tensor_dls(), resnet18, n_out=4, normalize=False)
    learn.freeze_to(-1)
    s = learn.summary()
    rows = {r[0]: r for r in s.rows}
    body_bn = [n for n, m in learn.model.named_modules() if n.startswith('0.') and isinstance(m, nn.BatchNorm2d)]
    body_conv = [n for n, m in learn.model.named_modules() if n.startswith('0.') and isinstance(m, nn.Conv2d)]
    assert len(body_bn) == 20 and len(body_conv) == 20
    assert all(rows[n][4] is True for n in body_bn) and all(rows[n][4] is False for n in body_conv)
    assert s.total == sum(p.numel() for p in learn.model.parameters()) == sum(r[3] for r in s.rows)
    assert s.trainable == sum(p.numel() for p in learn.model.parameters() if p.requires_grad)
    assert f'Total params: {s.total:,}' in s and 'Model frozen up to parameter group 2 (of 3)' in s
    assert rows['0.0'][2] == '8 x 64 x 16 x 16'


def test_fine_tune_schedule_and_discriminative_lrs(hub):
    "fine_tune: a frozen fit (head at base_lr, others base_lr/10), then unfrozen lrs base_lr/2/lr_mult .. base_lr/2."
    write_checkpoint(resnet18)
    learn = vision_learner(tensor_dls(n=16), resnet18, n_out=4, normalize=False)
    seen = []
    from exp.callback_core import Callback
    class Peek(Callback):
        def after_batch(self, learn):
            if learn.training: seen.append((learn.get_hyper('lr'), learn.model[0][0].weight.requires_grad))
    frozen_w = learn.model[0][0].weight.detach().clone()
    with learn.no_logging(): learn.fine_tune(1, base_lr=2e-3, cbs=Peek())
    first, second = seen[:2], seen[2:]
    assert all(not g for _, g in first) and all(g for _, g in second)
    peak1 = max(first, key=lambda s: s[0][-1])[0]
    assert peak1[0] == pytest.approx(peak1[-1] / 10) and peak1[1] == pytest.approx(peak1[-1] / 10)
    peak2 = max(second, key=lambda s: s[0][-1])[0]
    assert peak2[-1] / peak2[0] == pytest.approx(100) and peak2[-1] <= 1e-3 * 1.0001
    assert not torch.equal(learn.model[0][0].weight, frozen_w)             # trained once unfrozen


def test_weights_picks_which_torchvision_weights(hub):
    from exp.vision_learner import resnet50
    with pytest.raises(FileNotFoundError, match='resnet50-0676ba61.pth'):           # IMAGENET1K_V1's file
        vision_learner(tensor_dls(), resnet50, n_out=4, weights='IMAGENET1K_V1')
    with pytest.raises(FileNotFoundError, match='resnet50-11ad3fa6.pth'):           # the DEFAULT, IMAGENET1K_V2
        vision_learner(tensor_dls(), resnet50, n_out=4)
    with pytest.raises(ValueError, match='has no weights'):
        vision_learner(tensor_dls(), resnet50, n_out=4, weights='NO_SUCH')
    _, state = write_checkpoint(resnet18)
    learn = vision_learner(tensor_dls(), resnet18, n_out=4, normalize=False, weights=arch_weights(resnet18, 'IMAGENET1K_V1'))
    assert torch.equal(learn.model[0][0].weight, state['conv1.weight'])
