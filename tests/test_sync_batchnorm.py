"""fastnn.nn.SyncBatchNorm over 2 gloo processes (loopback only) against one torch BatchNorm over
the concatenated batch: outputs, every gradient, running statistics."""
import datetime
import gc
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastnn

WORLD = 2


def _check(rank, batch_sizes, dtype, relu, residual, momentum, results):
    torch.manual_seed(0)
    C, H, W = 3, 4, 5
    total = sum(batch_sizes)
    x_all = torch.randn(total, C, H, W, dtype=torch.float64) * 2 + 0.5
    r_all = torch.randn(total, C, H, W, dtype=torch.float64)
    g_all = torch.randn(total, C, H, W, dtype=torch.float64)
    w0 = torch.rand(C, dtype=torch.float64) + 0.5
    b0 = torch.randn(C, dtype=torch.float64)

    # Oracle: one torch BatchNorm over the whole batch, two steps.
    ref = torch.nn.BatchNorm2d(C, momentum=momentum).to(dtype)
    with torch.no_grad():
        ref.weight.copy_(w0)
        ref.bias.copy_(b0)
    xs = x_all.to(dtype).clone().requires_grad_()
    rs = r_all.to(dtype).clone().requires_grad_()
    for _ in range(2):
        y_ref = ref(xs)
        if residual:
            y_ref = y_ref + rs
        if relu:
            y_ref = torch.relu(y_ref)
    y_ref.backward(g_all.to(dtype))

    if residual:
        local_bn = fastnn.nn.BatchNormAddReLU2d(C, momentum=momentum)
    elif relu:
        local_bn = fastnn.nn.BatchNormReLU2d(C, momentum=momentum)
    else:
        local_bn = torch.nn.BatchNorm2d(C, momentum=momentum)
    local_bn = local_bn.to(dtype)
    with torch.no_grad():
        local_bn.weight.copy_(w0)
        local_bn.bias.copy_(b0)
    sync = fastnn.nn.SyncBatchNorm.convert_sync_batchnorm(local_bn)
    assert isinstance(sync, fastnn.nn.SyncBatchNorm), type(sync)
    start = sum(batch_sizes[:rank])
    sl = slice(start, start + batch_sizes[rank])
    x = x_all[sl].to(dtype).clone().requires_grad_()
    r = r_all[sl].to(dtype).clone().requires_grad_()
    for _ in range(2):
        y = sync(x, r) if residual else sync(x)
    y.backward(g_all[sl].to(dtype))

    tol = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-4),
           torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}[dtype]
    torch.testing.assert_close(y, y_ref[sl].detach(), **tol)
    torch.testing.assert_close(x.grad, xs.grad[sl], **tol)
    if residual:
        torch.testing.assert_close(r.grad, rs.grad[sl], **tol)
    torch.testing.assert_close(sync.running_mean, ref.running_mean, **tol)
    torch.testing.assert_close(sync.running_var, ref.running_var, **tol)
    assert int(sync.num_batches_tracked) == 2
    # Parameter gradients are per-rank sums, as in torch.nn.SyncBatchNorm: summed over the group
    # they give the full-batch gradient.
    gw, gb = sync.weight.grad.clone(), sync.bias.grad.clone()
    dist.all_reduce(gw)
    dist.all_reduce(gb)
    torch.testing.assert_close(gw, ref.weight.grad, **tol)
    torch.testing.assert_close(gb, ref.bias.grad, **tol)

    # Eval: no collective, the running statistics.
    sync.eval()
    ref.eval()
    with torch.no_grad():
        ye = sync(x, r) if residual else sync(x)
        ye_ref = ref(x)
        if residual:
            ye_ref = ye_ref + r
        if relu:
            ye_ref = torch.relu(ye_ref)
    torch.testing.assert_close(ye, ye_ref, **tol)


