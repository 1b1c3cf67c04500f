"""fastnn: fast batch normalization and fused BN+ReLU / BN+add+ReLU for PyTorch CNNs."""
import os

import torch

from fastnn import _ext, ops, reference  # noqa: F401  (_ext loads the kernels first)
from fastnn import functional, models, nn  # noqa: F401
from fastnn.convert import AddReLU, convert, fuse_for_inference  # noqa: F401

__version__ = "0.1.0"
__all__ = ["AddReLU", "backend_info", "convert", "functional", "fuse_for_inference", "models",
           "nn", "ops", "reference"]


def backend_info() -> dict:
    """Which devices run compiled fastnn kernels, and why any do not.

    Returns a dict with ``compiled`` (fastnn._C loaded), ``devices`` (device types with kernels,
    e.g. ``('cpu', 'cuda')``), ``reason`` (why the reference is used, or None), ``torch``,
    ``built_against_torch``, ``cpu_isa`` (the instruction set of the CPU kernels: 'avx2',
    'avx512' or 'default'), ``cpu_isa_bf16_fp16`` (that of the kernels bfloat16/float16 CPU
    inputs run on: 'avx512' on CPUs with AVX-512 when fastnn._C_avx512 was built, else the same
    as ``cpu_isa``), ``cpu_bf16_avx512bf16`` (whether bfloat16 outputs are rounded with
    AVX512-BF16's conversion instruction, on CPUs that have it; the same bits either way),
    ``cuda_available`` and ``relu_mask`` (whether training forwards with ReLU
    keep the output's ReLU mask for the backward, CUDA and CPU; ``FASTNN_RELU_MASK=0`` turns it
    off, read once, when the first such forward runs).
    """
    try:
        from fastnn import _build_info
        built = _build_info.TORCH_VERSION
    except ImportError:
        built = None
    return {
        "compiled": _ext.loaded(),
        "devices": _ext.kernel_devices(),
        "reason": _ext.reason(),
        "torch": torch.__version__,
        "built_against_torch": built,
        "cpu_isa": _ext.cpu_isa(),
        "cpu_isa_bf16_fp16": _ext.cpu_reduced_isa() or _ext.cpu_isa(),
        "cpu_bf16_avx512bf16": _ext.cpu_bf16_avx512bf16(),
        "cuda_available": torch.cuda.is_available(),
        "relu_mask": os.environ.get("FASTNN_RELU_MASK", "1") != "0",
    }
