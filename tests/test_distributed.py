"""Several processes, checkpoints and interruptions, end to end with real processes and real signals.

- DDP through torchrun: 2 processes, gloo on the CPU, Fashion-MNIST, the same script as alone: the
  replicas stay identical and match one process with the same global batch (weights within 1e-5), with
  in-memory tensors and with a DataBlock over the PNG files (TfmdDL shards itself).
- Ctrl-C (a real SIGINT) in one of the 2 processes stops both cleanly at the same batch; resuming the
  checkpoint in new processes ends on the weights of the uninterrupted run (within 1e-6; 0 here).
- The same alone: a one-cycle fit stopped by SIGINT and resumed in a fresh process equals the fit run
  straight through (within 1e-6).
- Atomic checkpoints: a process killed (SIGKILL) while writing leaves the previous checkpoint loadable.

The notebooks 08_distributed and 08a_checkpoint build and explain the pieces; `examples/ddp_fashion_mnist.py`
is the script run here. Every process uses one thread (this machine has two cores), which also makes the
CPU arithmetic repeat exactly from one process to the next.
"""
import importlib.util, json, os, signal, socket, subprocess, sys, textwrap, time

import pytest
import torch

from conftest import ROOT

EXAMPLE = ROOT / 'examples' / 'ddp_fashion_mnist.py'
MLP = ['--model', 'mlp', '--n-train', '2048', '--n-valid', '2000', '--bs', '128', '--epochs', '2', '--threads', '1']
CONVNET = ['--model', 'convnet', '--n-train', '1024', '--n-valid', '1000', '--bs', '128', '--epochs', '3', '--threads', '1']
ENV = {**{k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')},
       'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT)}


def ctrl_c_as_usual():
    """In the child before exec: Ctrl-C (SIGINT) at its default, which a shell's `cmd &` (or nohup-style CI) may have set to
    ignore; a Python started with SIGINT ignored keeps ignoring it, and exp rightly leaves an ignored Ctrl-C alone."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def torchrun(out, *extra, nproc=2):
    "Start the example under torchrun (`--standalone`: a free port on this machine)."
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', str(EXAMPLE),
           *MLP, '--out', str(out), *extra]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_as_usual)


def launch(out, *extra, nproc=2):
    "Start the example's `nproc` processes with the variables torchrun would set (loopback, a free port), no agent."
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    env = dict(ENV, WORLD_SIZE=str(nproc), MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    return [subprocess.Popen([sys.executable, str(EXAMPLE), *MLP, '--out', str(out), *extra], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_as_usual) for r in range(nproc)]


def results(out, procs):
    "Wait for the processes (all killed if one fails); rank 0's stdout and the summary."
    procs = procs if isinstance(procs, list) else [procs]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=180))
            assert p.returncode == 0, outs[-1][0] + outs[-1][1][-4000:]
    finally:
        for p in procs:
            if p.poll() is None: p.kill(); p.wait()
    return outs[0][0], json.loads((out / 'summary.json').read_text())


def alone(out, args, *extra):
    "Start the example as one plain process."
    return subprocess.Popen([sys.executable, str(EXAMPLE), *args, '--out', str(out), *extra], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=ctrl_c_as_usual)


def finish(p):
    out = p.communicate(timeout=180)[0]
    assert p.returncode == 0, out
    return out


def in_this_process(out, args):
    "Run the example's main() here (alone: `distrib_ctx` changes nothing)."
    spec = importlib.util.spec_from_file_location('ddp_fashion_mnist_example', EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    threads = torch.get_num_threads()
    try: mod.main(args + ['--out', str(out)])
    finally: torch.set_num_threads(threads)
    return json.loads((out / 'summary.json').read_text())


def weights(out): return torch.load(out / 'models' / 'final.pth', weights_only=True)


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope='module')
def ddp(tmp_path_factory):
    "Two processes under torchrun, straight through, with a checkpoint every epoch; and one process alone, meanwhile."
    out, alone_out = tmp_path_factory.mktemp('ddp'), tmp_path_factory.mktemp('alone')
    job = torchrun(out, '--checkpoint')
    one = in_this_process(alone_out, MLP)
    stdout, two = results(out, job)
    return out, stdout, two, alone_out, one


def assert_two_match_one(two_out, two, one_out, one):
    "2 processes (summary `two`, files in `two_out`) took the steps 1 process took: weights, table, losses, predictions."
    assert two['world_size'] == 2 and one['world_size'] == 1
    assert two['replica_max_diff'] == 0.0                   # the two copies of the model are identical
    assert two['same_numbers_everywhere']                   # both processes report the same table and metrics
    assert max_diff(weights(two_out), weights(one_out)) < 1e-5
    assert torch.allclose(torch.tensor(two['values']), torch.tensor(one['values']), atol=1e-5)
    assert torch.allclose(torch.tensor(two['losses']), torch.tensor(one['losses']), atol=1e-5)
    p1, p2 = (torch.load(d / 'preds.pth', weights_only=True) for d in (one_out, two_out))
    assert two['n_preds'] == 2000 and torch.equal(p2['targs'], p1['targs'])   # gathered, in order
    assert torch.allclose(p2['preds'], p1['preds'], atol=1e-4)


def test_ddp_two_processes_match_one(ddp):
    out, stdout, two, tmp_path, one = ddp
    assert_two_match_one(out, two, tmp_path, one)
    assert stdout.count('train_loss') == 1 and stdout.count('trained in') == 1   # only rank 0 prints


def test_ddp_datablock_loaders_match_one_process(tmp_path):
    "The data block's TfmdDL shards itself: 2 processes decoding PNG files take the steps one process takes."
    two_out, one_out = tmp_path / 'two', tmp_path / 'one'
    job = torchrun(two_out, '--data', 'datablock')
    one = in_this_process(one_out, [*MLP, '--data', 'datablock'])
    _, two = results(two_out, job)
    assert_two_match_one(two_out, two, one_out, one)


def test_ddp_ctrl_c_in_one_process_then_resume(ddp, tmp_path):
    stdout, cut = results(tmp_path, launch(tmp_path, '--checkpoint', '--ctrl-c-at', '1,3,1'))   # SIGINT to rank 1 only
    assert cut['interrupted'] == [1, 4, 'training']         # both stopped after the same batch (the next vote)
    assert stdout.count('interrupted') == 1                 # reported once
    assert cut['replica_max_diff'] == 0.0 and cut['same_numbers_everywhere']   # still in step, still usable
    assert len(cut['values']) == 1
    stdout, resumed = results(tmp_path, launch(tmp_path, '--resume', 'checkpoint'))
    assert resumed['interrupted'] is None and resumed['replica_max_diff'] == 0.0
    assert max_diff(weights(tmp_path), weights(ddp[0])) <= 1e-6
    assert resumed['values'] == ddp[2]['values']


def test_ctrl_c_then_resume_in_a_fresh_process(tmp_path):
    full, cut = tmp_path / 'full', tmp_path / 'cut'
    job = alone(cut, CONVNET, '--checkpoint', '--ctrl-c-at', '1,4')
    in_this_process(full, CONVNET)                               # straight through, meanwhile
    log = finish(job)
    assert log.count('fit interrupted at epoch 1, training batch 4') == 1, log
    summary = json.loads((cut / 'summary.json').read_text())
    assert summary['interrupted'] == [1, 4, 'training'] and summary['n_preds'] == 1000   # usable after the stop
    ck = torch.load(cut / 'models' / 'checkpoint.pth', weights_only=True)
    assert ck['fit']['epoch'] == 1 and len(ck['fit']['cbs']['Recorder']['values']) == 1
    finish(alone(cut, CONVNET, '--resume', 'checkpoint'))
    assert max_diff(weights(cut), weights(full)) <= 1e-6
    resumed, straight = (json.loads((d / 'summary.json').read_text()) for d in (cut, full))
    assert resumed['values'] == straight['values'] and resumed['losses'] == straight['losses']


KILLED_MID_WRITE = textwrap.dedent('''
    import io, os, signal, sys, torch
    from exp.torch_core import save_atomic
    path = sys.argv[1]
    save_atomic({'w': torch.zeros(1000)}, path)
    real_save = torch.save
    def dies_half_way(obj, f, *args, **kwargs):
        buf = io.BytesIO(); real_save(obj, buf)
        f.write(buf.getvalue()[:len(buf.getvalue()) // 2]); f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save = dies_half_way
    save_atomic({'w': torch.ones(1000)}, path)
''')

SAVES_FOREVER = textwrap.dedent('''
    import sys, torch
    from exp.torch_core import save_atomic
    print('ready', flush=True)
    for i in range(1, 10 ** 6): save_atomic({'i': torch.tensor(i), 'w': torch.full((2 ** 20,), float(i))}, sys.argv[1])
''')


def test_checkpoint_survives_sigkill_during_write(tmp_path):
    ck = tmp_path / 'a' / 'ck.pth'
    ck.parent.mkdir()
    r = subprocess.run([sys.executable, '-c', KILLED_MID_WRITE, str(ck)], env=ENV, capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert any(p.name.endswith('.tmp') for p in ck.parent.iterdir())          # it did die half-way through
    assert torch.equal(torch.load(ck, weights_only=True)['w'], torch.zeros(1000))
    for delay in (0.2,):                                                         # killed at a moment it does not choose
        ck = tmp_path / f'loop{delay}' / 'ck.pth'
        ck.parent.mkdir()
        p = subprocess.Popen([sys.executable, '-c', SAVES_FOREVER, str(ck)], env=ENV, stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == 'ready'
        t0 = time.monotonic()
        while not ck.exists() and time.monotonic() - t0 < 20: time.sleep(0.01)
        time.sleep(delay)
        p.kill(); p.wait(); p.stdout.close()
        state = torch.load(ck, weights_only=True)
        assert torch.equal(state['w'], torch.full_like(state['w'], float(state['i'])))
