#!/usr/bin/env bash
# fastnn on a GPU machine: build against the installed torch, check the CUDA ops, run the CUDA
# tests, compute-sanitizer and the benchmark, all inside one time budget. Every step is bounded by
# `timeout`, a failing step does not stop the others, and each step's status goes to
# $OUT/summary.txt. A step that would start with too little of the budget left is skipped and
# says so; run it again by name.
#
#   scripts/gpu_check.sh                 # env build smoke targets kernels onchip models sanitize test bench
#   scripts/gpu_check.sh sanitize bench  # only these steps (any of the names below)
#
# Steps, most telling first: env, build (loads the fastnn._C that scripts/device_prebuild.sh left
# in .device-build/ when its stamp matches these sources, Python and torch; else compiles here),
# smoke (every CUDA op against fastnn.reference, determinism, stability, N=0, graph capture,
# >2^31 elements), targets (fastnn-bench --targets: the exact cases of the speed goals, met or
# not), kernels (benchmarks/kernel_times.py: each kernel's time and each call's span, fastnn's
# and nn.BatchNorm2d's, on the channels-last cases at 64 channels and their NCHW and 256-channel
# neighbours), onchip (the on-chip training forward and backward, FASTNN_CUDA_ONCHIP=1: the op
# check, memcheck and racecheck of them, targets and kernels again, to set against the
# three-kernel paths'), models (fastnn-bench --models, one run per model: training steps at
# batch 128 and inference at batch 256, channels_last, bfloat16 autocast: torchvision's model
# against fastnn's swapped in, converted and fastnn.models' own build (for inference also folded
# by fuse_for_inference), with each one's step memory; MODELS_ARGS=--model-compile adds
# torch.compile of torchvision's and of fastnn.models' (folded, for inference)),
# sanitize (memcheck and racecheck over small CUDA calls; SANITIZE_TOOLS adds
# initcheck, synccheck), test (the pytest cases marked cuda; TEST_MARK= runs the whole suite),
# bench (fastnn-bench), profile (ncu on the main shapes; not in the default set).
#
# Times on an H200 (2026-11-30, fastnn._C prebuilt): env and build 10 s, smoke 12 s, targets 9 s,
# test 65 s (16 cores, 8 xdist workers), memcheck 17 s and racecheck about 40 s (fastnn's
# kernels instrumented), bench --quick 54 s at --time-limit 40; initcheck instruments PyTorch's
# kernels too and had not reached the op check's first case after 70 s.
#
# Environment: OUT (default ./gpu-out), GPU_CHECK_BUDGET (seconds for the whole run, default 540),
# GPU_CHECK_BUNDLE (a .tgz path: all of OUT in one archive, kept current during the run),
# BENCH_ARGS (default "--quick"; empty runs the full set), KERNELS_ARGS (kernel_times.py's
# arguments), MODELS (default "resnet50 densenet121 googlenet"), MODELS_ARGS (more fastnn-bench
# arguments for them), PYTEST_ARGS (extra pytest arguments),
# TEST_MARK (default "cuda"), SANITIZE_TOOLS (default "memcheck racecheck"), SANITIZE_KERNELS
# (the kernels memcheck and racecheck instrument, by name substring; default "bn_", fastnn's;
# empty: all, PyTorch's too, many times slower; initcheck always instruments all), MAX_JOBS (build
# parallelism), and <STEP>_TIMEOUT in seconds, each capped by what is left of the budget
# (BUILD_TIMEOUT, SMOKE_TIMEOUT, TARGETS_TIMEOUT, KERNELS_TIMEOUT, MODELS_TIMEOUT (per model),
# TEST_TIMEOUT, SANITIZE_TIMEOUT, BENCH_TIMEOUT, PROFILE_TIMEOUT).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
OUT=${OUT:-./gpu-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SUMMARY="$OUT/summary.txt"
PY=${PYTHON:-$(command -v python || command -v python3 || echo python)}
export MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}
export PYTHONUNBUFFERED=1
# fastnn importable from the checkout even when it was built in place rather than installed.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-540}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-300}
SMOKE_TIMEOUT=${SMOKE_TIMEOUT:-150}
TARGETS_TIMEOUT=${TARGETS_TIMEOUT:-90}
KERNELS_TIMEOUT=${KERNELS_TIMEOUT:-90}
MODELS_TIMEOUT=${MODELS_TIMEOUT:-90}   # per model
TEST_TIMEOUT=${TEST_TIMEOUT:-240}
SANITIZE_TIMEOUT=${SANITIZE_TIMEOUT:-90}   # per sanitizer tool
BENCH_TIMEOUT=${BENCH_TIMEOUT:-150}
PROFILE_TIMEOUT=${PROFILE_TIMEOUT:-240}
BENCH_ARGS=${BENCH_ARGS---quick}
KERNELS_ARGS=${KERNELS_ARGS:-}
MODELS=${MODELS:-resnet50 densenet121 googlenet}
MODELS_ARGS=${MODELS_ARGS:-}
PYTEST_ARGS=${PYTEST_ARGS:-}
TEST_MARK=${TEST_MARK-cuda}
SANITIZE_TOOLS=${SANITIZE_TOOLS:-memcheck racecheck}
SANITIZE_KERNELS=${SANITIZE_KERNELS-bn_}

if [ "$#" -gt 0 ]; then
  STEPS=("$@")
else
  STEPS=(env build smoke targets kernels onchip models sanitize test bench)
fi

{
  echo "fastnn GPU check, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), host $(hostname)"
  echo "steps: ${STEPS[*]}"
} > "$SUMMARY"
FAILED=0

