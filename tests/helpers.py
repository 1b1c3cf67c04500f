"""Inputs, tolerances and the two oracles (PyTorch and fastnn.reference) shared by the tests."""
import contextlib
import math
import random
import warnings

import pytest
import torch
import torch.nn.functional as F

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import fastnn
    from fastnn import reference

HAS_CUDA = torch.cuda.is_available()
BACKENDS = ("kernel", "reference")

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[
        pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]),
]

REDUCED = (torch.float16, torch.bfloat16)


@contextlib.contextmanager
def torch_threads(n):
    """torch's intra-op thread count set to n inside, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def randomize_batch_norms(model, seed=0):
    """Non-trivial BN weights, biases and running statistics, so that a mix-up shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.2)
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                    m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return model


# Input dtype and whether the parameters/running statistics have the input's own dtype (for
# float16/bfloat16; otherwise they are float32).
DTYPE_CASES = [
    pytest.param(torch.float64, False, id="f64"),
    pytest.param(torch.float32, False, id="f32"),
    pytest.param(torch.bfloat16, False, id="bf16-f32params"),
    pytest.param(torch.bfloat16, True, id="bf16-bf16params"),
    pytest.param(torch.float16, False, id="f16-f32params"),
    pytest.param(torch.float16, True, id="f16-f16params"),
]

# Input shape and memory format, ranks 2 to 5, both memory formats.
LAYOUTS = {
    "2d": ((6, 5), torch.contiguous_format),
    "3d": ((4, 5, 7), torch.contiguous_format),
    "nchw": ((4, 5, 6, 7), torch.contiguous_format),
    "nhwc": ((4, 5, 6, 7), torch.channels_last),
    # rows wider than a CPU column block (512): element-wise passes go row by row
    "nhwc_wide": ((3, 600, 2, 3), torch.channels_last),
    "ncdhw": ((2, 5, 3, 4, 5), torch.contiguous_format),
    "ndhwc": ((2, 5, 3, 4, 5), torch.channels_last_3d),
}

# The shapes above are small: they never leave the kernels' smallest cases. These span the ways
# the CPU kernels cut their work (csrc/cpu/batch_norm_cpu_kernels.h's Plan): channel planes of 64
# values and more, cut into several L1-sized chunks past 2048-8192 values; channels-first planes
# of 16-63 and of fewer values, handled as rows; channels-last rows narrower than 64 values
# (grouped several to a row, with a partial last row), of 64-512, wider than a 512-column
# block, and wider than the gradient sums' 2048-column block; enough rows for several groups of
# rows; and on CUDA the planes and rows kernels with their vector heads and tails and several
# blocks per channel. Each regime gets random draws
# (seeded by its name, so every run sees the same).
KERNEL_REGIMES = {
    # name: (memory formats, shape from a random.Random)
    "planes": (["contiguous"], lambda r: (r.randint(1, 4), r.randint(1, 6), r.randint(8, 40),
                                          r.randint(8, 40))),
    "chunked_planes": (["contiguous"], lambda r: (r.randint(1, 3), r.randint(1, 3),
                                                  r.randint(50, 110), r.randint(50, 110))),
    "mid_planes": (["contiguous"], lambda r: (r.randint(2, 5), r.randint(1, 80), r.randint(4, 7),
                                              r.randint(4, 9))),
    "short_planes": (["contiguous"], lambda r: (r.randint(2, 5), r.randint(1, 120),
                                                r.randint(1, 3), r.randint(1, 5))),
    "narrow_rows": (["channels_last"], lambda r: (r.randint(1, 4), r.randint(1, 63),
                                                  r.randint(1, 30), r.randint(1, 30))),
    "rows": (["channels_last"], lambda r: (r.randint(1, 4), r.randint(64, 512), r.randint(1, 16),
                                           r.randint(1, 16))),
    "many_rows": (["channels_last"], lambda r: (r.randint(8, 16), r.choice([64, 128, 200]),
                                                r.randint(20, 28), r.randint(20, 28))),
    "wide_rows": (["channels_last"], lambda r: (r.randint(1, 4), r.randint(513, 1100),
                                                r.randint(1, 6), r.randint(1, 6))),
    "widest_rows": (["channels_last"], lambda r: (r.randint(1, 3), r.randint(2049, 2400),
                                                  r.randint(1, 5), r.randint(1, 5))),
    "2d": (["contiguous"], lambda r: (r.randint(2, 3000), r.randint(1, 700))),
    "3d": (["contiguous"], lambda r: (r.randint(2, 5), r.randint(1, 40), r.randint(1, 300))),
    "5d": (["contiguous", "channels_last"], lambda r: (r.randint(1, 4), r.randint(1, 40),
                                                       r.randint(1, 6), r.randint(1, 6),
                                                       r.randint(1, 6))),
}


