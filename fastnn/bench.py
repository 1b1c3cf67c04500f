"""fastnn-bench: how fast fastnn's batch norm is, next to what PyTorch offers.

Op level: BN training forward, inference, backward and forward+backward, BN+ReLU and BN+add+ReLU,
on every distinct BN shape of ResNet-50, DenseNet-121 and GoogLeNet (derived from the models), or
a quick set. Each fastnn call is timed side by side (interleaved, on like inputs) with
nn.BatchNorm2d or the eager sequence (``relu(bn(x) + r)`` as torchvision writes it), torch.compile
of that sequence, fastnn's own pure-PyTorch reference, and a tensor copy of the same size (the
bandwidth yardstick). Model level (``--models``): training-step and inference throughput of
torchvision networks with and without fastnn's BN modules.

Timing: on CUDA, CUDA events around every call after a warm-up; on CPU, time.perf_counter. Medians
over many repeats, with the interquartile range. Inputs are rotated through several copies when one
set would fit in the L2 (CUDA) or last-level (CPU) cache, so no call reads warm data left by the
previous one.

    fastnn-bench --quick --out bench-out      # a few shapes; table, bench.md, bench.json, bench.png
    fastnn-bench                              # the full set for this machine
    fastnn-bench --compare A.json B.json      # what changed between two runs
    fastnn-bench --compare A1.json,A2.json B1.json,B2.json   # ... of runs taken alternately
"""
import argparse
import contextlib
import copy
import ctypes
import datetime
import gc
import importlib
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import fastnn
import fastnn.functional
import fastnn.nn
from fastnn import _bench_shapes
from fastnn._bench_shapes import BNShape

__all__ = ["CASES", "main", "build_step", "make_inputs", "measure", "run_ops", "run_models",
           "swap_batchnorm", "reference_backend", "interleaved_medians"]

SCHEMA = "fastnn-bench/1"

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHORT_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
LAYOUTS = ("nchw", "channels_last")
SHORT_LAYOUT = {"nchw": "NCHW", "channels_last": "CL"}
BASELINES = ("torch", "compile", "reference")
# Column titles: "eager" is nn.BatchNorm2d or the eager op sequence (each case names which),
# "compile" torch.compile of it, "reference" fastnn's pure-PyTorch fallback.
IMPL_TITLES = {"fastnn": "fastnn", "torch": "eager", "compile": "compile",
               "reference": "reference", "copy": "clone"}


@dataclass(frozen=True)
class Case:
    """One op-level benchmark case.

    mode: "train_fwd" / "eval_fwd" (forward without autograd), "bwd" (backward of a recorded
    training forward) or "fwd_bwd" (training forward then backward to input, parameters and
    residual). The fewest bytes the case must move are ``nb * N * b + mask * N / 8`` for N
    elements of b bytes: the floors of DESIGN.md (data kept on chip between passes; a 1-bit ReLU
    mask saved for the backward).
    """
    name: str
    title: str
    mode: str
    relu: bool
    residual: bool
    nb: int
    mask: int
    eager: str
    dual: bool = False  # the residual is a second BN's input: relu(bn(x) + bn2(r))

    @property
    def byte_model(self) -> str:
        return f"{self.nb}Nb" + (f"+{self.mask}N/8" if self.mask else "")

    def min_bytes(self, numel: int, itemsize: int) -> float:
        return self.nb * numel * itemsize + self.mask * numel / 8.0


CASES: Dict[str, Case] = {c.name: c for c in [
    Case("bn_train_fwd", "BN forward, training", "train_fwd", False, False, 2, 0, "nn.BatchNorm2d"),
    Case("bn_eval", "BN inference", "eval_fwd", False, False, 2, 0, "nn.BatchNorm2d"),
    Case("bn_bwd", "BN backward, training", "bwd", False, False, 3, 0, "nn.BatchNorm2d"),
    Case("bn_fwd_bwd", "BN forward+backward", "fwd_bwd", False, False, 5, 0, "nn.BatchNorm2d"),
    Case("bn_relu_fwd_bwd", "BN+ReLU forward+backward", "fwd_bwd", True, False, 5, 2,
         "relu(bn(x))"),
    Case("bn_add_relu_fwd", "BN+add+ReLU forward, training", "train_fwd", True, True, 3, 1,
         "relu(bn(x)+r)"),
    Case("bn_add_relu_eval", "BN+add+ReLU inference", "eval_fwd", True, True, 3, 0,
         "relu(bn(x)+r)"),
    Case("bn_add_relu_fwd_bwd", "BN+add+ReLU forward+backward", "fwd_bwd", True, True, 7, 2,
         "relu(bn(x)+r)"),
    Case("dual_add_relu_fwd_bwd", "BN+BN+add+ReLU (downsampling shortcut) forward+backward",
         "fwd_bwd", True, True, 8, 2, "relu(bn(x)+bn2(r))", dual=True),
]}

@dataclass(frozen=True)
class Target:
    """A goal fastnn is held to: fastnn at least `goal` times faster than `baseline` ("speedup"),
    or fastnn's median at most `goal` ms ("ms"), on one exact case."""
    case: str
    shape: Tuple[int, int, int, int]
    dtype: str
    layout: str
    kind: str
    goal: float
    label: str
    where: str  # the machine the goal is stated for
    baseline: str = "torch"


# The goals, per device type. `fastnn-bench --targets` times exactly these cases; any run prints
# the lines of the cases it timed with the same (C, H, W) and dtype, with a verdict when the batch
# and layout are the goal's too.
TARGETS = {
    "cpu": [
        Target("bn_train_fwd", (32, 64, 56, 56), "float32", "nchw", "speedup", 2.0,
               "BN training forward, fastnn vs nn.BatchNorm2d", "a 2-core CPU"),
        Target("bn_add_relu_fwd_bwd", (32, 64, 56, 56), "float32", "nchw", "speedup", 1.5,
               "BN+add+ReLU forward+backward, fastnn vs eager relu(bn(x)+r)", "a 2-core CPU"),
    ],
    # Measured on an H100 80GB: nn.BatchNorm2d 0.60 ms (NCHW) and 0.118 ms (channels_last) for
    # the training forward; for BN+add+ReLU forward+backward eager 5.16 / 3.78 ms and
    # torch.compile 2.79 / 2.72 ms, the streaming floor about 1.40 ms.
    "cuda": [
        Target("bn_train_fwd", (256, 64, 56, 56), "float16", "nchw", "speedup", 4.0,
               "BN training forward, fastnn vs nn.BatchNorm2d", "an H100"),
        Target("bn_train_fwd", (256, 64, 56, 56), "float16", "channels_last", "speedup", 1.15,
               "BN training forward, fastnn vs nn.BatchNorm2d", "an H100"),
        Target("bn_add_relu_fwd_bwd", (256, 256, 56, 56), "bfloat16", "nchw", "ms", 1.6,
               "BN+add+ReLU forward+backward, fastnn", "an H100"),
        Target("bn_add_relu_fwd_bwd", (256, 256, 56, 56), "bfloat16", "channels_last", "ms",
               1.6, "BN+add+ReLU forward+backward, fastnn", "an H100"),
    ],
}


# ---------------------------------------------------------------------------------------------
# Environment

def _run_quiet(cmd: Sequence[str], cwd: Optional[str] = None) -> Optional[str]:
    try:
        out = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_cache_bytes() -> int:
    """Size of the largest CPU cache (the last level) sysfs lists; 32 MiB if unknown. For input
    rotation this is the whole of it, even where fastnn's kernels count less of it as theirs
    (fastnn._ext.cpu_caches): more input sets than needed only cost memory."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            best = max(best, sysfs_size(os.path.join(base, entry, "size")))
    except OSError:
        pass
    return best or (32 << 20)


def sysfs_size(path: str) -> int:
    """A sysfs cache size file ("48K", "2048K", "480M") in bytes; 0 if unreadable."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return 0
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    digits = text[:-1] if scale != 1 else text
    return int(digits) * scale if digits.isdigit() else 0


def cache_bytes(device: torch.device) -> int:
    """The cache a benchmark input must not fit in: L2 on CUDA, the last level on CPU."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 0) or (50 << 20))
    return _cpu_cache_bytes()


def _git_commit() -> Tuple[Optional[str], Optional[bool]]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastnn.__file__)))
    commit = _run_quiet(["git", "rev-parse", "HEAD"], cwd=root)
    if commit is None:
        return None, None
    status = _run_quiet(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root)
    return commit, bool(status)


def _load_average() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def load_note(env: dict, end_load: Optional[List[float]]) -> Optional[str]:
    """A warning when other work shared the CPU during the run (it slows CPU timings and, for
    CUDA runs, the launching thread)."""
    cores = env.get("cpu_count") or 1
    loads = [x[0] for x in (env.get("load_average"), end_load) if x]
    if loads and max(loads) > 0.75 * cores + 0.5:
        return (f"the machine was busy with other work (1-minute load average "
                f"{max(loads):.1f} on {cores} cores): timings are slower and noisier than on an "
                f"idle machine (CPU runs: rerun when it is idle, or compare with --threads 1)")
    return None


_cpu_allocator = "system default"  # what keep_freed_memory() made of the C allocator


def keep_freed_memory() -> str:
    """On glibc, makes freed CPU tensors go back to the process heap instead of to the OS
    (no mmap for large blocks, no heap trimming), as PyTorch's CUDA caching allocator or
    jemalloc/tcmalloc do. Without it, every large output can come from a fresh mmap whose page
    faults (thousands per call) dominate and randomize the timings of both fastnn and PyTorch.
    Returns what the allocator does now, for the run's header."""
    if not sys.platform.startswith("linux"):
        return "system default"
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "system default"
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    global _cpu_allocator
    if ok:  # recorded for collect_env
        _cpu_allocator = "glibc heap kept (mmap off, no trim)"
    return _cpu_allocator


