"""fastnn.functional.batch_norm (and the fused forms) against F.batch_norm and fastnn.reference."""
import functools
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastnn
from helpers import (DTYPE_CASES, KERNEL_REGIMES, LAYOUTS, assert_close, check_against_oracles,
                     check_results, gradcheck, gradgradcheck, kernel_case, make_input, make_params,
                     param_dtype, run_bn, tol, torch_reduced_precision_is_exact)

FUSED = {
    "plain": (False, False),
    "relu": (False, True),
    "add": (True, False),
    "add_relu": (True, True),
}


@pytest.mark.parametrize("fused", list(FUSED))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype, half_params", DTYPE_CASES)
def test_matches_torch(backend, device, dtype, half_params, layout, training, fused):
    shape, fmt = LAYOUTS[layout]
    x = make_input(shape, dtype, device, fmt)
    w, b, rm, rv = make_params(shape[1], param_dtype(dtype, half_params), device)
    with_residual, relu = FUSED[fused]
    r = make_input(shape, dtype, device, fmt, shift=0.0, scale=1.0) if with_residual else None
    if backend == "kernel":
        assert fastnn.functional.use_kernel(x)
    check_against_oracles(x, w, b, rm, rv, training, 0.1, 1e-5, residual=r, relu=relu)


@pytest.mark.parametrize("shape", [
    (2, 1), (2, 1, 1), (2, 3, 1, 1), (2, 7, 1, 1, 1), (3, 1, 5, 3), (2, 7, 3, 1), (5, 3, 1, 9),
    (2, 7, 1, 3, 1), (2, 64, 3, 3), (8, 3, 17, 19), (2, 1000), (300, 3), (2, 129, 33),
    (3, 1000, 2, 3), (2, 520, 1, 3, 2),
], ids=str)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_odd_sizes(backend, device, dtype, training, fmt, shape):
    memory_format = torch.contiguous_format
    if fmt == "channels_last":
        if len(shape) < 4:
            pytest.skip("channels_last needs rank 4 or 5")
        memory_format = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x = make_input(shape, dtype, device, memory_format)
    w, b, rm, rv = make_params(shape[1], dtype, device)
    r = make_input(shape, dtype, device, memory_format, shift=0.0)
    # With two values per channel the normalized output is ill-conditioned when they nearly
    # agree (condition ~ |x| / sqrt(var + eps)): float32 implementations, PyTorch's included,
    # then differ beyond 1e-5. A larger eps bounds that for float32; float64 keeps eps=1e-5.
    eps = 1e-5 if dtype == torch.float64 else 1e-2
    check_against_oracles(x, w, b, rm, rv, training, 0.1, eps)
    check_against_oracles(x, w, b, rm, rv, training, 0.1, eps, residual=r, relu=True)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype, half_params", DTYPE_CASES)
def test_no_weight_or_bias(backend, device, dtype, half_params, training):
    x = make_input((4, 3, 5, 5), dtype, device)
    w, b, rm, rv = make_params(3, param_dtype(dtype, half_params), device)
    r = make_input((4, 3, 5, 5), dtype, device, shift=0.0)
    for weight, bias in ((None, None), (w, None), (None, b)):
        check_against_oracles(x, weight, bias, rm, rv, training, 0.1, 1e-5)
        check_against_oracles(x, weight, bias, rm, rv, training, 0.1, 1e-5, residual=r, relu=True)


@pytest.mark.parametrize("layout", ["2d", "nchw", "nhwc", "ndhwc"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=["f64", "f32", "bf16"])
def test_training_without_running_stats(backend, device, dtype, layout):
    """track_running_stats=False: batch statistics, nothing to update."""
    shape, fmt = LAYOUTS[layout]
    x = make_input(shape, dtype, device, fmt)
    w, b, _, _ = make_params(shape[1], param_dtype(dtype), device)
    check_against_oracles(x, w, b, None, None, True, 0.1, 1e-5)
    check_against_oracles(x, w, b, None, None, True, 0.1, 1e-5, relu=True)
    check_against_oracles(x, None, None, None, None, True, 0.1, 1e-5,
                          residual=torch.randn_like(x), relu=True)


@pytest.mark.parametrize("momentum", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.5])
def test_momentum_and_eps(backend, device, momentum, eps):
    x = make_input((4, 3, 5, 5), torch.float64, device)
    w, b, rm, rv = make_params(3, torch.float64, device)
    for training in (True, False):
        check_against_oracles(x, w, b, rm, rv, training, momentum, eps)


def test_eval_eps_zero(backend, device):
    """torch accepts eps=0 in eval."""
    x = make_input((4, 3, 5, 5), torch.float64, device)
    w, b, rm, rv = make_params(3, torch.float64, device)
    check_against_oracles(x, w, b, rm, rv, False, 0.1, 0.0, relu=True)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fused_helpers(backend, device, training):
    """batch_norm_relu and batch_norm_add_relu are batch_norm(relu=True[, residual=])."""
    x = make_input((4, 3, 5, 5), torch.float64, device)
    r = make_input((4, 3, 5, 5), torch.float64, device, shift=0.0)
    w, b, rm, rv = make_params(3, torch.float64, device)
    rm1, rv1, rm2, rv2 = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    out = fastnn.functional.batch_norm_relu(x, rm1, rv1, w, b, training, 0.2, 1e-4)
    exp = F.relu(F.batch_norm(x, rm2, rv2, w, b, training, 0.2, 1e-4))
    assert_close(out, exp, x.dtype)
    assert_close(rm1, rm2, x.dtype)
    assert_close(rv1, rv2, x.dtype)
    out = fastnn.functional.batch_norm_add_relu(x, r, rm1, rv1, w, b, training, 0.2, 1e-4)
    exp = F.relu(F.batch_norm(x, rm2, rv2, w, b, training, 0.2, 1e-4) + r)
    assert_close(out, exp, x.dtype)
    assert_close(rm1, rm2, x.dtype)
    assert_close(rv1, rv2, x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=["f32", "f64", "bf16"])
def test_empty_batch(backend, device, dtype):
    """N=0 works: empty output, running statistics unchanged, zero parameter gradients."""
    x = torch.empty((0, 3, 4, 4), dtype=dtype, device=device, requires_grad=True)
    w, b, rm, rv = make_params(3, param_dtype(dtype), device)
    w.requires_grad_(True)
    b.requires_grad_(True)
    rm0, rv0 = rm.clone(), rv.clone()
    for training in (True, False):
        out = fastnn.functional.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5, relu=True)
        assert out.shape == x.shape and out.dtype == dtype
        out.sum().backward()
        assert x.grad.shape == x.shape
        assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
        assert torch.count_nonzero(w.grad) == 0 and torch.count_nonzero(b.grad) == 0
    xr = torch.empty((0, 3, 4, 4), dtype=dtype, device=device).contiguous(
        memory_format=torch.channels_last)
    out = fastnn.functional.batch_norm(xr, rm, rv, w, b, True, 0.1, 1e-5,
                                       residual=torch.empty_like(xr))
    assert out.shape == xr.shape
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