def kernel_case(regime, draw, max_numel=400_000):
    """Draw number `draw` of `regime`: shape, memory format, dtype and options (the same on
    every run); at most `max_numel` elements (fewer samples)."""
    rng = random.Random(f"{regime}-{draw}")
    formats, make_shape = KERNEL_REGIMES[regime]
    shape = make_shape(rng)
    while math.prod(shape) > max_numel:  # halve N, then the largest spatial size (or C)
        i = 0 if shape[0] > 2 else max(range(2, len(shape)), key=lambda k: shape[k], default=1)
        shape = shape[:i] + (max(1, shape[i] // 2),) + shape[i + 1:]
    fmt = rng.choice(formats)
    memory_format = torch.contiguous_format
    if fmt == "channels_last":
        memory_format = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    return {
        "shape": shape,
        "format": memory_format,
        "dtype": rng.choice([torch.float64, torch.float32, torch.bfloat16, torch.float16]),
        "training": rng.random() < 0.7,
        "residual": rng.random() < 0.5,
        "relu": rng.random() < 0.5,
        "dual": rng.random() < 0.3,
        "shift": rng.choice([0.0, 3.0, -50.0]),
    }


# (rtol, atol) for outputs and running statistics, and for gradients, by input dtype.
_TOL = {
    torch.float64: ((1e-10, 1e-10), (1e-10, 1e-10)),
    torch.float32: ((1e-5, 1e-5), (1e-4, 1e-4)),
    torch.float16: ((1e-2, 1e-2), (2e-2, 2e-2)),
    torch.bfloat16: ((2e-2, 2e-2), (4e-2, 4e-2)),
}


def tol(dtype, grad=False):
    """dict(rtol=..., atol=...) for comparing results computed from `dtype` inputs."""
    rtol, atol = _TOL[dtype][1 if grad else 0]
    return {"rtol": rtol, "atol": atol}


def assert_close(actual, expected, dtype, grad=False, msg=""):
    """Compares values (not dtypes) with the tolerance of the input dtype `dtype`."""
    if expected is None or actual is None:
        assert actual is None and expected is None, f"{msg}: {actual!r} vs {expected!r}"
        return
    assert actual.shape == expected.shape, f"{msg}: shape {actual.shape} vs {expected.shape}"
    torch.testing.assert_close(actual.detach().to("cpu", torch.float64),
                               expected.detach().to("cpu", torch.float64),
                               msg=lambda m: f"{msg}: {m}", **tol(dtype, grad))


def gradcheck(fn, inputs, atol=1e-5):
    """torch.autograd.gradcheck in every mode: reverse and forward (jvp), each also batched
    (torch.vmap over the grad_outputs or tangents)."""
    return torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=atol, check_forward_ad=True,
                                    check_batched_grad=True, check_batched_forward_grad=True)


def gradgradcheck(fn, inputs, atol=1e-5):
    """torch.autograd.gradgradcheck, reverse over reverse (batched too) and forward over
    reverse."""
    return torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=atol, check_batched_grad=True,
                                        check_fwd_over_rev=True)