# run_step NAME TIMEOUT LOGFILE CMD...: runs CMD under `timeout`, output to LOGFILE and the
# console, and records the outcome in the summary.
run_step() {
  local name=$1 limit=$2 log=$3
  shift 3
  local start end rc left
  start=$(date +%s)
  # What is left of the budget, less a margin for the steps' own bookkeeping.
  left=$((BUDGET - (start - START) - 10))
  if [ "$left" -lt 20 ]; then
    printf '%-22s %-16s %5ss  %s\n' "$name" "SKIP(budget)" 0 "over GPU_CHECK_BUDGET=$BUDGET" >> "$SUMMARY"
    echo "==> [$name] skipped: ${left}s left of the ${BUDGET}s budget" | tee -a "$log"
    return 0
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "==> [$name] $*" | tee -a "$log"
  set +e
  timeout --signal="${STEP_SIGNAL:-TERM}" --kill-after=30 "$limit" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  set -e
  end=$(date +%s)
  local status=PASS
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    status="TIMEOUT(${limit}s)"
  elif [ "$rc" -ne 0 ]; then
    status="FAIL(rc=$rc)"
  fi
  [ "$status" = PASS ] || FAILED=1
  printf '%-22s %-16s %5ss  %s\n' "$name" "$status" "$((end - start))" "${log#$OUT/}" >> "$SUMMARY"
  return 0
}

note() { printf '%-22s %s\n' "$1" "$2" >> "$SUMMARY"; }

