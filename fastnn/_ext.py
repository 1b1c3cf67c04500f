"""Loads the compiled kernels (fastnn._C) once and says which devices have them.

A missing or mismatched extension is never an import error: fastnn warns once, with the reason,
and every op runs on the pure-PyTorch reference (fastnn/reference.py). FASTNN_BACKEND=reference
forces that fallback.
"""
import importlib
import os
import warnings

import torch

_loaded = False
_reason = None


def _torch_major_minor(version):
    return ".".join(version.split("+")[0].split(".")[:2])


def _cpu_lacks(flags):
    """The CPU flags (as /proc/cpuinfo names them) this machine lacks, of `flags`; empty where
    that cannot be read (not Linux), since then nothing is known to be missing."""
    try:
        with open("/proc/cpuinfo") as f:
            have = set(f.read().split())
    except OSError:
        return []
    return [flag for flag in flags if flag not in have]


_reduced_isa = None
_bf16_avx512bf16 = False


def _load_reduced_cpu_kernels():
    """On a CPU with AVX-512, route bfloat16/float16 CPU inputs to fastnn._C_avx512 (the same
    kernels built for AVX-512, where they ran about 1.25x faster in geometric mean; float32 and
    float64 stay on fastnn._C's). FASTNN_CPU_AVX512=0 keeps every dtype on fastnn._C."""
    global _reduced_isa, _bf16_avx512bf16
    if os.environ.get("FASTNN_CPU_AVX512", "1").strip().lower() in ("0", "off", "false", "no"):
        return
    try:
        from fastnn import _build_info
    except ImportError:
        return
    isa = getattr(_build_info, "CPU_REDUCED_ISA", None)
    if not isa or _cpu_lacks(getattr(_build_info, "CPU_REDUCED_FLAGS", ("?",))):
        return
    try:
        table = importlib.import_module("fastnn._C_avx512").kernels
    except (ImportError, OSError, AttributeError):
        return
    use = getattr(importlib.import_module("fastnn._C"), "_use_reduced_cpu_kernels", None)
    if use is not None and use(table):  # False: a table from another build of fastnn
        _reduced_isa = isa
        _bf16_avx512bf16 = bool(getattr(importlib.import_module("fastnn._C_avx512"),
                                        "bfloat16_avx512bf16", False))


def _load():
    global _loaded, _reason
    backend = os.environ.get("FASTNN_BACKEND", "auto").strip().lower()
    if backend == "reference":
        _reason = "FASTNN_BACKEND=reference"
        return
    if backend not in ("auto", "", "compiled"):
        raise ValueError(f"FASTNN_BACKEND must be 'auto', 'compiled' or 'reference', got {backend!r}")
    try:
        from fastnn import _build_info  # written by setup.py next to the extension
        built = _build_info.TORCH_VERSION
        isa = getattr(_build_info, "CPU_ISA", None)
        missing = _cpu_lacks(getattr(_build_info, "CPU_FLAGS", ()))
    except ImportError:
        built, isa, missing = None, None, []
    if built is not None and _torch_major_minor(built) != _torch_major_minor(torch.__version__):
        _reason = (f"fastnn._C was built against torch {built} but torch {torch.__version__} is "
                   f"installed; rebuild fastnn (pip install --no-build-isolation .)")
    elif missing:
        # Loading it would be safe, but its first CPU kernel would stop the process (SIGILL).
        _reason = (f"fastnn._C's CPU kernels were built for {isa} but this CPU lacks "
                   f"{', '.join(missing)}; rebuild fastnn with FASTNN_CPU_ARCH=auto")
    else:
        try:
            importlib.import_module("fastnn._C")  # loading the library registers the ops
            _loaded = True
            _load_reduced_cpu_kernels()
            return
        except (ImportError, OSError) as e:
            _reason = f"fastnn._C could not be loaded ({type(e).__name__}: {e})"
    if backend == "compiled":
        raise ImportError(f"FASTNN_BACKEND=compiled but {_reason}")
    warnings.warn(f"{_reason}; fastnn uses its pure-PyTorch reference implementation",
                  RuntimeWarning, stacklevel=3)


_load()


def loaded():
    """True when the compiled extension is loaded and its ops are registered."""
    return _loaded


def reason():
    """Why the compiled extension is not in use, or None."""
    return _reason


# Every op of csrc/fastnn.cpp; an older fastnn._C may lack some of them on some device.
OPS = ("batch_norm_train", "batch_norm_eval", "batch_norm_backward", "batch_norm_dual",
       "batch_norm_dual_backward", "batch_norm_stats",
       "batch_norm_train_with_stats", "batch_norm_backward_reduce", "batch_norm_backward_elemt",
       "batch_norm_cat_with_stats")


def _registered_devices(op):
    if not _loaded:
        return ()
    devices = []
    for key, name in (("CPU", "cpu"), ("CUDA", "cuda")):
        try:
            if torch._C._dispatch_has_kernel_for_dispatch_key(f"fastnn::{op}", key):
                devices.append(name)
        except RuntimeError:  # an older fastnn._C without this op
            return ()
    return tuple(devices)


# Asked once, after loading: kernel_devices() is then a plain constant that torch.compile traces
# through (it cannot trace the dispatcher query itself).
_op_devices = {op: _registered_devices(op) for op in OPS}
_devices = _op_devices["batch_norm_train"]


def cpu_caches():
    """(level-2 cache, last-level cache, least output the CPU kernels write with non-temporal
    stores in a training pass, the same in an inference), in bytes, as fastnn._C's CPU kernels
    plan with them; None without fastnn._C (or with one older than this query)."""
    if not _loaded:
        return None
    query = getattr(importlib.import_module("fastnn._C"), "_cpu_caches", None)
    return tuple(query()) if query is not None else None


def cpu_isa():
    """The instruction set fastnn._C's CPU kernels were built for ('avx2', 'avx512', 'default'),
    or None when unknown."""
    try:
        from fastnn import _build_info
    except ImportError:
        return None
    return getattr(_build_info, "CPU_ISA", None)


def cpu_reduced_isa():
    """The instruction set of the kernels bfloat16/float16 CPU inputs run on when it is not
    cpu_isa()'s ('avx512'), else None."""
    return _reduced_isa


def cpu_bf16_avx512bf16():
    """Whether bfloat16 CPU outputs are rounded with AVX512-BF16's conversion instruction (the
    fastnn._C_avx512 kernels built for it, on a CPU that has it; FASTNN_CPU_AVX512_BF16=0 turns
    them off). The bits are the same either way."""
    return _bf16_avx512bf16


def kernel_devices(op="batch_norm_train"):
    """Device types ('cpu', 'cuda') for which fastnn._C registered a kernel of `op`."""
    return _op_devices[op]