def collect_env(device: torch.device) -> dict:
    """Device, CPU, threads, driver, versions, date and commit of this run."""
    commit, dirty = _git_commit()
    try:
        import torchvision
        tv = torchvision.__version__
    except ImportError:
        tv = None
    info = fastnn.backend_info()
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device_type": device.type,
        "device": _cpu_model() if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torchvision": tv,
        "fastnn": fastnn.__version__,
        "fastnn_compiled": bool(info.get("compiled")),
        "fastnn_kernel_devices": list(info.get("devices") or ()),
        "fastnn_reason": info.get("reason"),
        "fastnn_backend": ("compiled" if fastnn.ops.has_kernel(device.type) else "reference"),
        "fastnn_cpu_isa": info.get("cpu_isa"),
        "fastnn_cpu_isa_bf16_fp16": info.get("cpu_isa_bf16_fp16"),
        "fastnn_cpu_bf16_avx512bf16": info.get("cpu_bf16_avx512bf16"),
        "fastnn_relu_mask": info.get("relu_mask"),
        "git_commit": commit,
        "git_dirty": dirty,
        "cache_bytes": cache_bytes(device),
        "load_average": _load_average(),
        "cpu_allocator": _cpu_allocator,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({
            "gpu_capability": f"{props.major}.{props.minor}",
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "gpu_sms": props.multi_processor_count,
            "driver": _run_quiet(["nvidia-smi", "--query-gpu=driver_version",
                                  "--format=csv,noheader", f"--id={device.index or 0}"]),
            "cudnn": torch.backends.cudnn.version(),
        })
    return env


def backend_line(env: dict) -> str:
    if env["fastnn_backend"] == "compiled":
        isa = env.get("fastnn_cpu_isa")
        reduced = env.get("fastnn_cpu_isa_bf16_fp16")
        what = ""
        if env["device_type"] == "cpu" and isa:
            what = (f" ({isa} CPU kernels" + (f"; {reduced} for bfloat16/float16" if reduced and
                                              reduced != isa else "") +
                    ("; bfloat16 rounded with AVX512-BF16" if env.get("fastnn_cpu_bf16_avx512bf16")
                     else "") + ")")
        if env["device_type"] == "cuda" and env.get("fastnn_relu_mask") is not None:
            what = " (ReLU mask " + ("on" if env["fastnn_relu_mask"] else
                                     "off: FASTNN_RELU_MASK=0") + ")"
        return f"fastnn backend: compiled kernels on {env['device_type']}{what}"
    return (f"fastnn backend: REFERENCE (pure PyTorch) on {env['device_type']}: "
            f"{env['fastnn_reason'] or 'fastnn._C has no kernel for this device'}")


def env_lines(env: dict) -> List[str]:
    lines = [f"device: {env['device']}"
             + (f" (sm_{env['gpu_capability'].replace('.', '')}, {env['gpu_memory_gib']} GiB, "
                f"driver {env['driver']}, cuDNN {env['cudnn']})" if env["device_type"] == "cuda"
                else f" ({env['cpu_count']} cores, torch threads {env['torch_threads']}, "
                     f"torch {env['cpu_capability']}, allocator: "
                     f"{env.get('cpu_allocator', 'system default')})"),
             f"torch {env['torch']} (CUDA {env['torch_cuda']}), torchvision {env['torchvision']}, "
             f"python {env['python']}, fastnn {env['fastnn']}",
             backend_line(env),
             f"date {env['date']}, commit {(env['git_commit'] or 'unknown')[:12]}"
             + (" (with uncommitted changes)" if env["git_dirty"] else "")]
    return lines


# ---------------------------------------------------------------------------------------------
# Inputs and the callables that are timed

@contextlib.contextmanager
def reference_backend():
    """Within this block fastnn's modules and functions run the pure-PyTorch reference."""
    saved = fastnn.functional.use_kernel
    fastnn.functional.use_kernel = lambda input: False
    try:
        yield
    finally:
        fastnn.functional.use_kernel = saved


def param_dtype(dtype: torch.dtype) -> torch.dtype:
    """BN parameters and statistics stay float32 for half inputs, as under autocast."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def rotation_sets(set_bytes: int, cache: int, limit: int = 32) -> int:
    """How many copies of an input set to cycle through so that consecutive uses of one copy are
    at least three cache sizes apart: 1 when a set already is that large."""
    if set_bytes <= 0:
        return 1
    return max(1, min(limit, math.ceil(3 * cache / set_bytes)))


@dataclass
class OpInputs:
    """Input sets for one (shape, dtype, layout): x (requires grad), residual r and output
    gradient g, `sets` copies of each, plus BN parameters and running statistics."""
    shape: Tuple[int, int, int, int]
    dtype: torch.dtype
    layout: str
    eps: float
    xs: List[torch.Tensor]
    rs: List[torch.Tensor]
    gs: List[torch.Tensor]
    params: Dict[str, torch.Tensor]

    @property
    def sets(self) -> int:
        return len(self.xs)


def make_inputs(shape: Sequence[int], dtype: torch.dtype, layout: str, device: torch.device,
                eps: float = 1e-5, sets: Optional[int] = None, seed: int = 0) -> OpInputs:
    """`sets` defaults to what rotation_sets() asks for x, r and g together."""
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if sets is None:
        sets = rotation_sets(3 * numel * itemsize, cache_bytes(device))
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    gen = torch.Generator(device=device).manual_seed(seed)

    def tensor(scale, shift):
        t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
        t = (t * scale + shift).to(dtype).contiguous(memory_format=fmt)
        return t

    xs = [tensor(1.5, 0.5).requires_grad_() for _ in range(sets)]
    rs = [tensor(1.0, 0.0).requires_grad_() for _ in range(sets)]
    gs = [tensor(1.0, 0.0) for _ in range(sets)]
    C = shape[1]
    pdt = param_dtype(dtype)
    params = {
        "weight": torch.rand(C, generator=gen, device=device).to(pdt) + 0.5,
        "bias": (torch.randn(C, generator=gen, device=device) * 0.1).to(pdt),
        "running_mean": (torch.randn(C, generator=gen, device=device) * 0.1).to(pdt),
        "running_var": (torch.rand(C, generator=gen, device=device) + 0.5).to(pdt),
    }
    return OpInputs(shape, dtype, layout, eps, xs, rs, gs, params)


def _torch_bn(inputs: OpInputs) -> torch.nn.BatchNorm2d:
    C = inputs.shape[1]
    p = inputs.params
    bn = torch.nn.BatchNorm2d(C, eps=inputs.eps, device=p["weight"].device,
                              dtype=p["weight"].dtype)
    with torch.no_grad():
        for name, t in p.items():
            getattr(bn, name).copy_(t)
    return bn


def _fastnn_class(case: Case):
    if case.residual:
        return fastnn.nn.BatchNormAddReLU2d
    if case.relu:
        return fastnn.nn.BatchNormReLU2d
    return fastnn.nn.BatchNorm2d


def _eager_forward(bn: torch.nn.Module, case: Case, bn2: Optional[torch.nn.Module] = None
                   ) -> Callable:
    """The eager sequence as torchvision's ResNet writes it (in-place add and ReLU)."""
    if case.dual:
        def forward(x, r):
            out = bn(x)
            out += bn2(r)
            return F.relu(out, inplace=True)
    elif case.residual:
        def forward(x, r):
            out = bn(x)
            out += r
            return F.relu(out, inplace=True)
    elif case.relu:
        def forward(x, r):
            return F.relu(bn(x), inplace=True)
    else:
        def forward(x, r):
            return bn(x)
    return forward


def _module_forward(impl: str, case: Case, inputs: OpInputs) -> Tuple[Callable, torch.nn.Module]:
    """forward(x, r) of one implementation, and the module holding its parameters."""
    if impl in ("torch", "compile"):
        bn = _torch_bn(inputs)
        bn2 = _torch_bn(inputs) if case.dual else None
        forward = _eager_forward(bn, case, bn2)
        if impl == "compile":
            forward = torch.compile(forward, dynamic=False)
        module = torch.nn.ModuleList([bn, bn2]) if case.dual else bn
    elif impl in ("fastnn", "reference"):
        module = _fastnn_class(case).from_module(_torch_bn(inputs))
        if case.dual:
            bn1 = module
            bn2 = fastnn.nn.BatchNorm2d.from_module(_torch_bn(inputs))
            module = torch.nn.ModuleList([bn1, bn2])

            def forward(x, r):
                return fastnn.nn.dual_bn_add_relu(bn1, x, bn2, r)
        elif case.residual:
            def forward(x, r):
                return module(x, r)
        else:
            def forward(x, r):
                return module(x)
        if impl == "reference":
            fast_forward = forward

            def forward(x, r):
                with reference_backend():
                    return fast_forward(x, r)
    else:
        raise ValueError(f"unknown implementation {impl!r}")
    module.train(case.mode != "eval_fwd")
    return forward, module


def build_step(case: Case, impl: str, inputs: OpInputs) -> Callable[[int], None]:
    """step(i): one call of `impl` for `case` on input set i.

    impl: 'fastnn', 'torch' (nn.BatchNorm2d or the eager sequence), 'compile' (torch.compile of
    that), 'reference' (fastnn's pure-PyTorch fallback) or 'copy' (a clone of x: the
    bandwidth yardstick)."""
    xs, rs, gs = inputs.xs, inputs.rs, inputs.gs
    if impl == "copy":
        # A fresh output per call, as every implementation timed against it gets (a copy_ into
        # buffers of its own would pay for their first-touch page faults and for writing to
        # memory that no allocator has just handed back).
        srcs = [x.detach() for x in xs]

        def step(i):
            srcs[i].clone()
        return step

    forward, module = _module_forward(impl, case, inputs)
    params = list(module.parameters())  # weight and bias of each batch norm

    if case.mode in ("train_fwd", "eval_fwd"):
        def step(i):
            with torch.no_grad():
                forward(xs[i], rs[i])
        return step

    def wrt(i):
        return [xs[i]] + ([rs[i]] if case.residual else []) + params

    if case.mode == "fwd_bwd":
        def step(i):
            out = forward(xs[i], rs[i])
            torch.autograd.grad(out, wrt(i), gs[i])
        return step

    if case.mode == "bwd":
        outs = [forward(xs[i], rs[i]) for i in range(inputs.sets)]

        def step(i):
            torch.autograd.grad(outs[i], wrt(i), gs[i], retain_graph=True)
        return step
    raise ValueError(f"unknown mode {case.mode!r}")