# ---------------------------------------------------------------------------------------------
# A standalone check of the CUDA ops against fastnn.reference, written into $OUT so that it runs
# the same way with and without compute-sanitizer (--small keeps the sanitizer runs short).
write_op_check() {
  cat > "$OUT/cuda_op_check.py" <<'PYEOF'
"""Every CUDA fastnn op against fastnn.reference on the same device: all dtypes, layouts, ranks,
vector and scalar paths, relu/residual, weight/bias or none, float32 or input-dtype parameters;
plus determinism, large-mean stability, N=0, non-contiguous input and CUDA-graph capture."""
import sys
import warnings

import torch

warnings.simplefilter("ignore", RuntimeWarning)
import fastnn  # noqa: E402
from fastnn import reference  # noqa: E402

SMALL = "--small" in sys.argv
# --device cpu runs the same checks on the CPU kernels: a check of this script itself.
dev = torch.device(sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cuda")
CUDA = dev.type == "cuda"
if not fastnn.ops.has_kernel(dev.type):
    sys.exit(f"fastnn._C has no {dev.type} kernels: {fastnn.backend_info()}")
ops = torch.ops.fastnn

TOL = {torch.float64: (1e-9, 1e-9), torch.float32: (1e-4, 1e-4),
       torch.float16: (1e-2, 1e-2), torch.bfloat16: (3e-2, 3e-2)}
GTOL = {torch.float64: (1e-8, 1e-8), torch.float32: (1e-3, 1e-3),
        torch.float16: (3e-2, 3e-2), torch.bfloat16: (8e-2, 8e-2)}
failures = []
checked = 0


def close(name, got, want, tol):
    global checked
    checked += 1
    if got.shape != want.shape or got.dtype != want.dtype:
        failures.append(f"{name}: shape/dtype {tuple(got.shape)} {got.dtype} vs "
                        f"{tuple(want.shape)} {want.dtype}")
        return
    rtol, atol = tol
    if not torch.allclose(got.double(), want.double(), rtol=rtol, atol=atol, equal_nan=True):
        err = (got.double() - want.double()).abs().max().item()
        failures.append(f"{name}: max abs err {err:.3g} (rtol {rtol}, atol {atol})")


def make(shape, fmt, dtype, misalign=False):
    numel = 1
    for s in shape:
        numel *= s
    if misalign:  # storage offset of one element: no 16-byte vectors possible
        base = torch.randn(numel + 1, device=dev, dtype=torch.float32).to(dtype)
        t = base[1:].view(shape)
    else:
        t = torch.randn(shape, device=dev, dtype=torch.float32).to(dtype)
    t = t * 2 + 0.5
    if fmt is not None:
        t = t.contiguous(memory_format=fmt)
    return t


def layout_of(t):
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return "cl"
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d) and not t.is_contiguous():
        return "cl3d"
    return "contig" if t.is_contiguous() else "strided"


SHAPES = [  # (shape, memory format)
    ((6, 5), None), ((7, 16), None), ((4, 5, 7), None), ((3, 8, 16), None),
    ((4, 5, 6, 7), None), ((4, 5, 6, 7), torch.channels_last),
    ((3, 16, 4, 8), None), ((3, 16, 4, 8), torch.channels_last),
    ((2, 1, 9, 9), None), ((5, 24, 1, 1), None), ((2, 24, 1, 1), torch.channels_last),
    ((2, 5, 3, 4, 5), None), ((2, 5, 3, 4, 5), torch.channels_last_3d),
    ((2, 8, 2, 4, 4), torch.channels_last_3d),
]
if SMALL:  # under the sanitizers: each layout and access path once
    SHAPES = [((7, 16), None), ((4, 5, 6, 7), None), ((4, 5, 6, 7), torch.channels_last),
              ((3, 16, 4, 8), None), ((3, 16, 4, 8), torch.channels_last), ((2, 1, 9, 9), None),
              ((2, 24, 1, 1), torch.channels_last), ((2, 8, 2, 4, 4), torch.channels_last_3d)]
else:
    SHAPES += [((8, 64, 56, 56), None), ((8, 64, 56, 56), torch.channels_last),
               ((16, 256, 7, 7), None), ((16, 256, 7, 7), torch.channels_last),
               ((2, 3, 1000, 1100), None), ((1, 40, 2100, 3), torch.channels_last),
               ((4096, 33), None), ((3, 2048, 14, 14), None),
               # more rows than the on-chip training forward keeps in shared memory
               ((96, 64, 56, 56), torch.channels_last)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
if SMALL:  # under the sanitizers: each vector width once (bfloat16 shares float16's)
    DTYPES = [torch.float32, torch.float16, torch.float64]


def params(C, dtype, kind):
    acc = reference.accumulate_dtype(dtype)
    pdt = dtype if kind == "own" else acc
    w = torch.rand(C, device=dev, dtype=torch.float32).add_(0.5).to(pdt)
    b = torch.randn(C, device=dev, dtype=torch.float32).to(pdt)
    rm = torch.randn(C, device=dev, dtype=torch.float32).to(pdt)
    rv = torch.rand(C, device=dev, dtype=torch.float32).add_(0.5).to(pdt)
    return w, b, rm, rv


def check_case(shape, fmt, dtype, relu, res, affine, pkind, misalign=False):
    name = f"{tuple(shape)} {layout_of(make(shape, fmt, torch.float32))} {dtype} relu={relu} " \
           f"res={res} affine={affine} params={pkind}{' misaligned' if misalign else ''}"
    print("case", name, flush=True)  # progress, for a run stopped at its time limit
    x = make(shape, fmt, dtype, misalign)
    C = shape[1]
    w, b, rm, rv = params(C, dtype, pkind)
    if not affine:
        w = b = None
    r = make(shape, fmt, dtype) if res else None
    tol, gtol = TOL[dtype], GTOL[dtype]
    # training forward
    rm1, rv1, rm2, rv2 = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    out, mean, invstd = ops.batch_norm_train(x, w, b, rm1, rv1, 0.1, 1e-5, r, relu)
    eout, emean, einvstd = reference.batch_norm_train(x, w, b, rm2, rv2, 0.1, 1e-5, r, relu)
    close(name + " train out", out, eout, tol)
    close(name + " save_mean", mean, emean, TOL[mean.dtype])
    close(name + " save_invstd", invstd, einvstd, (1e-3, 1e-3) if dtype != torch.float64 else TOL[dtype])
    close(name + " running_mean", rm1, rm2, tol)
    close(name + " running_var", rv1, rv2, tol)
    if layout_of(out) != layout_of(x) and layout_of(x) != "strided":
        failures.append(f"{name}: output layout {layout_of(out)} for input {layout_of(x)}")
    # determinism
    out_b, mean_b, invstd_b = ops.batch_norm_train(x, w, b, None, None, 0.1, 1e-5, r, relu)
    if not (torch.equal(out, out_b) and torch.equal(mean, mean_b) and torch.equal(invstd, invstd_b)):
        failures.append(f"{name}: training forward not bitwise reproducible")
    # eval forward
    eo = ops.batch_norm_eval(x, w, b, rm, rv, 1e-5, r, relu)
    ee = reference.batch_norm_eval(x, w, b, rm, rv, 1e-5, r, relu)
    close(name + " eval out", eo, ee, tol)
    # backward, training and eval, with and without the residual gradient
    go = make(shape, fmt, dtype)
    for training in (True, False):
        if training:
            m_, i_, o_ = emean, einvstd, eout
        else:
            acc = reference.accumulate_dtype(dtype)
            m_, i_, o_ = rm.to(acc), torch.rsqrt(rv.to(acc) + 1e-5), ee
        for rg in ((False, True) if res else (False,)):
            got = ops.batch_norm_backward(go, x, w, o_ if relu else None, m_, i_, training, relu, rg)
            want = reference.batch_norm_backward(go, x, w, o_ if relu else None, m_, i_, training,
                                                 relu, rg)
            tag = f"{name} backward training={training} residual_grad={rg}"
            close(tag + " grad_input", got[0], want[0], gtol)
            # sums over many elements: compare relative to their scale
            scale = max(1.0, want[1].abs().max().item(), want[2].abs().max().item())
            close(tag + " grad_weight", got[1] / scale, want[1] / scale, gtol)
            close(tag + " grad_bias", got[2] / scale, want[2] / scale, gtol)
            close(tag + " grad_residual", got[3], want[3], (0, 0))
            again = ops.batch_norm_backward(go, x, w, o_ if relu else None, m_, i_, training, relu, rg)
            if not all(torch.equal(a, b_) for a, b_ in zip(got, again)):
                failures.append(f"{tag}: backward not bitwise reproducible")
    if relu:
        check_masked(name, x, w, b, r, go, out, mean, invstd)
    check_parts(name, x, w, b, rm, rv, r, go, relu, eout, emean, einvstd)
    check_dual(name, x, w, b, rm, rv, go, relu, pkind)
    check_cat(name, x, w, b, rm, rv, relu)


def check_masked(name, x, w, b, r, go, out, mean, invstd):
    """batch_norm_train_masked (what autograd runs with relu): batch_norm_train's results and a
    ReLU mask of a byte per 16-byte vector (CUDA); the backward given that mask against the
    backward reading the output, with and without the residual gradient."""
    dtype = x.dtype
    tol, gtol = TOL[dtype], GTOL[dtype]
    mo, mm, mi, mask = ops.batch_norm_train_masked(x, w, b, None, None, 0.1, 1e-5, r, True)
    close(name + " masked train out", mo, out, tol)
    close(name + " masked save_mean", mm, mean, TOL[mean.dtype])
    if mask.dtype != torch.uint8 or mask.numel() != fastnn.ops.relu_mask_numel(x, True):
        failures.append(f"{name}: ReLU mask {mask.dtype} of {mask.numel()} bytes")
        return
    for rg in ((False, True) if r is not None else (False,)):
        tag = f"{name} backward with the forward's mask, residual_grad={rg}"
        want = ops.batch_norm_backward(go, x, w, out, mean, invstd, True, True, rg)
        got = ops.batch_norm_backward(go, x, w, out, mean, invstd, True, True, rg, mask)
        close(tag + " grad_input", got[0], want[0], gtol)
        scale = max(1.0, want[1].abs().max().item(), want[2].abs().max().item())
        close(tag + " grad_weight", got[1] / scale, want[1] / scale, gtol)
        close(tag + " grad_bias", got[2] / scale, want[2] / scale, gtol)
        close(tag + " grad_residual", got[3], want[3], (0, 0))
        again = ops.batch_norm_backward(go, x, w, out, mean, invstd, True, True, rg, mask)
        if not all(torch.equal(a, b_) for a, b_ in zip(got, again)):
            failures.append(f"{tag}: not bitwise reproducible")


def check_cat(name, x, w, b, rm, rv, relu):
    """batch_norm_cat_with_stats of x split along its channels against
    batch_norm_train_with_stats of x itself: the same normalize, so bitwise equal. Cuts fall on
    multiples of 8 channels where C allows (the vector path of channels-last inputs); an empty
    piece is added only to channels-first inputs (it makes torch.cat's result channels-first)."""
    C = x.shape[1]
    if C % 8 == 0:
        cuts = sorted({0, C // 3 // 8 * 8, (3 * C // 4) // 8 * 8, C})
    else:
        cuts = sorted({0, C // 3, C - C // 4, C})
    pieces = [x[:, a:b_] for a, b_ in zip(cuts[:-1], cuts[1:])]
    fmt = torch.channels_last if layout_of(x) == "cl" else (
        torch.channels_last_3d if layout_of(x) == "cl3d" else torch.contiguous_format)
    if C >= 2 and fmt == torch.contiguous_format:
        pieces.insert(1, x[:, :0])
    pieces = [t.contiguous(memory_format=fmt) for t in pieces]
    mean, var = reference.batch_norm_stats(x)
    rm1, rv1, rm2, rv2 = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    got = ops.batch_norm_cat_with_stats(pieces, mean, var, w, b, rm1, rv1, 0.1, 1e-5, relu)
    want = ops.batch_norm_train_with_stats(torch.cat(pieces, 1), mean, var, w, b, rm2, rv2, 0.1,
                                           1e-5, None, relu)
    tag = f"{name} cat_with_stats ({len(pieces)} inputs)"
    for what, g_, w_ in (("out", got[0], want[0]), ("save_mean", got[1], want[1]),
                         ("save_invstd", got[2], want[2]), ("running_mean", rm1, rm2),
                         ("running_var", rv1, rv2)):
        close(f"{tag} {what}", g_, w_, (0, 0))
    if layout_of(got[0]) != layout_of(want[0]):
        failures.append(f"{tag}: output layout {layout_of(got[0])}, concatenation's "
                        f"{layout_of(want[0])}")


def check_dual(name, x, w, b, rm, rv, go, relu, pkind):
    """relu(bn(x) + bn2(z)) and its backward, training and eval, against the reference."""
    dtype = x.dtype
    tol, gtol = TOL[dtype], GTOL[dtype]
    acc = reference.accumulate_dtype(dtype)
    stat_tol = TOL[acc] if dtype in (torch.float32, torch.float64) else (1e-4, 1e-4)
    z = make(tuple(x.shape), None, dtype).contiguous(memory_format=torch.channels_last) \
        if layout_of(x) == "cl" else make(tuple(x.shape), None, dtype)
    w2, b2, rm2, rv2 = params(x.shape[1], dtype, pkind)
    if w is None:
        w2 = b2 = None
    for training in (True, False):
        tag = f"{name} dual training={training}"
        got_stats = [t.clone() for t in (rm, rv, rm2, rv2)]
        want_stats = [t.clone() for t in (rm, rv, rm2, rv2)]
        got = ops.batch_norm_dual(x, w, b, got_stats[0], got_stats[1], z, w2, b2, got_stats[2],
                                  got_stats[3], training, 0.1, 1e-5, 0.2, 1e-3, relu)
        want = reference.batch_norm_dual(x, w, b, want_stats[0], want_stats[1], z, w2, b2,
                                         want_stats[2], want_stats[3], training, 0.1, 1e-5, 0.2,
                                         1e-3, relu)
        close(tag + " out", got[0], want[0], tol)
        for k, what in enumerate(("mean", "invstd", "mean2", "invstd2")):
            close(f"{tag} {what}", got[k + 1], want[k + 1], stat_tol)
        for k, what in enumerate(("running_mean", "running_var", "running_mean2", "running_var2")):
            close(f"{tag} {what}", got_stats[k], want_stats[k], tol)
        o_ = want[0] if relu else None
        args = (go, x, w, z, w2, o_, want[1], want[2], want[3], want[4], training, relu)
        gg = ops.batch_norm_dual_backward(*args)
        gw = reference.batch_norm_dual_backward(*args)
        scale = max(1.0, *(gw[k].abs().max().item() for k in (1, 2, 4, 5)))
        for k, what in enumerate(("grad_input", "grad_weight", "grad_bias", "grad_input2",
                                  "grad_weight2", "grad_bias2")):
            if k in (0, 3):
                close(f"{tag} backward {what}", gg[k], gw[k], gtol)
            else:
                close(f"{tag} backward {what}", gg[k] / scale, gw[k] / scale, gtol)
        again = ops.batch_norm_dual_backward(*args)
        if not all(torch.equal(a, b_) for a, b_ in zip(gg, again)):
            failures.append(f"{tag}: dual backward not bitwise reproducible")
        if training and relu:  # the masked form and the backward given its mask
            masked = ops.batch_norm_dual_masked(
                x, w, b, None, None, z, w2, b2, None, None, True, 0.1, 1e-5, 0.2, 1e-3, True)
            close(tag + " masked out", masked[0], got[0], tol)
            gm = ops.batch_norm_dual_backward(*args[:5], got[0], *masked[1:5], True, True,
                                              masked[5])
            gref = ops.batch_norm_dual_backward(*args[:5], got[0], *masked[1:5], True, True)
            for k in (0, 3):
                close(f"{tag} backward with the forward's mask {k}", gm[k], gref[k], gtol)


def check_parts(name, x, w, b, rm, rv, r, go, relu, eout, emean, einvstd):
    """The training forward and backward in parts (SyncBatchNorm, DenseNet's shared statistics)
    against the reference and against the whole ops."""
    dtype = x.dtype
    tol, gtol = TOL[dtype], GTOL[dtype]
    acc = reference.accumulate_dtype(dtype)
    stat_tol = TOL[acc] if dtype in (torch.float32, torch.float64) else (1e-4, 1e-4)
    mean, var = ops.batch_norm_stats(x)
    emean2, evar = reference.batch_norm_stats(x)
    close(name + " stats mean", mean, emean2, stat_tol)
    close(name + " stats var", var, evar, stat_tol)
    again = ops.batch_norm_stats(x)
    if not (torch.equal(mean, again[0]) and torch.equal(var, again[1])):
        failures.append(f"{name}: batch_norm_stats not bitwise reproducible")
    # with the reference's statistics: the same output and running statistics as the whole op
    rm1, rv1, rm2, rv2 = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    out, sm, si = ops.batch_norm_train_with_stats(x, emean2, evar, w, b, rm1, rv1, 0.1, 1e-5, r,
                                                  relu)
    reference.batch_norm_train(x, w, b, rm2, rv2, 0.1, 1e-5, r, relu)
    close(name + " with_stats out", out, eout, tol)
    close(name + " with_stats save_mean", sm, emean2, (0, 0))
    close(name + " with_stats save_invstd", si, torch.rsqrt(evar + 1e-5), stat_tol)
    close(name + " with_stats running_mean", rm1, rm2, tol)
    close(name + " with_stats running_var", rv1, rv2, tol)
    # backward in parts
    o_ = eout if relu else None
    for rg in (False, True):
        got = ops.batch_norm_backward_reduce(go, x, o_, emean, einvstd, relu, rg)
        want = reference.batch_norm_backward_reduce(go, x, o_, emean, einvstd, relu, rg)
        scale = max(1.0, want[0].abs().max().item(), want[1].abs().max().item())
        tag = f"{name} backward_reduce residual_grad={rg}"
        close(tag + " sum_dy", got[0] / scale, want[0] / scale, gtol)
        close(tag + " sum_dy_xhat", got[1] / scale, want[1] / scale, gtol)
        close(tag + " grad_residual", got[2], want[2], (0, 0))
    n = x.numel() // x.shape[1]
    mean_dy, mean_dy_xhat = want[0] / n, want[1] / n
    gi = ops.batch_norm_backward_elemt(go, x, w, o_, emean, einvstd, mean_dy, mean_dy_xhat, relu)
    egi = reference.batch_norm_backward_elemt(go, x, w, o_, emean, einvstd, mean_dy, mean_dy_xhat,
                                              relu)
    close(name + " backward_elemt", gi, egi, gtol)
    whole = ops.batch_norm_backward(go, x, w, o_, emean, einvstd, True, relu, False)[0]
    close(name + " backward_elemt vs backward", gi, whole, gtol)


def check_large():
    """Tensors of more than 2^31 elements (64-bit indexing), planes and rows layouts."""
    free, _ = torch.cuda.mem_get_info()
    if free < 40 * 2**30:
        print(f"large cases skipped: {free / 2**30:.1f} GiB free")
        return
    for shape in ((1, 2, 2**30 + 17), (2**27 + 3, 16)):
        x = torch.randn(shape, device=dev, dtype=torch.float16)
        dims = [0] + list(range(2, x.dim()))
        out, m, i = ops.batch_norm_train(x, None, None, None, None, 0.1, 1e-5, None, False)
        var, mean = torch.var_mean(x.float(), dim=dims, correction=0)
        close(f"large {shape}: mean", m, mean, (1e-4, 1e-4))
        close(f"large {shape}: invstd", i, torch.rsqrt(var + 1e-5), (1e-4, 1e-4))
        bshape = (1, -1) + (1,) * (x.dim() - 2)
        tail = (slice(None),) * (x.dim() - 1) + (slice(-100000, None),)
        if x.dim() == 2:
            tail = (slice(-100000, None), slice(None))
        want = ((x[tail].float() - mean.view(bshape)) * torch.rsqrt(var + 1e-5).view(bshape)).half()
        close(f"large {shape}: output tail", out[tail], want, TOL[torch.float16])
        del out
        gi, gw, gb, _ = ops.batch_norm_backward(x, x, None, None, m, i, True, False, False)
        sb = x.float().sum(dims)
        close(f"large {shape}: grad_bias", gb / sb.abs().max(), sb / sb.abs().max(), (1e-3, 1e-3))
        del gi, gw, gb, x
        torch.cuda.empty_cache()


def main():
    torch.manual_seed(0)
    for shape, fmt in SHAPES:
        for dtype in DTYPES:
            combos = [(False, False, True, "acc"), (True, True, True, "own"),
                      (True, False, False, "acc"), (False, True, True, "acc")]
            if SMALL:
                combos = combos[:2]
            for relu, res, affine, pkind in combos:
                if pkind == "own" and dtype in (torch.float32, torch.float64):
                    pkind = "acc"
                check_case(shape, fmt, dtype, relu, res, affine, pkind)
    for dtype in DTYPES:  # scalar path forced by a misaligned input
        check_case((3, 16, 4, 8), torch.channels_last, dtype, True, True, True, "acc", misalign=True)
        check_case((3, 16, 4, 8), None, dtype, True, True, True, "acc", misalign=True)

    # batch_norm_cat_with_stats: more inputs than one launch takes (the concatenated copy);
    # pieces whose channel counts keep the output's vectors off their boundaries (scalar path);
    # 8/16/8-channel pieces of 7x7 planes (vectors with a scalar head and tail per plane) in
    # both layouts; exactly the inputs one launch takes.
    cat_cases = [((1,) * 70, torch.float16, None), ((3,) * 5, torch.float16, torch.channels_last),
                 ((5,) * 4, torch.float16, None), ((1,) * 64, torch.float32, None)]
    for dtype in (torch.float16, torch.float32):
        for fmt in (None, torch.channels_last):
            cat_cases.append(((8, 16, 8), dtype, fmt))
    for widths, dtype, fmt in cat_cases:
        pieces = [make((4, wd, 7, 7), fmt, dtype) for wd in widths]
        xc = torch.cat(pieces, 1)
        mean, var = reference.batch_norm_stats(xc)
        C = xc.shape[1]
        rm1, rv1 = torch.zeros(C, device=dev), torch.ones(C, device=dev)
        rm2, rv2 = rm1.clone(), rv1.clone()
        got = ops.batch_norm_cat_with_stats(pieces, mean, var, None, None, rm1, rv1, 0.1, 1e-5,
                                            True)
        want = ops.batch_norm_train_with_stats(xc, mean, var, None, None, rm2, rv2, 0.1, 1e-5,
                                               None, True)
        tag = f"cat_with_stats {len(widths)} inputs of {set(widths)} channels {dtype} {fmt}"
        close(tag + " out", got[0], want[0], (0, 0))
        close(tag + " running_mean", rm1, rm2, (0, 0))
        close(tag + " running_var", rv1, rv2, (0, 0))
        if layout_of(got[0]) != layout_of(xc):
            failures.append(f"{tag}: output layout {layout_of(got[0])}, torch.cat's "
                            f"{layout_of(xc)}")

    # strided (non-contiguous) input and grad_output in another layout than the input
    x = make((4, 6, 10, 10), None, torch.float32)[:, :, ::2, 1::2]
    out, m, i = ops.batch_norm_train(x, None, None, None, None, 0.1, 1e-5, None, False)
    eo, em, ei = reference.batch_norm_train(x, None, None, None, None, 0.1, 1e-5, None, False)
    close("strided input", out, eo, TOL[torch.float32])
    xc = make((4, 16, 6, 6), torch.channels_last, torch.float32)
    go = make((4, 16, 6, 6), None, torch.float32)
    _, m, i = reference.batch_norm_train(xc, None, None, None, None, 0.1, 1e-5, None, False)
    got = ops.batch_norm_backward(go, xc, None, None, m, i, True, False, False)
    want = reference.batch_norm_backward(go, xc, None, None, m, i, True, False, False)
    close("grad_output in NCHW for channels_last input", got[0], want[0], GTOL[torch.float32])
    if not got[0].is_contiguous(memory_format=torch.channels_last):
        failures.append("grad_input of a channels_last input is not channels_last")

    # N = 0: empty output, zero statistics, running statistics untouched
    for fmt in (None, torch.channels_last):
        x = torch.empty((0, 8, 4, 4), device=dev).contiguous(memory_format=fmt or torch.contiguous_format)
        rm, rv = torch.randn(8, device=dev), torch.rand(8, device=dev)
        rm0, rv0 = rm.clone(), rv.clone()
        out, m, i = ops.batch_norm_train(x, None, None, rm, rv, 0.1, 1e-5, None, True)
        if out.shape != x.shape or not torch.equal(rm, rm0) or not torch.equal(rv, rv0):
            failures.append("N=0 training changed the running statistics or the shape")
        if m.abs().sum().item() != 0 or i.abs().sum().item() != 0:
            failures.append("N=0 training: statistics not zero")
        go = torch.empty_like(x)
        g = ops.batch_norm_backward(go, x, None, None, m, i, True, False, True)
        if g[0].shape != x.shape or g[1].abs().sum().item() != 0 or g[3].shape != x.shape:
            failures.append("N=0 backward: wrong result")
        if ops.batch_norm_eval(x, None, None, rm, rv, 1e-5, None, False).shape != x.shape:
            failures.append("N=0 eval: wrong shape")

    # large mean, unit std: float32 statistics still match float64
    shape = (8, 4, 32, 32) if SMALL else (32, 16, 64, 64)
    for fmt in (None, torch.channels_last):
        x = (torch.randn(shape, device=dev, dtype=torch.float64) + 1e4).float()
        x = x.contiguous(memory_format=fmt or torch.contiguous_format)
        out, m, i = ops.batch_norm_train(x, None, None, None, None, 0.1, 1e-5, None, False)
        x64 = x.double()
        var, mean = torch.var_mean(x64, dim=[0, 2, 3], correction=0)
        close(f"large mean {fmt}: mean", m.double(), mean, (0, 2e-3))
        close(f"large mean {fmt}: invstd", i.double(), torch.rsqrt(var + 1e-5), (1e-4, 0))
        y64 = (x64 - mean.view(1, -1, 1, 1)) * torch.rsqrt(var + 1e-5).view(1, -1, 1, 1)
        close(f"large mean {fmt}: output", out.double(), y64, (0, 3e-3))

    # CUDA-graph capture and replay of a training forward + backward
    if CUDA and not SMALL:
        x = make((8, 32, 16, 16), torch.channels_last, torch.float16)
        w, b, rm, rv = params(32, torch.float16, "acc")
        go = make((8, 32, 16, 16), torch.channels_last, torch.float16)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):  # warm-up outside the capture
                o, m, i = ops.batch_norm_train(x, w, b, rm, rv, 0.1, 1e-5, None, True)
                ops.batch_norm_backward(go, x, w, o, m, i, True, True, False)
        torch.cuda.current_stream().wait_stream(s)
        rm.copy_(torch.zeros_like(rm))
        rv.copy_(torch.ones_like(rv))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            o, m, i = ops.batch_norm_train(x, w, b, rm, rv, 0.1, 1e-5, None, True)
            gi, gw, gb, _ = ops.batch_norm_backward(go, x, w, o, m, i, True, True, False)
        rm.copy_(torch.zeros_like(rm))
        rv.copy_(torch.ones_like(rv))
        graph.replay()
        torch.cuda.synchronize()
        rm2, rv2 = torch.zeros_like(rm), torch.ones_like(rv)
        eo, em, ei = reference.batch_norm_train(x, w, b, rm2, rv2, 0.1, 1e-5, None, True)
        egi, egw, egb, _ = reference.batch_norm_backward(go, x, w, eo, em, ei, True, True, False)
        close("graph replay out", o, eo, TOL[torch.float16])
        close("graph replay running_mean", rm, rm2, TOL[torch.float32])
        close("graph replay running_var", rv, rv2, TOL[torch.float32])
        close("graph replay grad_input", gi, egi, GTOL[torch.float16])

    if CUDA and not SMALL:
        check_large()

    if CUDA:
        torch.cuda.synchronize()
    print(f"cuda op check: {checked} comparisons, {len(failures)} failures")
    for f in failures[:200]:
        print("FAIL", f)
    sys.exit(1 if failures else 0)


main()
PYEOF
}

# ---------------------------------------------------------------------------------------------
step_env() {
  local log="$OUT/env.log"
  {
    echo "date: $(date -u)"
    echo "git: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo n/a) $(git -C "$ROOT" status --short 2>/dev/null | wc -l) changed files"
    nvidia-smi || true
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv || true
    nvcc --version || true
    command -v compute-sanitizer || echo "no compute-sanitizer"
    command -v ncu || echo "no ncu"
    "$PY" -c "import sys, torch; print('python', sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version()); print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else None, torch.cuda.get_device_capability() if torch.cuda.is_available() else '')"
    "$PY" -m pip list 2>/dev/null | grep -i -E "^(torch|pytest|hypothesis|numpy|ninja|setuptools|matplotlib|torchvision) " || true
  } > "$log" 2>&1
  note env "$(grep -m1 '^device' "$log" || echo 'no device line')"
  note torch "$(grep -m1 '^torch' "$log" || echo '?')"
}

# stamp_field FILE KEY: the value of "KEY: value" in a stamp file.
stamp_field() { sed -n "s/^$2: //p" "$1" | head -1; }

# use_prebuilt LOG: loads fastnn._C from .device-build/ (scripts/device_prebuild.sh, run on another
# machine and carried here) when its stamp says it was built from these sources for this Python
# and torch, and it then has CUDA kernels; else leaves fastnn/ as it was and returns 1.
use_prebuilt() {
  local log=$1 dir="$ROOT/.device-build" key want have
  [ -f "$dir/STAMP" ] || return 1
  for key in sources torch ext_suffix; do
    want=$(stamp_field "$dir/STAMP" "$key")
    case $key in
      sources) have=$(bash "$ROOT/scripts/source_hash.sh") ;;
      torch) have=$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null) ;;
      ext_suffix)
        have=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))') ;;
    esac
    if [ "$want" != "$have" ]; then
      echo "prebuilt fastnn._C not used: $key is '$have' here, '$want' in .device-build/STAMP" |
        tee -a "$log"
      return 1
    fi
  done
  local copied=()
  for f in "$dir"/_C*.so "$dir/_build_info.py"; do
    cp "$f" "$ROOT/fastnn/" && copied+=("$ROOT/fastnn/$(basename "$f")")
  done
  if "$PY" -c "import fastnn, sys; print(fastnn.backend_info())
