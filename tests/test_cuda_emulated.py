"""csrc/cuda's kernels and host code, run on the CPU by an emulated CUDA runtime (tests/cuda_emu):
every op against the CPU kernels on the same inputs, on the layouts, vector widths and grid shapes
the launch planning picks between, and bitwise equal whichever order the emulated threads run in.

What this checks: indexing, the planning of grids and vectors, the reductions and their fixed
merge order, barriers and shuffles (a thread order that changes a result is a missing barrier; a
barrier not every thread reaches is an error), reads of shared memory or scratch no thread
wrote (both start as NaN here), and launch configurations CUDA would refuse. What it cannot
check: the device's memory model and speed, and anything of the CUDA toolchain itself; those
need the GPU run of scripts/gpu_check.sh.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

from helpers import KERNEL_REGIMES, assert_close, kernel_case, make_input, make_params, param_dtype

sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emu"))
import emu_build  # noqa: E402

pytestmark = pytest.mark.cuda_emu

# (sm_count, blocks_per_sm) the launch planning sees: one block per channel group, or many
# partials per channel (and blocks with no rows at all).
GRIDS = {"narrow": (1, 1), "wide": (16, 2), "many": (80, 2)}

# Built with AddressSanitizer (scripts/cuda_emu_asan.sh): every access is checked; the reruns in
# other thread orders are left out there, since they touch the same memory.
ASAN = os.environ.get("FASTNN_CUDA_EMU_ASAN") == "1"

# name: (shape, memory format, storage offset in elements). The shapes reach: planes with a
# scalar head and tail (odd plane sizes), planes split into segments (S over 1024 vectors),
# more rows than a block walks at once (a plane of 15 takes 8 or 16 lanes: 64 or 32 rows per
# block), channels_last rows with a partial and several channel blocks,
# scalar rows (C not a multiple of the vector), C == 1 and S == 1 (both become another
# layout), rank 2, 3 and 5, and a misaligned base pointer (no vectors).
SHAPES = {
    "nchw_odd": ((5, 3, 7, 9), torch.contiguous_format, 0),
    "nchw_rows": ((150, 2, 3, 5), torch.contiguous_format, 0),
    "nchw_segments": ((2, 2, 100, 90), torch.contiguous_format, 0),
    "nhwc": ((4, 12, 5, 6), torch.channels_last, 0),
    "nhwc_wide": ((2, 200, 3, 3), torch.channels_last, 0),
    "nhwc_rows": ((8, 8, 16, 16), torch.channels_last, 0),
    "nhwc_odd_c": ((3, 10, 3, 5), torch.channels_last, 0),
    "2d": ((300, 24), torch.contiguous_format, 0),
    "3d": ((4, 5, 33), torch.contiguous_format, 0),
    "c1": ((6, 1, 5, 5), torch.contiguous_format, 0),
    "s1": ((7, 6, 1, 1), torch.contiguous_format, 0),
    "ndhwc": ((2, 8, 3, 4, 5), torch.channels_last_3d, 0),
    "misaligned": ((4, 8, 6, 6), torch.contiguous_format, 1),
}
DTYPES = {"f32": torch.float32, "f64": torch.float64, "f16": torch.float16,
          "bf16": torch.bfloat16}
FUSE = {"plain": (False, False), "relu": (False, True), "add_relu": (True, True)}


@pytest.fixture(scope="module")
def emu():
    try:
        mod = emu_build.load(sanitize=ASAN)
    except Exception as e:  # a build failure is a failure, with the compiler's message
        pytest.fail(f"building csrc/cuda for the CPU emulation failed: {e}")
    return mod


@pytest.fixture(autouse=True)
def uninitialized_is_nan():
    """Memory from at::empty (outputs, scratch partials) starts as NaN, as shared memory does."""
    was = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(was)
    torch.utils.deterministic.fill_uninitialized_memory = fill


def _input(name, dtype, shift=0.5):
    shape, fmt, offset = SHAPES[name]
    x = make_input(shape, dtype, "cpu", fmt, shift=shift)
    if offset:
        base = torch.empty(x.numel() + offset, dtype=dtype)[offset:]
        x = base.view(shape).copy_(x)
    return x


def _clone(args):
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a.clone(memory_format=torch.preserve_format))
        elif isinstance(a, list):
            out.append([t.clone(memory_format=torch.preserve_format) for t in a])
        else:
            out.append(a)
    return out


def _bits(t):
    return t.contiguous().view(-1).view(torch.uint8)


def _tensors(result, args):
    """The op's outputs followed by the tensor arguments (running statistics are updated in
    place), as a flat list."""
    res = list(result) if isinstance(result, (tuple, list)) else [result]
    return res + [a for a in args if isinstance(a, torch.Tensor)]


def run_both(emu, op, args, grid, dtype, stat_dtype=None):
    """Runs `op` emulated and on the CPU kernels on copies of `args`; compares every output and
    every argument afterwards, and reruns the emulation with the threads in reverse and in
    shuffled order, which must give bitwise the same results."""
    emu.configure(*GRIDS[grid], 0, 0)
    a_emu = _clone(args)
    got = _tensors(getattr(emu, op)(*a_emu), a_emu)
    a_cpu = _clone(args)
    # A CUDA ReLU mask is not the CPU kernels' (a bit per element): they read the output instead
    # (the mask argument itself is compared below, unchanged).
    cpu_args = [None if isinstance(a, torch.Tensor) and a.dtype == torch.uint8 else a
                for a in a_cpu]
    want = _tensors(getattr(torch.ops.fastnn, op)(*cpu_args), a_cpu)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, (op, i, g.dtype, w.dtype)
        if g.dim() >= 2 and g.numel() > 0:
            assert g.stride() == w.stride(), (op, i, g.stride(), w.stride())
        if not g.is_floating_point():  # a ReLU mask passed in
            assert torch.equal(g, w), f"{op} output {i}"
            continue
        # statistics are in the accumulation dtype whatever the input's
        d = dtype if g.dtype == dtype else (stat_dtype or g.dtype)
        assert_close(g, w, d, grad="backward" in op, msg=f"{op} output {i}")
    for schedule, seed in () if ASAN else ((1, 0), (2, 7)):
        emu.configure(*GRIDS[grid], schedule, seed)
        a_again = _clone(args)
        again = _tensors(getattr(emu, op)(*a_again), a_again)
        for i, (g, h) in enumerate(zip(got, again)):
            assert torch.equal(_bits(g), _bits(h)), \
                f"{op} output {i} depends on the order of the threads (schedule {schedule})"
    emu.configure(*GRIDS["narrow"], 0, 0)
    return got


def _grid_for(*names):
    """One grid per case, alternating over the parameter names, so every shape and dtype meets
    both grids across the cases without running each case twice."""
    return "wide" if sum(len(n) for n in names) % 2 else "narrow"


def _check_no_nan(tensors, what):
    for i, t in enumerate(tensors):
        assert not torch.isnan(t.double()).any(), f"{what}: NaN in output {i}"


@pytest.mark.parametrize("fuse", list(FUSE))
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_train(emu, shape, dt, fuse):
    dtype = DTYPES[dt]
    x = _input(shape, dtype)
    C = x.shape[1]
    w, b, rm, rv = make_params(C, param_dtype(dtype), "cpu")
    res, relu = FUSE[fuse]
    r = _input(shape, dtype, shift=0.0) if res else None
    got = run_both(emu, "batch_norm_train", [x, w, b, rm, rv, 0.1, 1e-5, r, relu],
                   _grid_for(shape, dt, fuse), dtype)
    _check_no_nan(got, "batch_norm_train")


@pytest.mark.parametrize("fuse", list(FUSE))
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_eval(emu, shape, dt, fuse):
    dtype = DTYPES[dt]
    x = _input(shape, dtype)
    # bfloat16 and float16 inputs take parameters of their own dtype here (the other reading
    # of ChannelParam); the training test covers float32 ones.
    w, b, rm, rv = make_params(x.shape[1], dtype, "cpu")
    res, relu = FUSE[fuse]
    r = _input(shape, dtype, shift=0.0) if res else None
    got = run_both(emu, "batch_norm_eval", [x, w, b, rm, rv, 1e-5, r, relu],
                   _grid_for(shape, dt, fuse), dtype)
    _check_no_nan(got, "batch_norm_eval")


BACKWARD = {"plain": (False, False), "relu": (True, False), "relu_residual": (True, True)}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", list(BACKWARD))
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_backward(emu, shape, dt, kind, training):
    dtype = DTYPES[dt]
    x = _input(shape, dtype)
    w, b, _, _ = make_params(x.shape[1], param_dtype(dtype), "cpu")
    relu, residual_grad = BACKWARD[kind]
    # what the backward receives: the CPU training forward's output and saved statistics
    out, mean, invstd = torch.ops.fastnn.batch_norm_train(x, w, b, None, None, 0.1, 1e-5, None,
                                                          relu)
    g = _input(shape, dtype, shift=0.0)
    got = run_both(emu, "batch_norm_backward",
                   [g, x, w, out if relu else None, mean, invstd, training, relu, residual_grad],
                   _grid_for(shape, dt, kind, str(training)), dtype)
    _check_no_nan([t for t in got[:4] if t.numel()], "batch_norm_backward")


def _reads_vectors(x):
    """Whether the backward reads x's shape in 16-byte vectors (and so the forward's ReLU mask):
    an aligned input, and in rows (channels_last, or one value per plane) whole vectors of
    channels."""
    vec = 16 // x.element_size()
    spatial = x.numel() // max(1, x.shape[0] * x.shape[1])
    rows = spatial == 1 or not x.is_contiguous()
    aligned = x.data_ptr() % 16 == 0
    return aligned and (not rows or x.shape[1] % vec == 0)


def _mask_numel(x):
    vec = 16 // x.element_size()
    return (x.numel() + vec - 1) // vec


def _expected_mask(out, x):
    """The ReLU mask the masked forwards specify for output `out` of input `x`: the byte of each
    16-byte vector of the output (in memory order) that the kernels read as a vector, bit i set
    where element i passes the gradient (> 0 or NaN), and 0 in every other byte: spans that
    cross a plane's edge (a plane's scalar head and tail, NCHW) and all of them for rows whose
    channel count is not a multiple of the vector width."""
    vec = 16 // out.element_size()
    n = out.numel()
    flat = torch.as_strided(out, (n,), (1,), out.storage_offset())  # memory order: dense
    passes = ~(flat <= 0)
    full = n // vec * vec
    bits = passes[:full].view(-1, vec).to(torch.uint8) << torch.arange(vec, dtype=torch.uint8)
    want = torch.zeros(_mask_numel(out), dtype=torch.uint8)
    want[:full // vec] = bits.sum(1, dtype=torch.uint8)
    C = x.shape[1]
    spatial = n // max(1, x.shape[0] * C)
    rows = C > 1 and (spatial == 1 or not x.is_contiguous())
    if rows:
        return want if C % vec == 0 else torch.zeros_like(want)
    plane = n if C == 1 else spatial  # C == 1: the kernels walk the tensor as one plane
    start = torch.arange(_mask_numel(out)) * vec
    inside = (start // plane == (start + vec - 1) // plane) & (start + vec <= n)
    return torch.where(inside, want, torch.zeros_like(want))


def _check_backward_with_mask(backward, args, mask, x, dtype, cpu_op, what):
    """The backward given the forward's ReLU mask: what it gives reading the output and the CPU
    kernels' result (to rounding: its kernels are other instantiations, whose occupancy may
    give another grid and so another order of the partial sums); and it does read the mask
    where it reads vectors (the mask's bits flipped change the gradients)."""
    from_out = backward(*args)
    from_mask = backward(*args, mask)
    want = cpu_op(*args)
    for i, (a, b, w) in enumerate(zip(from_out, from_mask, want)):
        if w.numel():
            d = dtype if w.dtype == dtype else w.dtype
            assert_close(b, a, d, grad=True, msg=f"{what} output {i}, mask against output")
            assert_close(b, w, d, grad=True, msg=f"{what} output {i}")
    flipped = backward(*args, mask ^ 0xFF)
    changed = not torch.equal(_bits(flipped[0]), _bits(from_out[0]))
    assert changed == _reads_vectors(x), f"{what}: the mask is read {changed}"


@pytest.mark.parametrize("res", [False, True], ids=["relu", "add_relu"])
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_train_relu_mask(emu, shape, dt, res):
    """batch_norm_train_masked: batch_norm_train's outputs and running statistics, and a mask
    the backward reads in place of the output (with and without grad_residual)."""
    dtype = DTYPES[dt]
    x = _input(shape, dtype)
    w, b, rm, rv = make_params(x.shape[1], param_dtype(dtype), "cpu")
    r = _input(shape, dtype, shift=0.0) if res else None
    emu.configure(*GRIDS[_grid_for(shape, dt, str(res))], 0, 0)
    rm_e, rv_e = rm.clone(), rv.clone()
    out, mean, invstd, mask = emu.batch_norm_train_masked(x, w, b, rm_e, rv_e, 0.1, 1e-5, r, True)
    want = torch.ops.fastnn.batch_norm_train(x, w, b, rm, rv, 0.1, 1e-5, r, True)
    for i, (g, e) in enumerate(zip((out, mean, invstd, rm_e, rv_e), (*want, rm, rv))):
        assert_close(g, e, dtype if g.dtype == dtype else g.dtype, msg=f"output {i}")
    assert mask.dtype == torch.uint8 and mask.shape == (_mask_numel(x),)
    assert torch.equal(mask, _expected_mask(out, x)), "the ReLU mask's bytes"
    g = _input(shape, dtype, shift=0.0)
    for residual_grad in (False, True):
        _check_backward_with_mask(emu.batch_norm_backward,
                                  [g, x, w, out, mean, invstd, True, True, residual_grad], mask,
                                  x, dtype, torch.ops.fastnn.batch_norm_backward,
                                  f"backward (grad_residual {residual_grad})")
    emu.configure(*GRIDS["narrow"], 0, 0)
    # no mask without relu
    assert emu.batch_norm_train_masked(x, w, b, None, None, 0.1, 1e-5, r, False)[3].numel() == 0


def _dual_args(shape, dtype, training, relu):
    """The arguments of batch_norm_dual: two inputs, each with its own parameters."""
    x = _input(shape, dtype)
    z = _input(shape, dtype, shift=-0.3)
    w, b, rm, rv = make_params(x.shape[1], param_dtype(dtype), "cpu")
    w2, b2, rm2, rv2 = make_params(x.shape[1], param_dtype(dtype), "cpu")
    return [x, w, b, rm, rv, z, w2, b2, rm2, rv2, training, 0.1, 1e-5, 0.2, 1e-3, relu]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("relu", [False, True], ids=["add", "add_relu"])
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_dual(emu, shape, dt, relu, training):
    dtype = DTYPES[dt]
    got = run_both(emu, "batch_norm_dual", _dual_args(shape, dtype, training, relu),
                   _grid_for(shape, dt, str(relu), str(training)), dtype)
    _check_no_nan(got, "batch_norm_dual")


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("shape", ["nchw_odd", "nchw_segments", "nhwc_rows", "2d"])
def test_train_relu_mask_misaligned_residual(emu, shape, dt):
    """A residual that is not 16-byte aligned makes the normalize run 1 wide; the mask is then
    written from the output, and the backward (whose own tensors are aligned) reads it."""
    dtype = DTYPES[dt]
    x = _input(shape, dtype)
    w, b, _, _ = make_params(x.shape[1], param_dtype(dtype), "cpu")
    r0 = _input(shape, dtype, shift=0.0)
    r = torch.empty(r0.numel() + 1, dtype=dtype)[1:].as_strided(r0.shape, r0.stride()).copy_(r0)
    out, mean, invstd, mask = emu.batch_norm_train_masked(x, w, b, None, None, 0.1, 1e-5, r, True)
    want = torch.ops.fastnn.batch_norm_train(x, w, b, None, None, 0.1, 1e-5, r, True)
    assert_close(out, want[0], dtype, msg="output")
    assert torch.equal(mask, _expected_mask(out, x)), "the ReLU mask's bytes"
    g = _input(shape, dtype, shift=0.0)
    _check_backward_with_mask(emu.batch_norm_backward,
                              [g, x, w, out, mean, invstd, True, True, True], mask, x, dtype,
                              torch.ops.fastnn.batch_norm_backward, "backward")


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_dual_relu_mask(emu, shape, dt):
    """batch_norm_dual_masked in training with relu: batch_norm_dual's outputs and a mask the
    dual backward reads in place of the output; no mask in eval."""
    dtype = DTYPES[dt]
    args = _dual_args(shape, dtype, True, True)
    x, w, z, w2 = args[0], args[1], args[5], args[6]
    emu.configure(*GRIDS[_grid_for(shape, dt)], 0, 0)
    out, m1, i1, m2, i2, mask = emu.batch_norm_dual_masked(*_clone(args))
    want = torch.ops.fastnn.batch_norm_dual(*_clone(args))
    for i, (g, e) in enumerate(zip((out, m1, i1, m2, i2), want)):
        assert_close(g, e, dtype if g.dtype == dtype else g.dtype, msg=f"output {i}")
    assert mask.dtype == torch.uint8 and mask.shape == (_mask_numel(x),)
    assert torch.equal(mask, _expected_mask(out, x)), "the ReLU mask's bytes"
    g = _input(shape, dtype, shift=0.0)
    _check_backward_with_mask(emu.batch_norm_dual_backward,
                              [g, x, w, z, w2, out, m1, i1, m2, i2, True, True], mask, x, dtype,
                              torch.ops.fastnn.batch_norm_dual_backward, "dual backward")
    emu.configure(*GRIDS["narrow"], 0, 0)
    eval_args = _dual_args(shape, dtype, False, True)
    assert emu.batch_norm_dual_masked(*eval_args)[5].numel() == 0


def test_relu_mask_checked(emu):
    """A relu_mask that is not the masked forward's for this input is refused, by name."""
    x = _input("nchw_odd", torch.float32)
    w, b, _, _ = make_params(x.shape[1], torch.float32, "cpu")
    out, mean, invstd, mask = emu.batch_norm_train_masked(x, w, b, None, None, 0.1, 1e-5, None,
                                                          True)
    args = [torch.randn_like(x), x, w, out, mean, invstd, True, True, False]
    for bad in (mask[:-1], mask.to(torch.int32), torch.stack([mask, mask], 1)):
        with pytest.raises(RuntimeError, match="relu_mask"):
            emu.batch_norm_backward(*args, bad)
    # an empty mask is no mask: the output is read
    torch.testing.assert_close(emu.batch_norm_backward(*args, mask[:0])[0],
                               emu.batch_norm_backward(*args)[0], rtol=0, atol=0)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("relu", [False, True], ids=["add", "add_relu"])
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_dual_backward(emu, shape, dt, relu, training):
    dtype = DTYPES[dt]
    args = _dual_args(shape, dtype, training, relu)
    x, w, z, w2 = args[0], args[1], args[5], args[6]
    out, m1, i1, m2, i2 = torch.ops.fastnn.batch_norm_dual(*args)
    g = _input(shape, dtype, shift=0.0)
    got = run_both(emu, "batch_norm_dual_backward",
                   [g, x, w, z, w2, out if relu else None, m1, i1, m2, i2, training, relu],
                   _grid_for(shape, dt, str(relu), str(training)), dtype)
    _check_no_nan(got[:6], "batch_norm_dual_backward")


# Rows inputs of few channels on a GPU of many blocks: one partial per block, P of them per
# channel, which the finalize kernels merge with more partial lanes (finalize_block): 64 lanes for
# (17000, 3) (P = 133), 32 for (4, 3, 48, 48) (P = 72). Three channels are 4 threads a row.
MANY_PARTIALS = {
    "rows_133_f32": ((17000, 3), torch.contiguous_format, torch.float32),
    "rows_133_f64": ((17000, 3), torch.contiguous_format, torch.float64),
    "nhwc_72_f16": ((4, 3, 48, 48), torch.channels_last, torch.float16),
}


@pytest.mark.parametrize("case", list(MANY_PARTIALS))
def test_many_partials(emu, case):
    shape, fmt, dtype = MANY_PARTIALS[case]
    C = shape[1]
    x = make_input(shape, dtype, "cpu", fmt, shift=0.5)
    w, b, rm, rv = make_params(C, param_dtype(dtype), "cpu")
    out, mean, invstd = run_both(emu, "batch_norm_train", [x, w, b, rm, rv, 0.1, 1e-5, None, True],
                                 "many", dtype)[:3]
    g = make_input(shape, dtype, "cpu", fmt, shift=0.0)
    run_both(emu, "batch_norm_backward", [g, x, w, out, mean, invstd, True, True, False], "many",
             dtype)
    run_both(emu, "batch_norm_stats", [g], "many", dtype)
    if dtype == torch.float16:  # three sums a partial (the dual backward)
        args = [x, w, b, rm, rv, g, w, b, rm, rv, True, 0.1, 1e-5, 0.2, 1e-3, True]
        out, m1, i1, m2, i2 = torch.ops.fastnn.batch_norm_dual(*args)
        run_both(emu, "batch_norm_dual_backward", [g, x, w, g, w, out, m1, i1, m2, i2, True, True],
                 "many", dtype)


# The on-chip training forward (FASTNN_CUDA_ONCHIP=1: one cooperative kernel, rows layouts of at
# most 32 channel vectors, no residual): rows shapes with several blocks' worth of rows
# (R = N * S over 3 blocks), channel counts a power-of-two number of vectors or not (idle
# columns), and 256 channels (32 vectors of float16; float32 and float64 are then too wide and
# take the three-kernel path).
ONCHIP = {
    "nhwc16": ((8, 16, 10, 10), torch.channels_last),
    "nhwc24": ((5, 24, 11, 13), torch.channels_last),
    "2d64": ((1100, 64), torch.contiguous_format),
    "nhwc256": ((2, 256, 5, 7), torch.channels_last),
}
ONCHIP_GRID = (3, 1)  # blocks resident at once: the kernel's grid


def _onchip_fixed_bytes(C, dtype):
    """Shared memory the on-chip kernel needs besides its cached rows (see onchip_scratch)."""
    vec = 16 // torch.tensor([], dtype=dtype).element_size()
    tx = min(32, 1 << max(0, (C // vec - 1).bit_length()))
    acc = 8 if dtype == torch.float64 else 4
    return (2 * C + 3 * max(vec * 16 * tx, 512)) * acc, 512 // tx


@pytest.mark.parametrize("cache", ["none", "part", "all"])
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("case", list(ONCHIP))
def test_train_onchip(emu, monkeypatch, case, dt, relu, cache):
    """batch_norm_train and batch_norm_train_masked through the on-chip kernel: the CPU kernels'
    outputs and running statistics, the same bits in any thread order, the ReLU mask's bytes;
    with no row, some rows or every row of a block kept in shared memory."""
    shape, fmt = ONCHIP[case]
    dtype = DTYPES[dt]
    C = shape[1]
    x = make_input(shape, dtype, "cpu", fmt, shift=0.5)
    w, b, rm, rv = make_params(C, param_dtype(dtype), "cpu")
    limit = _onchip_limit(cache, C, dtype, 0, 1)
    eligible = C // (16 // x.element_size()) <= 32
    monkeypatch.setenv("FASTNN_CUDA_ONCHIP", "1")
    monkeypatch.setitem(GRIDS, "coop", ONCHIP_GRID)
    emu.set_shared_memory(limit)
    try:
        launches = emu.counters()[0]
        run_both(emu, "batch_norm_train", [x, w, b, rm, rv, 0.1, 1e-5, None, relu], "coop", dtype)
        ran = (emu.counters()[0] - launches) // (1 if ASAN else 3)
        assert ran == (1 if eligible else 3), f"{ran} kernels a call"
        if relu:
            emu.configure(*ONCHIP_GRID, 0, 0)
            rm_e, rv_e = rm.clone(), rv.clone()
            out, mean, invstd, mask = emu.batch_norm_train_masked(x, w, b, rm_e, rv_e, 0.1, 1e-5,
                                                                  None, True)
            want = torch.ops.fastnn.batch_norm_train(x, w, b, rm, rv, 0.1, 1e-5, None, True)
            for i, (g, e) in enumerate(zip((out, mean, invstd, rm_e, rv_e), (*want, rm, rv))):
                assert_close(g, e, dtype if g.dtype == dtype else g.dtype, msg=f"masked {i}")
            assert torch.equal(mask, _expected_mask(out, x)), "the ReLU mask's bytes"
    finally:
        emu.set_shared_memory(227 << 10)
        emu.configure(*GRIDS["narrow"], 0, 0)


def _onchip_limit(cache, C, dtype, extra, rows_of):
    """The device's shared memory for `cache` (none, part, all) rows of an on-chip kernel that
    needs `extra` more [C] accumulation values and keeps `rows_of` tensors a cached row."""
    fixed, ty = _onchip_fixed_bytes(C, dtype)
    acc = 8 if dtype == torch.float64 else 4
    row = rows_of * C * torch.tensor([], dtype=dtype).element_size()
    return {"none": fixed + extra * C * acc, "part": fixed + extra * C * acc + ty * row,
            "all": 227 << 10}[cache]


# Under AddressSanitizer the two kinds that touch every access (none, and the mask read with
# grad_residual written).
ONCHIP_BACKWARD = (["plain", "relu_residual_grad"] if ASAN else
                   ["plain", "residual_grad", "relu", "relu_residual_grad"])


@pytest.mark.parametrize("cache", ["none", "part", "all"])
@pytest.mark.parametrize("kind", ONCHIP_BACKWARD)
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("case", list(ONCHIP))
def test_backward_onchip(emu, monkeypatch, case, dt, kind, cache):
    """batch_norm_backward (training) through the on-chip kernel: the CPU kernels' gradients,
    the same bits in any thread order; with relu it masks by the forward's ReLU mask (without the
    mask it takes the three-kernel path)."""
    shape, fmt = ONCHIP[case]
    dtype = DTYPES[dt]
    C = shape[1]
    relu, residual_grad = "relu" in kind, "residual_grad" in kind
    x = make_input(shape, dtype, "cpu", fmt, shift=0.5)
    go = make_input(shape, dtype, "cpu", fmt, shift=0.0)
    w, b, rm, rv = make_params(C, param_dtype(dtype), "cpu")
    out, mean, invstd, mask = torch.ops.fastnn.batch_norm_train(x, w, b, rm, rv, 0.1, 1e-5, None,
                                                                relu) + (None,)
    if relu:
        emu.configure(*ONCHIP_GRID, 0, 0)
        mask = emu.batch_norm_train_masked(x, w, b, None, None, 0.1, 1e-5, None, True)[3]
    eligible = C // (16 // x.element_size()) <= 32
    monkeypatch.setenv("FASTNN_CUDA_ONCHIP", "1")
    monkeypatch.setitem(GRIDS, "coop", ONCHIP_GRID)
    emu.set_shared_memory(_onchip_limit(cache, C, dtype, 1, 2))
    try:
        launches = emu.counters()[0]
        run_both(emu, "batch_norm_backward",
                 [go, x, w, out, mean, invstd, True, relu, residual_grad, mask], "coop", dtype)
        ran = (emu.counters()[0] - launches) // (1 if ASAN else 3)
        assert ran == (1 if eligible else 3), f"{ran} kernels a call"
        if relu:  # without the forward's mask: the three-kernel path
            launches = emu.counters()[0]
            emu.batch_norm_backward(go, x, w, out, mean, invstd, True, True, residual_grad)
            assert emu.counters()[0] - launches == 3
    finally:
        emu.set_shared_memory(227 << 10)
        emu.configure(*GRIDS["narrow"], 0, 0)


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_training_in_parts(emu, shape, dt):
    """batch_norm_stats -> batch_norm_train_with_stats -> batch_norm_backward_reduce ->
    batch_norm_backward_elemt (SyncBatchNorm's path), each emulated against the CPU kernel."""
    dtype = DTYPES[dt]
    grid = _grid_for(shape, dt)
    x = _input(shape, dtype)
    w, b, rm, rv = make_params(x.shape[1], param_dtype(dtype), "cpu")
    r = _input(shape, dtype, shift=0.0)
    mean, var = run_both(emu, "batch_norm_stats", [x], grid, dtype)[:2]
    out, smean, sinvstd = run_both(
        emu, "batch_norm_train_with_stats", [x, mean, var, w, b, rm, rv, 0.1, 1e-5, r, True],
        grid, dtype)[:3]
    g = _input(shape, dtype, shift=0.0)
    for relu, residual_grad in ((False, False), (True, False), (True, True)):
        sum_dy, sum_dy_xhat, gres = run_both(
            emu, "batch_norm_backward_reduce",
            [g, x, out if relu else None, smean, sinvstd, relu, residual_grad], grid, dtype)[:3]
        count = x.numel() // x.shape[1]
        run_both(emu, "batch_norm_backward_elemt",
                 [g, x, w, out if relu else None, smean, sinvstd, sum_dy / count,
                  sum_dy_xhat / count, relu], grid, dtype)


CAT = {
    # per-input (channels, memory format); all of one N, H, W
    "nchw": [(3, torch.contiguous_format), (5, torch.contiguous_format),
             (8, torch.contiguous_format)],
    "nhwc": [(8, torch.channels_last), (16, torch.channels_last), (8, torch.channels_last)],
    "nhwc_odd": [(3, torch.channels_last), (5, torch.channels_last)],
    "mixed": [(4, torch.channels_last), (4, torch.contiguous_format)],
    "many": [(1, torch.contiguous_format)] * 70,  # over one launch's input table
}


@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn_relu"])
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("spatial", [(5, 7), (8, 8)], ids=["odd", "even"])
@pytest.mark.parametrize("cat", list(CAT))
def test_cat_with_stats(emu, cat, spatial, dt, relu):
    dtype = DTYPES[dt]
    N = 3
    xs = [make_input((N, c) + spatial, dtype, "cpu", fmt) for c, fmt in CAT[cat]]
    full = torch.cat(xs, 1)
    C = full.shape[1]
    mean, var = torch.ops.fastnn.batch_norm_stats(full)
    w, b, rm, rv = make_params(C, param_dtype(dtype), "cpu")
    got = run_both(emu, "batch_norm_cat_with_stats",
                   [xs, mean, var, w, b, rm, rv, 0.1, 1e-5, relu],
                   _grid_for(cat, str(spatial), dt, str(relu)), dtype)
    _check_no_nan(got, "batch_norm_cat_with_stats")


def test_strided_and_reduced_precision_parameters(emu):
    """Weight, bias and running statistics as strided views, and of the input's own dtype
    (bfloat16/float16 running statistics updated in place)."""
    for dtype, fmt in ((torch.float32, torch.contiguous_format),
                       (torch.bfloat16, torch.channels_last),
                       (torch.float16, torch.contiguous_format)):
        x = make_input((4, 6, 5, 7), dtype, "cpu", fmt)
        full = [t.repeat_interleave(2) for t in make_params(6, dtype, "cpu")]
        w, b, rm, rv = (t[::2] for t in full)
        assert w.stride() == (2,)
        got = run_both(emu, "batch_norm_train", [x, w, b, rm, rv, 0.1, 1e-5, None, True], "wide",
                       dtype, stat_dtype=torch.float32)
        _check_no_nan(got, "batch_norm_train")
        run_both(emu, "batch_norm_eval", [x, w, b, rm, rv, 1e-5, None, False], "narrow", dtype)


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("shape", ["nchw_odd", "nhwc", "2d"])
def test_without_affine_or_running_stats(emu, shape, dt):
    """No weight, bias or running statistics (null ChannelParam and RunningStat pointers): the
    training forward, its backward, and the dual form with only its first module affine."""
    dtype = DTYPES[dt]
    grid = _grid_for(shape, dt)
    x = _input(shape, dtype)
    out, mean, invstd = run_both(emu, "batch_norm_train",
                                 [x, None, None, None, None, 0.1, 1e-5, None, True], grid,
                                 dtype)[:3]
    g = _input(shape, dtype, shift=0.0)
    run_both(emu, "batch_norm_backward", [g, x, None, out, mean, invstd, True, True, False],
             grid, dtype)
    args = _dual_args(shape, dtype, True, True)
    args[6:10] = [None, None, None, None]  # weight2, bias2, running_mean2, running_var2
    run_both(emu, "batch_norm_dual", args, grid, dtype)


def _close_with_nan(got, want, dtype, what):
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g.double(), w.double(), equal_nan=True,
                                   msg=lambda m: f"{what} output {i}: {m}",
                                   **{"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32
                                   else {"rtol": 2e-2, "atol": 2e-2})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "nhwc"])
def test_nan_and_inf_as_the_cpu_kernels(emu, fmt, dtype):
    """NaN and Inf at a channel's first value (the statistics shift), at a later plane's first
    value and inside a plane: the emulated forward and backward agree with the CPU kernels,
    NaN for NaN and Inf for Inf."""
    x = make_input((3, 5, 6, 7), torch.float32, "cpu")
    x[0, 0, 0, 0] = float("inf")
    x[1, 1, 0, 0] = float("-inf")
    x[2, 2, 3, 4] = float("nan")
    x[1, 3, 2, 2] = float("inf")
    x = x.to(dtype).contiguous(memory_format=fmt)
    w, b, rm, rv = make_params(5, torch.float32, "cpu")
    r = make_input((3, 5, 6, 7), dtype, "cpu", fmt, shift=0.0)
    r[0, 4, 1, 1] = float("nan")
    for grid in GRIDS:
        emu.configure(*GRIDS[grid], 0, 0)
        args = [x, w, b, rm, rv, 0.1, 1e-5, r, True]
        a1, a2 = _clone(args), _clone(args)
        got = _tensors(emu.batch_norm_train(*a1), a1)
        want = _tensors(torch.ops.fastnn.batch_norm_train(*a2), a2)
        _close_with_nan(got, want, dtype, "batch_norm_train")
        out, mean, invstd = want[:3]
        g = make_input(x.shape, dtype, "cpu", fmt, shift=0.0)
        # with grad_residual the masked gradient is written once; without, the dx pass reads
        # the ReLU mask the reduce pass wrote (a NaN output passes the gradient in both)
        for residual_grad in (True, False):
            args = [g, x, w, out, mean, invstd, True, True, residual_grad]
            _close_with_nan(emu.batch_norm_backward(*args),
                            torch.ops.fastnn.batch_norm_backward(*args), dtype,
                            "batch_norm_backward")
    emu.configure(*GRIDS["narrow"], 0, 0)


def _random_cases(n, seed=1234):
    rng = torch.Generator().manual_seed(seed)
    cases = []
    for _ in range(n):
        rank = int(torch.randint(2, 6, (1,), generator=rng))
        N = int(torch.randint(1, 9, (1,), generator=rng))
        C = int(torch.randint(1, 70, (1,), generator=rng))
        spatial = tuple(int(v) for v in torch.randint(1, 12, (rank - 2,), generator=rng))
        if N * (1 if not spatial else torch.tensor(spatial).prod().item()) < 2:
            N = 2
        shape = (N, C) + spatial
        fmt = torch.contiguous_format
        if rank in (4, 5) and int(torch.randint(0, 2, (1,), generator=rng)):
            fmt = torch.channels_last if rank == 4 else torch.channels_last_3d
        dt = list(DTYPES)[int(torch.randint(0, 4, (1,), generator=rng))]
        grid = list(GRIDS)[int(torch.randint(0, 2, (1,), generator=rng))]
        cases.append(pytest.param(shape, fmt, dt, grid,
                                  id=f"{'x'.join(map(str, shape))}-{str(fmt)[6:]}-{dt}-{grid}"))
    return cases


@pytest.mark.parametrize("shape, fmt, dt, grid", _random_cases(40))
def test_random_shapes(emu, shape, fmt, dt, grid):
    """Forward with residual and ReLU, then the training backward, on random shapes."""
    dtype = DTYPES[dt]
    x = make_input(shape, dtype, "cpu", fmt)
    w, b, rm, rv = make_params(shape[1], param_dtype(dtype), "cpu")
    r = make_input(shape, dtype, "cpu", fmt, shift=0.0)
    out, mean, invstd = run_both(emu, "batch_norm_train",
                                 [x, w, b, rm, rv, 0.1, 1e-5, r, True], grid, dtype)[:3]
    g = make_input(shape, dtype, "cpu", fmt, shift=0.0)
    run_both(emu, "batch_norm_backward", [g, x, w, out, mean, invstd, True, True, True], grid,
             dtype)


@pytest.mark.parametrize("regime", list(KERNEL_REGIMES))
def test_kernel_regimes(emu, regime):
    """A random shape of each of helpers.KERNEL_REGIMES (planes cut into several segments, many
    rows, several channel blocks, ...; at most 60,000 elements), with its dtype, residual and
    ReLU: the training forward and backward, and the dual form and its backward."""
    case = kernel_case(regime, 0, max_numel=60_000)
    shape, fmt, dtype = case["shape"], case["format"], case["dtype"]
    grid = _grid_for(regime)
    x = make_input(shape, dtype, "cpu", fmt, shift=case["shift"])
    w, b, rm, rv = make_params(shape[1], param_dtype(dtype), "cpu")
    r = make_input(shape, dtype, "cpu", fmt, shift=0.0) if case["residual"] else None
    relu = case["relu"]
    out, mean, invstd = run_both(emu, "batch_norm_train",
                                 [x, w, b, rm, rv, 0.1, 1e-5, r, relu], grid, dtype)[:3]
    g = make_input(shape, dtype, "cpu", fmt, shift=0.0)
    run_both(emu, "batch_norm_backward",
             [g, x, w, out if relu else None, mean, invstd, True, relu, relu and r is not None],
             grid, dtype)
    z = make_input(shape, dtype, "cpu", fmt, shift=-case["shift"] / 10)
    w2, b2, rm2, rv2 = make_params(shape[1], param_dtype(dtype), "cpu")
    args = [x, w, b, rm, rv, z, w2, b2, rm2, rv2, True, 0.1, 1e-5, 0.2, 1e-3, relu]
    out, m1, i1, m2, i2 = run_both(emu, "batch_norm_dual", args, grid, dtype)[:5]
    run_both(emu, "batch_norm_dual_backward",
             [g, x, w, z, w2, out if relu else None, m1, i1, m2, i2, True, relu], grid, dtype)


LARGE = os.environ.get("FASTNN_CUDA_EMU_LARGE") == "1"


@pytest.mark.skipif(not LARGE, reason="about 9 GB of memory and minutes of CPU: set "
                    "FASTNN_CUDA_EMU_LARGE=1")
@pytest.mark.parametrize("layout", ["planes", "rows"])
def test_over_2_31_elements(emu, layout):
    """A float16 training forward over 2^31 + 2^26 elements (int64 offsets everywhere): ones in
    the last 4096 elements of memory, twos in the 100 around element 2^31, zeros elsewhere, so
    every statistic and output value is known."""
    if layout == "planes":
        shape, fmt = (33, 2, 4096, 8192), torch.contiguous_format
    else:
        shape, fmt = (33, 64, 1024, 1024), torch.channels_last
    x = torch.empty(shape, dtype=torch.float16, memory_format=fmt).zero_()
    assert x.numel() > 2**31
    C, S = shape[1], shape[2] * shape[3]

    def memory_order(t):  # the elements in memory order, as a view
        v = t.permute(0, 2, 3, 1).reshape(-1) if fmt == torch.channels_last else t.view(-1)
        assert v.data_ptr() == t.data_ptr()
        return v

    def chan(i):  # the channel of memory positions i
        return i % C if fmt == torch.channels_last else (i // S) % C

    ones = torch.arange(x.numel() - 4096, x.numel())
    twos = torch.arange(2**31 - 50, 2**31 + 50)
    x_view = memory_order(x)
    x_view[ones] = 1.0
    x_view[twos] = 2.0
    M = x.numel() // C
    s1 = torch.zeros(C, dtype=torch.float64)
    s2 = torch.zeros(C, dtype=torch.float64)
    s1.index_add_(0, chan(ones), torch.ones(len(ones), dtype=torch.float64))
    s2.index_add_(0, chan(ones), torch.ones(len(ones), dtype=torch.float64))
    s1.index_add_(0, chan(twos), torch.full((len(twos),), 2.0, dtype=torch.float64))
    s2.index_add_(0, chan(twos), torch.full((len(twos),), 4.0, dtype=torch.float64))
    mean = s1 / M
    var = s2 / M - mean * mean
    w, b, rm, rv = make_params(C, torch.float32, "cpu")
    rm0, rv0 = rm.clone(), rv.clone()
    emu.configure(132, 2, 0, 0)
    out, smean, sinvstd = emu.batch_norm_train(x, w, b, rm, rv, 0.1, 1e-5, None, False)
    emu.configure(*GRIDS["narrow"], 0, 0)
    torch.testing.assert_close(smean.double(), mean, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(sinvstd.double(), (var + 1e-5).rsqrt(), rtol=1e-4, atol=0)
    torch.testing.assert_close(rm.double(), 0.9 * rm0.double() + 0.1 * mean, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(rv.double(), 0.9 * rv0.double() + 0.1 * var * M / (M - 1),
                               rtol=1e-4, atol=1e-9)
    out_view = memory_order(out)
    scale = (var + 1e-5).rsqrt() * w.double()
    zeros = torch.arange(x.numel() - 10000, x.numel() - 4096)
    for idx, value in ((ones, 1.0), (twos, 2.0), (zeros, 0.0)):
        c = chan(idx)
        expect = (value - mean[c]) * scale[c] + b.double()[c]
        torch.testing.assert_close(out_view[idx].double(), expect, rtol=2e-3, atol=2e-3)


def test_large_mean_statistics(emu):
    """Mean 1e4, std 1 in float32: the emulated statistics match float64 to float32 rounding."""
    for shape, fmt in (((8, 4, 30, 30), torch.contiguous_format),
                       ((8, 16, 12, 12), torch.channels_last)):
        x64 = torch.randn(shape, dtype=torch.float64) + 1e4
        x = x64.float().contiguous(memory_format=fmt)
        emu.configure(*GRIDS["wide"], 0, 0)
        mean, var = emu.batch_norm_stats(x)
        xd = x.double()
        dims = [d for d in range(x.dim()) if d != 1]
        torch.testing.assert_close(mean.double(), xd.mean(dims), rtol=2e-7, atol=0)
        torch.testing.assert_close(var.double(), xd.var(dims, unbiased=False), rtol=1e-5,
                                   atol=0)
    emu.configure(*GRIDS["narrow"], 0, 0)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "nhwc"])
def test_outlier_at_a_channels_first_element(emu, fmt):
    """A channel whose first element lies 2000 std from its mean: the float32 statistics still
    match float64 (to 1e-5 std for the mean), as the CPU kernels' do."""
    x64 = torch.randn(16, 8, 32, 32, dtype=torch.float64) * 1e-3
    x64[0, :, 0, 0] = 2.0
    x = x64.float().contiguous(memory_format=fmt)
    xd = x.double()
    want_mean, want_var = xd.mean((0, 2, 3)), xd.var((0, 2, 3), unbiased=False)
    for grid in GRIDS:
        emu.configure(*GRIDS[grid], 0, 0)
        for mean, var in (emu.batch_norm_stats(x), torch.ops.fastnn.batch_norm_stats(x)):
            err = ((mean.double() - want_mean) / want_var.sqrt()).abs().max().item()
            assert err < 1e-5, f"mean off by {err:.2e} std ({grid})"
            torch.testing.assert_close(var.double(), want_var, rtol=1e-5, atol=0)
    emu.configure(*GRIDS["narrow"], 0, 0)


def test_empty_inputs(emu):
    for shape in ((0, 3, 4, 4), (2, 3, 0, 4)):
        x = torch.randn(shape)
        w, b, rm, rv = make_params(3, torch.float32, "cpu")
        if shape[0] * shape[2] > 1 or shape[0] == 0:
            out = emu.batch_norm_eval(x, w, b, rm, rv, 1e-5, None, True)
            assert out.shape == x.shape
        mean, var = emu.batch_norm_stats(x)
        assert mean.shape == (3,) and var.shape == (3,)


# The emulation itself: what it must catch, so that the tests above can fail.

def test_emulation_shuffle_and_barrier(emu):
    x = torch.randn(4 * 256)
    torch.testing.assert_close(emu.check_block_sum(x, 256, True), x.view(4, 256).sum(1))
    for bx, by in ((32, 4), (8, 16), (2, 64)):
        x = torch.randn(bx * by)
        torch.testing.assert_close(emu.check_warp_sum(x, bx, by), x.view(-1, 32).sum(1))


def test_emulation_catches_a_missing_barrier(emu):
    x = torch.randn(2 * 128)
    sums = []
    for schedule in (0, 1):
        emu.configure(1, 1, schedule, 0)
        sums.append(emu.check_block_sum(x, 128, False))
    emu.configure(*GRIDS["narrow"], 0, 0)
    # thread 0 first: the other threads' shared memory is still the NaN fill
    assert torch.isnan(sums[0]).all()
    assert not torch.equal(sums[0], sums[1])


def test_emulation_catches_a_divergent_barrier(emu):
    with pytest.raises(RuntimeError, match="exited while others wait at __syncthreads"):
        emu.check_divergent_barrier(64)


@pytest.mark.parametrize("config", [(1, 1, 2048, 1), (1, 1, 0, 1), (0, 1, 32, 1),
                                    (1, 70000, 32, 1), (1, 1, 32, 33)])
def test_emulation_refuses_bad_launches(emu, config):
    with pytest.raises(RuntimeError, match="cuda_emu: invalid"):
        emu.check_launch_config(*config)


def test_emulation_checks_launch_bounds(emu):
    assert emu.check_launch_bounds(64).sum().item() == 64
    with pytest.raises(RuntimeError, match="__launch_bounds__\\(64\\)"):
        emu.check_launch_bounds(96)


def test_emulation_cooperative_launch(emu):
    """A cooperative launch runs its blocks together: what each block wrote before grid_sync()
    is there for the others after it, in any thread order; a thread or a block that leaves
    before the barrier, more blocks than can be resident and static shared memory are errors."""
    try:
        for schedule in (0, 1, 2):
            emu.configure(4, 1, schedule, 3)
            assert emu.check_grid_exchange(4, 64, 0).tolist() == [2.0, 3.0, 4.0, 1.0]
            with pytest.raises(RuntimeError, match="grid_sync"):
                emu.check_grid_exchange(4, 64, 1)
            with pytest.raises(RuntimeError, match="exited while the others wait at grid_sync"):
                emu.check_grid_exchange(4, 64, 2)
        with pytest.raises(RuntimeError, match="more than can be resident"):
            emu.check_grid_exchange(5, 64, 0)
        with pytest.raises(RuntimeError, match="static __shared__ array in a cooperative"):
            emu.check_static_shared_cooperative()
    finally:
        emu.configure(*GRIDS["narrow"], 0, 0)
