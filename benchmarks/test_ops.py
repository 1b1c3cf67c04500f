"""Op-level benchmarks: fastnn against nn.BatchNorm2d / the eager sequence, torch.compile (CUDA
only; FASTNN_BENCH_COMPILE=1 adds it on CPU) and fastnn's pure-PyTorch reference.

The layer shape is ResNet-50's layer1 BN, (N, 64, 56, 56), taken from the model: N = 32 on CPU,
128 on CUDA. CPU runs float32; CUDA runs bfloat16 and float32.
"""
import importlib
import itertools
import os

import pytest
import torch

from fastnn import _bench_shapes, bench, ops

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BATCH = 128 if DEVICE.type == "cuda" else 32
SHAPES = [s for s in _bench_shapes.quick_shapes(DEVICE.type, BATCH)
          if s.shape[1:] == (64, 56, 56)]
DTYPES = ["bfloat16", "float32"] if DEVICE.type == "cuda" else ["float32"]
LAYOUTS = ["nchw", "channels_last"]
CASES = ["bn_train_fwd", "bn_eval", "bn_fwd_bwd", "bn_add_relu_fwd_bwd", "dual_add_relu_fwd_bwd"]
IMPLS = ["fastnn", "torch", "compile", "reference"]
ROUNDS = 100 if DEVICE.type == "cuda" else 10

_inputs_cache = {}


def _inputs(shape, dtype, layout):
    """One set of inputs per (shape, dtype, layout), shared by every implementation."""
    key = (shape.shape, dtype, layout)
    if key not in _inputs_cache:
        _inputs_cache.clear()
        _inputs_cache[key] = bench.make_inputs(shape.shape, bench.DTYPES[dtype], layout, DEVICE,
                                               eps=shape.eps)
    return _inputs_cache[key]


@pytest.mark.parametrize("shape,dtype,layout,case,impl", [
    pytest.param(s, d, l, c, i, id=f"{c}-{'x'.join(map(str, s.shape))}-{d}-{l}-{i}")
    for s, d, l, c, i in itertools.product(SHAPES, DTYPES, LAYOUTS, CASES, IMPLS)])
def test_op(benchmark, shape, dtype, layout, case, impl):
    if impl == "compile" and DEVICE.type == "cpu" and not os.environ.get("FASTNN_BENCH_COMPILE"):
        pytest.skip("torch.compile on CPU is slow to build; set FASTNN_BENCH_COMPILE=1")
    if impl == "reference" and not ops.has_kernel(DEVICE.type):
        pytest.skip("fastnn has no compiled kernel here, so fastnn already is the reference")
    spec = bench.CASES[case]
    inputs = _inputs(shape, dtype, layout)
    if impl == "compile":
        importlib.import_module("torch._dynamo").reset()
    step = bench.build_step(spec, impl, inputs)
    sets = inputs.sets
    counter = itertools.count()

    if DEVICE.type == "cuda":
        def run():
            step(next(counter) % sets)
            torch.cuda.synchronize(DEVICE)
    else:
        def run():
            step(next(counter) % sets)

    benchmark.group = f"{case} {'x'.join(map(str, shape.shape))} {dtype} {layout}"
    benchmark.extra_info.update({
        "impl": impl, "case": case, "shape": list(shape.shape), "dtype": dtype,
        "layout": layout, "byte_model": spec.byte_model, "input_sets": sets,
        "fastnn_backend": "compiled" if ops.has_kernel(DEVICE.type) else "reference",
        "torch_threads": torch.get_num_threads(),
    })
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=2, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: each case ran once, as a smoke test
        return
    median = benchmark.stats.stats.median
    nbytes = spec.min_bytes(shape.numel, torch.empty((), dtype=bench.DTYPES[dtype]).element_size())
    benchmark.extra_info["gbps"] = nbytes / median / 1e9