def _check_compiled(rank, results=None):
    """torch.compile(fullgraph=True) of a network with every synchronized module kind: no graph
    break, and the outputs, gradients and running statistics of eager execution."""
    import copy

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.bn1 = fastnn.nn.BatchNormReLU2d(4)
            self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1)
            self.bn2 = fastnn.nn.BatchNormAddReLU2d(4, momentum=0.3)
            self.bn3 = torch.nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn1(self.conv1(x))
            return self.bn3(self.bn2(self.conv2(y), y))

    torch.manual_seed(0)
    net = fastnn.nn.SyncBatchNorm.convert_sync_batchnorm(Net().double())
    compiled_net = copy.deepcopy(net)
    compiled = torch.compile(compiled_net, fullgraph=True)
    x = torch.randn(2 + rank, 3, 5, 5, dtype=torch.float64)  # uneven batches
    for _ in range(2):
        y = net(x)
        y.square().sum().backward()
        yc = compiled(x)
        yc.square().sum().backward()
    tol = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(yc, y, **tol)
    for (name, p), (_, pc) in zip(net.named_parameters(), compiled_net.named_parameters()):
        torch.testing.assert_close(pc.grad, p.grad, **tol, msg=name)
    for (name, b), (_, bc) in zip(net.named_buffers(), compiled_net.named_buffers()):
        torch.testing.assert_close(bc, b, **tol, msg=name)
    # The statistics came from the whole group: both ranks hold the same running statistics.
    rv = compiled_net.bn2.running_var.clone()
    dist.all_reduce(rv)
    torch.testing.assert_close(rv, 2 * compiled_net.bn2.running_var, **tol)