sys.exit(0 if fastnn.ops.has_kernel('cuda') else 1)" >> "$log" 2>&1; then
    echo "prebuilt fastnn._C loaded: $(tr '\n' ' ' < "$dir/STAMP")" | tee -a "$log"
    return 0
  fi
  echo "prebuilt fastnn._C has no CUDA kernels here (see above); compiling" | tee -a "$log"
  rm -f ${copied[@]+"${copied[@]}"}
  return 1
}

step_build() {
  local log="$OUT/build.log" start
  start=$(date +%s)
  if use_prebuilt "$log"; then
    printf '%-22s %-16s %5ss  %s\n' build "PASS(prebuilt)" "$(($(date +%s) - start))" \
      "${log#$OUT/}" >> "$SUMMARY"
  else
    # --no-deps: the machine has no network; everything the package needs is installed already.
    run_step build "$BUILD_TIMEOUT" "$log" env FASTNN_CUDA=1 "$PY" -m pip install -v --no-build-isolation --no-deps -e .
    if ! "$PY" -c "import fastnn, sys; sys.exit(0 if fastnn.ops.has_kernel('cuda') else 1)" >> "$log" 2>&1; then
      echo "pip install did not give CUDA kernels; trying build_ext --inplace" | tee -a "$log"
      run_step build_ext_inplace "$BUILD_TIMEOUT" "$log" env FASTNN_CUDA=1 "$PY" setup.py build_ext --inplace
    fi
    "$PY" -c "import fastnn; print(fastnn.backend_info())" >> "$log" 2>&1 || true
  fi
  note backend "$("$PY" -c "import fastnn; print(fastnn.backend_info())" 2>&1 | tail -1)"
}