def test_large_mean_stability(backend, device):
    """Mean 1e4, std 1: float32 statistics still match a float64 computation."""
    C = 4
    x = (torch.randn(16, C, 32, 32, dtype=torch.float64) + 1e4).to(device)
    x32 = x.float()
    w, b, rm, rv = make_params(C, torch.float32, device)
    rm64, rv64 = rm.double(), rv.double()
    for fmt in (torch.contiguous_format, torch.channels_last):
        rm1, rv1 = rm.clone(), rv.clone()
        out = fastnn.functional.batch_norm(x32.contiguous(memory_format=fmt), rm1, rv1, w, b,
                                           True, 0.5, 1e-5)
        rm2, rv2 = rm64.clone(), rv64.clone()
        exp = F.batch_norm(x32.double(), rm2, rv2, w.double(), b.double(), True, 0.5, 1e-5)
        # float32 holds x to ~5e-4 (its ulp at 1e4); the normalized output is right to that.
        torch.testing.assert_close(out.double(), exp, rtol=0, atol=5e-3)
        torch.testing.assert_close(rm1.double(), rm2, rtol=1e-6, atol=0)
        torch.testing.assert_close(rv1.double(), rv2, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("C, period, N, H", [(512, 128, 8, 7), (600, 128, 8, 7),
                                              (64, 1024, 16, 14)], ids=str)
def test_statistics_of_uneven_rows(backend, device, C, period, N, H):
    """Channels-last float32 statistics stay exact to float32 rounding when a channel's values
    are far from uniform along the rows (the N*H*W positions): the first sixteenth of every
    `period` rows offset by 100 std. The CPU kernel's column statistics sum deviations from
    pivots taken from the first rows of each run of `period` rows (its work item for these
    widths), which on this input would amplify float rounding 17-fold (relative error 5e-7 to
    1.3e-6); it must notice and redo those columns in double."""
    rows = N * H * H
    r = torch.arange(rows)
    offset = ((r % period) < period // 16).double() * 100.0
    x = torch.randn(rows, C, dtype=torch.float64) + offset[:, None]
    x = x.view(N, H, H, C).permute(0, 3, 1, 2).float().to(device)
    assert x.is_contiguous(memory_format=torch.channels_last)
    _check_exact_statistics(backend, device, x)


def _check_exact_statistics(backend, device, x):
    """The running statistics of one training step (momentum 1) on float32 x: the biased
    variance and the mean (in std) to float32 rounding of float64's for the CPU kernels.
    Rounding the results to float32 alone costs up to 6e-8 of the variance. The reference
    (float32 PyTorch ops) and the CUDA kernels are held to the float32 tolerance of the suite."""
    C = x.shape[1]
    rm = torch.zeros(C, device=device)
    rv = torch.ones(C, device=device)
    fastnn.functional.batch_norm(x, rm, rv, None, None, True, 1.0, 1e-5)
    xd = x.double()
    std = xd.std((0, 2, 3))
    exact = backend == "kernel" and device == "cpu"
    rtol = 2e-7 if exact else tol(torch.float32)["rtol"]
    torch.testing.assert_close(rv.double(), std**2, rtol=rtol, atol=0)
    torch.testing.assert_close((rm.double() - xd.mean((0, 2, 3))) / std,
                               torch.zeros_like(std), rtol=0, atol=rtol)


@pytest.mark.parametrize("N, C, H", [(8, 3, 14), (16, 2, 9), (8, 3, 7)], ids=str)
def test_statistics_far_from_the_sampled_pivot(backend, device, N, C, H):
    """Channels-first float32 statistics stay exact to float32 rounding when the values that the
    CPU kernel samples for a pivot (eight, evenly spaced over a plane of 64 values or more, or
    over a channel's planes and positions for 7x7 maps) are far from the mean. Its one-pass sums
    of deviations from that pivot would, with those values offset by 100 std, amplify float
    rounding about 25-fold (relative errors of the variance of 3e-7 to 1e-6); it must notice
    and take two passes."""
    S = H * H
    offset = torch.zeros(S, dtype=torch.float64)
    offset[torch.arange(8) * (S // 8)] = 100.0
    x = (torch.randn(N, C, S, dtype=torch.float64) + offset).view(N, C, H, H).float().to(device)
    _check_exact_statistics(backend, device, x)


# Each of the CPU kernels' element-wise paths: channel planes of 64 values or more, planes of 16
# to 63 (6x7), rows of short planes (3x3), channels-last rows narrower and wider than a column
# block.
PRECISION_LAYOUTS = {
    "nchw_blocks": ((4, 5, 9, 9), torch.contiguous_format),
    "nchw": LAYOUTS["nchw"],
    "nchw_rows": ((8, 70, 3, 3), torch.contiguous_format),
    "nhwc": LAYOUTS["nhwc"],
    "nhwc_wide": LAYOUTS["nhwc_wide"],
}


@pytest.mark.parametrize("offset", [0.0, 3.0, 100.0, 1e4])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", list(PRECISION_LAYOUTS))
def test_float32_output_precision(layout, training, offset):
    """The CPU kernels' float32 output is right to a few roundings of its own scale for channel
    means from 0 to 1e4 standard deviations: whether the means are folded into the shift
    (y = x * scale + shift, near zero) or subtracted first (far from zero). Checked against
    float64 on the same float32 input; the dual form (two batch norms added) likewise."""
    if not fastnn.ops.has_kernel("cpu"):
        pytest.skip("fastnn._C has no CPU kernels")
    shape, fmt = PRECISION_LAYOUTS[layout]
    C = shape[1]
    view = (1, C) + (1,) * (len(shape) - 2)
    gen = torch.Generator().manual_seed(0)
    std = 0.5

    def sample():
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * std + offset * std
        return x.float().contiguous(memory_format=fmt)

    x, z = sample(), sample()
    w = torch.rand(C, generator=gen) + 0.5
    b = torch.rand(C, generator=gen) - 0.5
    w2 = torch.rand(C, generator=gen) + 0.5
    b2 = torch.rand(C, generator=gen) - 0.5
    rm = torch.full((C,), offset * std)
    rv = torch.full((C,), std * std)

    def bn64(t, weight, bias):
        t = t.double()
        if training:
            mean = t.mean([d for d in range(t.dim()) if d != 1]).view(view)
            var = t.var([d for d in range(t.dim()) if d != 1], unbiased=False).view(view)
        else:
            mean, var = rm.double().view(view), rv.double().view(view)
        xhat = (t - mean) / torch.sqrt(var + 1e-5)
        return xhat * weight.double().view(view) + bias.double().view(view), xhat

    exp, xhat = bn64(x, w, b)
    out = fastnn.functional.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5)
    scale = b.abs().double().view(view) + w.double().view(view) * (xhat.abs() + 1)
    err = (out.double() - exp).abs() / scale
    assert err.max() <= 4 * torch.finfo(torch.float32).eps, err.max()

    exp2, zhat = bn64(z, w2, b2)
    out = fastnn.functional.dual_batch_norm_add_relu(
        x, z, rm.clone(), rv.clone(), rm.clone(), rv.clone(), w, b, w2, b2, training, relu=False)
    scale = scale + b2.abs().double().view(view) + w2.double().view(view) * (zhat.abs() + 1)
    err = (out.double() - exp - exp2).abs() / scale
    assert err.max() <= 4 * torch.finfo(torch.float32).eps, err.max()


@pytest.mark.parametrize("grad_offset", [0.0, 20.0])
@pytest.mark.parametrize("offset", [0.0, 3.0, 100.0, 1e4])
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("layout", list(PRECISION_LAYOUTS))
def test_float32_input_grad_precision(layout, relu, offset, grad_offset):
    """The CPU kernels' float32 training input gradients (batch norm and the dual form) are
    right to a few roundings of their own scale for channel means from 0 to 1e4 standard
    deviations and output gradients with and without a large mean. Checked against float64 on
    the same float32 input, gradient and saved statistics, with the output gradient correlated
    with the input so that the (x - mean) * k2 term matters: a kernel that folded the mean into
    the gradient's offset (dx = a * (g - k1 + mean * k2 - x * k2)) at 100 standard deviations
    would be off by about 23 roundings, at 1e4 by about 2800."""
    if not fastnn.ops.has_kernel("cpu"):
        pytest.skip("fastnn._C has no CPU kernels")
    shape, fmt = PRECISION_LAYOUTS[layout]
    C = shape[1]
    dims = [d for d in range(len(shape)) if d != 1]
    view = (1, C) + (1,) * (len(shape) - 2)
    gen = torch.Generator().manual_seed(0)
    std = 0.5
    x64 = torch.randn(shape, generator=gen, dtype=torch.float64)
    x = (x64 * std + offset * std).float().contiguous(memory_format=fmt)
    g = (torch.randn(shape, generator=gen, dtype=torch.float64) + 0.5 * x64 + grad_offset)
    g = g.float().contiguous(memory_format=fmt)
    z = (x64.flip(0) * std * 2 - offset * std).float().contiguous(memory_format=fmt)
    w = torch.rand(C, generator=gen) + 0.5
    b = torch.rand(C, generator=gen) - 0.5
    w2 = torch.rand(C, generator=gen) + 0.5
    b2 = torch.rand(C, generator=gen) - 0.5

    def check(dx, x, gm, mean, invstd, weight):
        m, istd = mean.double().view(view), invstd.double().view(view)
        xc = x.double() - m
        k1 = gm.mean(dims, keepdim=True)
        k2 = (gm * xc).mean(dims, keepdim=True) * istd * istd
        a = weight.double().view(view) * istd
        exp = a * (gm - k1 - xc * k2)
        rms = (gm - k1).pow(2).mean(dims, keepdim=True).sqrt()
        scale = a.abs() * (rms + k1.abs() + (k2.abs() / istd) * (xc.abs() * istd + 1))
        err = (dx.double() - exp).abs() / scale
        assert err.max() <= 8 * torch.finfo(torch.float32).eps, err.max()

    def masked(out):
        return torch.where(out <= 0, 0.0, g.double()) if relu else g.double()

    out, mean, invstd = torch.ops.fastnn.batch_norm_train(
        x, w, b, None, None, 0.1, 1e-5, None, relu)
    dx = torch.ops.fastnn.batch_norm_backward(
        g, x, w, out if relu else None, mean, invstd, True, relu, False)[0]
    check(dx, x, masked(out), mean, invstd, w)

    # relu(bn(x) + bn2(z)): both gradients from one pass over g.
    out, mean, invstd, mean2, invstd2 = torch.ops.fastnn.batch_norm_dual(
        x, w, b, None, None, z, w2, b2, None, None, True, 0.1, 1e-5, 0.1, 1e-5, relu)
    dx, _, _, dz, _, _ = torch.ops.fastnn.batch_norm_dual_backward(
        g, x, w, z, w2, out if relu else None, mean, invstd, mean2, invstd2, True, relu)
    check(dx, x, masked(out), mean, invstd, w)
    check(dz, z, masked(out), mean2, invstd2, w2)


# ---------------------------------------------------------------------------------------------
# hypothesis: shapes, strides (non-contiguous views), momentum, eps

def _views(draw, shape):
    """A non-trivial view of a larger tensor that has `shape`, and the larger tensor's shape."""
    kind = draw(st.sampled_from(["contiguous", "slice", "transpose", "channels_last", "offset",
                                 "expand_batch", "channels_minor"]))
    nd = len(shape)
    if kind == "channels_minor" and nd >= 3:  # C the fastest dimension, any rank
        base = (shape[0],) + shape[2:] + (shape[1],)
        return base, lambda t: t.movedim(-1, 1), kind
    if kind == "slice":  # every other element of the last dimension
        base = shape[:-1] + (shape[-1] * 2,)
        return base, lambda t: t[..., ::2], kind
    if kind == "transpose" and nd >= 3:  # last two dims (or N and spatial for rank 3) swapped
        a, b_ = (nd - 2, nd - 1) if nd >= 4 else (0, 2)
        base = list(shape)
        base[a], base[b_] = base[b_], base[a]
        return tuple(base), lambda t: t.transpose(a, b_), kind
    if kind == "channels_last" and nd in (4, 5):
        fmt = torch.channels_last if nd == 4 else torch.channels_last_3d
        return shape, lambda t: t.contiguous(memory_format=fmt), kind
    if kind == "offset":  # drop the first batch entry: storage offset, still dense
        base = (shape[0] + 1,) + shape[1:]
        return base, lambda t: t[1:], kind
    if kind == "expand_batch":  # channel-major slice of a wider tensor
        base = (shape[0], shape[1] + 2) + shape[2:]
        return base, lambda t: t[:, 1:-1], kind
    return shape, None, "contiguous"


@st.composite
def bn_cases(draw):
    rank = draw(st.integers(2, 5))
    N = draw(st.integers(2, 5))
    C = draw(st.integers(1, 6))
    spatial = tuple(draw(st.integers(1, 5)) for _ in range(rank - 2))
    shape = (N, C) + spatial
    base, transform, kind = _views(draw, shape)
    return {
        "shape": shape,
        "base": base,
        "transform": transform,
        "kind": kind,
        "momentum": draw(st.floats(0.0, 1.0, allow_subnormal=False)),
        "eps": draw(st.sampled_from([1e-5, 1e-3, 1e-1, 1.0])),  # (>= 1e-2 for float32 below)
        "training": draw(st.booleans()),
        "residual": draw(st.booleans()),
        "relu": draw(st.booleans()),
        "affine": draw(st.booleans()),
        "dtype": draw(st.sampled_from([torch.float64, torch.float32])),
    }


# derandomize: the same examples on every run (CI stays deterministic); no example database.
@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=bn_cases())
def test_hypothesis(backend, device, case):
    dtype = case["dtype"]
    eps = case["eps"]
    if dtype == torch.float32:
        eps = max(eps, 1e-2)  # see test_odd_sizes: tiny batches are ill-conditioned in float32
    x = make_input(case["base"], dtype, device)
    w, b, rm, rv = make_params(case["shape"][1], dtype, device, affine=case["affine"])
    r = make_input(case["shape"], dtype, device, shift=0.0) if case["residual"] else None
    check_against_oracles(x, w, b, rm, rv, case["training"], case["momentum"], eps,
                          residual=r, relu=case["relu"], transform=case["transform"])


# The shapes above are small: they never leave the kernels' smallest cases. These are random
# shapes from each of the kernels' ways of cutting the work (helpers.KERNEL_REGIMES).
@pytest.mark.parametrize("draw", range(6))
@pytest.mark.parametrize("regime", list(KERNEL_REGIMES))
def test_kernel_regimes(backend, device, regime, draw):
    """Outputs, running statistics and every gradient against PyTorch and fastnn.reference on
    random shapes from each of the kernels' ways of cutting the work, random dtype, training or
    eval, residual and ReLU; in some draws the dual form (two batch norms added) against
    PyTorch's two batch norms instead."""
    if backend == "reference":
        pytest.skip("the kernels' ways of cutting the work: the reference has none")
    case = kernel_case(regime, draw)
    shape, fmt, dtype = case["shape"], case["format"], case["dtype"]
    x = make_input(shape, dtype, device, fmt, shift=case["shift"])
    params = make_params(shape[1], param_dtype(dtype), device)
    if not case["dual"]:
        r = make_input(shape, dtype, device, fmt, shift=0.0) if case["residual"] else None
        check_against_oracles(x, *params, case["training"], 0.1, 1e-5, residual=r,
                              relu=case["relu"])
        return
    # Means of a few standard deviations: PyTorch's own float32 error grows with mean / std
    # (test_float32_output_precision holds fastnn to float64 there).
    z = make_input(shape, dtype, device, fmt, shift=-case["shift"] / 10)
    p2 = make_params(shape[1], param_dtype(dtype), device)
    g = make_input(shape, dtype, device, fmt, shift=0.0, scale=1.0)
    got = _run_dual("fastnn", x, z, params, p2, case["training"], case["relu"], g)
    # fastnn's dual kernel adds the two batch norms in float32 and rounds once.
    upcast = dtype in (torch.float16, torch.bfloat16) and fastnn.ops.has_kernel(
        device, "batch_norm_dual")
    exp = _run_dual("torch", x, z, params, p2, case["training"], case["relu"], g, upcast=upcast)
    for key in got:
        assert_close(got[key], exp[key], dtype, grad=key.startswith("grad"), msg=key)


# ---------------------------------------------------------------------------------------------
# gradcheck / gradgradcheck in float64 through fastnn.functional.batch_norm

GRAD_CASES = {
    "plain": (False, False, True),
    "relu": (False, True, True),
    "residual": (True, False, True),
    "residual_relu": (True, True, True),
    "no_affine_relu": (False, True, False),
}


def _gradcheck_inputs(device, with_residual, affine, fmt=torch.contiguous_format):
    shape = (3, 2, 3, 2)
    dt = torch.float64
    x = make_input(shape, dt, device, fmt).requires_grad_(True)
    w, b, rm, rv = make_params(2, dt, device, affine=affine)
    inputs = [x]
    if affine:
        inputs += [w.requires_grad_(True), b.requires_grad_(True)]
    if with_residual:
        inputs.append(make_input(shape, dt, device, fmt, shift=0.0).requires_grad_(True))
    return inputs, rm, rv


def _bn_fn(training, with_residual, affine, relu, rm, rv):
    def fn(*args):
        args = list(args)
        x = args.pop(0)
        w, b = (args.pop(0), args.pop(0)) if affine else (None, None)
        r = args.pop(0) if with_residual else None
        # Fresh running statistics per call: the training update must not change later calls.
        return fastnn.functional.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1,
                                            1e-3, residual=r, relu=relu)
    return fn


@pytest.mark.parametrize("case", list(GRAD_CASES))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck(backend, device, training, case):
    with_residual, relu, affine = GRAD_CASES[case]
    inputs, rm, rv = _gradcheck_inputs(device, with_residual, affine)
    fn = _bn_fn(training, with_residual, affine, relu, rm, rv)
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_channels_last(backend, device, training):
    inputs, rm, rv = _gradcheck_inputs(device, True, True, torch.channels_last)
    fn = _bn_fn(training, True, True, True, rm, rv)
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


# ---------------------------------------------------------------------------------------------
# Layouts of the other tensors: residual, grad_output, parameters and running statistics

def _strided_grad(kind, shape, dtype, device):
    g = torch.randn(shape, dtype=torch.float64).to(device, dtype)
    if kind == "expanded":  # what out.sum().backward() sends: all strides 0
        return torch.ones((), dtype=dtype, device=device).expand(shape)
    if kind == "channel_expanded":  # stride 0 in every dimension but C
        return torch.randn(1, shape[1], 1, 1, dtype=torch.float64).to(device, dtype).expand(shape)
    if kind == "channels_last":
        return g.contiguous(memory_format=torch.channels_last)
    if kind == "contiguous":
        return g.contiguous()
    if kind == "transposed":
        return g.transpose(2, 3).contiguous().transpose(2, 3)
    raise ValueError(kind)


@pytest.mark.parametrize("grad_kind", ["expanded", "channel_expanded", "channels_last",
                                       "contiguous", "transposed"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=["f64", "f32", "bf16"])
def test_grad_output_layouts(backend, device, dtype, training, fmt, grad_kind):
    """Gradients whatever the layout of grad_output (out.sum() sends a stride-0 one)."""
    shape = (3, 4, 5, 6)
    x = make_input(shape, dtype, device, fmt)
    r = make_input(shape, dtype, device, fmt, shift=0.0)
    w, b, rm, rv = make_params(4, param_dtype(dtype), device)
    g = _strided_grad(grad_kind, shape, dtype, device)
    args = (x, w, b, rm, rv, training, 0.1, 1e-5)
    for residual, relu in ((None, False), (r, True)):
        got = run_bn("fastnn", *args, residual=residual, relu=relu, grad_out=g)
        upcast = dtype == torch.bfloat16 and (relu or not torch_reduced_precision_is_exact(device))
        exp = run_bn("torch", *args, residual=residual, relu=relu, grad_out=g, upcast=upcast)
        check_results(got, exp, dtype, f"{grad_kind}:")
        check_results(got, run_bn("reference", *args, residual=residual, relu=relu, grad_out=g),
                      dtype, f"{grad_kind} vs reference:")


@pytest.mark.parametrize("r_kind", ["channels_last", "contiguous", "sliced", "transposed"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_residual_layouts(backend, device, training, fmt, r_kind):
    """The residual may have any layout, independent of the input's."""
    shape = (3, 4, 5, 6)
    x = make_input(shape, torch.float32, device, fmt)
    w, b, rm, rv = make_params(4, torch.float32, device)
    base = make_input((3, 4, 5, 12), torch.float32, device, shift=0.0)
    r = {
        "channels_last": base[..., :6].contiguous(memory_format=torch.channels_last),
        "contiguous": base[..., :6].contiguous(),
        "sliced": base[..., ::2],
        "transposed": base[..., :6].transpose(2, 3).contiguous().transpose(2, 3),
    }[r_kind]
    assert r.shape == shape
    got = check_against_oracles(x, w, b, rm, rv, training, 0.1, 1e-5, residual=r, relu=True)
    if training is False and fmt == torch.channels_last:
        assert got["out"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_strided_parameters_and_running_stats(backend, device, training):
    """weight/bias/running stats that are strided views: the running-stat update lands in the
    viewed storage."""
    x = make_input((4, 3, 5, 5), torch.float32, device)
    storage = torch.randn(4, 6, dtype=torch.float64).to(device, torch.float32)
    storage[3].uniform_(0.5, 1.5)
    w, b, rm, rv = storage[0, ::2], storage[1, 1::2], storage[2, ::2], storage[3, 1::2]
    assert not w.is_contiguous()
    # PyTorch's oracle on the CPU: its CUDA batch norm (torch 2.11) left strided running
    # statistics as they were in training.
    expected = storage.to("cpu", copy=True)
    exp = F.batch_norm(x.cpu(), expected[2, ::2], expected[3, 1::2], expected[0, ::2],
                       expected[1, 1::2], training, 0.3, 1e-5)
    out = fastnn.functional.batch_norm(x, rm, rv, w, b, training, 0.3, 1e-5)
    assert_close(out, exp, torch.float32)
    assert_close(storage, expected, torch.float32)


# Where the non-finite value sits: inside a plane; a channel's first value (the value the CUDA
# kernels shift by) and the first of a later plane (where a CPU chunk starts), on 64x64 planes
# (the CPU's blocks layout) and channels-last.
_NONFINITE_AT = {
    "inside": ((4, 3, 5, 5), torch.contiguous_format, (1, 0, 2, 3)),
    "channel-first": ((2, 3, 64, 64), torch.contiguous_format, (0, 1, 0, 0)),
    "plane-first": ((2, 3, 64, 64), torch.contiguous_format, (1, 2, 0, 0)),
    "cl-first": ((4, 3, 5, 5), torch.channels_last, (0, 0, 0, 0)),
}


@pytest.mark.parametrize("at", list(_NONFINITE_AT))
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_nan_and_inf_propagate(backend, device, training, value, at):
    """NaN/Inf inputs give what PyTorch gives (per channel: a mean of +-Inf stays +-Inf), and the
    same running stats. PyTorch's oracle runs on the CPU: its CUDA kernel for channels_last input
    (torch 2.11) makes the mean of a channel whose first value is +-Inf NaN, unlike its NCHW
    and CPU kernels."""
    shape, memory_format, pos = _NONFINITE_AT[at]
    x = make_input(shape, torch.float32, device, memory_format)
    x[pos] = float(value)
    w, b, rm, rv = make_params(3, torch.float32, device)
    rm1, rv1 = rm.clone(), rv.clone()
    rm2, rv2 = rm.to("cpu", copy=True), rv.to("cpu", copy=True)
    out = fastnn.functional.batch_norm(x, rm1, rv1, w, b, training, 0.1, 1e-5)
    exp = F.batch_norm(x.cpu(), rm2, rv2, w.cpu(), b.cpu(), training, 0.1, 1e-5)
    close = functools.partial(torch.testing.assert_close, equal_nan=True, check_device=False,
                              **tol(torch.float32))
    close(out, exp)
    close(rm1, rm2)
    close(rv1, rv2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("where", ["input", "residual", "input2"])
def test_nan_gradients_through_relu(backend, device, where, fmt, dtype):
    """Where a NaN reaches the ReLU's output, the gradient passes there as in torch's ReLU
    backward (zero only where the output is <= 0): with a NaN in the residual (or the dual
    form's second input) every other gradient stays finite and must equal PyTorch's."""
    memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    shape = (3, 4, 8, 8)
    x = make_input(shape, dtype, device, memory_format, shift=0.0)
    z = make_input(shape, dtype, device, memory_format, shift=0.0)
    g = make_input(shape, dtype, device, memory_format, shift=0.0)
    (x if where == "input" else z)[1, 2, 3, 5] = float("nan")
    w, b, _, _ = make_params(4, dtype, device)
    w2, b2, _, _ = make_params(4, dtype, device)
    leaves = [t.clone().requires_grad_() for t in (x, z, w, b, w2, b2)]
    ref_leaves = [t.clone().requires_grad_() for t in (x, z, w, b, w2, b2)]
    dual = where == "input2"

    def run(fn, ts):
        xl, zl, wl, bl, w2l, b2l = ts
        out = fn(xl, zl, wl, bl, w2l, b2l)
        wrt = [xl, zl, wl, bl] + ([w2l, b2l] if dual else [])
        return [out] + list(torch.autograd.grad(out, wrt, g))

    if dual:
        got = run(lambda xl, zl, wl, bl, w2l, b2l: fastnn.functional.dual_batch_norm_add_relu(
            xl, zl, None, None, None, None, wl, bl, w2l, b2l, True), leaves)
        exp = run(lambda xl, zl, wl, bl, w2l, b2l: F.relu(
            F.batch_norm(xl, None, None, wl, bl, True) + F.batch_norm(zl, None, None, w2l, b2l,
                                                                      True)), ref_leaves)
    else:
        got = run(lambda xl, zl, wl, bl, w2l, b2l: fastnn.functional.batch_norm_add_relu(
            xl, zl, None, None, wl, bl, True), leaves)
        exp = run(lambda xl, zl, wl, bl, w2l, b2l: F.relu(
            F.batch_norm(xl, None, None, wl, bl, True) + zl), ref_leaves)
    names = ["out", "grad_input", "grad_residual", "grad_weight", "grad_bias", "grad_weight2",
             "grad_bias2"]
    for name, a, e in zip(names, got, exp):
        torch.testing.assert_close(a, e, equal_nan=True, msg=name,
                                   **tol(dtype, grad=name != "out"))
    if where == "residual":  # one NaN output: everything else is finite
        assert all(bool(t.isfinite().all()) for t in (got[1], got[3], got[4]))


# ---------------------------------------------------------------------------------------------
# Outputs large enough for the CPU kernels' non-temporal stores (training: a quarter of the
# last-level cache, inference: all of it; at least 4 MiB), on cache-line-aligned planes (32x32,
# 16x16 rows) and on planes that are not (14x14: streaming is then turned off).

def _cpu_stream_threshold(training):
    caches = fastnn._ext.cpu_caches()
    if caches is None or len(caches) < 4:
        pytest.skip("fastnn._C does not say its cache sizes")
    return caches[2] if training else caches[3]


def test_cpu_cache_plan():
    """The sizes the CPU kernels plan with: a level-2 cache, a last-level cache of at most 32 MiB
    per CPU sharing it, outputs written non-temporally from a quarter of it in training passes and
    from all of it in an inference (at least 4 MiB)."""
    from fastnn.bench import sysfs_size

    caches = fastnn._ext.cpu_caches()
    if caches is None:
        pytest.skip("no compiled CPU kernels")
    level2, last, stream, stream_one_pass = caches
    assert level2 > 0 and last > 0
    assert stream == max(4 << 20, last // 4)
    assert stream_one_pass == max(4 << 20, last)
    # The kernels read index0..index7 in order and keep the first of the largest size.
    base = "/sys/devices/system/cpu/cpu0/cache"
    largest, where = 0, None
    for index in range(8):
        entry = os.path.join(base, f"index{index}")
        size = sysfs_size(os.path.join(entry, "size"))
        if size > largest:
            largest, where = size, entry
    if where is None:
        pytest.skip("sysfs lists no cache sizes")
    try:
        with open(os.path.join(where, "shared_cpu_list")) as f:
            cpu_list = f.read().strip()
    except OSError:
        cpu_list = ""
    try:
        cpus = sum(int(b) - int(a) + 1 for a, _, b in
                   (part.partition("-") if "-" in part else (part, "", part)
                    for part in cpu_list.split(",")))
    except ValueError:
        cpus = 0  # unreadable: the kernels then take the listed size as it is
    if cpus <= 0:
        assert last == largest
        return
    assert last == min(largest, cpus * (32 << 20))


@pytest.mark.parametrize("hw", [32, 14, 7], ids=lambda v: f"{v}x{v}")
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_large_outputs_cpu(dtype, training, fmt, hw):
    """Forward and backward with a residual against float64 PyTorch. Over millions of values a
    few land within rounding of the ReLU's kink or of a cancellation, so the bound is relative to
    each tensor's largest value: far below what a wrongly written span would give."""
    if not fastnn.ops.has_kernel("cpu"):
        pytest.skip("no compiled CPU kernels")
    threshold = _cpu_stream_threshold(training)
    elem = torch.empty((), dtype=dtype).element_size()
    C = 32
    N = -(-threshold // (elem * C * hw * hw)) + 1
    if N * C * hw * hw * elem > (96 << 20):
        pytest.skip(f"last-level cache too large for a quick test ({threshold} byte threshold)")
    memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    shape = (N, C, hw, hw)
    x = make_input(shape, dtype, "cpu", memory_format).requires_grad_()
    r = make_input(shape, dtype, "cpu", memory_format, shift=0.0).requires_grad_()
    g = make_input(shape, dtype, "cpu", memory_format, shift=0.0)
    w, b, rm, rv = make_params(C, torch.float32, "cpu")
    w.requires_grad_()
    b.requires_grad_()
    rm64, rv64 = rm.double(), rv.double()
    out = fastnn.functional.batch_norm(x, rm, rv, w, b, training=training, residual=r)
    grads = torch.autograd.grad(out, (x, r, w, b), g)

    x64, r64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, r, w, b))
    ref = F.batch_norm(x64, rm64, rv64, w64, b64, training=training) + r64
    ref_grads = torch.autograd.grad(ref, (x64, r64, w64, b64), g.double())
    bound = 1e-6 if dtype == torch.float32 else 1e-2
    for name, got, want in [("out", out, ref), ("grad_input", grads[0], ref_grads[0]),
                            ("grad_residual", grads[1], ref_grads[1]),
                            ("grad_weight", grads[2], ref_grads[2]),
                            ("grad_bias", grads[3], ref_grads[3]),
                            ("running_mean", rm, rm64), ("running_var", rv, rv64)]:
        want = want.detach()
        scale = float(want.abs().max())
        torch.testing.assert_close(got.detach().double(), want, rtol=bound,
                                   atol=bound * max(scale, 1.0), msg=lambda m: f"{name}: {m}")
    assert out.is_contiguous(memory_format=memory_format)


# ---------------------------------------------------------------------------------------------
# batch_norm_with_stats: training batch norm with the batch statistics computed beforehand (what
# DenseNet's blocks do), against batch_norm in training

def _run_with_stats(x, w, b, rm, rv, r, relu, g, given):
    xl = x.detach().clone().requires_grad_(True)
    wl, bl = (None if t is None else t.detach().clone().requires_grad_(True) for t in (w, b))
    rl = None if r is None else r.detach().clone().requires_grad_(True)
    rm, rv = rm.clone(), rv.clone()
    if given:
        # Statistics of each half of the channels separately, then put together.
        half = x.shape[1] // 2
        parts = [fastnn.functional.batch_norm_stats(x[:, :half]),
                 fastnn.functional.batch_norm_stats(x[:, half:])]
        mean = torch.cat([m for m, _ in parts])
        var = torch.cat([v for _, v in parts])
        out = fastnn.functional.batch_norm_with_stats(xl, mean, var, rm, rv, wl, bl, 0.1, 1e-5,
                                                      residual=rl, relu=relu)
    else:
        out = fastnn.functional.batch_norm(xl, rm, rv, wl, bl, True, 0.1, 1e-5, residual=rl,
                                           relu=relu)
    out.backward(g)
    return {"out": out.detach(), "running_mean": rm, "running_var": rv, "grad_input": xl.grad,
            "grad_weight": None if wl is None else wl.grad,
            "grad_bias": None if bl is None else bl.grad,
            "grad_residual": None if rl is None else rl.grad}


@pytest.mark.parametrize("fused", list(FUSED))
@pytest.mark.parametrize("layout", ["2d", "nchw", "nhwc", "ndhwc"])
@pytest.mark.parametrize("dtype, half_params", DTYPE_CASES)
def test_with_stats_matches_batch_norm(backend, device, dtype, half_params, layout, fused):
    shape, fmt = LAYOUTS[layout]
    shape = (shape[0], 6) + shape[2:]
    x = make_input(shape, dtype, device, fmt)
    w, b, rm, rv = make_params(6, param_dtype(dtype, half_params), device)
    with_residual, relu = FUSED[fused]
    r = make_input(shape, dtype, device, fmt, shift=0.0, scale=1.0) if with_residual else None
    g = make_input(shape, dtype, device, fmt, shift=0.0, scale=1.0)
    got = _run_with_stats(x, w, b, rm, rv, r, relu, g, given=True)
    expected = _run_with_stats(x, w, b, rm, rv, r, relu, g, given=False)
    check_results(got, expected, dtype, "with_stats vs batch_norm:")
    assert got["out"].dtype == dtype and got["grad_input"].dtype == dtype


@pytest.mark.parametrize("relu", [False, True], ids=["norelu", "relu"])
def test_with_stats_gradcheck(backend, device, relu):
    inputs, rm, rv = _gradcheck_inputs(device, True, True)

    def fn(x, w, b, r):
        mean, var = fastnn.functional.batch_norm_stats(x)
        return fastnn.functional.batch_norm_with_stats(x, mean, var, rm.clone(), rv.clone(), w,
                                                       b, 0.1, 1e-3, residual=r, relu=relu)
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


# batch_norm_cat_with_stats: batch_norm_with_stats of torch.cat(inputs, 1) without the copy

def _run_cat_with_stats(inputs, w, b, rm, rv, relu, g, fused):
    xs = [t.detach().clone().requires_grad_(True) for t in inputs]
    wl, bl = (None if t is None else t.detach().clone().requires_grad_(True) for t in (w, b))
    rm, rv = rm.clone(), rv.clone()
    if fused:
        stats = [fastnn.functional.batch_norm_stats(t) for t in xs]
        mean = torch.cat([m for m, _ in stats])
        var = torch.cat([v for _, v in stats])
        out = fastnn.functional.batch_norm_cat_with_stats(xs, mean, var, rm, rv, wl, bl, 0.1,
                                                          1e-5, relu=relu)
    else:
        out = fastnn.functional.batch_norm(torch.cat(xs, 1), rm, rv, wl, bl, True, 0.1, 1e-5,
                                           relu=relu)
    out.backward(g)
    # Each input's gradient, put side by side.
    return {"out": out.detach(), "running_mean": rm, "running_var": rv,
            "grad_input": torch.cat([t.grad for t in xs], 1), "grad_residual": None,
            "grad_weight": None if wl is None else wl.grad,
            "grad_bias": None if bl is None else bl.grad}


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("layout", ["2d", "nchw", "nhwc", "ndhwc"])
@pytest.mark.parametrize("dtype, half_params", DTYPE_CASES)
def test_cat_with_stats_matches_batch_norm(backend, device, dtype, half_params, layout, relu):
    """Outputs, every gradient and the running statistics of batch_norm (training) on the
    concatenation."""
    shape, fmt = LAYOUTS[layout]
    inputs = [make_input((shape[0], c) + shape[2:], dtype, device, fmt, shift=0.5 * i)
              for i, c in enumerate((3, 1, 4))]
    w, b, rm, rv = make_params(8, param_dtype(dtype, half_params), device)
    g = make_input((shape[0], 8) + shape[2:], dtype, device, fmt, shift=0.0, scale=1.0)
    got = _run_cat_with_stats(inputs, w, b, rm, rv, relu, g, fused=True)
    expected = _run_cat_with_stats(inputs, w, b, rm, rv, relu, g, fused=False)
    check_results(got, expected, dtype, "cat_with_stats vs batch_norm:")
    assert got["out"].dtype == dtype
    assert got["out"].stride() == torch.cat(inputs, 1).stride()  # torch.cat's layout


@pytest.mark.parametrize("relu", [False, True], ids=["norelu", "relu"])
def test_cat_with_stats_gradcheck(backend, device, relu):
    a = make_input((3, 2, 3, 2), torch.float64, device).requires_grad_(True)
    c = make_input((3, 1, 3, 2), torch.float64, device, torch.channels_last,
                   shift=-1.0).requires_grad_(True)
    w, b, rm, rv = make_params(3, torch.float64, device)
    w.requires_grad_(True)
    b.requires_grad_(True)

    def fn(a, c, w, b):
        mean, var = fastnn.functional.batch_norm_stats(torch.cat([a, c], 1))
        return fastnn.functional.batch_norm_cat_with_stats([a, c], mean, var, rm.clone(),
                                                           rv.clone(), w, b, 0.1, 1e-3, relu=relu)
    assert gradcheck(fn, (a, c, w, b))
    assert gradgradcheck(fn, (a, c, w, b))


def test_cat_with_stats_mixed_dtypes_follow_torch_cat(backend, device):
    """Inputs the kernel does not take (here two dtypes) are concatenated by torch.cat first,
    with its type promotion."""
    a = make_input((4, 2, 3, 3), torch.float32, device)
    c = make_input((4, 3, 3, 3), torch.float64, device)
    x = torch.cat([a, c], 1)
    mean, var = fastnn.functional.batch_norm_stats(x)
    w, b, rm, rv = make_params(5, torch.float64, device)
    out = fastnn.functional.batch_norm_cat_with_stats([a, c], mean, var, rm.clone(), rv.clone(),
                                                      w, b)
    exp = fastnn.functional.batch_norm(x, rm.clone(), rv.clone(), w, b, True)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, exp)
    with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
        fastnn.functional.batch_norm_cat_with_stats(
            [a, make_input((4, 3, 2, 3), torch.float32, device)], mean, var, rm, rv, w, b)


def test_with_stats_bad_statistics(backend, device):
    x = make_input((4, 3, 5), torch.float32, device)
    w, b, rm, rv = make_params(3, torch.float32, device)
    mean, var = fastnn.functional.batch_norm_stats(x)
    with pytest.raises(RuntimeError, match=r"batch_norm_with_stats: var must be a torch.float32 "
                                           r"tensor of size \(3,\)"):
        fastnn.functional.batch_norm_with_stats(x, mean, var[:2], rm, rv, w, b)
    with pytest.raises(RuntimeError, match="batch_norm_with_stats: mean must be"):
        fastnn.functional.batch_norm_with_stats(x, mean.double(), var, rm, rv, w, b)
    bn = fastnn.nn.BatchNorm1d(3).to(device)
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(RuntimeError, match="var must be"):
        bn._bn_forward(x, None, False, (mean, var[:2]))
    for k, v in bn.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} changed by a failing call"


# ---------------------------------------------------------------------------------------------
# dual_batch_norm_add_relu: relu(bn(x) + bn2(z)), a ResNet block with a downsampling shortcut

def _run_dual(impl, x, z, p1, p2, training, relu, g, upcast=False):
    dt = torch.float32 if upcast else None

    def leaf(t):
        if t is None:
            return None
        t = t.detach()
        return (t.to(dt) if dt is not None else t.clone()).requires_grad_(True)

    xl, zl = leaf(x), leaf(z)
    w1, b1, w2, b2 = (leaf(t) for t in (p1[0], p1[1], p2[0], p2[1]))
    rm1, rv1, rm2, rv2 = (t.detach().to(dt or t.dtype, copy=True)
                          for t in (p1[2], p1[3], p2[2], p2[3]))
    if impl == "fastnn":
        out = fastnn.functional.dual_batch_norm_add_relu(
            xl, zl, rm1, rv1, rm2, rv2, w1, b1, w2, b2, training, 0.1, 1e-5, momentum2=0.3,
            eps2=1e-3, relu=relu)
    else:
        out = (F.batch_norm(xl, rm1, rv1, w1, b1, training, 0.1, 1e-5)
               + F.batch_norm(zl, rm2, rv2, w2, b2, training, 0.3, 1e-3))
        if relu:
            out = F.relu(out)
    out.backward(g.to(out.dtype))
    return {"out": out.detach(), "running_mean": rm1, "running_var": rv1, "running_mean2": rm2,
            "running_var2": rv2, "grad_input": xl.grad, "grad_input2": zl.grad,
            "grad_weight": w1.grad, "grad_bias": b1.grad, "grad_weight2": w2.grad,
            "grad_bias2": b2.grad}


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype, half_params", DTYPE_CASES)
def test_dual_matches_torch(backend, device, dtype, half_params, layout, training, relu):
    shape, fmt = LAYOUTS[layout]
    x = make_input(shape, dtype, device, fmt)
    z = make_input(shape, dtype, device, fmt, shift=-3.0, scale=0.5)
    p1 = make_params(shape[1], param_dtype(dtype, half_params), device)
    p2 = make_params(shape[1], param_dtype(dtype, half_params), device)
    g = make_input(shape, dtype, device, fmt, shift=0.0, scale=1.0)
    got = _run_dual("fastnn", x, z, p1, p2, training, relu, g)
    # In float16/bfloat16 PyTorch rounds each batch norm before the add; fastnn's dual kernel and
    # reference add in float32 (a device without the dual kernel rounds as PyTorch does).
    fused = backend == "reference" or fastnn.ops.has_kernel(device, "batch_norm_dual")
    upcast = fused and dtype in (torch.float16, torch.bfloat16)
    exp = _run_dual("torch", x, z, p1, p2, training, relu, g, upcast=upcast)
    for key in got:
        assert_close(got[key], exp[key], dtype, grad=key.startswith("grad"), msg=key)
    assert got["out"].dtype == dtype and got["grad_input2"].dtype == dtype
    assert got["grad_weight2"].dtype == p2[0].dtype
    if fmt != torch.contiguous_format:
        assert got["out"].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_dual_gradcheck(backend, device, training, relu):
    shape = (3, 2, 3, 2)
    x = make_input(shape, torch.float64, device).requires_grad_(True)
    z = make_input(shape, torch.float64, device, shift=-1.0).requires_grad_(True)
    w1, b1, rm1, rv1 = make_params(2, torch.float64, device)
    w2, b2, rm2, rv2 = make_params(2, torch.float64, device)
    inputs = [x, z] + [t.requires_grad_(True) for t in (w1, b1, w2, b2)]

    def fn(x, z, w1, b1, w2, b2):
        return fastnn.functional.dual_batch_norm_add_relu(
            x, z, rm1.clone(), rv1.clone(), rm2.clone(), rv2.clone(), w1, b1, w2, b2, training,
            0.1, 1e-3, relu=relu)
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


def test_dual_bad_input(backend, device):
    x = make_input((4, 3, 5), torch.float32, device)
    w, b, rm, rv = make_params(3, torch.float32, device)
    for bad, match in ((x[:2], r"input2 must have the input's size"),
                       (x.double(), "input2 has dtype torch.float64")):
        with pytest.raises(RuntimeError, match=match):
            fastnn.functional.dual_batch_norm_add_relu(x, bad, rm, rv, rm, rv, w, b, w, b, True)
    bn, bn2 = fastnn.nn.BatchNorm1d(3).to(device), fastnn.nn.BatchNorm1d(3).to(device)
    state = [{k: v.clone() for k, v in m.state_dict().items()} for m in (bn, bn2)]
    with pytest.raises(RuntimeError, match="input2 must have"):
        fastnn.nn.dual_bn_add_relu(bn, x, bn2, x[:2])
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        fastnn.nn.dual_bn_add_relu(bn, x[0, 0], bn2, x)
    for m, s in zip((bn, bn2), state):
        for k, v in m.state_dict().items():
            assert torch.equal(v, s[k]), f"{k} changed by a failing call"
    # Other modules are called one after the other.
    torch_bn = torch.nn.BatchNorm1d(3).to(device).eval()
    bn2.eval()
    torch.testing.assert_close(fastnn.nn.dual_bn_add_relu(torch_bn, x, bn2, 2 * x),
                               torch.relu(torch_bn(x) + bn2(2 * x)))


@pytest.mark.parametrize("z_kind", ["channels_last", "sliced", "transposed"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_dual_mixed_layouts(backend, device, training, z_kind):
    """input2 in another layout than input, or a strided view: handled, never wrong."""
    shape = (4, 6, 5, 7)
    x = make_input(shape, torch.float32, device)
    if z_kind == "channels_last":
        z = make_input(shape, torch.float32, device, torch.channels_last, shift=-1.0)
    elif z_kind == "sliced":
        z = make_input((4, 12, 5, 7), torch.float32, device, shift=-1.0)[:, ::2]
    else:
        z = make_input((4, 6, 7, 5), torch.float32, device, shift=-1.0).transpose(2, 3)
    p1 = make_params(6, torch.float32, device)
    p2 = make_params(6, torch.float32, device)
    g = make_input(shape, torch.float32, device, shift=0.0, scale=1.0)
    got = _run_dual("fastnn", x, z, p1, p2, training, True, g)
    exp = _run_dual("torch", x, z, p1, p2, training, True, g)
    for key in got:
        assert_close(got[key], exp[key], torch.float32, grad=key.startswith("grad"), msg=key)


@pytest.mark.parametrize("shape", [(2, 3, 0), (2, 3, 0, 5), (2, 0, 5, 5), (2, 0), (0, 3, 4, 4)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_inputs_every_form(backend, device, training, shape):
    """Empty inputs of every kind (no channels, no spatial positions, no batch): an empty output
    from the plain, fused and dual forms, the running statistics unchanged. torch gives the
    same where it takes the input (no channels: torch raises an IndexError from inside its
    kernel; fastnn returns the empty output)."""
    C = shape[1]
    x = torch.randn(shape, device=device)
    z = torch.randn(shape, device=device)
    w, b, rm, rv = make_params(C, torch.float32, device)
    if C > 0:
        exp = F.relu(F.batch_norm(x, rm.clone(), rv.clone(), w, b, training)
                     + F.batch_norm(z, rm.clone(), rv.clone(), w, b, training))
        assert exp.shape == x.shape
    rms = [rm.clone() for _ in range(4)]
    rvs = [rv.clone() for _ in range(4)]
    got = fastnn.functional.dual_batch_norm_add_relu(x, z, rms[0], rvs[0], rms[1], rvs[1], w, b,
                                                     w, b, training)
    assert got.shape == x.shape
    got = fastnn.functional.batch_norm_add_relu(x, z, rms[2], rvs[2], w, b, training)
    assert got.shape == x.shape
    got = fastnn.functional.batch_norm(x, rms[3], rvs[3], w, b, training)
    assert got.shape == x.shape
    for m_, v_ in zip(rms, rvs):
        assert torch.equal(m_, rm) and torch.equal(v_, rv)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_nan_eps_as_torch(backend, device, training):
    """torch takes eps=nan (its checks are eps <= 0 and eps < 0) and gives NaN: so does fastnn,
    the dual form included, with the same running statistics."""
    x = make_input((4, 3, 5, 5), torch.float32, device)
    w, b, rm, rv = make_params(3, torch.float32, device)
    rm1, rv1, rm2, rv2 = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    nan = float("nan")
    exp = F.batch_norm(x, rm2, rv2, w, b, training, 0.1, nan)
    got = fastnn.functional.batch_norm(x, rm1, rv1, w, b, training, 0.1, nan)
    torch.testing.assert_close(got, exp, equal_nan=True)
    torch.testing.assert_close(rm1, rm2, equal_nan=True)
    torch.testing.assert_close(rv1, rv2, equal_nan=True)
    got = fastnn.functional.dual_batch_norm_add_relu(x, x.clone(), rm.clone(), rv.clone(),
                                                     rm.clone(), rv.clone(), w, b, w, b,
                                                     training, 0.1, 1e-5, eps2=nan)
    assert got.isnan().all()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_dual_empty_batch(backend, device, training):
    """N = 0: an empty output and gradients, running statistics untouched, batches counted, as
    two torch.nn.BatchNorm2d do."""
    bn, bn2 = fastnn.nn.BatchNormAddReLU2d(3).to(device), fastnn.nn.BatchNorm2d(3).to(device)
    bn.train(training)
    bn2.train(training)
    x = torch.randn(0, 3, 4, 4, device=device, requires_grad=True)
    z = torch.randn(0, 3, 4, 4, device=device, requires_grad=True)
    out = fastnn.nn.dual_bn_add_relu(bn, x, bn2, z)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape and z.grad.shape == z.shape
    for m in (bn, bn2):
        assert torch.count_nonzero(m.running_mean) == 0
        assert torch.equal(m.running_var, torch.ones_like(m.running_var))
        assert m.num_batches_tracked.item() == (1 if training else 0)
