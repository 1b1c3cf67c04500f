"""The registered ops (torch.ops.fastnn.*) against fastnn.reference, their fake kernels, opcheck,
and fastnn.reference's own backward against autograd."""
import ast
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastnn
from fastnn import ops, reference
from helpers import (DTYPE_CASES, LAYOUTS, assert_close, gradcheck, gradgradcheck,
                     is_channels_last, make_input, make_params, param_dtype, torch_threads)

OPTIONS = {  # residual, relu
    "plain": (False, False),
    "relu": (False, True),
    "add_relu": (True, True),
}


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_layout(out, input):
    """The output layout rule of csrc/batch_norm_common.cpp (and of the fake kernels)."""
    fmt = ops.output_memory_format(input)
    assert out.is_contiguous(memory_format=fmt), (out.stride(), fmt)


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype, half_params", DTYPE_CASES)
def test_train_op_matches_reference(kernel_only, dtype, half_params, layout, option):
    device = kernel_only
    shape, fmt = LAYOUTS[layout]
    x = make_input(shape, dtype, device, fmt)
    w, b, rm, rv = make_params(shape[1], param_dtype(dtype, half_params), device)
    with_residual, relu = OPTIONS[option]
    r = make_input(shape, dtype, device, fmt, shift=0.0) if with_residual else None
    rm1, rv1, rm2, rv2 = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    out, mean, invstd = torch.ops.fastnn.batch_norm_train(x, w, b, rm1, rv1, 0.1, 1e-5, r, relu)
    eout, emean, einvstd = reference.batch_norm_train(x, w, b, rm2, rv2, 0.1, 1e-5, r, relu)
    assert out.dtype == dtype and mean.dtype == _acc(dtype) and invstd.dtype == _acc(dtype)
    assert mean.shape == (shape[1],) and invstd.shape == (shape[1],)
    _check_layout(out, x)
    assert_close(out, eout, dtype, msg="out")
    # statistics are float32/float64 whatever the input: compare at accumulation precision
    assert_close(mean, emean, _acc(dtype), msg="save_mean")
    assert_close(invstd, einvstd, _acc(dtype), msg="save_invstd")
    assert_close(rm1, rm2, dtype, msg="running_mean")
    assert_close(rv1, rv2, dtype, msg="running_var")
    assert rm1.dtype == rm.dtype and rv1.dtype == rv.dtype


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype, half_params", DTYPE_CASES)
def test_eval_op_matches_reference(kernel_only, dtype, half_params, layout, option):
    device = kernel_only
    shape, fmt = LAYOUTS[layout]
    x = make_input(shape, dtype, device, fmt)
    w, b, rm, rv = make_params(shape[1], param_dtype(dtype, half_params), device)
    with_residual, relu = OPTIONS[option]
    r = make_input(shape, dtype, device, fmt, shift=0.0) if with_residual else None
    rm0, rv0 = rm.clone(), rv.clone()
    out = torch.ops.fastnn.batch_norm_eval(x, w, b, rm, rv, 1e-5, r, relu)
    assert out.dtype == dtype
    _check_layout(out, x)
    assert_close(out, reference.batch_norm_eval(x, w, b, rm, rv, 1e-5, r, relu), dtype)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