# ---------------------------------------------------------------------------------------------
# Timing

@dataclass
class Policy:
    """How long to time each implementation: warm-up calls, then enough repeats to fill
    `target_s` of measured time, within [min_reps, max_reps] for fastnn, eager and compile and
    [min_reps_other, max_reps] for the reference and the copy."""
    warmup: int
    target_s: float
    min_reps: int
    max_reps: int
    min_reps_other: int = 3


POLICIES = {
    ("cpu", True): Policy(warmup=1, target_s=0.1, min_reps=5, max_reps=40, min_reps_other=3),
    ("cpu", False): Policy(warmup=1, target_s=0.15, min_reps=5, max_reps=40, min_reps_other=3),
    ("cuda", True): Policy(warmup=3, target_s=0.02, min_reps=15, max_reps=100, min_reps_other=10),
    ("cuda", False): Policy(warmup=3, target_s=0.01, min_reps=10, max_reps=60,
                            min_reps_other=10),
}


_process_warm = False  # set once the first case of this process has been warmed up


def _stats(times_s: List[float]) -> dict:
    ts = sorted(times_s)
    n = len(ts)

    def q(p):  # linear interpolation between order statistics
        pos = p * (n - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, n - 1)
        return ts[lo] + (ts[hi] - ts[lo]) * (pos - lo)
    return {"median_ms": q(0.5) * 1e3, "p25_ms": q(0.25) * 1e3, "p75_ms": q(0.75) * 1e3,
            "min_ms": ts[0] * 1e3, "max_ms": ts[-1] * 1e3, "n": n}