def param_dtype(dtype, half_params=False):
    """The parameter dtype paired with an input dtype: float32 for float16/bfloat16 input unless
    `half_params` asks for the input's own dtype."""
    return dtype if dtype not in REDUCED or half_params else torch.float32


def make_input(shape, dtype, device, memory_format=torch.contiguous_format, shift=0.5,
               scale=2.0):
    x = torch.randn(shape, dtype=torch.float64) * scale + shift
    return x.to(device=device, dtype=dtype).contiguous(memory_format=memory_format)


def make_params(C, dtype, device, affine=True):
    """(weight, bias, running_mean, running_var) of `dtype`; weight/bias None unless affine."""
    w = torch.randn(C, dtype=torch.float64) if affine else None
    b = torch.randn(C, dtype=torch.float64) if affine else None
    rm = torch.randn(C, dtype=torch.float64) * 0.3
    rv = torch.rand(C, dtype=torch.float64) + 0.5
    return tuple(None if t is None else t.to(device=device, dtype=dtype) for t in (w, b, rm, rv))


def is_channels_last(t):
    if t.dim() == 4:
        return t.is_contiguous(memory_format=torch.channels_last)
    if t.dim() == 5:
        return t.is_contiguous(memory_format=torch.channels_last_3d)
    return False


def _leaf(t, dtype=None):
    if t is None:
        return None
    t = t.detach()
    t = t.to(dtype) if dtype is not None and t.dtype != dtype else t.clone()
    return t.requires_grad_(True)


def run_bn(impl, x, weight, bias, running_mean, running_var, training, momentum, eps,
           residual=None, relu=False, grad_out=None, upcast=False, transform=None):
    """Runs one batch-norm call on copies of the arguments and returns a dict of everything it
    produced: out, running_mean, running_var and the gradient of each tensor argument.

    impl: "fastnn" (fastnn.functional.batch_norm), "torch" (F.batch_norm, + residual, relu) or
    "reference" (fastnn.reference ops, differentiated by autograd).
    upcast: compute in float32 from float32 copies of every argument (the oracle for reduced
    precision, where PyTorch would round between the batch norm and the residual add).
    transform: applied to the (leaf) input before the call, to feed strided views.
    """
    dt = torch.float32 if upcast else None
    xl, wl, bl, rl = (_leaf(t, dt) for t in (x, weight, bias, residual))
    rm = None if running_mean is None else running_mean.detach().to(dt or running_mean.dtype,
                                                                     copy=True)
    rv = None if running_var is None else running_var.detach().to(dt or running_var.dtype,
                                                                   copy=True)
    xin = transform(xl) if transform is not None else xl
    if impl == "fastnn":
        out = fastnn.functional.batch_norm(xin, rm, rv, wl, bl, training, momentum, eps,
                                           residual=rl, relu=relu)
    elif impl == "torch":
        if xin.is_cuda and (wl is None or bl is None):
            # torch 2.11's CUDA batch norm backward fails ("tensor does not have a device") when
            # weight or bias is None; a weight of ones and a bias of zeros that take no gradient
            # are the same function.
            C = xin.shape[1]
            like = next((t for t in (wl, bl, rm) if t is not None), None)
            pdt = like.dtype if like is not None else reference.accumulate_dtype(xin.dtype)
            w_ = wl if wl is not None else torch.ones(C, dtype=pdt, device=xin.device)
            b_ = bl if bl is not None else torch.zeros(C, dtype=pdt, device=xin.device)
        else:
            w_, b_ = wl, bl
        if eps == 0.0 and not training:
            # torch 2.14 accepts eps=0 in eval, as fastnn does; older releases (2.11) reject it in
            # F.batch_norm's Python check, while their kernel, called directly, computes it.
            out = torch.batch_norm(xin, w_, b_, rm, rv, False, momentum, eps,
                                   torch.backends.cudnn.enabled)
        else:
            out = F.batch_norm(xin, rm, rv, w_, b_, training, momentum, eps)
        if rl is not None:
            out = out + rl
        if relu:
            out = F.relu(out)
    elif impl == "reference":
        if training:
            out = reference.batch_norm_train(xin, wl, bl, rm, rv, momentum, eps, rl, relu)[0]
        else:
            out = reference.batch_norm_eval(xin, wl, bl, rm, rv, eps, rl, relu)
    else:
        raise ValueError(impl)
    if grad_out is None:
        grad_out = torch.randn_like(out)
    out.backward(grad_out.to(out.dtype))
    return {
        "out": out.detach(),
        "running_mean": rm,
        "running_var": rv,
        "grad_input": xl.grad,
        "grad_weight": None if wl is None else wl.grad,
        "grad_bias": None if bl is None else bl.grad,
        "grad_residual": None if rl is None else rl.grad,
    }


