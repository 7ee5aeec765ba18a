"""exp.data's download path, for real, against an HTTP server on loopback.

The server serves a good archive, a truncated one, one whose checksum we state wrongly, a 404, and
supports Range requests (so resuming a partial download is exercised) and can cut a response short.
"""
import gzip, hashlib, http.server, io, os, shutil, tarfile, threading
from pathlib import Path

import pytest

from exp import data as D


class Handler(http.server.BaseHTTPRequestHandler):
    files: dict = {}          # name -> bytes
    cut: dict = {}            # name -> bytes to send before dropping the connection (once)
    requests: list = []

    def log_message(self, *a): pass

    def do_GET(self):
        name = self.path.lstrip('/')
        self.requests.append((name, self.headers.get('Range')))
        if name not in self.files:
            self.send_error(404, 'Not Found'); return
        body, start = self.files[name], 0
        rng = self.headers.get('Range')
        if rng:
            start = int(rng.split('=')[1].split('-')[0])
            if start >= len(body):
                self.send_response(416); self.end_headers(); return
            self.send_response(206)
            self.send_header('Content-Range', f'bytes {start}-{len(body) - 1}/{len(body)}')
        else: self.send_response(200)
        self.send_header('Content-Length', str(len(body) - start))
        self.end_headers()
        n = self.cut.pop(name, None)
        self.wfile.write(body[start:start + n] if n is not None else body[start:])
        if n is not None: self.close_connection = True


@pytest.fixture
def server():
    Handler.files, Handler.cut, Handler.requests = {}, {}, []
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{srv.server_address[1]}/'
    srv.shutdown()


def make_tgz(n_files=3, size=20_000):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode='w:gz') as t:
        for i in range(n_files):
            data = os.urandom(size)
            info = tarfile.TarInfo(f'ds/train/{i}.bin'); info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def data(tmp_path, monkeypatch):
    monkeypatch.setenv('EXP_DATA', str(tmp_path / 'cache'))
    return tmp_path / 'cache'


def test_good_archive_with_checksum(server, data):
    tgz = make_tgz()
    Handler.files['ds.tgz'] = tgz
    p = D.untar_data(server + 'ds.tgz', sha256=hashlib.sha256(tgz).hexdigest())
    assert p == data / 'ds' and len((p / 'train').ls()) == 3
    n = len(Handler.requests)
    assert D.untar_data(server + 'ds.tgz') == p and len(Handler.requests) == n      # second call: no request


def test_truncated_archive_leaves_nothing(server, data):
    tgz = make_tgz()
    Handler.files['trunc.tgz'] = tgz[: len(tgz) // 2]          # the server itself has a truncated file
    with pytest.raises(D.DownloadError, match='trunc.tgz: cannot extract'):
        D.untar_data(server + 'trunc.tgz')
    assert not (data / 'trunc').exists()
    assert not list(data.rglob('trunc.tgz*')) and not [p for p in data.glob('.trunc.*') if p.is_dir()]   # lock file only


def test_bad_checksum_removes_file(server, data):
    Handler.files['ds.tgz'] = make_tgz()
    with pytest.raises(D.DownloadError, match='checksum mismatch'):
        D.untar_data(server + 'ds.tgz', sha256='0' * 64)
    assert not (data / 'ds').exists() and not list(data.rglob('ds.tgz*'))


def test_404_is_a_clear_error(server, data):
    with pytest.raises(D.DownloadError, match=r'missing\.tgz: HTTP 404'):
        D.untar_data(server + 'missing.tgz')
    assert not (data / 'missing').exists() and not list(data.rglob('missing*'))


def test_connection_lost_then_resume(server, tmp_path):
    body = os.urandom(300_000)
    Handler.files['big.bin'] = body
    Handler.cut['big.bin'] = 100_000
    dest = tmp_path / 'big.bin'
    with pytest.raises(D.DownloadError, match='resume'):
        D.download_url(server + 'big.bin', dest, show_progress=False)
    assert not dest.exists() and (tmp_path / 'big.bin.part').stat().st_size == 100_000
    D.download_url(server + 'big.bin', dest, sha256=hashlib.sha256(body).hexdigest(), show_progress=False)
    assert dest.read_bytes() == body and not (tmp_path / 'big.bin.part').exists()
    assert Handler.requests[-1] == ('big.bin', 'bytes=100000-')                    # really resumed


def test_fashion_mnist_download_verifies_content(server, data, monkeypatch, tmp_path):
    "The offline-first chain's last resort: download the 4 files and check their content hashes."
    src = Path(D.URLs.DEBIAN_FASHION_MNIST)
    if not (src / 'train-labels-idx1-ubyte.gz').exists(): pytest.skip('dataset-fashion-mnist not installed')
    for f in D.FASHION_MNIST_FILES: Handler.files[f] = (src / f).read_bytes()
    monkeypatch.setenv('EXP_FASHION_MNIST_DIR', str(tmp_path / 'nowhere'))        # pretend Debian's is absent
    # a corrupted training-label file: same length, one byte changed inside the gzip stream's content
    labels = bytearray(gzip.decompress(Handler.files['train-labels-idx1-ubyte.gz'])); labels[100] ^= 1
    good = Handler.files['train-labels-idx1-ubyte.gz']
    Handler.files['train-labels-idx1-ubyte.gz'] = gzip.compress(bytes(labels))
    with pytest.raises(D.DownloadError, match='train-labels-idx1-ubyte.gz: content checksum mismatch'):
        D.fashion_mnist_path(base_url=server)
    assert not (data / 'fashion_mnist' / 'train-labels-idx1-ubyte.gz').exists()
    Handler.files['train-labels-idx1-ubyte.gz'] = good
    p = D.fashion_mnist_path(base_url=server)
    x, y, xv, yv = D.load_fashion_mnist(p)
    assert x.shape == (60000, 28, 28) and int(y.bincount().min()) == 6000


def test_png_tree_is_atomic(tmp_path, monkeypatch):
    "A failure half-way through building the PNG tree leaves no tree behind; the next call builds it."
    if not Path(D.URLs.DEBIAN_FASHION_MNIST, 'train-labels-idx1-ubyte.gz').exists(): pytest.skip('no dataset')
    import torch
    small = (torch.zeros(20, 28, 28, dtype=torch.uint8), torch.arange(20) % 10,
             torch.full((10, 28, 28), 255, dtype=torch.uint8), torch.arange(10))
    monkeypatch.setattr(D, 'load_fashion_mnist', lambda *a: small)
    real, calls = D._write_pngs, []
    def flaky(x, y, folder):                              # fail after the training half was written
        calls.append(folder.name)
        if calls == ['training', 'testing']: raise OSError('disk full (simulated)')
        return real(x, y, folder)
    monkeypatch.setattr(D, '_write_pngs', flaky)
    dest = tmp_path / 'png'
    with pytest.raises(OSError, match='disk full'): D.fashion_mnist_png(dest)
    assert not dest.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith('.png.') and p.is_dir()]
    D.fashion_mnist_png(dest)
    assert len((dest / 'training' / 'Bag').ls()) == 2 and len((dest / 'testing').ls()) == 10