# step_smoke, step_sanitize, step_targets and step_kernels take an optional suffix for their step
# and log names (step_onchip runs them again as *_onchip).
step_smoke() {
  local sfx=${1:-}
  write_op_check
  run_step "smoke$sfx" "$SMOKE_TIMEOUT" "$OUT/smoke$sfx.log" "$PY" "$OUT/cuda_op_check.py"
  note "smoke${sfx}_result" "$(grep -m1 'cuda op check' "$OUT/smoke$sfx.log" || echo 'no result line')"
}

step_test() {
  local args=(tests -q -rfEs --junitxml="$OUT/pytest.xml")
  [ -n "$TEST_MARK" ] && args+=(-m "$TEST_MARK")
  # pytest-xdist, where installed, spreads the cases over the machine's cores.
  "$PY" -c "import xdist" > /dev/null 2>&1 && args+=(-n "$(( $(nproc) < 8 ? $(nproc) : 8 ))")
  # At the time limit pytest gets SIGINT, which it takes as a keyboard interrupt: it stops and
  # still reports the failures so far and writes the junit file.
  # shellcheck disable=SC2086
  STEP_SIGNAL=INT run_step pytest "$TEST_TIMEOUT" "$OUT/pytest.log" "$PY" -m pytest "${args[@]}" $PYTEST_ARGS
  note pytest_result "$(grep -E '^=* ?[0-9]+ (passed|failed|error|skipped|deselected)|no tests ran' "$OUT/pytest.log" | tail -1 || echo 'no result line')"
}