def _check_opcheck(rank, results=None):
    """torch.library.opcheck of the synchronized ops (schema, autograd registration, fake
    kernels, AOT dispatch), each call a real collective over the group."""
    torch.manual_seed(rank)
    C = 3
    x = torch.randn(2 + rank, C, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.rand(C, dtype=torch.float64, requires_grad=True)
    b = torch.randn(C, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2 + rank, C, 4, 4, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    for residual, relu in ((None, False), (r, True)):
        torch.library.opcheck(torch.ops.fastnn.sync_batch_norm.default,
                              (x, w, b, residual, rm, rv, 0.1, 1e-5, relu, ""))
    y, mean, invstd, count = torch.ops.fastnn.sync_batch_norm.default(
        x.detach(), w.detach(), b.detach(), None, None, None, 0.1, 1e-5, True, "")
    assert float(count) == 2 * 16 + 3 * 16
    g = torch.randn_like(y)
    torch.library.opcheck(torch.ops.fastnn.sync_batch_norm_backward.default,
                          (g, x.detach(), w.detach(), y, mean, invstd, count, True, True, ""))


def _check_one_value_over_group(rank, results=None):
    """One value per channel over the whole group (batch sizes 1 and 0): every rank raises
    torch's ValueError and no running statistic changes."""
    sync = fastnn.nn.SyncBatchNorm(3)
    x = torch.randn(1 - rank, 3, requires_grad=True)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        sync(x)
    assert int(sync.num_batches_tracked) == 0
    assert torch.equal(sync.running_mean, torch.zeros(3))
    assert torch.equal(sync.running_var, torch.ones(3))


def _backend(device):
    """NCCL where every rank has a GPU of its own; else gloo, which also gathers CUDA tensors, so
    two ranks can share one GPU."""
    if device == "cuda" and torch.cuda.device_count() >= WORLD and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def _worker(rank, init_file, cases, result_dir, device="cpu"):
    if device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        # The checks make their tensors and modules with the default device.
        torch.set_default_device("cuda")
    dist.init_process_group(_backend(device), init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        for i, (check, args) in enumerate(cases):
            try:
                check(rank, *args, results=None)
                msg = "ok"
            except Exception:
                msg = traceback.format_exc()
            with open(os.path.join(result_dir, f"{i}.{rank}"), "w") as f:
                f.write(msg)
            dist.barrier()
    finally:
        # What the checks left in reference cycles goes while the group exists (see
        # examples/ddp_train.py: a gloo group torn down at interpreter exit can abort).
        gc.collect()
        dist.destroy_process_group()


CASES = [
    # batch sizes per rank, dtype, relu, residual, momentum
    (_check, ((3, 5), torch.float64, False, False, 0.1)),
    (_check, ((2, 0), torch.float64, True, False, None)),
    (_check, ((0, 0), torch.float64, False, False, 0.1)),  # an empty batch over the group
    (_check, ((4, 4), torch.float64, True, True, 0.3)),
    (_check, ((1, 1), torch.float32, False, False, 0.1)),  # one value per rank, two over the group
    (_check, ((3, 2), torch.bfloat16, True, True, 0.1)),
    (_check_one_value_over_group, ()),
    (_check_compiled, ()),
    (_check_opcheck, ()),
]


def _run_cases(tmp_path, device):
    init_file = tmp_path / "init"
    ctx = mp.start_processes(_worker, args=(str(init_file), CASES, str(tmp_path), device),
                             nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.time() + 240
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("SyncBatchNorm workers did not finish within 240 s")
    failures = []
    for i, case in enumerate(CASES):
        for rank in range(WORLD):
            path = tmp_path / f"{i}.{rank}"
            msg = path.read_text() if path.exists() else "no result"
            if msg != "ok":
                failures.append(f"case {case[0].__name__}{case[1]} rank {rank} "
                                f"({device}, {_backend(device)}):\n{msg}")
    assert not failures, "\n".join(failures)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_sync_batchnorm_matches_full_batch(tmp_path):
    _run_cases(tmp_path, "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sync_batchnorm_matches_full_batch_cuda(tmp_path):
    """The same cases on CUDA tensors: fastnn's CUDA kernels for the local statistics, normalize
    and backward, the collectives over NCCL (a GPU per rank) or gloo (ranks sharing a GPU)."""
    _run_cases(tmp_path, "cuda")


def test_sync_batchnorm_single_process_is_batchnorm():
    """Without an initialised process group it is a plain fastnn BatchNorm (no collective)."""
    torch.manual_seed(1)
    x = torch.randn(4, 3, 5, 5)
    sync = fastnn.nn.SyncBatchNorm(3)
    ref = torch.nn.BatchNorm2d(3)
    torch.testing.assert_close(sync(x), ref(x))
    torch.testing.assert_close(sync.running_var, ref.running_var)
    assert set(sync.state_dict()) == set(ref.state_dict())


def test_convert_keeps_fused_forms():
    model = torch.nn.Sequential(fastnn.nn.BatchNormReLU2d(3), torch.nn.BatchNorm2d(3),
                                fastnn.nn.BatchNormAddReLU2d(3))
    conv = fastnn.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(conv[0]) is fastnn.nn.SyncBatchNormReLU
    assert type(conv[1]) is fastnn.nn.SyncBatchNorm
    assert type(conv[2]) is fastnn.nn.SyncBatchNormAddReLU
    assert conv[0].weight is model[0].weight
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(conv[2](x, x), torch.relu(torch.nn.functional.batch_norm(
        x, None, None, model[2].weight, model[2].bias, training=True) + x))


def test_convert_refuses_uninitialized_lazy_batch_norm():
    """A lazy batch norm has no size before its first forward: converting it would give a
    SyncBatchNorm of 0 features that fails later. A lazy convolution is no obstacle."""
    model = torch.nn.Sequential(torch.nn.LazyConv2d(3, 1), torch.nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match=r"convert_sync_batchnorm: 1 is an uninitialized "
                                         r"LazyBatchNorm2d"):
        fastnn.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(model[1]) is torch.nn.LazyBatchNorm2d  # untouched
    x = torch.randn(2, 3, 4, 4)
    model(x)  # materializes both
    bn = model[1]
    assert type(bn) is torch.nn.BatchNorm2d
    ref = model.eval()(x)
    conv = fastnn.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(conv[1]) is fastnn.nn.SyncBatchNorm
    assert conv[1].weight is bn.weight and conv[1].running_mean is bn.running_mean
    torch.testing.assert_close(conv(x), ref)


def test_ddp_example_trains_on_cpu():
    """examples/ddp_train.py: DDP + fastnn SyncBatchNorm on 2 gloo processes, a few steps."""
    pytest.importorskip("sklearn")
    import pathlib
    import re
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, str(root / "examples" / "ddp_train.py"), "--model", "lenet_bn",
         "--epochs", "1", "--max-steps", "12", "--timeout", "120"],
        capture_output=True, text=True, timeout=240, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = re.search(r"mean loss of the first 3 steps ([0-9.]+), of the last 3 ([0-9.]+)", proc.stdout)
    assert m, proc.stdout
    assert float(m.group(2)) < float(m.group(1))  # it learns
    # Every rank ends with the same running statistics: they came from the group's batches.
    assert "running statistics identical across ranks: max difference 0\n" in proc.stdout