def check_results(got, expected, dtype, what=""):
    for key in ("out", "running_mean", "running_var"):
        assert_close(got[key], expected[key], dtype, msg=f"{what} {key}")
    for key in ("grad_input", "grad_weight", "grad_bias", "grad_residual"):
        assert_close(got[key], expected[key], dtype, grad=True, msg=f"{what} {key}")


def torch_reduced_precision_is_exact(device):
    """Whether PyTorch's own float16/bfloat16 batch norm is an oracle to the reduced-precision
    tolerances here. On the CPU it is (float32 sums of the inputs). On CUDA (torch 2.11, H200) its
    bfloat16 backward is not: for a constant grad_output its grad_weight came out 0.03 to 0.08
    where the exact value is 0 (fastnn: 1e-6), and its grad_bias/grad_weight sums differed from
    fastnn's and fastnn.reference's (float32 sums, which agree) by up to 0.23 on layer shapes;
    there PyTorch in float32 on float32 copies is the oracle."""
    return torch.device(device).type != "cuda"


def check_against_oracles(x, weight, bias, running_mean, running_var, training, momentum, eps,
                          residual=None, relu=False, transform=None):
    """fastnn.functional.batch_norm against PyTorch and against fastnn.reference: output, running
    statistics and every gradient; also dtypes and the channels_last output layout. Returns
    fastnn's results."""
    dtype = x.dtype
    probe = transform(x) if transform is not None else x
    grad_out = torch.randn(probe.shape, dtype=torch.float64).to(x.device, dtype)
    args = (x, weight, bias, running_mean, running_var, training, momentum, eps)
    kw = {"residual": residual, "relu": relu, "grad_out": grad_out, "transform": transform}
    got = run_bn("fastnn", *args, **kw)
    # In float16/bfloat16 PyTorch rounds between its batch norm and the residual add, and values
    # within that rounding of zero can fall on the other side of the ReLU; fastnn computes in
    # float32 and rounds once. So PyTorch's side then runs in float32 on float32 copies; on CUDA
    # always, where PyTorch's reduced-precision backward is further off than these tolerances
    # (see torch_reduced_precision_is_exact).
    upcast = dtype in REDUCED and (residual is not None or relu
                                   or not torch_reduced_precision_is_exact(x.device))
    check_results(got, run_bn("torch", *args, upcast=upcast, **kw), dtype, "vs torch:")
    check_results(got, run_bn("reference", *args, **kw), dtype, "vs reference:")

    assert got["out"].dtype == dtype and got["out"].device == x.device
    assert got["grad_input"].dtype == dtype
    for key, t in (("grad_weight", weight), ("grad_bias", bias), ("running_mean", running_mean),
                   ("running_var", running_var)):
        if t is not None:
            assert got[key].dtype == t.dtype, key
    if is_channels_last(probe) and not probe.is_contiguous():
        assert is_channels_last(got["out"]), "channels_last input must give channels_last output"
    return got