step_sanitize() {
  local sfx=${1:-}
  if ! command -v compute-sanitizer > /dev/null; then
    note "sanitize$sfx" "SKIP (no compute-sanitizer)"
    return 0
  fi
  write_op_check
  local tool
  # memcheck and racecheck instrument fastnn's kernels only (PyTorch's run as they are; with
  # all of them instrumented the op check does not get past PyTorch's start in minutes), where
  # this compute-sanitizer takes the filter: a small CUDA program under it tells. initcheck
  # instruments every kernel: it knows memory as written only through the kernels it
  # instruments, so with PyTorch's left out their outputs, fastnn's inputs, read as
  # uninitialized.
  local filter=()
  if [ -n "$SANITIZE_KERNELS" ]; then
    if compute-sanitizer --kernel-name "kns=$SANITIZE_KERNELS" --error-exitcode 99 \
        "$PY" -c "import torch; torch.ones(1, device='cuda').sum().item()" > /dev/null 2>&1; then
      filter=(--kernel-name "kns=$SANITIZE_KERNELS")
    else
      note "sanitize$sfx" "--kernel-name not taken: every kernel instrumented"
    fi
  fi
  for tool in $SANITIZE_TOOLS; do
    local extra=()
    [ "$tool" = memcheck ] && extra=(--leak-check no)
    [ "$tool" != initcheck ] && extra+=(${filter[@]+"${filter[@]}"})
    # The caching allocator would hide out-of-bounds accesses inside its blocks.
    run_step "sanitize${sfx}_$tool" "$SANITIZE_TIMEOUT" "$OUT/sanitize${sfx}_$tool.log" \
      env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" ${extra[@]+"${extra[@]}"} \
      --error-exitcode 99 --print-limit 50 "$PY" "$OUT/cuda_op_check.py" --small
    note "  $tool errors" "$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitize${sfx}_$tool.log" | tail -1 || echo '?')"
  done
}