@pytest.mark.parametrize("residual_grad", [False, True], ids=["nores", "resgrad"])
@pytest.mark.parametrize("relu", [False, True], ids=["norelu", "relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype, half_params", DTYPE_CASES)
def test_backward_op_matches_reference(kernel_only, dtype, half_params, layout, training, relu,
                                       residual_grad):
    device = kernel_only
    shape, fmt = LAYOUTS[layout]
    x = make_input(shape, dtype, device, fmt)
    w, b, rm, rv = make_params(shape[1], param_dtype(dtype, half_params), device)
    if training:
        out, mean, invstd = reference.batch_norm_train(x, w, b, None, None, 0.1, 1e-5, None, relu)
    else:
        out = reference.batch_norm_eval(x, w, b, rm, rv, 1e-5, None, relu)
        mean = rm.to(_acc(dtype))
        invstd = torch.rsqrt(rv.to(_acc(dtype)) + 1e-5)
    g = make_input(shape, dtype, device, fmt, shift=0.0, scale=1.0)
    output = out if relu else None
    got = torch.ops.fastnn.batch_norm_backward(g, x, w, output, mean, invstd, training, relu,
                                               residual_grad)
    exp = reference.batch_norm_backward(g, x, w, output, mean, invstd, training, relu,
                                        residual_grad)
    gi, gw, gb, gr = got
    assert gi.dtype == dtype and gi.shape == x.shape
    _check_layout(gi, x)
    assert gw.dtype == _acc(dtype) and gb.dtype == _acc(dtype)
    assert gw.shape == (shape[1],) and gb.shape == (shape[1],)
    if residual_grad:
        assert gr.dtype == dtype and gr.shape == x.shape
        _check_layout(gr, x)
    else:
        assert gr.numel() == 0
    for name, a, e in zip(("grad_input", "grad_weight", "grad_bias", "grad_residual"), got, exp):
        assert_close(a, e, dtype, grad=True, msg=name)
    # and without a weight
    got = torch.ops.fastnn.batch_norm_backward(g, x, None, output, mean, invstd, training, relu,
                                               residual_grad)
    exp = reference.batch_norm_backward(g, x, None, output, mean, invstd, training, relu,
                                        residual_grad)
    for name, a, e in zip(("grad_input", "grad_weight", "grad_bias", "grad_residual"), got, exp):
        assert_close(a, e, dtype, grad=True, msg=f"{name} (no weight)")


@pytest.mark.parametrize("layout", ["2d", "nchw", "nhwc", "ndhwc"])
def test_empty_batch_ops(kernel_only, layout):
    device = kernel_only
    shape, fmt = LAYOUTS[layout]
    x = make_input((0,) + shape[1:], torch.float32, device, fmt)
    w, b, rm, rv = make_params(shape[1], torch.float32, device)
    rm0, rv0 = rm.clone(), rv.clone()
    out, mean, invstd = torch.ops.fastnn.batch_norm_train(x, w, b, rm, rv, 0.1, 1e-5, None, True)
    assert out.shape == x.shape
    assert torch.count_nonzero(mean) == 0 and torch.count_nonzero(invstd) == 0
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    assert torch.ops.fastnn.batch_norm_eval(x, w, b, rm, rv, 1e-5, None, True).shape == x.shape
    gi, gw, gb, gr = torch.ops.fastnn.batch_norm_backward(out, x, w, out, mean, invstd, True,
                                                          True, True)
    assert gi.shape == x.shape and gr.shape == x.shape
    assert torch.count_nonzero(gw) == 0 and torch.count_nonzero(gb) == 0


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_deterministic(kernel_only, training):
    """The same inputs give bitwise the same outputs and gradients."""
    device = kernel_only
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        m = fastnn.nn.BatchNormAddReLU2d(64).to(device).train(training)
        x = make_input((8, 64, 28, 28), torch.float32, device, torch.channels_last)
        x.requires_grad_(True)
        r = torch.randn_like(x).requires_grad_(True)
        out = m(x, r)
        out.backward(torch.randn_like(out))
        results.append([out, x.grad, r.grad, m.weight.grad, m.bias.grad, m.running_mean,
                        m.running_var])
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# reference.batch_norm_backward is the oracle for the backward kernel: check it against autograd
# through PyTorch's own batch norm.

@pytest.mark.parametrize("relu", [False, True], ids=["norelu", "relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_reference_backward_matches_autograd(device, layout, training, relu):
    shape, fmt = LAYOUTS[layout]
    dt = torch.float64
    x = make_input(shape, dt, device, fmt).requires_grad_(True)
    w, b, rm, rv = make_params(shape[1], dt, device)
    w.requires_grad_(True)
    b.requires_grad_(True)
    r = make_input(shape, dt, device, fmt, shift=0.0).requires_grad_(True)
    y = F.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5) + r
    if relu:
        y = F.relu(y)
    g = torch.randn_like(y)
    ex, ew, eb, er = torch.autograd.grad(y, (x, w, b, r), g)
    if training:
        out, mean, invstd = reference.batch_norm_train(x.detach(), w.detach(), b.detach(), None,
                                                       None, 0.1, 1e-5, r.detach(), relu)
    else:
        mean, invstd = rm, torch.rsqrt(rv + 1e-5)
        out = reference.batch_norm_eval(x.detach(), w.detach(), b.detach(), rm, rv, 1e-5,
                                        r.detach(), relu)
    gi, gw, gb, gr = reference.batch_norm_backward(g, x.detach(), w.detach(),
                                                   out if relu else None, mean, invstd,
                                                   training, relu, True)
    for a, e in ((gi, ex), (gw, ew), (gb, eb), (gr, er)):
        assert_close(a, e, dt, grad=True)


# ---------------------------------------------------------------------------------------------
# torch.library.opcheck: schema (mutation), fake kernels, autograd registration, AOT dispatch

def _sample_train_args(device, requires_grad):
    def rg(t):
        return t.requires_grad_(requires_grad) if t is not None else None

    cases = [
        # dtype, half params, shape, memory format, weight, running stats, residual, relu
        (torch.float32, False, (2, 3, 4, 5), torch.contiguous_format, True, True, False, False),
        (torch.float32, False, (2, 3, 4, 5), torch.channels_last, True, True, True, True),
        (torch.float64, False, (4, 3), torch.contiguous_format, False, False, False, True),
        (torch.float64, False, (3, 2, 5), torch.contiguous_format, True, True, True, False),
        (torch.bfloat16, False, (2, 3, 2, 3, 2), torch.channels_last_3d, True, True, True, True),
        (torch.float16, True, (2, 4, 3, 3), torch.contiguous_format, True, True, False, True),
    ]
    for dtype, half, shape, fmt, affine, stats, with_res, relu in cases:
        x = rg(make_input(shape, dtype, device, fmt))
        w, b, rm, rv = make_params(shape[1], param_dtype(dtype, half), device, affine)
        if not stats:
            rm = rv = None
        r = rg(make_input(shape, dtype, device, fmt, shift=0.0)) if with_res else None
        yield (x, rg(w), rg(b), rm, rv, 0.1, 1e-5, r, relu)


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
def test_opcheck_train(kernel_only, requires_grad):
    for args in _sample_train_args(kernel_only, requires_grad):
        torch.library.opcheck(torch.ops.fastnn.batch_norm_train.default, args)


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
def test_opcheck_eval(kernel_only, requires_grad):
    for x, w, b, rm, rv, _, eps, r, relu in _sample_train_args(kernel_only, requires_grad):
        if rm is None:
            rm = torch.zeros(x.shape[1], device=x.device, dtype=_acc(x.dtype))
            rv = torch.ones(x.shape[1], device=x.device, dtype=_acc(x.dtype))
        torch.library.opcheck(torch.ops.fastnn.batch_norm_eval.default,
                              (x, w, b, rm, rv, eps, r, relu))


def test_opcheck_backward(kernel_only):
    for x, w, b, rm, rv, m, eps, r, relu in _sample_train_args(kernel_only, False):
        out, mean, invstd = torch.ops.fastnn.batch_norm_train(x, w, b, None, None, m, eps, r, relu)
        g = torch.randn_like(out)
        for training in (True, False):
            torch.library.opcheck(
                torch.ops.fastnn.batch_norm_backward.default,
                (g, x, w, out if relu else None, mean, invstd, training, relu, r is not None))


def test_fake_kernels_match_real(kernel_only):
    """Shapes, dtypes and strides of every output under FakeTensorMode equal the real ones."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for args in _sample_train_args(kernel_only, False):
        real = torch.ops.fastnn.batch_norm_train(*args)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            fake = torch.ops.fastnn.batch_norm_train(*fake_args)
        for a, f in zip(real, fake):
            assert (a.shape, a.dtype, a.stride()) == (f.shape, f.dtype, f.stride())


def _clone_args(args):
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]


def _assert_same(got, want, what, exact):
    """Same dtypes, shapes and strides, and values bitwise (exact) or to rounding (the CUDA
    masked forms are other kernel instantiations, whose grids may differ)."""
    for i, (g, w) in enumerate(zip(got, want)):
        if isinstance(w, torch.Tensor):
            assert g.dtype == w.dtype and g.shape == w.shape and g.stride() == w.stride(), \
                (what, i)
            if exact:
                assert torch.equal(g.reshape(-1).view(torch.uint8),
                                   w.reshape(-1).view(torch.uint8)), f"{what}: {i} differs"
            else:
                assert_close(g, w, g.dtype, msg=f"{what}: {i}")


def test_masked_forms(kernel_only):
    """batch_norm_train_masked: batch_norm_train's outputs and running statistics, and
    the ReLU mask of the size its fake kernel gives (ops.relu_mask_numel: with relu a byte per
    16-byte vector on CUDA, a bit per element and padding on CPU except for channels-first maps
    under 64 values; else empty); opcheck'ed."""
    for args in _sample_train_args(kernel_only, False):
        plain, masked = _clone_args(args), _clone_args(args)
        want = torch.ops.fastnn.batch_norm_train(*plain)
        *got, mask = torch.ops.fastnn.batch_norm_train_masked(*masked)
        _assert_same(got + masked, list(want) + plain, "batch_norm_train_masked",
                     kernel_only == "cpu")
        assert mask.dtype == torch.uint8 and mask.device == args[0].device
        assert mask.shape == (ops.relu_mask_numel(args[0], args[8]),)
        torch.library.opcheck(torch.ops.fastnn.batch_norm_train_masked.default, args)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_dual_masked_form(dual_kernel, training):
    for args in _dual_args(dual_kernel, False, training):
        plain, masked = _clone_args(args), _clone_args(args)
        want = torch.ops.fastnn.batch_norm_dual(*plain)
        *got, mask = torch.ops.fastnn.batch_norm_dual_masked(*masked)
        _assert_same(got + masked, list(want) + plain, "batch_norm_dual_masked",
                     dual_kernel == "cpu")
        assert mask.shape == (ops.relu_mask_numel(args[0], args[-1] and training),)
        torch.library.opcheck(torch.ops.fastnn.batch_norm_dual_masked.default, args)


_MASK_PROBE = """
import torch, fastnn
from torch.utils._python_dispatch import TorchDispatchMode

class Calls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))

x = torch.randn(2, 4, 3, 3, requires_grad=True)
r = torch.randn(2, 4, 3, 3)
with Calls() as calls:
    fastnn.nn.BatchNormReLU2d(4)(x).sum().backward()
    fastnn.nn.BatchNormAddReLU2d(4)(x, r).sum().backward()
    fastnn.nn.BatchNorm2d(4)(x).sum().backward()
print(sorted(n for n in calls.names if n.startswith("fastnn")))
"""


@pytest.mark.parametrize("setting", [None, "0"], ids=["default", "off"])
def test_relu_mask_setting(setting):
    """A recorded forward with relu runs the masked op unless FASTNN_RELU_MASK=0; without relu
    it never does."""
    if not ops.has_kernel("cpu"):
        pytest.skip("fastnn._C is not built")
    env = {k: v for k, v in os.environ.items() if k != "FASTNN_RELU_MASK"}
    if setting is not None:
        env["FASTNN_RELU_MASK"] = setting
    run = subprocess.run([sys.executable, "-c", _MASK_PROBE], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    names = set(ast.literal_eval(run.stdout.strip().splitlines()[-1]))
    assert ("fastnn.batch_norm_train_masked" in names) == (setting is None), names
    assert {"fastnn.batch_norm_train", "fastnn.batch_norm_backward"} <= names, names


def test_fake_relu_mask_on_cuda():
    """The fake kernels give CUDA inputs the mask the CUDA kernels return: ceil(numel / (16 /
    element size)) bytes with relu (so torch.compile plans the CUDA ops right on any machine)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if not ops.has_kernel("cpu"):
        pytest.skip("fastnn._C is not built")
    with FakeTensorMode():
        for dtype, vec in ((torch.float32, 4), (torch.bfloat16, 8), (torch.float64, 2)):
            x = torch.empty(3, 5, 7, 3, dtype=dtype, device="cuda")
            for relu in (False, True):
                mask = torch.ops.fastnn.batch_norm_train_masked(x, None, None, None, None, 0.1,
                                                                1e-5, None, relu)[3]
                assert mask.device.type == "cuda" and mask.dtype == torch.uint8
                assert mask.shape == ((3 * 5 * 7 * 3 + vec - 1) // vec if relu else 0,)


# The CPU kernels can take channels-first input whose channels fit in a core's level-2 cache
# through both passes of a training forward or backward a group of channels at a time, with each
# chunk's partial result and each channel's merge order those of the passes over the whole
# tensor. FASTNN_CPU_CHANNEL_LOCAL=1 takes them wherever a channel fits, 0 never. The shapes keep
# a channel's tensors within 64 KB, under that bound on any CPU with 128 KB of level-2 cache;
# 48x48 planes of float32 and float64 are several chunks long; 7x7 planes go channel-local too
# (the backward a plane per chunk, with the tail of each plane past its last whole vector; the
# forward with the whole-tensor pass's statistics of each channel, their two-pass fallback
# included).
_CHANNEL_LOCAL_SHAPES = [(4, 64, 10, 10), (3, 37, 9, 9), (1, 16, 48, 48), (5, 24, 7, 7)]


def _channel_local_runs(monkeypatch, run):
    results = []
    for setting in ("0", "1"):
        monkeypatch.setenv("FASTNN_CPU_CHANNEL_LOCAL", setting)
        results.append(run())
    return results


@pytest.mark.parametrize("shape", _CHANNEL_LOCAL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["f32", "f64", "bf16", "f16"])
def test_channel_local_passes_bitwise(cpu_kernel, monkeypatch, dtype, shape):
    """Channel-local and whole-tensor passes: bitwise the same outputs, saved and running
    statistics and gradients, for every form of the training forward and backward and of the
    dual form; channel 0's mean of 1e4 standard deviations is centered while the others fold
    into the shift; channel 1's values lie 100 standard deviations below those at every sixth
    position of a plane, so that a pivot sampled there is far off."""
    torch.manual_seed(0)
    C = shape[1]
    x = make_input(shape, dtype, "cpu")
    x[:, 0] = x[:, 0] * 0.5 + 1e4 * (2.0 if dtype in (torch.float32, torch.float64) else 0.01)
    far = torch.ones(x[0, 1].numel(), dtype=torch.bool)
    far[::6] = False
    x.view(shape[0], C, -1)[:, 1, far] -= 200.0
    r = make_input(shape, dtype, "cpu")
    g = make_input(shape, dtype, "cpu", shift=0.0, scale=1.0)
    w, b, rm, rv = make_params(C, torch.float32 if dtype != torch.float64 else dtype, "cpu")
    for residual in (None, r):
        for relu in (False, True):
            def forward():
                stats = [rm.clone(), rv.clone()]
                out = torch.ops.fastnn.batch_norm_train(x, w, b, *stats, 0.1, 1e-5, residual,
                                                        relu)
                return list(out) + stats

            whole, local = _channel_local_runs(monkeypatch, forward)
            _assert_same(local, whole, f"forward residual={residual is not None} relu={relu}",
                         True)
            out, mean, invstd = whole[:3]
            for residual_grad in (False, True):
                def backward():
                    return list(torch.ops.fastnn.batch_norm_backward(
                        g, x, w, out if relu else None, mean, invstd, True, relu,
                        residual_grad))

                whole_b, local_b = _channel_local_runs(monkeypatch, backward)
                _assert_same(local_b, whole_b,
                             f"backward relu={relu} residual_grad={residual_grad}", True)
    # batch_norm_dual: relu(bn(x) + bn2(r)) and its backward.
    w2, b2, rm2, rv2 = make_params(C, w.dtype, "cpu")
    for relu in (False, True):
        def dual():
            stats = [rm.clone(), rv.clone(), rm2.clone(), rv2.clone()]
            out = torch.ops.fastnn.batch_norm_dual(x, w, b, stats[0], stats[1], r, w2, b2,
                                                   stats[2], stats[3], True, 0.1, 1e-5, 0.2,
                                                   1e-3, relu)
            return list(out) + stats

        whole, local = _channel_local_runs(monkeypatch, dual)
        _assert_same(local, whole, f"dual relu={relu}", True)
        out, mean, invstd, mean2, invstd2 = whole[:5]

        def dual_backward():
            return list(torch.ops.fastnn.batch_norm_dual_backward(
                g, x, w, r, w2, out if relu else None, mean, invstd, mean2, invstd2, True, relu))

        whole_b, local_b = _channel_local_runs(monkeypatch, dual_backward)
        _assert_same(local_b, whole_b, f"dual backward relu={relu}", True)


# The CPU kernels write outputs from a size on (a quarter of the last-level cache) with
# non-temporal stores, where every span starts on a cache line. FASTNN_CPU_STREAM=1 takes them
# whatever the size, 0 never: the shapes here are small, with planes (16x16), channels-last rows
# (64 channels) and rank-2 rows on cache lines, and 7x7 planes that are not (never streamed).
_STREAM_SHAPES = [((4, 32, 16, 16), torch.contiguous_format), ((3, 64, 5, 5), torch.channels_last),
                  ((40, 64), torch.contiguous_format), ((5, 24, 7, 7), torch.contiguous_format)]


@pytest.mark.parametrize("local", ["0", "1"], ids=["whole", "local"])
@pytest.mark.parametrize("case", range(len(_STREAM_SHAPES)),
                         ids=lambda i: "x".join(map(str, _STREAM_SHAPES[i][0])))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["f32", "f64", "bf16", "f16"])
def test_streamed_outputs_bitwise(cpu_kernel, monkeypatch, dtype, case, local):
    """Every op that writes an activation-sized output: bitwise the same outputs, statistics and
    gradients written through the cache and around it."""
    shape, fmt = _STREAM_SHAPES[case]
    monkeypatch.setenv("FASTNN_CPU_CHANNEL_LOCAL", local)
    torch.manual_seed(0)
    C = shape[1]
    x, r, z = (make_input(shape, dtype, "cpu", fmt) for _ in range(3))
    g = make_input(shape, dtype, "cpu", fmt, shift=0.0, scale=1.0)
    w, b, rm, rv = make_params(C, torch.float32 if dtype != torch.float64 else dtype, "cpu")
    w2, b2, rm2, rv2 = make_params(C, w.dtype, "cpu")
    fn = torch.ops.fastnn

    def runs(run):
        results = []
        for setting in ("0", "1"):
            monkeypatch.setenv("FASTNN_CPU_STREAM", setting)
            results.append(run())
        monkeypatch.delenv("FASTNN_CPU_STREAM")
        return results

    def check(run, what):
        plain, streamed = runs(run)
        _assert_same(streamed, plain, what, True)
        return plain

    for residual in (None, r):
        for relu in (False, True):
            what = f"residual={residual is not None} relu={relu}"

            def train():
                stats = [rm.clone(), rv.clone()]
                return list(fn.batch_norm_train_masked(x, w, b, *stats, 0.1, 1e-5, residual,
                                                       relu)) + stats

            out, mean, invstd, mask = check(train, "train " + what)[:4]
            check(lambda: [fn.batch_norm_eval(x, w, b, rm, rv, 1e-5, residual, relu)],
                  "eval " + what)
            for training in (True, False):
                for residual_grad in (False, True):
                    check(lambda: list(fn.batch_norm_backward(
                        g, x, w, out if relu else None, mean, invstd, training, relu,
                        residual_grad, mask if relu and training else None)),
                          f"backward training={training} residual_grad={residual_grad} {what}")
    for relu in (False, True):
        def dual():
            stats = [rm.clone(), rv.clone(), rm2.clone(), rv2.clone()]
            return list(fn.batch_norm_dual(x, w, b, stats[0], stats[1], z, w2, b2, stats[2],
                                           stats[3], True, 0.1, 1e-5, 0.2, 1e-3, relu)) + stats

        out, mean, invstd, mean2, invstd2 = check(dual, f"dual relu={relu}")[:5]
        check(lambda: list(fn.batch_norm_dual_backward(g, x, w, z, w2, out if relu else None,
                                                       mean, invstd, mean2, invstd2, True,
                                                       relu)), f"dual backward relu={relu}")
    mean, var = fn.batch_norm_stats(x)
    check(lambda: list(fn.batch_norm_train_with_stats(x, mean, var, w, b, rm.clone(), rv.clone(),
                                                      0.1, 1e-5, r, True)), "with stats")
    if len(shape) == 4:
        half = C // 2
        parts = [x[:, :half].contiguous(memory_format=fmt),
                 x[:, half:].contiguous(memory_format=fmt)]
        check(lambda: list(fn.batch_norm_cat_with_stats(parts, mean, var, w, b, rm.clone(),
                                                        rv.clone(), 0.1, 1e-5, True)),
              "cat with stats")
    invstd = torch.rsqrt(var + 1e-5)
    out = fn.batch_norm_eval(x, w, b, mean, var, 1e-5, None, True)
    sum_dy, sum_dy_xhat, _ = check(lambda: list(fn.batch_norm_backward_reduce(
        g, x, out, mean, invstd, True, True)), "backward reduce")
    n = x.numel() // C
    check(lambda: [fn.batch_norm_backward_elemt(g, x, w, out, mean, invstd, sum_dy / n,
                                                sum_dy_xhat / n, True)], "backward elemt")


# The CPU ReLU mask: the masked training forwards write a bit per output element, in the
# output's memory order (element i: bit i % 8 of byte i // 8), set where the output is > 0 or
# NaN, and 8 bytes of padding; the backward given it reads it in place of the output. None for
# channels-first maps under 64 values (7x7, 3x3 here): their backward reads the output. The
# shapes cover the blocks layout (several chunks per plane, 9x9 planes that end inside a byte),
# the rows layout (channels-last, rank 2) and runs that start and end inside a byte; both
# settings of FASTNN_CPU_CHANNEL_LOCAL and one or two threads (a byte shared by two runs).
_MASK_CASES = [((4, 64, 10, 10), "nchw"), ((3, 37, 9, 9), "nchw"), ((5, 24, 7, 7), "nchw"),
               ((1, 16, 48, 48), "nchw"), ((2, 5, 3, 3), "nchw"), ((3, 37, 9, 9), "nhwc"),
               ((2, 130, 3, 1), "nhwc"), ((7, 19), "2d"), ((33, 6), "2d")]


def _mask_input(shape, fmt, dtype):
    torch.manual_seed(sum(shape))
    memory_format = torch.channels_last if fmt == "nhwc" else torch.contiguous_format
    x = make_input(shape, dtype, "cpu", memory_format)
    w, b, rm, rv = make_params(shape[1], torch.float32 if dtype != torch.float64 else dtype,
                               "cpu")
    # Channel 0: outputs of a positive float too small for bfloat16/float16 (rounded to zero:
    # the backward of a zero output); channel 1: NaN outputs (the gradient passes).
    w[0] = 0.0
    b[0] = 2.0 ** -140 if dtype == torch.bfloat16 else 1e-9
    x[(0, 1) + (0,) * (x.dim() - 2)] = float("nan")
    return x, w, b, rm, rv


def _memory_order(t):
    dims = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    return t.permute(dims).reshape(-1)


def _mask_bits(mask, numel):
    shifts = torch.arange(8, dtype=torch.uint8)
    bits = (mask[:(numel + 7) // 8, None] >> shifts) & 1
    return bits.reshape(-1)[:numel].bool()


def _check_mask(mask, out, what):
    n = out.numel()
    assert mask.dtype == torch.uint8 and mask.shape == (ops.relu_mask_numel(out, True),), what
    if mask.numel() == 0:  # channels-first maps under 64 values: the backward reads the output
        assert out.dim() > 2 and out.is_contiguous() and out[0, 0].numel() < 64, what
        return
    assert torch.equal(_mask_bits(mask, n), ~(_memory_order(out).float() <= 0)), what
    # The bits past the last element and the padding are zero: the same input, the same bytes.
    assert torch.all(mask[(n + 7) // 8:] == 0), what
    if n % 8:
        assert int(mask[n // 8]) >> (n % 8) == 0, what


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def cpu_threads(request):
    with torch_threads(request.param) as n:
        yield n


@pytest.mark.parametrize("local", ["0", "1"], ids=["whole", "local"])
@pytest.mark.parametrize("case", _MASK_CASES, ids=lambda c: "x".join(map(str, c[0])) + "-" + c[1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["f32", "f64", "bf16", "f16"])
def test_cpu_relu_mask(cpu_kernel, cpu_threads, monkeypatch, dtype, case, local):
    """The CPU masked forwards (BN+ReLU, BN+add+ReLU, the dual form): batch_norm_train's
    outputs and a mask whose bits are !(output <= 0) in memory order; the backward given the
    mask is bitwise the backward reading the output, training and eval, with and without the
    masked gradient returned (residual_grad), and the dual backward too."""
    monkeypatch.setenv("FASTNN_CPU_CHANNEL_LOCAL", local)
    shape, fmt = case
    x, w, b, rm, rv = _mask_input(shape, fmt, dtype)
    r = make_input(shape, dtype, "cpu", shift=0.0).contiguous(
        memory_format=torch.channels_last if fmt == "nhwc" else torch.contiguous_format)
    g = make_input(shape, dtype, "cpu", shift=0.0, scale=1.0)
    for residual in (None, r):
        what = f"residual={residual is not None}"
        plain = [rm.clone(), rv.clone()]
        masked = [rm.clone(), rv.clone()]
        want = torch.ops.fastnn.batch_norm_train(x, w, b, *plain, 0.1, 1e-5, residual, True)
        *got, mask = torch.ops.fastnn.batch_norm_train_masked(x, w, b, *masked, 0.1, 1e-5,
                                                              residual, True)
        _assert_same(got + masked, list(want) + plain, what, True)
        out, mean, invstd = want
        _check_mask(mask, out, what)
        for training in (True, False):
            for residual_grad in (False, True):
                def backward(m):
                    return list(torch.ops.fastnn.batch_norm_backward(
                        g, x, w, out, mean, invstd, training, True, residual_grad, m))

                _assert_same(backward(mask), backward(None),
                             f"{what} training={training} residual_grad={residual_grad}", True)
        if mask.numel() == 0:
            continue
        # The backward reads the mask, not the output: with every bit clear no gradient passes
        # (the backward of an output of zeros); with every bit set, all of it (the backward
        # without relu).
        none = torch.ops.fastnn.batch_norm_backward(g, x, w, out, mean, invstd, True, True, True,
                                                    torch.zeros_like(mask))
        _assert_same(list(none), list(torch.ops.fastnn.batch_norm_backward(
            g, x, w, torch.zeros_like(out), mean, invstd, True, True, True)), what, True)
        assert torch.all(none[3] == 0), what
        every = torch.ops.fastnn.batch_norm_backward(g, x, w, out, mean, invstd, True, True,
                                                     False, torch.full_like(mask, 255))
        _assert_same(list(every)[:3], list(torch.ops.fastnn.batch_norm_backward(
            g, x, w, None, mean, invstd, True, False, False))[:3], what, True)
    w2, b2, rm2, rv2 = make_params(shape[1], w.dtype, "cpu")
    for training in (True, False):
        def dual(op):
            stats = [rm.clone(), rv.clone(), rm2.clone(), rv2.clone()]
            got = op(x, w, b, stats[0], stats[1], r, w2, b2, stats[2], stats[3], training, 0.1,
                     1e-5, 0.2, 1e-3, True)
            return list(got) + stats

        want = dual(torch.ops.fastnn.batch_norm_dual)
        got = dual(torch.ops.fastnn.batch_norm_dual_masked)
        mask = got.pop(5)
        _assert_same(got, want, f"dual training={training}", True)
        out, mean, invstd, mean2, invstd2 = want[:5]
        if not training:
            assert mask.numel() == 0
            continue
        _check_mask(mask, out, "dual")

        def dual_backward(m):
            return list(torch.ops.fastnn.batch_norm_dual_backward(
                g, x, w, r, w2, out, mean, invstd, mean2, invstd2, True, True, m))

        _assert_same(dual_backward(mask), dual_backward(None), "dual backward", True)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_cpu_autograd_reads_the_mask(cpu_kernel, dtype, fmt):
    """Through autograd (the masked forwards, the backward given their mask) BN+ReLU, BN+add+ReLU
    and the dual form on CPU give the gradients of the backward ops reading the output."""
    shape = (4, 24, 9, 9)
    x = make_input(shape, dtype, "cpu", fmt).requires_grad_()
    r = make_input(shape, dtype, "cpu", fmt, shift=0.0).requires_grad_()
    w, b, _, _ = make_params(shape[1], torch.float32, "cpu")
    for residual in (None, r):
        out, mean, invstd = fastnn.ops.batch_norm_train(x, w, b, None, None, 0.1, 1e-5, residual,
                                                        True)
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, [x] + ([r] if residual is not None else []), g)
        want = torch.ops.fastnn.batch_norm_backward(g, x.detach(), w, out.detach(), mean, invstd,
                                                    True, True, residual is not None)
        assert torch.equal(got[0], want[0])
        if residual is not None:
            assert torch.equal(got[1], want[3])
    w2, b2, _, _ = make_params(shape[1], torch.float32, "cpu")
    out, mean, invstd, mean2, invstd2 = fastnn.ops.batch_norm_dual(
        x, w, b, None, None, r, w2, b2, None, None, True, 0.1, 1e-5, 0.1, 1e-5, True)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, r], g)
    want = torch.ops.fastnn.batch_norm_dual_backward(g, x.detach(), w, r.detach(), w2,
                                                     out.detach(), mean, invstd, mean2, invstd2,
                                                     True, True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[3])


def test_cpu_relu_mask_checked(cpu_kernel):
    """A relu_mask that is not the CPU masked forward's for this input is refused, by name."""
    x = make_input((2, 4, 3, 3), torch.float32, "cpu", torch.channels_last)
    out, mean, invstd, mask = torch.ops.fastnn.batch_norm_train_masked(
        x, None, None, None, None, 0.1, 1e-5, None, True)
    assert mask.numel() > 0
    g = torch.randn_like(out)
    w2 = torch.ones(4)
    for bad in (mask[:-1], mask.to(torch.int32), torch.zeros(mask.numel() * 2,
                                                             dtype=torch.uint8)[::2]):
        with pytest.raises(RuntimeError, match="relu_mask"):
            torch.ops.fastnn.batch_norm_backward(g, x, None, out, mean, invstd, True, True,
                                                 False, bad)
        with pytest.raises(RuntimeError, match="relu_mask"):
            torch.ops.fastnn.batch_norm_dual_backward(g, x, None, x, w2, out, mean, invstd,
                                                      mean, invstd, True, True, bad)


@pytest.mark.cuda
@pytest.mark.parametrize("residual", [False, True], ids=["relu", "add_relu"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_backward_from_the_forward_mask(dtype, fmt, residual):
    """On CUDA the training backward through autograd (which gives it the forward's ReLU mask)
    is the backward op reading the output (to rounding: other kernel instantiations may take
    another grid), on shapes with and without scalar heads."""
    if not (torch.cuda.is_available() and ops.has_kernel("cuda")):
        pytest.skip("needs fastnn's CUDA kernels and a GPU")
    for shape in ((8, 16, 14, 14), (5, 24, 7, 9), (3, 32, 33, 1)):
        x = make_input(shape, dtype, "cuda", fmt).requires_grad_()
        w, b, _, _ = make_params(shape[1], torch.float32, "cuda")
        r = make_input(shape, dtype, "cuda", fmt, shift=0.0).requires_grad_() if residual else None
        out, mean, invstd = torch.ops.fastnn.batch_norm_train(x, w, b, None, None, 0.1, 1e-5, r,
                                                              True)
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, [x] + ([r] if residual else []), g)
        want = torch.ops.fastnn.batch_norm_backward(g, x.detach(), w, out.detach(), mean, invstd,
                                                    True, True, residual)
        assert_close(got[0], want[0], dtype, grad=True, msg=f"{shape} grad_input")
        if residual:
            assert_close(got[1], want[3], dtype, grad=True, msg=f"{shape} grad_residual")


# ---------------------------------------------------------------------------------------------
# More than 2^31 elements (64-bit indexing)

@pytest.mark.large
@pytest.mark.cuda
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "nhwc"])
def test_over_2_31_elements(fmt):
    """Training forward, backward and eval on a float16 tensor of 2,147,745,800 elements:
    a strided subset (and the very last elements) against PyTorch with statistics reduced per
    channel in float64."""
    if not (torch.cuda.is_available() and ops.has_kernel("cuda")):
        pytest.skip("needs fastnn's CUDA kernels")
    shape = (2, 4, 16385, 16385)
    C, n = shape[1], shape[0] * shape[2] * shape[3]
    eps = 1e-5
    x = (torch.randn(shape, device="cuda", dtype=torch.float16) + 0.5).contiguous(
        memory_format=fmt)
    w, b, rm, rv = make_params(C, torch.float32, "cuda")
    rm0, rv0 = rm.clone(), rv.clone()
    subsets = [(slice(None), slice(None), slice(None, None, 997), slice(3, None, 1009)),
               (slice(-1, None), slice(None), slice(-1, None), slice(-9, None))]

    var = torch.empty(C, dtype=torch.float64, device="cuda")
    mean = torch.empty(C, dtype=torch.float64, device="cuda")
    for c in range(C):
        var[c], mean[c] = torch.var_mean(x[:, c].double(), correction=0)
    invstd = torch.rsqrt(var + eps)

    out, save_mean, save_invstd = torch.ops.fastnn.batch_norm_train(x, w, b, rm, rv, 0.1, eps,
                                                                     None, True)
    assert out.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(save_mean.double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(save_invstd.double(), invstd, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rm.double(), 0.9 * rm0.double() + 0.1 * mean, rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(rv.double(), 0.9 * rv0.double() + 0.1 * var * n / (n - 1),
                               rtol=1e-4, atol=1e-4)
    for sub in subsets:
        exp = F.relu(F.batch_norm(x[sub].float(), mean.float(), var.float(), w, b, False, 0.0,
                                  eps))
        assert_close(out[sub], exp, torch.float16)
    del out

    g = torch.randn_like(x)
    gi, gw, gb, _ = torch.ops.fastnn.batch_norm_backward(g, x, w, None, save_mean, save_invstd,
                                                         True, False, False)
    exp_gb = torch.empty_like(mean)
    exp_gw = torch.empty_like(mean)
    for c in range(C):
        gc = g[:, c].double()
        exp_gb[c] = gc.sum()
        exp_gw[c] = (gc * ((x[:, c].double() - mean[c]) * invstd[c])).sum()
        del gc
    # float32 sums of n terms of size ~1: allow 1e-7 of their total magnitude
    torch.testing.assert_close(gb.double(), exp_gb, rtol=0, atol=1e-7 * n)
    torch.testing.assert_close(gw.double(), exp_gw, rtol=0, atol=1e-7 * n)
    pc = (1, C, 1, 1)
    for sub in subsets:
        xhat = (x[sub].double() - mean.view(pc)) * invstd.view(pc)
        exp = ((g[sub].double() - (exp_gb / n).view(pc) - xhat * (exp_gw / n).view(pc))
               * (invstd * w.double()).view(pc))
        assert_close(gi[sub], exp, torch.float16, grad=True)
    del gi, g

    out = torch.ops.fastnn.batch_norm_eval(x, w, b, rm, rv, eps, None, False)
    for sub in subsets:
        assert_close(out[sub], F.batch_norm(x[sub].float(), rm, rv, w, b, False, 0.0, eps),
                     torch.float16)


# ---------------------------------------------------------------------------------------------
# The ops that split the training forward and backward into parts (SyncBatchNorm, DenseNet's
# shared statistics). They have CPU kernels; elsewhere fastnn.functional runs their reference.

def _require_kernels(device, *names):
    """The device, or a skip naming the ops fastnn._C has no kernel of on it."""
    missing = [op for op in names if not ops.has_kernel(device, op)]
    if missing:
        pytest.skip(f"fastnn._C has no {device} kernel of {', '.join(missing)}")
    return device


PART_OPS = ("batch_norm_stats", "batch_norm_train_with_stats", "batch_norm_backward_reduce",
            "batch_norm_backward_elemt")


@pytest.fixture
def part_kernels(kernel_only):
    return _require_kernels(kernel_only, *PART_OPS)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["f64", "f32", "bf16", "f16"])
def test_stats_op_matches_reference(part_kernels, dtype, layout):
    shape, fmt = LAYOUTS[layout]
    x = make_input(shape, dtype, part_kernels, fmt, shift=30.0)  # a mean far from zero
    mean, var = torch.ops.fastnn.batch_norm_stats(x)
    exp_mean, exp_var = reference.batch_norm_stats(x.to(torch.float64))
    assert mean.dtype == _acc(dtype) and var.dtype == _acc(dtype)
    assert mean.shape == (shape[1],) and var.shape == (shape[1],)
    assert_close(mean, exp_mean, dtype, msg="mean")
    assert_close(var, exp_var, dtype, msg="var")
    torch_var, torch_mean = torch.var_mean(x.to(torch.float64), [0] + list(range(2, x.dim())),
                                           correction=0)
    assert_close(mean, torch_mean, dtype, msg="mean vs torch.var_mean")
    assert_close(var, torch_var, dtype, msg="var vs torch.var_mean")


@pytest.mark.parametrize("residual_grad", [False, True], ids=["nores", "resgrad"])
@pytest.mark.parametrize("relu", [False, True], ids=["norelu", "relu"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype, half_params", DTYPE_CASES)
def test_backward_parts_match_reference(part_kernels, dtype, half_params, layout, relu,
                                        residual_grad):
    """reduce and elemt against the reference, and reduce -> elemt with the local sums equal to
    the whole training backward."""
    device = part_kernels
    shape, fmt = LAYOUTS[layout]
    x = make_input(shape, dtype, device, fmt)
    w, b, _, _ = make_params(shape[1], param_dtype(dtype, half_params), device)
    out, mean, invstd = reference.batch_norm_train(x, w, b, None, None, 0.1, 1e-5, None, relu)
    output = out if relu else None
    g = make_input(shape, dtype, device, fmt, shift=0.0, scale=1.0)
    got = torch.ops.fastnn.batch_norm_backward_reduce(g, x, output, mean, invstd, relu,
                                                      residual_grad)
    exp = reference.batch_norm_backward_reduce(g, x, output, mean, invstd, relu, residual_grad)
    sum_dy, sum_dy_xhat, gr = got
    assert sum_dy.dtype == _acc(dtype) and sum_dy_xhat.dtype == _acc(dtype)
    if residual_grad:
        assert gr.dtype == dtype and gr.shape == x.shape
        _check_layout(gr, x)
    else:
        assert gr.numel() == 0
    for name, a, e in zip(("sum_dy", "sum_dy_xhat", "grad_residual"), got, exp):
        assert_close(a, e, dtype, grad=True, msg=name)

    count = x.numel() // shape[1]
    # Sums as another process would contribute them: the elemt op must use what it is given.
    mean_dy = sum_dy / count + 0.25
    mean_dy_xhat = sum_dy_xhat / count - 0.5
    for weight in (w, None):
        gi = torch.ops.fastnn.batch_norm_backward_elemt(g, x, weight, output, mean, invstd,
                                                        mean_dy, mean_dy_xhat, relu)
        assert gi.dtype == dtype and gi.shape == x.shape
        _check_layout(gi, x)
        exp_gi = reference.batch_norm_backward_elemt(g, x, weight, output, mean, invstd, mean_dy,
                                                     mean_dy_xhat, relu)
        assert_close(gi, exp_gi, dtype, grad=True, msg="grad_input")
    gi = torch.ops.fastnn.batch_norm_backward_elemt(g, x, w, output, mean, invstd,
                                                    sum_dy / count, sum_dy_xhat / count, relu)
    whole = torch.ops.fastnn.batch_norm_backward(g, x, w, output, mean, invstd, True, relu,
                                                 residual_grad)
    assert_close(gi, whole[0], dtype, grad=True, msg="reduce -> elemt vs batch_norm_backward")
    assert_close(sum_dy_xhat, whole[1], dtype, grad=True, msg="sum_dy_xhat vs grad_weight")
    assert_close(sum_dy, whole[2], dtype, grad=True, msg="sum_dy vs grad_bias")


@pytest.mark.parametrize("layout", ["2d", "nchw", "nhwc"])
def test_part_ops_empty_batch(part_kernels, layout):
    shape, fmt = LAYOUTS[layout]
    x = make_input((0,) + shape[1:], torch.float32, part_kernels, fmt)
    mean, var = torch.ops.fastnn.batch_norm_stats(x)
    assert mean.shape == (shape[1],) and torch.count_nonzero(mean) == 0
    assert torch.count_nonzero(var) == 0
    invstd = torch.ones_like(mean)
    sd, sdx, gr = torch.ops.fastnn.batch_norm_backward_reduce(x, x, x, mean, invstd, True, True)
    assert torch.count_nonzero(sd) == 0 and torch.count_nonzero(sdx) == 0
    assert gr.shape == x.shape
    gi = torch.ops.fastnn.batch_norm_backward_elemt(x, x, None, x, mean, invstd, sd, sdx, True)
    assert gi.shape == x.shape


def test_part_ops_bad_input(part_kernels):
    x = make_input((4, 3, 5), torch.float32, part_kernels)
    ok = torch.zeros(3, device=part_kernels)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        torch.ops.fastnn.batch_norm_stats(x[0, 0])
    with pytest.raises(NotImplementedError, match="float32, float64"):
        torch.ops.fastnn.batch_norm_stats(x.to(torch.int32))
    with pytest.raises(RuntimeError, match="batch_norm_backward_reduce: grad_output must have"):
        torch.ops.fastnn.batch_norm_backward_reduce(x[:2], x, None, ok, ok, False, False)
    with pytest.raises(RuntimeError, match="output .* is required when relu=True"):
        torch.ops.fastnn.batch_norm_backward_reduce(x, x, None, ok, ok, True, False)
    with pytest.raises(RuntimeError, match="batch_norm_backward_elemt: mean_dy must be a 1-D"):
        torch.ops.fastnn.batch_norm_backward_elemt(x, x, None, None, ok, ok, ok[:2], ok, False)
    with pytest.raises(RuntimeError, match="mean_dy_xhat must have dtype"):
        torch.ops.fastnn.batch_norm_backward_elemt(x, x, None, None, ok, ok, ok, ok.double(),
                                                   False)


def test_opcheck_part_ops(part_kernels):
    for x, w, b, rm, rv, m, eps, r, relu in _sample_train_args(part_kernels, False):
        torch.library.opcheck(torch.ops.fastnn.batch_norm_stats.default, (x,))
        out, mean, invstd = torch.ops.fastnn.batch_norm_train(x, w, b, None, None, m, eps, r, relu)
        g = torch.randn_like(out)
        output = out if relu else None
        torch.library.opcheck(torch.ops.fastnn.batch_norm_backward_reduce.default,
                              (g, x, output, mean, invstd, relu, r is not None))
        sd, sdx, _ = torch.ops.fastnn.batch_norm_backward_reduce(g, x, output, mean, invstd, relu,
                                                                 False)
        torch.library.opcheck(torch.ops.fastnn.batch_norm_backward_elemt.default,
                              (g, x, w, output, mean, invstd, sd / 7, sdx / 7, relu))


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype, half_params", DTYPE_CASES)
def test_train_with_stats_op_matches_train(part_kernels, dtype, half_params, layout, option):
    """Given the input's own statistics, the same output, saved statistics and running-statistics
    update as batch_norm_train."""
    shape, fmt = LAYOUTS[layout]
    x = make_input(shape, dtype, part_kernels, fmt)
    w, b, rm, rv = make_params(shape[1], param_dtype(dtype, half_params), part_kernels)
    with_res, relu = OPTIONS[option]
    r = make_input(shape, dtype, part_kernels, fmt, shift=0.0) if with_res else None
    mean, var = torch.ops.fastnn.batch_norm_stats(x)
    rm1, rv1, rm2, rv2 = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    got = torch.ops.fastnn.batch_norm_train_with_stats(x, mean, var, w, b, rm1, rv1, 0.1, 1e-5,
                                                       r, relu)
    exp = torch.ops.fastnn.batch_norm_train(x, w, b, rm2, rv2, 0.1, 1e-5, r, relu)
    _check_layout(got[0], x)
    for name, a, e in zip(("out", "save_mean", "save_invstd"), got, exp):
        assert a.dtype == e.dtype, name
        assert_close(a, e, dtype, msg=name)
    assert_close(rm1, rm2, dtype, msg="running_mean")
    assert_close(rv1, rv2, dtype, msg="running_var")


def test_opcheck_train_with_stats(part_kernels):
    for requires_grad in (False, True):
        for x, w, b, rm, rv, m, eps, r, relu in _sample_train_args(part_kernels, requires_grad):
            mean, var = torch.ops.fastnn.batch_norm_stats(x.detach())
            torch.library.opcheck(torch.ops.fastnn.batch_norm_train_with_stats.default,
                                  (x, mean, var, w, b, rm, rv, m, eps, r, relu))


# ---------------------------------------------------------------------------------------------
# batch_norm_dual: relu(bn(input) + bn2(input2))

def _dual_args(device, requires_grad, training):
    for x, w, b, rm, rv, m, eps, _, relu in _sample_train_args(device, requires_grad):
        z = make_input(x.shape, x.dtype, device, ops.output_memory_format(x), shift=-2.0)
        z.requires_grad_(requires_grad)
        w2, b2, rm2, rv2 = (None if t is None else t.clone() for t in (w, b, rm, rv))
        if w2 is not None:
            w2 = w2.detach().requires_grad_(requires_grad)
            b2 = b2.detach().requires_grad_(requires_grad)
        if not training and rm is None:
            acc = _acc(x.dtype)
            rm = torch.zeros(x.shape[1], device=device, dtype=acc)
            rv = torch.ones(x.shape[1], device=device, dtype=acc)
            rm2, rv2 = rm.clone() + 0.5, rv.clone() * 2
        yield (x, w, b, rm, rv, z, w2, b2, rm2, rv2, training, m, eps, 0.3, 1e-3, relu)


@pytest.fixture
def dual_kernel(kernel_only):
    return _require_kernels(kernel_only, "batch_norm_dual")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_dual_op_matches_reference(dual_kernel, training):
    for args in _dual_args(dual_kernel, False, training):
        dtype = args[0].dtype
        mine = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        ref = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        got = torch.ops.fastnn.batch_norm_dual(*mine)
        exp = reference.batch_norm_dual(*ref)
        _check_layout(got[0], args[0])
        for name, a, e in zip(("out", "mean", "invstd", "mean2", "invstd2"), got, exp):
            assert a.dtype == e.dtype, name
            assert_close(a, e, dtype, msg=name)
        for i in (3, 4, 8, 9):  # running statistics
            if mine[i] is not None:
                assert_close(mine[i], ref[i], dtype, msg=f"running statistics (argument {i})")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
def test_opcheck_dual(dual_kernel, requires_grad, training):
    for args in _dual_args(dual_kernel, requires_grad, training):
        torch.library.opcheck(torch.ops.fastnn.batch_norm_dual.default, args)


@pytest.fixture
def dual_backward_kernel(kernel_only):
    return _require_kernels(kernel_only, "batch_norm_dual_backward")


@pytest.mark.parametrize("relu", [False, True], ids=["norelu", "relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype, half_params", DTYPE_CASES)
def test_dual_backward_op_matches_reference(dual_backward_kernel, dtype, half_params, layout,
                                            training, relu):
    device = dual_backward_kernel
    shape, fmt = LAYOUTS[layout]
    x = make_input(shape, dtype, device, fmt)
    z = make_input(shape, dtype, device, fmt, shift=-3.0, scale=0.5)
    w, b, rm, rv = make_params(shape[1], param_dtype(dtype, half_params), device)
    w2, b2, rm2, rv2 = make_params(shape[1], param_dtype(dtype, half_params), device)
    out, m1, is1, m2, is2 = reference.batch_norm_dual(x, w, b, rm.clone(), rv.clone(), z, w2, b2,
                                                      rm2.clone(), rv2.clone(), training, 0.1,
                                                      1e-5, 0.1, 1e-3, relu)
    g = make_input(shape, dtype, device, fmt, shift=0.0, scale=1.0)
    output = out if relu else None
    for weights in ((w, w2), (None, None)):
        got = torch.ops.fastnn.batch_norm_dual_backward(g, x, weights[0], z, weights[1], output,
                                                        m1, is1, m2, is2, training, relu)
        exp = reference.batch_norm_dual_backward(g, x, weights[0], z, weights[1], output, m1, is1,
                                                 m2, is2, training, relu)
        names = ("grad_input", "grad_weight", "grad_bias", "grad_input2", "grad_weight2",
                 "grad_bias2")
        for name, a, e in zip(names, got, exp):
            assert a.dtype == e.dtype, name
            assert_close(a, e, dtype, grad=True, msg=name)
        _check_layout(got[0], x)
        _check_layout(got[3], x)


def test_opcheck_dual_backward(dual_backward_kernel):
    for training in (True, False):
        for args in _dual_args(dual_backward_kernel, False, training):
            x, w, b, rm, rv, z, w2, b2, rm2, rv2, _, m, eps, m2, eps2, relu = args
            out, mean, invstd, mean2, invstd2 = torch.ops.fastnn.batch_norm_dual(*args)
            g = torch.randn_like(out)
            torch.library.opcheck(torch.ops.fastnn.batch_norm_dual_backward.default,
                                  (g, x, w, z, w2, out if relu else None, mean, invstd, mean2,
                                   invstd2, training, relu))


# ---------------------------------------------------------------------------------------------
# batch_norm_cat_with_stats: batch_norm_train_with_stats of torch.cat(inputs, 1), the inputs read
# where they are (DenseNet's feature maps)

CAT_WIDTHS = (3, 1, 5, 2)


@pytest.fixture
def cat_kernel(kernel_only):
    return _require_kernels(kernel_only, "batch_norm_cat_with_stats", "batch_norm_stats")


def _cat_inputs(layout, dtype, device, widths=CAT_WIDTHS):
    """Inputs of `widths` channels in `layout`; "mixed": channels_last and contiguous alike."""
    if layout == "mixed":
        shape, _ = LAYOUTS["nhwc"]
        fmts = [torch.channels_last if i % 2 else torch.contiguous_format
                for i in range(len(widths))]
    else:
        shape, fmt = LAYOUTS[layout]
        fmts = [fmt] * len(widths)
    return [make_input((shape[0], w) + shape[2:], dtype, device, f, shift=0.5 + i)
            for i, (w, f) in enumerate(zip(widths, fmts))]


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("layout", ["2d", "3d", "nchw", "nhwc", "mixed", "ndhwc"])
@pytest.mark.parametrize("dtype, half_params", DTYPE_CASES)
def test_cat_with_stats_op_matches_train_with_stats(cat_kernel, dtype, half_params, layout, relu):
    """The same output, saved statistics and running-statistics update as
    batch_norm_train_with_stats of the concatenation, and the reference's."""
    inputs = _cat_inputs(layout, dtype, cat_kernel)
    x = torch.cat(inputs, 1)
    C = x.shape[1]
    w, b, rm, rv = make_params(C, param_dtype(dtype, half_params), cat_kernel)
    mean, var = torch.ops.fastnn.batch_norm_stats(x)
    rm1, rv1, rm2, rv2, rm3, rv3 = (t.clone() for t in (rm, rv) * 3)
    got = torch.ops.fastnn.batch_norm_cat_with_stats(inputs, mean, var, w, b, rm1, rv1, 0.1, 1e-5,
                                                     relu)
    exp = torch.ops.fastnn.batch_norm_train_with_stats(x, mean, var, w, b, rm2, rv2, 0.1, 1e-5,
                                                       None, relu)
    ref = reference.batch_norm_cat_with_stats(inputs, mean, var, w, b, rm3, rv3, 0.1, 1e-5, relu)
    assert got[0].stride() == x.stride()  # torch.cat's layout
    for name, a, e, r in zip(("out", "save_mean", "save_invstd"), got, exp, ref):
        assert a.dtype == e.dtype == r.dtype, name
        assert_close(a, e, dtype, msg=name)
        assert_close(a, r, dtype, msg=name + " vs reference")
    for a, e in ((rm1, rm2), (rv1, rv2), (rm1, rm3), (rv1, rv3)):
        assert_close(a, e, dtype, msg="running statistics")


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "nhwc"])
def test_cat_with_stats_op_large(cat_kernel, fmt):
    """Outputs large enough for the non-temporal stores of the channels-first path."""
    inputs = [make_input((2, c, 128, 128), torch.float32, cat_kernel, fmt) for c in (64, 32, 32)]
    x = torch.cat(inputs, 1)
    w, b, rm, rv = make_params(128, torch.float32, cat_kernel)
    mean, var = torch.ops.fastnn.batch_norm_stats(x)
    got = torch.ops.fastnn.batch_norm_cat_with_stats(inputs, mean, var, w, b, None, None, 0.1,
                                                     1e-5, True)[0]
    exp = torch.ops.fastnn.batch_norm_train_with_stats(x, mean, var, w, b, None, None, 0.1, 1e-5,
                                                       None, True)[0]
    assert torch.equal(got, exp)


def test_cat_with_stats_op_empty_batch(cat_kernel):
    inputs = [torch.empty(0, c, 3, 3, device=cat_kernel) for c in (2, 3)]
    rm, rv = torch.zeros(5, device=cat_kernel), torch.ones(5, device=cat_kernel)
    mean, var = torch.zeros(5, device=cat_kernel), torch.zeros(5, device=cat_kernel)
    out, _, _ = torch.ops.fastnn.batch_norm_cat_with_stats(inputs, mean, var, None, None, rm, rv,
                                                           0.1, 1e-5, True)
    assert out.shape == (0, 5, 3, 3)
    assert torch.equal(rm, torch.zeros(5, device=cat_kernel))
    assert torch.equal(rv, torch.ones(5, device=cat_kernel))


def test_cat_with_stats_op_bad_inputs(cat_kernel):
    d = cat_kernel
    mean, var = torch.zeros(5, device=d), torch.ones(5, device=d)
    op = torch.ops.fastnn.batch_norm_cat_with_stats
    with pytest.raises(ValueError, match="inputs must hold at least one tensor"):
        op([], mean, var, None, None, None, None, 0.1, 1e-5, False)
    with pytest.raises(ValueError, match=r"inputs\[1\] has size \[2, 3, 4, 4\], which does not "
                                         r"match inputs\[0\]"):
        op([torch.randn(2, 2, 3, 3, device=d), torch.randn(2, 3, 4, 4, device=d)], mean, var,
           None, None, None, None, 0.1, 1e-5, False)
    with pytest.raises(TypeError, match=r"inputs\[1\] is Double but inputs\[0\] is Float"):
        op([torch.randn(2, 2, 3, 3, device=d), torch.randn(2, 3, 3, 3, device=d).double()], mean,
           var, None, None, None, None, 0.1, 1e-5, False)
    with pytest.raises((RuntimeError, ValueError), match="weight"):
        op([torch.randn(2, 2, 3, 3, device=d), torch.randn(2, 3, 3, 3, device=d)], mean, var,
           torch.ones(4, device=d), None, None, None, 0.1, 1e-5, False)
    rm, rv = torch.zeros(5, device=d), torch.ones(5, device=d)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        op([torch.randn(1, 2, device=d), torch.randn(1, 3, device=d)], mean, var, None, None, rm,
           rv, 0.1, 1e-5, False)
    assert torch.equal(rm, torch.zeros(5, device=d)) and torch.equal(rv, torch.ones(5, device=d))


def test_opcheck_cat_with_stats(cat_kernel):
    for layout in ("nchw", "mixed", "2d"):
        for dtype in (torch.float32, torch.bfloat16):
            for requires_grad in (False, True):
                inputs = [t.requires_grad_(requires_grad)
                          for t in _cat_inputs(layout, dtype, cat_kernel, (3, 2))]
                mean, var = torch.ops.fastnn.batch_norm_stats(torch.cat(inputs, 1).detach())
                w, b, rm, rv = make_params(5, torch.float32, cat_kernel)
                w.requires_grad_(requires_grad)
                for relu in (False, True):
                    torch.library.opcheck(torch.ops.fastnn.batch_norm_cat_with_stats.default,
                                          (inputs, mean, var, w, b, rm, rv, 0.1, 1e-5, relu))


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_cat_with_stats_op_gradcheck(cat_kernel, relu):
    """First and second derivatives of the op (through its autograd.Function) in float64."""
    a = make_input((3, 2, 3, 2), torch.float64, cat_kernel).requires_grad_(True)
    c = make_input((3, 1, 3, 2), torch.float64, cat_kernel, shift=-1.0).requires_grad_(True)
    w, b, _, _ = make_params(3, torch.float64, cat_kernel)
    w.requires_grad_(True)
    b.requires_grad_(True)

    def fn(a, c, w, b):
        mean, var = ops.batch_norm_stats(torch.cat([a, c], 1))
        return ops.batch_norm_cat_with_stats([a, c], mean, var, w, b, None, None, 0.1, 1e-3,
                                             relu)[0]
    assert gradcheck(fn, (a, c, w, b))
    assert gradgradcheck(fn, (a, c, w, b), atol=1e-4)