def _error(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return text[:300]


def interleaved_medians(fns: Dict[str, Callable[[int], object]], calls: int, rounds: int,
                        device: Optional[torch.device] = None) -> Dict[str, float]:
    """{name: median seconds per call} of each callable, timed side by side: one untimed warm-up
    round, then `rounds` rounds that each time every callable in turn over `calls` back-to-back
    calls (call i is passed i, to pick its input set), with the device synchronized around each
    batch of calls. For the small scripts in benchmarks/; `measure` is fastnn-bench's timing."""
    if calls < 1 or rounds < 1:
        raise ValueError(f"interleaved_medians: calls and rounds must be >= 1, got {calls} and "
                         f"{rounds}")

    def sync():
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
    for f in fns.values():
        for i in range(calls):
            f(i)
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            sync()
            start = time.perf_counter()
            for i in range(calls):
                f(i)
            sync()
            samples[name].append((time.perf_counter() - start) / calls)
    return {name: _stats(v)["median_ms"] / 1e3 for name, v in samples.items()}


def measure(steps: Dict[str, Callable[[int], None]], sets: int, device: torch.device,
            policy: Policy) -> Dict[str, dict]:
    """Times every step side by side: after a warm-up, rounds in which each implementation runs
    once (in a fresh random order each round, so that no implementation follows another more
    often than the rest: on CPU a call that follows one of the same output size can get that
    call's freed, still-cached buffer). Every call, whichever implementation makes it, takes the
    next of the `sets` input sets, so that no call reads inputs the call before it left in cache
    (interleaving implementations on one set would time the second from cache and the first from
    memory, and medians would fall on either side of that split). A slow implementation takes
    part in fewer rounds, spread evenly. Returns per name either timing
    statistics (plus ``first_call_s``, which includes any compilation) or ``{"error": ...}``."""
    global _process_warm
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    results: Dict[str, dict] = {}
    estimate: Dict[str, float] = {}
    first: Dict[str, float] = {}
    for name, step in steps.items():
        try:
            t0 = time.perf_counter()
            step(0)
            sync()
            first[name] = time.perf_counter() - t0
            # Warm-up calls, each timed on its own: their fastest is the estimate that sets the
            # number of repeats. A call slower than the whole target is its own warm-up, unless
            # it compiled something.
            best = first[name]
            warmup = policy.warmup if first[name] < policy.target_s else 0
            if not _process_warm:
                # The process's first case also settles the allocator (the C library's heap
                # grows to its working size, fresh pages fault in): more warm-up calls.
                warmup = max(warmup, 5)
            if "compile" in name:
                warmup = max(1, policy.warmup)
            for w in range(warmup):
                t0 = time.perf_counter()
                step((w + 1) % sets)
                sync()
                best = min(best, time.perf_counter() - t0)
            estimate[name] = best
        except Exception as e:  # an implementation that cannot run this case is reported
            results[name] = {"error": _error(e)}
    names = [n for n in steps if n not in results]
    if not names:
        return results
    _process_warm = True
    reps = {}
    for n in names:
        low = policy.min_reps if n in ("fastnn", "torch", "compile") else policy.min_reps_other
        reps[n] = int(min(policy.max_reps, max(low, policy.target_s / max(estimate[n], 1e-9))))
        if n == "copy":  # the yardstick needs a fair median, not the finest one
            reps[n] = min(reps[n], max(low, policy.max_reps // 3))
    rounds = max(reps.values())
    times: Dict[str, List[float]] = {n: [] for n in names}
    calls = 0
    events = []
    failed: Dict[str, str] = {}
    order_rng = random.Random(0)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for j in range(rounds):
            for name in order_rng.sample(names, len(names)):
                if name in failed or (j * reps[name]) // rounds == ((j + 1) * reps[name]) // rounds:
                    continue
                i = calls % sets
                calls += 1
                try:
                    if cuda:
                        start = torch.cuda.Event(enable_timing=True)
                        end = torch.cuda.Event(enable_timing=True)
                        start.record()
                        steps[name](i)
                        end.record()
                        events.append((name, start, end))
                    else:
                        t0 = time.perf_counter()
                        steps[name](i)
                        times[name].append(time.perf_counter() - t0)
                except Exception as e:  # e.g. out of memory: reported, the others go on
                    failed[name] = _error(e)
        sync()
    finally:
        if gc_was_enabled:
            gc.enable()
    for name, start, end in events:
        if name not in failed:
            times[name].append(start.elapsed_time(end) / 1e3)
    for n in names:
        if n in failed:
            results[n] = {"error": failed[n]}
        else:
            results[n] = _stats(times[n])
            results[n]["first_call_s"] = first[n]
    return results


# ---------------------------------------------------------------------------------------------
# The op-level run

@dataclass
class OpPlan:
    device: torch.device
    shapes: List[BNShape]
    cases: List[str]
    dtypes: List[str]
    layouts: List[str]
    baselines: List[str]
    compile_shapes: Optional[List[Tuple[int, int, int]]]  # None: every shape
    compile_budget_s: float
    policy: Policy
    time_limit_s: Optional[float] = None  # no new (shape, dtype, layout) once this is spent
    reference_shapes: Optional[List[Tuple[int, int, int]]] = None  # None: every shape

    @property
    def size(self) -> int:
        return len(self.shapes) * len(self.dtypes) * len(self.layouts) * len(self.cases)


def _set_copy_yardstick(records: List[dict]) -> None:
    """Uses one copy bandwidth for every case of a (shape, dtype, layout): the median of the
    copies timed alongside each case, so one disturbed case does not skew its % of copy."""
    values = sorted(r["copy"]["gbps"] for r in records if "gbps" in r["copy"])
    if not values:
        return
    gbps = values[len(values) // 2]
    for r in records:
        r["copy_gbps"] = gbps
        for st in r["impls"].values():
            if "gbps" in st:
                st["pct_copy"] = 100.0 * st["gbps"] / gbps


def _record(case: Case, bshape: BNShape, dtype_name: str, layout: str, sets: int,
            timed: Dict[str, dict], skipped: Dict[str, str]) -> dict:
    numel = bshape.numel
    itemsize = torch.empty((), dtype=DTYPES[dtype_name]).element_size()
    nbytes = case.min_bytes(numel, itemsize)
    copy_stats = timed.pop("copy", {"error": "not measured"})
    copy_gbps = None
    if "median_ms" in copy_stats:
        copy_gbps = 2 * numel * itemsize / (copy_stats["median_ms"] * 1e-3) / 1e9
        copy_stats["gbps"] = copy_gbps
    impls = {}
    for name, st in timed.items():
        st = dict(st)
        if "median_ms" in st:
            st["gbps"] = nbytes / (st["median_ms"] * 1e-3) / 1e9
            st["pct_copy"] = 100.0 * st["gbps"] / copy_gbps if copy_gbps else None
        impls[name] = st
    for name, why in skipped.items():
        impls[name] = {"skipped": why}
    speedup = {}
    fast = impls.get("fastnn", {})
    for b in BASELINES:
        base = impls.get(b, {})
        if "median_ms" in fast and "median_ms" in base:
            speedup[b] = base["median_ms"] / fast["median_ms"]
    return {
        "case": case.name, "title": case.title, "eager": case.eager,
        "shape": list(bshape.shape), "dtype": dtype_name, "layout": layout,
        "eps": bshape.eps, "layers": dict(bshape.layers),
        "numel": numel, "itemsize": itemsize, "bytes": nbytes, "byte_model": case.byte_model,
        "input_sets": sets, "copy": copy_stats, "impls": impls, "speedup": speedup,
    }


def run_ops(plan: OpPlan, progress: bool = True) -> Tuple[List[dict], Optional[str]]:
    """Times every (shape, dtype, layout, case) of the plan; one record per combination.
    Returns the records and, when the time limit cut the run short, a note saying so."""
    from tqdm import tqdm
    device = plan.device
    records = []
    compile_spent = 0.0
    started = time.perf_counter()
    truncated = None
    bar = tqdm(total=plan.size, desc="fastnn-bench", unit="case", file=sys.stderr,
               disable=not progress, dynamic_ncols=True, leave=False)
    try:
        for bshape in plan.shapes:
            for dtype_name in plan.dtypes:
                for layout in plan.layouts:
                    if (plan.time_limit_s is not None and truncated is None
                            and time.perf_counter() - started > plan.time_limit_s):
                        truncated = (f"time limit of {plan.time_limit_s:g} s reached: "
                                     f"{len(records)} of {plan.size} op cases timed "
                                     f"(--time-limit)")
                    if truncated:
                        continue
                    try:
                        inputs = make_inputs(bshape.shape, DTYPES[dtype_name], layout, device,
                                             eps=bshape.eps)
                    except Exception as e:  # e.g. out of memory for a large batch
                        why = _error(e)
                        for case_name in plan.cases:
                            records.append(_record(CASES[case_name], bshape, dtype_name, layout,
                                                   0, {"fastnn": {"error": why}}, {}))
                            bar.update(1)
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                        continue
                    group: List[dict] = []
                    for case_name in plan.cases:
                        case = CASES[case_name]
                        bar.set_postfix_str(f"{case_name} {'x'.join(map(str, bshape.shape))} "
                                            f"{SHORT_DTYPE[dtype_name]} {SHORT_LAYOUT[layout]}")
                        steps, skipped = {}, {}
                        for impl in ["fastnn"] + plan.baselines + ["copy"]:
                            if (impl == "reference" and plan.reference_shapes is not None
                                    and tuple(bshape.shape[1:]) not in plan.reference_shapes):
                                skipped[impl] = "not a headline shape (--reference all)"
                                continue
                            if impl == "compile":
                                if (plan.compile_shapes is not None
                                        and tuple(bshape.shape[1:]) not in plan.compile_shapes):
                                    skipped[impl] = "not a headline shape (--compile all)"
                                    continue
                                if compile_spent > plan.compile_budget_s:
                                    skipped[impl] = "compile budget spent (--compile-budget)"
                                    continue
                                importlib.import_module("torch._dynamo").reset()
                            try:
                                t0 = time.perf_counter()
                                steps[impl] = build_step(case, impl, inputs)
                                if impl == "compile":
                                    compile_spent += time.perf_counter() - t0
                            except Exception as e:
                                skipped[impl] = _error(e)
                        timed = measure(steps, inputs.sets, device, plan.policy)
                        if "compile" in timed and "first_call_s" in timed["compile"]:
                            compile_spent += timed["compile"]["first_call_s"]
                        group.append(_record(case, bshape, dtype_name, layout, inputs.sets,
                                             timed, skipped))
                        del steps
                        bar.update(1)
                    _set_copy_yardstick(group)
                    records += group
                    del inputs
    finally:
        bar.close()
    return records, truncated


def run_targets(plan: OpPlan, progress: bool = True) -> List[dict]:
    """Times the cases of the device type's TARGETS, each on its own, against PyTorch eager (the
    goals' baseline; torch.compile and the reference are timed in the op run)."""
    records = []
    for t in TARGETS.get(plan.device.type, []):
        one = copy.copy(plan)
        one.shapes = [BNShape(t.shape, 1e-5, {"target": 1})]
        one.cases, one.dtypes, one.layouts = [t.case], [t.dtype], [t.layout]
        one.baselines = [b for b in plan.baselines if b == "torch"]
        one.time_limit_s = None
        records += run_ops(one, progress=progress)[0]
    return records


# ---------------------------------------------------------------------------------------------
# The model-level run: training step and inference throughput

def swap_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Replaces every torch.nn.BatchNorm2d in `model` (in place) with fastnn.nn.BatchNorm2d
    sharing its parameters and buffers."""
    for name, child in model.named_children():
        if type(child) is torch.nn.BatchNorm2d:
            setattr(model, name, fastnn.nn.BatchNorm2d.from_module(child))
        else:
            swap_batchnorm(child)
    return model


def _build_model(name: str, device: torch.device) -> torch.nn.Module:
    import torchvision
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None, **kwargs).to(device)


def _build_fastnn_model(name: str, base: torch.nn.Module, device: torch.device,
                        memory_format: torch.memory_format) -> torch.nn.Module:
    """fastnn.models' own build of `name` (every fusion it makes: BN+ReLU, BN+add+ReLU, the
    two-BN shortcut, DenseNet's shared statistics) with torchvision's model's weights."""
    kwargs = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    model = getattr(fastnn.models, name)(weights=None, **kwargs)
    model.load_state_dict(base.state_dict())
    return model.to(device=device, memory_format=memory_format)


def run_models(names: Sequence[str], device: torch.device, batch: int, image_size: int,
               use_compile: bool, policy: Policy, progress: bool = True,
               infer_batch: Optional[int] = None) -> List[dict]:
    """Images/s of a training step (forward, cross-entropy, backward, SGD step) at `batch` and
    of inference at `infer_batch` (default: `batch`), side by side, for torchvision's model
    ("torchvision"), the same model with its BN modules swapped for fastnn's ("fastnn"),
    converted with BN+ReLU and BN+add+ReLU fused ("fastnn fused", fastnn.convert) and
    fastnn.models' own build ("fastnn.models", with the two-BN shortcut and DenseNet's shared
    statistics), all with the same weights, and for inference that build with its batch norms
    folded into the convolutions ("fastnn.models folded", fastnn.fuse_for_inference); with
    use_compile also torch.compile of torchvision's and of the last fastnn variant. On CUDA: channels_last and bfloat16 autocast; on CPU:
    float32, NCHW. Each (model, mode) is printed as it finishes, so a run cut short still
    reports what it timed."""
    from tqdm import tqdm
    cuda = device.type == "cuda"
    def variants_of(mode):
        variants = ["torchvision", "fastnn", "fastnn fused", "fastnn.models"]
        if mode == "infer":
            variants.append("fastnn.models folded")
        if use_compile:
            variants += ["torchvision+compile", variants[-1] + "+compile"]
        return variants

    records = []
    bar = tqdm(total=len(names) * 2, desc="models", unit="run", file=sys.stderr,
               disable=not progress, dynamic_ncols=True, leave=False)
    gen = torch.Generator(device=device).manual_seed(0)
    fmt = torch.channels_last if cuda else torch.contiguous_format
    batches = {"train": batch, "infer": infer_batch or batch}
    inputs = {mode: torch.randn(n, 3, image_size, image_size, device=device, generator=gen
                                ).contiguous(memory_format=fmt)
              for mode, n in batches.items()}
    y = torch.randint(0, 1000, (batch,), device=device, generator=gen)
    if cuda:
        def autocast():
            return torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext
    try:
        for name in names:
            base = _build_model(name, device).to(memory_format=fmt)
            for mode in ("train", "infer"):
                bar.set_postfix_str(f"{name} {mode}")
                x = inputs[mode]
                steps, peaks, failed = {}, {}, {}
                for variant in variants_of(mode):
                    try:
                        if variant.startswith("fastnn fused"):
                            model = fastnn.convert(base)
                        elif variant.startswith("fastnn.models"):
                            model = _build_fastnn_model(name, base, device, fmt)
                            if variant.startswith("fastnn.models folded"):
                                model = fastnn.fuse_for_inference(model).to(memory_format=fmt)
                        else:
                            model = copy.deepcopy(base)
                            if variant.startswith("fastnn"):
                                swap_batchnorm(model)
                    except Exception as e:
                        failed[variant] = {"error": _error(e)}
                        continue
                    model.train(mode == "train")
                    forward = torch.compile(model) if variant.endswith("compile") else model
                    if mode == "train":
                        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

                        def step(i, forward=forward, opt=opt, x=x):
                            with autocast():
                                loss = F.cross_entropy(forward(x), y)
                            opt.zero_grad(set_to_none=True)
                            loss.backward()
                            opt.step()
                    else:
                        def step(i, forward=forward, x=x):
                            with torch.inference_mode(), autocast():
                                forward(x)
                    steps[variant] = step
                timed = measure(steps, 1, device, policy)
                timed.update(failed)
                if cuda:
                    for variant, step in steps.items():
                        if "error" in timed[variant]:
                            continue
                        # Memory the step needs above what is resident (every variant's
                        # parameters and optimizer state): activations and workspaces.
                        torch.cuda.synchronize(device)
                        torch.cuda.reset_peak_memory_stats(device)
                        resident = torch.cuda.memory_allocated(device)
                        step(0)
                        torch.cuda.synchronize(device)
                        peaks[variant] = (torch.cuda.max_memory_allocated(device)
                                          - resident) / 2**20
                out = {}
                for variant, st in timed.items():
                    st = dict(st)
                    if "median_ms" in st:
                        st["images_per_s"] = batches[mode] / (st["median_ms"] * 1e-3)
                        st["peak_mib"] = peaks.get(variant)
                    out[variant] = st
                sp = None
                fast, tv = out.get("fastnn", {}), out.get("torchvision", {})
                if "median_ms" in fast and "median_ms" in tv:
                    sp = tv["median_ms"] / fast["median_ms"]
                records.append({"model": name, "mode": mode, "batch": batches[mode],
                                "image_size": image_size,
                                "precision": ("bf16 autocast, channels_last" if cuda
                                              else "fp32, NCHW"),
                                "variants": out, "speedup": sp})
                tqdm.write(model_line(records[-1]), file=sys.stdout)
                sys.stdout.flush()
                del steps
                bar.update(1)
            del base
    finally:
        bar.close()
    return records


# ---------------------------------------------------------------------------------------------
# Output

def _fmt_ms(ms: Optional[float]) -> str:
    if ms is None:
        return "-"
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def _shape_str(shape) -> str:
    return "x".join(str(s) for s in shape)


def _impl_cell(st: Optional[dict]) -> str:
    if not st:
        return "-"
    if "median_ms" in st:
        return f"{_fmt_ms(st['median_ms'])} ±{_fmt_ms((st['p75_ms'] - st['p25_ms']) / 2)}"
    if "error" in st:
        return "error"
    return "-"


def _ratio(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _columns(run: dict) -> List[str]:
    present = set()
    for r in run["ops"]:
        for name, st in r["impls"].items():
            if "median_ms" in st or "error" in st:
                present.add(name)
    return [b for b in BASELINES if b in present]


def op_table_rows(run: dict, where: bool = False
                  ) -> Tuple[List[str], List[Tuple[str, List[List[str]]]]]:
    """Header and, per case, the rows of the op table (text cells); where=True adds the models'
    layers that have each shape."""
    baselines = _columns(run)
    header = ["shape", "dtype", "layout", "fastnn ms", "GB/s", "% copy"]
    for b in baselines:
        header += [f"{IMPL_TITLES[b]} ms", f"vs {IMPL_TITLES[b]}"]
    if where:
        header.append("layers")
    groups = []
    for case_name in CASES:
        rows = []
        recs = [r for r in run["ops"] if r["case"] == case_name]
        if not recs:
            continue
        for r in recs:
            fast = r["impls"].get("fastnn", {})
            row = [_shape_str(r["shape"]), SHORT_DTYPE[r["dtype"]], SHORT_LAYOUT[r["layout"]],
                   _impl_cell(fast),
                   f"{fast['gbps']:.1f}" if "gbps" in fast else "-",
                   f"{fast['pct_copy']:.0f}%" if fast.get("pct_copy") is not None else "-"]
            for b in baselines:
                row += [_impl_cell(r["impls"].get(b)), _ratio(r["speedup"].get(b))]
            if where:
                row.append(", ".join(f"{m} x{c}" for m, c in r.get("layers", {}).items()))
            rows.append(row)
        case = CASES[case_name]
        title = (f"{case.title}  [bytes {case.byte_model}; eager = {case.eager}]")
        groups.append((title, rows))
    return header, groups


def _text_table(header: List[str], rows: List[List[str]]) -> List[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    left = {0, 1, 2}

    def line(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))
    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]


def _target_line(t: Target, r: dict) -> str:
    """One record of a target's case: its numbers and, on the target's exact case, the
    verdict."""
    fast = r["impls"].get("fastnn", {})
    text = (f"{t.label}, {SHORT_DTYPE[r['dtype']]} {_shape_str(r['shape'])} "
            f"{SHORT_LAYOUT[r['layout']]}: ")
    exact = tuple(r["shape"]) == t.shape and r["layout"] == t.layout
    if "median_ms" not in fast:
        return text + "not measured"
    if t.kind == "speedup":
        sp = r["speedup"].get(t.baseline)
        if sp is None:
            return text + f"{_fmt_ms(fast['median_ms'])} ms, {IMPL_TITLES[t.baseline]} not measured"
        base = r["impls"][t.baseline]
        text += f"{_fmt_ms(fast['median_ms'])} vs {_fmt_ms(base['median_ms'])} ms = {sp:.2f}x"
        met = sp >= t.goal
        goal = f">= {t.goal:g}x"
    else:
        text += f"{_fmt_ms(fast['median_ms'])} ms"
        others = [f"{IMPL_TITLES[b]} {_fmt_ms(r['impls'][b]['median_ms'])} ms"
                  for b in BASELINES if "median_ms" in r["impls"].get(b, {})]
        if others:
            text += f" ({', '.join(others)})"
        met = fast["median_ms"] <= t.goal
        goal = f"<= {t.goal:g} ms"
    if exact:
        text += f"  (goal {goal} on {t.where}: {'met' if met else 'NOT met'})"
    return text


def claim_lines(run: dict) -> List[str]:
    """The lines of the device's goals (TARGETS): every timed record with a goal's case, (C, H,
    W) and dtype (under the goal of its layout where there is one), with a verdict where its
    batch and layout are the goal's too."""
    targets = TARGETS.get(run["env"]["device_type"], [])
    found = []
    for k, r in enumerate(run["ops"] + run.get("targets", [])):
        matching = [i for i, t in enumerate(targets)
                    if r["case"] == t.case and tuple(r["shape"][1:]) == t.shape[1:]
                    and r["dtype"] == t.dtype]
        if matching:
            i = next((i for i in matching if targets[i].layout == r["layout"]), matching[0])
            found.append((i, k, _target_line(targets[i], r)))
    return [line for _, _, line in sorted(found)]


def _geomean(xs: List[float]) -> Optional[float]:
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def summary_lines(run: dict) -> List[str]:
    lines = []
    for b in _columns(run):
        per_case = []
        for case_name in CASES:
            g = _geomean([r["speedup"][b] for r in run["ops"]
                          if r["case"] == case_name and b in r["speedup"]])
            if g is not None:
                per_case.append(f"{case_name} {g:.2f}x")
        allg = _geomean([r["speedup"][b] for r in run["ops"] if b in r["speedup"]])
        if allg is not None:
            lines.append(f"fastnn vs {IMPL_TITLES[b]}: geometric mean {allg:.2f}x "
                         f"({'; '.join(per_case)})")
    return lines


def aggregate_rows(run: dict) -> Tuple[List[str], List[List[str]]]:
    """One row per (case, dtype, layout) over all shapes: fastnn's median % of copy bandwidth and
    the geometric-mean speedup over each baseline, with its range."""
    baselines = _columns(run)
    header = ["case", "dtype", "layout", "shapes", "fastnn % copy"]
    header += [f"vs {IMPL_TITLES[b]} (min-max)" for b in baselines]
    rows = []
    for case_name in CASES:
        for d in DTYPES:
            for lay in LAYOUTS:
                recs = [r for r in run["ops"]
                        if r["case"] == case_name and r["dtype"] == d and r["layout"] == lay]
                if not recs:
                    continue
                pct = sorted(r["impls"]["fastnn"]["pct_copy"] for r in recs
                             if r["impls"].get("fastnn", {}).get("pct_copy") is not None)
                row = [case_name, SHORT_DTYPE[d], SHORT_LAYOUT[lay], str(len(recs)),
                       f"{pct[len(pct) // 2]:.0f}%" if pct else "-"]
                for b in baselines:
                    vals = [r["speedup"][b] for r in recs if b in r["speedup"]]
                    g = _geomean(vals)
                    row.append("-" if g is None else
                               f"{g:.2f}x ({min(vals):.2f}-{max(vals):.2f})")
                rows.append(row)
    return header, rows


def model_line(m: dict) -> str:
    """One line for a (model, mode) record: each variant's images/s and ratio to torchvision's,
    and its step memory where measured."""
    base = m["variants"].get("torchvision", {}).get("median_ms")
    parts = []
    for v, st in m["variants"].items():
        if "median_ms" not in st:
            parts.append(f"{v} {'error' if 'error' in st else '-'}")
            continue
        cell = f"{v} {st['images_per_s']:.0f} img/s"
        if base and v != "torchvision":
            cell += f" ({base / st['median_ms']:.2f}x)"
        if st.get("peak_mib") is not None:
            cell += f" {st['peak_mib']:.0f} MiB"
        parts.append(cell)
    return f"{m['model']} {m['mode']} {m['batch']}x{m['image_size']}²: " + "; ".join(parts)


def model_rows(run: dict) -> Tuple[List[str], List[List[str]]]:
    """One row per (model, mode, variant): images/s, ratio to torchvision, step memory."""
    header = ["model", "mode", "variant", "batch", "img/s", "ms/step", "vs torchvision",
              "step peak MiB"]
    rows = []
    for m in run.get("models", []):
        base = m["variants"].get("torchvision", {}).get("median_ms")
        for v, st in m["variants"].items():
            if "median_ms" in st:
                ratio = _ratio(base / st["median_ms"]) if base else "-"
                rows.append([m["model"], m["mode"], v, f"{m['batch']}x{m['image_size']}²",
                             f"{st['images_per_s']:.1f}", _impl_cell(st), ratio,
                             "-" if st.get("peak_mib") is None else f"{st['peak_mib']:.0f}"])
            else:
                rows.append([m["model"], m["mode"], v, f"{m['batch']}x{m['image_size']}²",
                             "error" if "error" in st else "-", "-", "-", "-"])
    return header, rows


def _legend(run: dict) -> List[str]:
    s = run["settings"]
    return [
        "times: median ms ± half the interquartile range, "
        + ("CUDA events" if run["env"]["device_type"] == "cuda"
           else f"time.perf_counter, {run['env']['torch_threads']} torch threads")
        + f"; inputs rotated through up to {max((r['input_sets'] for r in run['ops']), default=1)} "
          f"copies when a set fits in cache, each call on the next set; implementations "
          f"interleaved, in a random order each round",
        "GB/s: the case's fewest bytes (DESIGN.md floors: N elements of b bytes, e.g. 2Nb for a "
        "training forward) / fastnn's median; % copy: that over the bandwidth of a clone of the "
        "same tensor (2Nb moved) timed in the same rounds (median over the cases of that shape, "
        "dtype and layout)",
        "vs X: X's median / fastnn's median (above 1: fastnn is faster); forward cases run "
        "without autograd, backward cases take gradients of input, weight, bias (and residual)",
        "torch.compile: " + {
            "none": "not timed (--compile headline or all to time it)",
            "headline": "timed on the quick set's shapes only (--compile all for every shape)",
            "all": "timed on every shape"}[s["compile"]]
        + ("" if s["compile"] == "none"
           else f"; dynamic=False, stops after {s['compile_budget_s']:g} s spent compiling"),
    ] + (["fastnn reference: timed on the quick set's shapes only (--reference all for every "
          "shape)"] if s.get("reference") == "headline" and "reference" in s["baselines"]
         else [])


def error_lines(run: dict) -> List[str]:
    """Each distinct failure once, with how many cases it hit."""
    seen: Dict[Tuple[str, str], int] = {}
    for r in run["ops"]:
        for name, st in r["impls"].items():
            if "error" in st:
                key = (name, st["error"])
                seen[key] = seen.get(key, 0) + 1
    for m in run.get("models", []):
        for name, st in m["variants"].items():
            if "error" in st:
                key = (f"{m['model']} {name}", st["error"])
                seen[key] = seen.get(key, 0) + 1
    return [f"error in {name} ({n} case{'s' if n > 1 else ''}): {err}"
            for (name, err), n in seen.items()]


def _many_shapes(run: dict) -> bool:
    return len({tuple(r["shape"]) for r in run["ops"]}) > 4


def render_text(run: dict, full: bool = True) -> str:
    """The terminal report; full=False leaves out the per-shape tables (they are in bench.md)."""
    out = [backend_line(run["env"])]
    if run["ops"]:
        if full:
            header, groups = op_table_rows(run)
            for title, rows in groups:
                out += ["", title] + _text_table(header, rows)
        if _many_shapes(run) or not full:
            header, rows = aggregate_rows(run)
            out += ["", "Over all shapes (geometric mean of speedups; median % of copy)"]
            out += _text_table(header, rows)
        if not full:
            out += ["", f"({len(run['ops'])} rows per shape are in bench.md and bench.json)"]
        claims = claim_lines(run)
        if claims:
            out += ["", "Key ratios:"] + ["  " + c for c in claims]
        summ = summary_lines(run)
        if summ:
            out += [""] + summ
        out += [""] + _legend(run)
    if run.get("targets"):
        header, groups = op_table_rows({**run, "ops": run["targets"]})
        out += ["", "The goals' own cases (--targets)"]
        for title, rows in groups:
            out += [title] + _text_table(header, rows)
        if not run["ops"]:
            out += ["", "Key ratios:"] + ["  " + c for c in claim_lines(run)]
    if run.get("models"):
        header, rows = model_rows(run)
        out += ["", "Model level (images/s, median)"] + _text_table(header, rows)
    out += [""] + error_lines(run) + [f"note: {n}" for n in run["settings"].get("notes", [])]
    out += [f"run time {run['run_time_s']:.0f} s"]
    return "\n".join(out)


def _md_table(header: List[str], rows: List[List[str]]) -> List[str]:
    aligns = ["---" if i < 3 or h in ("layers", "case", "model", "mode", "variant") else "---:"
              for i, h in enumerate(header)]
    return (["| " + " | ".join(header) + " |", "| " + " | ".join(aligns) + " |"]
            + ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows])


def render_markdown(run: dict) -> str:
    env = run["env"]
    out = [f"# fastnn-bench results ({env['device']})", ""]
    out += ["- " + line for line in env_lines(env)]
    out += [f"- command: `{run['settings']['command']}`", f"- run time {run['run_time_s']:.0f} s"]
    out += [f"- note: {n}" for n in run["settings"].get("notes", [])]
    out += [f"- {e}" for e in error_lines(run)] + [""]
    if run["ops"]:
        claims = claim_lines(run)
        if claims:
            out += ["## Key ratios", ""] + ["- " + c for c in claims] + [""]
        summ = summary_lines(run)
        if summ:
            out += ["## Summary", ""] + ["- " + s for s in summ] + [""]
        out += ["## Op level", ""] + ["- " + s for s in _legend(run)] + [""]
        if _many_shapes(run):
            header, rows = aggregate_rows(run)
            out += ["### Over all shapes", "",
                    "Geometric mean of fastnn's speedup (range over shapes); median % of copy "
                    "bandwidth.", ""] + _md_table(header, rows) + [""]
        header, groups = op_table_rows(run, where=True)
        for title, rows in groups:
            out += [f"### {title}", ""] + _md_table(header, rows) + [""]
    if run.get("targets"):
        if not run["ops"]:
            out += ["## Key ratios", ""] + ["- " + c for c in claim_lines(run)] + [""]
        header, groups = op_table_rows({**run, "ops": run["targets"]})
        out += ["## The goals' own cases (--targets)", ""]
        for title, rows in groups:
            out += [f"### {title}", ""] + _md_table(header, rows) + [""]
    if run.get("models"):
        header, rows = model_rows(run)
        out += ["## Model level", "",
                "Images/s from the median step time (± half the IQR); step peak: CUDA memory a "
                "step needs above the resident parameters and optimizer state.",
                ""] + _md_table(header, rows) + [""]
    return "\n".join(out)


def _short_label(r: dict) -> str:
    return (f"{_shape_str(r['shape'])} {SHORT_DTYPE[r['dtype']]} {SHORT_LAYOUT[r['layout']]}")


def _speedup_axis(ax) -> None:
    """Log y axis labelled 0.5x, 1x, 2x ..."""
    from matplotlib import ticker
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def write_plots(run: dict, out_dir: str) -> List[str]:
    """bench.png (speedup per case; % of copy bandwidth per case), speedup_by_shape.png when the
    run covers model shapes, models.png with --models."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    colors = {"torch": "tab:blue", "compile": "tab:orange", "reference": "tab:gray",
              "fastnn": "tab:green"}
    ops = run["ops"]
    title = f"fastnn-bench: {run['env']['device']} ({run['env']['fastnn_backend']} backend)"
    if ops:
        cases = [c for c in CASES if any(r["case"] == c for r in ops)]
        baselines = _columns(run)
        fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.6 * len(cases) + 3), 9))
        ax = axes[0]
        width = 0.8 / max(1, len(baselines))
        for k, b in enumerate(baselines):
            label = f"vs {IMPL_TITLES[b]} (bar: geometric mean; dots: each shape/dtype/layout)"
            for ci, c in enumerate(cases):
                vals = [r["speedup"][b] for r in ops if r["case"] == c and b in r["speedup"]]
                if not vals:
                    continue
                x0 = ci - 0.4 + width * (k + 0.5)
                ax.bar(x0, _geomean(vals), width * 0.9, color=colors[b], alpha=0.35, label=label)
                label = None
                jit = [x0 + width * 0.6 * ((i % 7) / 6 - 0.5) for i in range(len(vals))]
                ax.scatter(jit, vals, s=10, color=colors[b], zorder=3)
        ax.axhline(1.0, color="black", lw=0.8)
        _speedup_axis(ax)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("speedup of fastnn (x)")
        ax.set_title(title, fontsize=10)
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        ax.legend(uniq.values(), uniq.keys(), fontsize=7, loc="best")
        ax = axes[1]
        impls = ["fastnn"] + [b for b in baselines if b != "reference"]
        width = 0.8 / len(impls)
        for k, name in enumerate(impls):
            for ci, c in enumerate(cases):
                vals = [r["impls"][name]["pct_copy"] for r in ops if r["case"] == c
                        and r["impls"].get(name, {}).get("pct_copy") is not None]
                if not vals:
                    continue
                x0 = ci - 0.4 + width * (k + 0.5)
                jit = [x0 + width * 0.6 * ((i % 7) / 6 - 0.5) for i in range(len(vals))]
                ax.scatter(jit, vals, s=10, color=colors[name],
                           label=IMPL_TITLES[name] if ci == 0 else None, zorder=3)
                ax.hlines(sorted(vals)[len(vals) // 2], x0 - width * 0.4, x0 + width * 0.4,
                          color=colors[name])
        ax.axhline(100.0, color="black", lw=0.8, ls="--")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([f"{c}\n({CASES[c].byte_model})" for c in cases], rotation=20,
                           ha="right", fontsize=8)
        ax.set_ylabel("% of clone bandwidth (fewest bytes / time)")
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        ax.legend(uniq.values(), uniq.keys(), fontsize=7, loc="best")
        fig.tight_layout()
        path = os.path.join(out_dir, "bench.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

        shapes = sorted({tuple(r["shape"]) for r in ops}, key=lambda s: (math.prod(s), s))
        if len(shapes) > 4 and "torch" in baselines:
            combos = [(d, l) for d in DTYPES for l in LAYOUTS
                      if any(r["dtype"] == d and r["layout"] == l for r in ops)]
            fig, axes = plt.subplots(len(combos), 1, figsize=(max(10, 0.22 * len(shapes) + 3),
                                                               3.2 * len(combos)), squeeze=False)
            index = {s: i for i, s in enumerate(shapes)}
            for ax, (d, l) in zip(axes[:, 0], combos):
                for c in cases:
                    pts = sorted((index[tuple(r["shape"])], r["speedup"]["torch"]) for r in ops
                                 if r["case"] == c and r["dtype"] == d and r["layout"] == l
                                 and "torch" in r["speedup"])
                    if pts:
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", lw=0.8,
                                label=c)
                ax.axhline(1.0, color="black", lw=0.8)
                _speedup_axis(ax)
                ax.set_title(f"fastnn vs eager per layer shape, {SHORT_DTYPE[d]} "
                             f"{SHORT_LAYOUT[l]}", fontsize=9)
                ax.set_xticks(range(len(shapes)))
                ax.set_xticklabels([_shape_str(s) for s in shapes], rotation=90, fontsize=5)
                ax.set_ylabel("speedup (x)")
                ax.legend(fontsize=6, ncol=3)
            fig.tight_layout()
            path = os.path.join(out_dir, "speedup_by_shape.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    if run.get("models"):
        models = run["models"]
        variants = []
        for m in models:
            for v in m["variants"]:
                if v not in variants:
                    variants.append(v)
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, mode in zip(axes, ("train", "infer")):
            recs = [m for m in models if m["mode"] == mode]
            width = 0.8 / max(1, len(variants))
            for k, v in enumerate(variants):
                xs = [i - 0.4 + width * (k + 0.5) for i in range(len(recs))]
                ys = [m["variants"].get(v, {}).get("images_per_s", 0) for m in recs]
                ax.bar(xs, ys, width * 0.9, label=v)
            ax.set_xticks(range(len(recs)))
            ax.set_xticklabels([m["model"] for m in recs])
            ax.set_ylabel("images/s")
            ax.set_title(f"{'training step' if mode == 'train' else 'inference'}", fontsize=10)
            ax.legend(fontsize=7)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, "models.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_outputs(run: dict, out_dir: str) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    path = os.path.join(out_dir, "bench.json")
    with open(path, "w") as f:
        json.dump(run, f, indent=1)
    paths.append(path)
    path = os.path.join(out_dir, "bench.md")
    with open(path, "w") as f:
        f.write(render_markdown(run) + "\n")
    paths.append(path)
    paths += write_plots(run, out_dir)
    return paths


# ---------------------------------------------------------------------------------------------
# Comparing two runs

def _key(r: dict) -> tuple:
    return (r["case"], tuple(r["shape"]), r["dtype"], r["layout"])


def combine_runs(runs: List[dict]) -> dict:
    """Several runs of the same set as one: per case, the geometric means over the runs of
    fastnn's median time and of each speedup (speedups are measured within a run, so their mean
    cancels most of a machine's drift between runs); per model variant, of images/s. Cases and
    variants missing from some runs are averaged over the runs that have them."""
    if len(runs) == 1:
        return runs[0]
    ops: Dict[tuple, List[dict]] = {}
    for run in runs:
        for r in run.get("ops", []):
            ops.setdefault(_key(r), []).append(r)
    combined_ops = []
    for rs in ops.values():
        r = dict(rs[0])
        times = [x["impls"].get("fastnn", {}).get("median_ms") for x in rs]
        r["impls"] = {"fastnn": {"median_ms": _geomean(times)}} if _geomean(times) else {}
        r["speedup"] = {}
        for base in {k for x in rs for k in x["speedup"]}:
            g = _geomean([x["speedup"].get(base) for x in rs])
            if g:
                r["speedup"][base] = g
        combined_ops.append(r)
    models: Dict[tuple, List[dict]] = {}
    for run in runs:
        for m in run.get("models", []):
            models.setdefault((m["model"], m["mode"]), []).append(m)
    combined_models = []
    for ms in models.values():
        m = dict(ms[0])
        m["variants"] = {}
        for v in {v for x in ms for v in x["variants"]}:
            g = _geomean([x["variants"].get(v, {}).get("images_per_s") for x in ms])
            m["variants"][v] = {"images_per_s": g} if g else {}
        combined_models.append(m)
    env = dict(runs[0]["env"])
    env["runs"] = len(runs)
    return {"env": env, "ops": combined_ops, "models": combined_models}


def _group_lines(ia: dict, ib: dict, common: List[tuple], baseline: str) -> List[str]:
    """Geometric-mean speedup over `baseline` in A and B by dtype and layout and by case, and
    how many cases are slower than it."""
    groups: Dict[str, List[tuple]] = {"all": list(common)}
    for k in common:
        groups.setdefault(f"{k[2]} {k[3]}", []).append(k)
    for k in common:
        groups.setdefault(k[0], []).append(k)
    header = ["group", "cases", "A", "B", "B/A"]
    rows = []
    for name, keys in groups.items():
        keys = [k for k in keys if baseline in ia[k]["speedup"] and baseline in ib[k]["speedup"]]
        ga = _geomean([ia[k]["speedup"][baseline] for k in keys])
        gb = _geomean([ib[k]["speedup"][baseline] for k in keys])
        if ga and gb:
            rows.append([name, str(len(keys)), f"{ga:.3f}x", f"{gb:.3f}x", f"{gb / ga:.3f}"])
    if not rows:
        return []
    keys = [k for k in common if baseline in ia[k]["speedup"] and baseline in ib[k]["speedup"]]
    slower_a = sum(1 for k in keys if ia[k]["speedup"][baseline] < 1)
    slower_b = sum(1 for k in keys if ib[k]["speedup"][baseline] < 1)
    return (["", f"Speedup over {IMPL_TITLES[baseline]}, geometric mean by group"]
            + _text_table(header, rows)
            + [f"slower than {IMPL_TITLES[baseline]}: {slower_a} of {len(keys)} cases (A), "
               f"{slower_b} (B)"])


def compare_runs(a, b, name_a: str = "A", name_b: str = "B") -> str:
    """Text report of what changed from run A to run B: fastnn's time per case, the speedups over
    each baseline, and their geometric means by group. A or B may be a list of runs of the same
    set, taken alternately with the other side's: they are combined with combine_runs."""
    a = combine_runs(a) if isinstance(a, list) else a
    b = combine_runs(b) if isinstance(b, list) else b
    out = []
    for label, run, name in (("A", a, name_a), ("B", b, name_b)):
        env = run["env"]
        runs = f" ({env['runs']} runs combined)" if env.get("runs", 1) > 1 else ""
        out.append(f"{label}: {name}{runs}: {env['device']}, torch {env['torch']}, "
                   f"fastnn backend {env['fastnn_backend']}, commit "
                   f"{(env.get('git_commit') or 'unknown')[:12]}, {env['date']}")
    if a["env"]["device"] != b["env"]["device"]:
        out.append("note: the two runs are on different devices")
    ia = {_key(r): r for r in a.get("ops", [])}
    ib = {_key(r): r for r in b.get("ops", [])}
    common = [k for k in ia if k in ib]
    out.append(f"{len(common)} op cases in both runs ({len(ia) - len(common)} only in A, "
               f"{len(ib) - len(common)} only in B)")
    baselines = [x for x in BASELINES
                 if any(x in ia[k]["speedup"] and x in ib[k]["speedup"] for k in common)]
    header = ["case", "shape", "dtype/layout", "fastnn A ms", "fastnn B ms", "B/A"]
    for x in baselines:
        header += [f"vs {IMPL_TITLES[x]} A", f"vs {IMPL_TITLES[x]} B"]
    rows, ratios = [], []
    for k in common:
        ra, rb = ia[k], ib[k]
        fa, fb = ra["impls"].get("fastnn", {}), rb["impls"].get("fastnn", {})
        ratio = None
        if "median_ms" in fa and "median_ms" in fb:
            ratio = fb["median_ms"] / fa["median_ms"]
            ratios.append(ratio)
        row = [k[0], _shape_str(k[1]), f"{SHORT_DTYPE[k[2]]} {SHORT_LAYOUT[k[3]]}",
               _fmt_ms(fa.get("median_ms")), _fmt_ms(fb.get("median_ms")),
               "-" if ratio is None else f"{ratio:.2f}"]
        for x in baselines:
            row += [_ratio(ra["speedup"].get(x)), _ratio(rb["speedup"].get(x))]
        rows.append(row)
    if rows:
        out += [""] + _text_table(header, rows)
    if ratios:
        g = _geomean(ratios)
        faster = sum(1 for r in ratios if r < 0.95)
        slower = sum(1 for r in ratios if r > 1.05)
        out += ["", f"fastnn time B/A: geometric mean {g:.3f} ({faster} cases >5% faster in B, "
                    f"{slower} >5% slower)"]
    for x in baselines:
        ga = _geomean([ia[k]["speedup"][x] for k in common if x in ia[k]["speedup"]])
        gb = _geomean([ib[k]["speedup"][x] for k in common if x in ib[k]["speedup"]])
        if ga and gb:
            out.append(f"speedup vs {IMPL_TITLES[x]}: geometric mean {ga:.2f}x (A) -> "
                       f"{gb:.2f}x (B)")
    for x in baselines:
        out += _group_lines(ia, ib, common, x)
    ma = {(m["model"], m["mode"]): m for m in a.get("models", [])}
    mb = {(m["model"], m["mode"]): m for m in b.get("models", [])}
    mcommon = [k for k in ma if k in mb]
    if mcommon:
        header = ["model", "mode", "variant", "img/s A", "img/s B", "B/A"]
        rows = []
        for k in mcommon:
            for v in ma[k]["variants"]:
                sa = ma[k]["variants"][v].get("images_per_s")
                sb = mb[k]["variants"].get(v, {}).get("images_per_s")
                rows.append([k[0], k[1], v, "-" if sa is None else f"{sa:.1f}",
                             "-" if sb is None else f"{sb:.1f}",
                             f"{sb / sa:.2f}" if sa and sb else "-"])
        out += ["", "Model level"] + _text_table(header, rows)
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Command line

def _split(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _parse_shapes(spec: str, extra: List[str], device: torch.device, batch: int,
                  image_size: int) -> List[BNShape]:
    shapes: Dict[tuple, BNShape] = {}

    def add(items):
        for s in items:
            if s.shape in shapes:  # the same model's count, whichever set named the shape
                for m, c in s.layers.items():
                    shapes[s.shape].layers[m] = max(shapes[s.shape].layers.get(m, 0), c)
            else:
                shapes[s.shape] = BNShape(s.shape, s.eps, dict(s.layers))
    for token in _split(spec):
        if token == "none":
            continue
        if token == "quick":
            add(_bench_shapes.quick_shapes(device.type, batch))
        elif token == "all":
            add(_bench_shapes.quick_shapes(device.type, batch))
            add(_bench_shapes.distinct_bn_shapes(_bench_shapes.MODELS, batch, image_size))
        elif token in _bench_shapes.MODELS:
            add(_bench_shapes.distinct_bn_shapes([token], batch, image_size))
        else:
            raise SystemExit(f"fastnn-bench: unknown shape set {token!r} (quick, all, "
                             f"{', '.join(_bench_shapes.MODELS)}; --shape N,C,H,W for others)")
    for text in extra:
        try:
            dims = tuple(int(v) for v in text.split(","))
        except ValueError:
            dims = ()
        if len(dims) != 4 or min(dims) < 1:
            raise SystemExit(f"fastnn-bench: --shape wants N,C,H,W, got {text!r}")
        add([BNShape(dims, 1e-5, {"--shape": 1})])
    return list(shapes.values())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastnn-bench",
        description="Benchmark fastnn's batch norm against nn.BatchNorm2d, the eager op sequence, "
                    "torch.compile and fastnn's reference fallback.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="cases: " + ", ".join(CASES) + "\n\nexamples:\n"
               "  fastnn-bench --quick --out bench-out\n"
               "  fastnn-bench --shapes resnet50 --dtypes bfloat16 --layouts channels_last\n"
               "  fastnn-bench --models resnet50 --out bench-out\n"
               "  fastnn-bench --compare old/bench.json new/bench.json")
    p.add_argument("--quick", action="store_true",
                   help="a few ResNet-50 shapes (CPU: under 3 minutes on 2 cores)")
    p.add_argument("--out", metavar="DIR", help="write bench.md, bench.json and PNG plots here")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=int, default=None,
                   help="batch size of the layer shapes (default: 128 on CUDA, 32 on CPU)")
    p.add_argument("--image-size", type=int, default=224,
                   help="image size the layer shapes are derived at (default 224)")
    p.add_argument("--shapes", default=None,
                   help="comma list of: quick, resnet50, densenet121, googlenet, all "
                        "(default: quick with --quick; all on CUDA; quick,resnet50 on CPU)")
    p.add_argument("--shape", action="append", default=[], metavar="N,C,H,W",
                   help="an extra shape (repeatable)")
    p.add_argument("--cases", default=None, help="comma list of cases (default: all)")
    p.add_argument("--dtypes", default=None,
                   help="comma list of float32, float16, bfloat16 (default: all three on CUDA; "
                        "float32,bfloat16 on CPU)")
    p.add_argument("--layouts", default="nchw,channels_last", help="nchw and/or channels_last")
    p.add_argument("--baselines", default="torch,compile,reference",
                   help="comma list of torch, compile, reference")
    p.add_argument("--compile", choices=["auto", "none", "headline", "all"], default="auto",
                   help="where torch.compile of the eager sequence is timed: on the quick set's "
                        "shapes (headline), all shapes, or nowhere; auto = headline on CUDA, none "
                        "on CPU (compiling is slow there)")
    p.add_argument("--reference", choices=["auto", "none", "headline", "all"], default="auto",
                   help="where fastnn's reference fallback is timed; auto = every shape with "
                        "--quick or --shapes, else the quick set's shapes only")
    p.add_argument("--compile-budget", type=float, default=None, metavar="S",
                   help="stop compiling new cases after S seconds spent compiling "
                        "(default 60 with --quick, 120 otherwise)")
    p.add_argument("--time-limit", type=float, default=None, metavar="S",
                   help="start no new shape/dtype/layout after S seconds of op timing (default: "
                        "420 for the full CUDA set, else none); the output says what was left")
    p.add_argument("--reps", type=int, default=None,
                   help="timed repeats per implementation (default: adaptive)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    p.add_argument("--system-malloc", action="store_true",
                   help="CPU: leave the C allocator as it is (by default freed memory stays in "
                        "the process, as with a caching allocator, so page faults of fresh "
                        "mmaps do not swamp the timings)")
    p.add_argument("--models", default=None,
                   help="also time a training step and inference of these torchvision models "
                        "(comma list of resnet50, densenet121, googlenet): torchvision's, with "
                        "fastnn's BN modules swapped in, fastnn.convert()ed, and fastnn.models' "
                        "own build")
    p.add_argument("--model-batch", type=int, default=None,
                   help="training batch for --models (default 128 on CUDA, 8 on CPU)")
    p.add_argument("--model-infer-batch", type=int, default=None,
                   help="inference batch for --models (default 256 on CUDA, the training "
                        "batch on CPU)")
    p.add_argument("--model-image-size", type=int, default=None,
                   help="image size for --models (default 224 on CUDA, 64 on CPU)")
    p.add_argument("--model-compile", action="store_true",
                   help="with --models, also time torchvision + torch.compile and fastnn + "
                        "torch.compile (each takes a minute or more to compile)")
    p.add_argument("--no-ops", action="store_true", help="skip the op-level cases")
    p.add_argument("--targets", action="store_true",
                   help="also time the exact cases fastnn's goals are stated for on this device "
                        "type (CUDA: fp16 training forward at 256x64x56x56, bf16 BN+add+ReLU "
                        "forward+backward at 256x256x56x56; CPU: float32 at 32x64x56x56) and "
                        "say whether each goal is met")
    p.add_argument("--list-shapes", action="store_true",
                   help="print the layer shapes that would be timed and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                   help="print the differences between two runs and exit; either side may be "
                        "a comma list of runs of the same set (taken alternately with the "
                        "other side's), combined as geometric means per case")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.compare:
        sides = []
        for spec in args.compare:
            runs = []
            for path in _split(spec):
                with open(path) as f:
                    runs.append(json.load(f))
            sides.append(runs)
        print(compare_runs(sides[0], sides[1], args.compare[0], args.compare[1]))
        return 0

    started = time.perf_counter()
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fastnn-bench: --device cuda but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    if not args.system_malloc and (not cuda or args.models):
        keep_freed_memory()
    batch = args.batch_size or (128 if cuda else 32)
    shape_spec = args.shapes or ("quick" if args.quick else ("all" if cuda else "quick,resnet50"))
    # The layer shapes come from torchvision's models: not needed when no op set is timed.
    shapes = ([] if args.no_ops and not args.list_shapes
              else _parse_shapes(shape_spec, args.shape, device, batch, args.image_size))
    if args.list_shapes:
        for s in shapes:
            print(f"{_shape_str(s.shape):>20}  eps={s.eps:g}  {s.where()}")
        return 0

    cases = _split(args.cases) if args.cases else list(CASES)
    dtypes = _split(args.dtypes) if args.dtypes else (
        ["bfloat16", "float16", "float32"] if cuda else ["float32", "bfloat16"])
    layouts = _split(args.layouts)
    baselines = _split(args.baselines)
    for name, values, allowed in (("case", cases, CASES), ("dtype", dtypes, DTYPES),
                                  ("layout", layouts, LAYOUTS), ("baseline", baselines, BASELINES)):
        for v in values:
            if v not in allowed:
                raise SystemExit(f"fastnn-bench: unknown {name} {v!r}; choose from "
                                 f"{', '.join(allowed)}")
    mode = args.compile if args.compile != "auto" else ("headline" if cuda else "none")
    if mode == "none" and "compile" in baselines:
        baselines.remove("compile")
    ref_mode = args.reference if args.reference != "auto" else (
        "all" if args.quick or args.shapes else "headline")
    if ref_mode == "none" and "reference" in baselines:
        baselines.remove("reference")
    notes = []
    if "reference" in baselines and not fastnn.ops.has_kernel(device.type):
        baselines.remove("reference")
        notes.append("fastnn has no compiled kernel for this device: the fastnn column IS the "
                     "reference fallback, so no separate reference column")
    policy = copy.copy(POLICIES[(device.type if cuda else "cpu", bool(args.quick))])
    if args.reps:
        policy.min_reps = policy.max_reps = policy.min_reps_other = args.reps
    budget = args.compile_budget if args.compile_budget is not None else (
        60.0 if args.quick else 120.0)
    plan = OpPlan(device=device, shapes=shapes, cases=cases, dtypes=dtypes, layouts=layouts,
                  baselines=baselines,
                  compile_shapes=None if mode == "all" else _bench_shapes.headline_shapes(
                      device.type),
                  compile_budget_s=budget, policy=policy,
                  time_limit_s=args.time_limit if args.time_limit is not None else (
                      420.0 if cuda and not args.quick and not args.shapes else None),
                  reference_shapes=None if ref_mode == "all" else _bench_shapes.headline_shapes(
                      device.type))

    env = collect_env(device)
    print("\n".join(env_lines(env)), flush=True)
    for n in notes:
        print("note: " + n, flush=True)
    if not args.no_ops:
        print(f"{plan.size} op cases: {len(shapes)} shapes x {len(dtypes)} dtypes x "
              f"{len(layouts)} layouts x {len(cases)} cases; baselines: "
              f"{', '.join(baselines) or 'none'}", flush=True)
    progress = not args.no_progress
    run = {
        "schema": SCHEMA,
        "env": env,
        "settings": {
            "command": "fastnn-bench " + " ".join(argv if argv is not None else sys.argv[1:]),
            "quick": bool(args.quick), "batch_size": batch, "image_size": args.image_size,
            "shapes": shape_spec, "cases": cases, "dtypes": dtypes, "layouts": layouts,
            "baselines": baselines, "compile": mode, "compile_budget_s": budget,
            "reference": ref_mode,
            "policy": vars(policy), "notes": notes,
        },
        "ops": [],
        "models": [],
    }
    if args.targets:  # first: the most telling numbers, whatever cuts the run short
        run["targets"] = run_targets(plan, progress=progress)
    if not args.no_ops:
        run["ops"], truncated = run_ops(plan, progress=progress)
        if truncated:
            notes.append(truncated)
    if args.models:
        names = _split(args.models)
        for n in names:
            if n not in _bench_shapes.MODELS:
                raise SystemExit(f"fastnn-bench: unknown model {n!r}")
        low = 10 if cuda else 5
        mpolicy = Policy(warmup=2, target_s=2.0 if cuda else 3.0, min_reps=low, max_reps=50,
                         min_reps_other=low)
        if args.reps:
            mpolicy.min_reps = mpolicy.max_reps = mpolicy.min_reps_other = args.reps
        model_batch = args.model_batch or (128 if cuda else 8)
        run["models"] = run_models(names, device, model_batch,
                                   args.model_image_size or (224 if cuda else 64),
                                   use_compile=args.model_compile, policy=mpolicy,
                                   progress=progress,
                                   infer_batch=args.model_infer_batch or (
                                       256 if cuda else model_batch))
        run["settings"]["models"] = names
    run["run_time_s"] = time.perf_counter() - started
    run["load_average_end"] = _load_average()
    busy = load_note(env, run["load_average_end"])
    if busy:
        notes.append(busy)
    print()
    print(render_text(run, full=not (args.out and len(run["ops"]) > 400)), flush=True)
    if args.out:
        for path in write_outputs(run, args.out):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