# run_bench NAME TIMEOUT ARGS...: fastnn-bench (as installed, else from the checkout) as step NAME,
# its output in $OUT/NAME.log.
run_bench() {
  local name=$1 limit=$2 cmd
  shift 2
  if command -v fastnn-bench > /dev/null; then
    cmd=(fastnn-bench)
  elif "$PY" -c "import fastnn.bench" > /dev/null 2>&1; then
    cmd=("$PY" -m fastnn.bench)
  else
    note "$name" "SKIP (no fastnn-bench)"
    return 0
  fi
  run_step "$name" "$limit" "$OUT/$name.log" "${cmd[@]}" "$@"
}

step_targets() {
  local sfx=${1:-}
  run_bench "targets$sfx" "$TARGETS_TIMEOUT" --targets --no-ops --no-progress \
    --out "$OUT/targets$sfx"
  grep -E 'goal .* (met|NOT met)\)' "$OUT/targets$sfx.log" 2> /dev/null | sed 's/^ */  /' \
    >> "$SUMMARY" || true
}

step_kernels() {
  local sfx=${1:-}
  # shellcheck disable=SC2086
  run_step "kernels$sfx" "$KERNELS_TIMEOUT" "$OUT/kernels$sfx.log" "$PY" \
    "$ROOT/benchmarks/kernel_times.py" --out "$OUT/kernels$sfx.txt" $KERNELS_ARGS
  grep -E 'span of nn.BatchNorm2d' "$OUT/kernels$sfx.txt" 2> /dev/null | sed 's/^ */  /' \
    >> "$SUMMARY" || true
}

# The same checks and timings with the on-chip training forward and backward
# (FASTNN_CUDA_ONCHIP=1; see plan_onchip in csrc/cuda/batch_norm_launch.cuh): the op check, the
# targets, the kernel times and memcheck/racecheck (the on-chip kernels instrumented), each step
# and log with an _onchip suffix.
step_onchip() {
  export FASTNN_CUDA_ONCHIP=1
  step_smoke _onchip
  step_targets _onchip
  step_kernels _onchip
  SANITIZE_TOOLS="memcheck racecheck" SANITIZE_KERNELS=onchip_rows_kernel step_sanitize _onchip
  unset FASTNN_CUDA_ONCHIP
}

# One fastnn-bench per model, so that one model's time limit or failure leaves the others' numbers;
# each (model, mode) line goes to the summary as it is in the log.
step_models() {
  local name
  for name in $MODELS; do
    # shellcheck disable=SC2086
    run_bench "models_$name" "$MODELS_TIMEOUT" --models "$name" --no-ops --no-progress \
      --out "$OUT/models_$name" $MODELS_ARGS
    grep -E "^$name (train|infer) " "$OUT/models_$name.log" 2> /dev/null | sed 's/^/  /' \
      >> "$SUMMARY" || true
  done
}

step_bench() {
  # shellcheck disable=SC2086
  run_bench bench "$BENCH_TIMEOUT" $BENCH_ARGS --out "$OUT/bench"
}

step_profile() {
  if ! command -v ncu > /dev/null; then
    note profile "SKIP (no ncu)"
    return 0
  fi
  cat > "$OUT/profile_ops.py" <<'PYEOF'
"""The headline shapes once each, for ncu: training forward and backward (BN+add+ReLU, and
BN+ReLU, whose backward passes a ReLU mask from its reduce pass to its dx pass), eval, fp16/bf16;
and a 7x7 layer (ResNet-50 stage 4), whose NCHW planes take a quarter of a warp each."""
import torch
import fastnn  # noqa: F401
ops = torch.ops.fastnn
dev = "cuda"
for shape, dtype in (((256, 64, 56, 56), torch.float16), ((256, 256, 56, 56), torch.bfloat16),
                     ((256, 2048, 7, 7), torch.float16)):
    for fmt in (torch.contiguous_format, torch.channels_last):
        C = shape[1]
        x = torch.randn(shape, device=dev, dtype=dtype).contiguous(memory_format=fmt)
        r = torch.randn_like(x)
        g = torch.randn_like(x)
        w, b = torch.ones(C, device=dev), torch.zeros(C, device=dev)
        rm, rv = torch.zeros(C, device=dev), torch.ones(C, device=dev)
        out, m, i = ops.batch_norm_train(x, w, b, rm, rv, 0.1, 1e-5, r, True)
        ops.batch_norm_backward(g, x, w, out, m, i, True, True, True)
        out, m, i = ops.batch_norm_train(x, w, b, rm, rv, 0.1, 1e-5, None, True)
        ops.batch_norm_backward(g, x, w, out, m, i, True, True, False)
        ops.batch_norm_eval(x, w, b, rm, rv, 1e-5, None, False)
        torch.cuda.synchronize()
PYEOF
  run_step profile "$PROFILE_TIMEOUT" "$OUT/profile.log" ncu --kernel-name regex:bn_ \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
    --csv --page details "$PY" "$OUT/profile_ops.py"
}

# GPU_CHECK_BUNDLE=FILE.tgz: all of $OUT in one archive (a device machine returns few files),
# refreshed every 15 s so that a run stopped from outside still leaves most of its logs.
BUNDLE=${GPU_CHECK_BUNDLE:-}
bundle() {
  tar czf "$BUNDLE.part" -C "$(dirname "$OUT")" "$(basename "$OUT")" 2> /dev/null &&
    mv -f "$BUNDLE.part" "$BUNDLE"
}
if [ -n "$BUNDLE" ]; then
  (while sleep 15; do bundle; done) &
  BUNDLER=$!
  trap 'kill "$BUNDLER" 2> /dev/null; bundle' EXIT
fi

for step in "${STEPS[@]}"; do
  case "$step" in
    env) step_env ;;
    build) step_build ;;
    smoke) step_smoke ;;
    targets) step_targets ;;
    kernels) step_kernels ;;
    onchip) step_onchip ;;
    models) step_models ;;
    sanitize) step_sanitize ;;
    test) step_test ;;
    bench) step_bench ;;
    profile) step_profile ;;
    *) note "$step" "unknown step (env build smoke targets kernels onchip models sanitize test bench profile)"
       FAILED=1 ;;
  esac
done

echo "overall: $([ "$FAILED" -eq 0 ] && echo PASS || echo FAIL), $(( $(date +%s) - START ))s of ${BUDGET}s" >> "$SUMMARY"
echo
cat "$SUMMARY"
exit "$FAILED"
