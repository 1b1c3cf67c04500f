"""Typed wrappers over torch.ops.fastnn.* and their fake (meta) kernels.

The ops themselves are declared in csrc/fastnn.cpp, their autograd in csrc/autograd.cpp. With the
fake kernels registered here they run under torch.compile(fullgraph=True), CUDA graphs and
torch.library.opcheck. When fastnn._C is not loaded none of this is registered, and
fastnn.functional runs fastnn.reference instead.
"""
import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch import _prims_common

from fastnn import _ext, reference

__all__ = ["available", "has_kernel", "batch_norm_train", "batch_norm_eval", "batch_norm_backward",
           "batch_norm_dual", "batch_norm_dual_backward", "batch_norm_stats",
           "batch_norm_train_with_stats", "batch_norm_backward_reduce",
           "batch_norm_backward_elemt", "batch_norm_cat_with_stats"]

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def available() -> bool:
    return _ext.loaded()


def has_kernel(device_type: str, op: str = "batch_norm_train") -> bool:
    """True when fastnn._C has a kernel of `op` for this device type ('cpu', 'cuda'): every op
    has one on every device fastnn._C was built for. Where it has none (an older build, or
    fastnn._C missing), fastnn.functional runs fastnn.reference or composes the op from
    others."""
    return device_type in _ext.kernel_devices(op)


def batch_norm_train(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                     running_mean: Optional[Tensor], running_var: Optional[Tensor],
                     momentum: float, eps: float, residual: Optional[Tensor] = None,
                     relu: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """(output, save_mean, save_invstd); running_mean/running_var are updated in place."""
    args = (input, weight, bias, running_mean, running_var, float(momentum), float(eps),
            residual, bool(relu))
    return torch.ops.fastnn.batch_norm_train.default(*args)


def batch_norm_eval(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    running_mean: Tensor, running_var: Tensor, eps: float,
                    residual: Optional[Tensor] = None, relu: bool = False) -> Tensor:
    args = (input, weight, bias, running_mean, running_var, float(eps), residual, bool(relu))
    return torch.ops.fastnn.batch_norm_eval.default(*args)


def batch_norm_backward(grad_output: Tensor, input: Tensor, weight: Optional[Tensor],
                        output: Optional[Tensor], mean: Tensor, invstd: Tensor, training: bool,
                        relu: bool, residual_grad: bool, relu_mask: Optional[Tensor] = None
                        ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_bias, grad_residual); see csrc/fastnn.cpp."""
    args = (grad_output, input, weight, output, mean, invstd, bool(training), bool(relu),
            bool(residual_grad), relu_mask)
    if torch.compiler.is_compiling() or torch.is_grad_enabled():
        return torch.ops.fastnn.batch_norm_backward.default(*args)
    with torch._C._AutoDispatchBelowAutograd():  # no graph to record: skip the Autograd key
        return torch.ops.fastnn.batch_norm_backward.default(*args)


def batch_norm_dual(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    running_mean: Optional[Tensor], running_var: Optional[Tensor], input2: Tensor,
                    weight2: Optional[Tensor], bias2: Optional[Tensor],
                    running_mean2: Optional[Tensor], running_var2: Optional[Tensor],
                    training: bool, momentum: float, eps: float, momentum2: float, eps2: float,
                    relu: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """[relu](bn(input) + bn2(input2)): (output, mean, invstd, mean2, invstd2)."""
    args = (input, weight, bias, running_mean, running_var, input2, weight2, bias2,
            running_mean2, running_var2, bool(training), float(momentum), float(eps),
            float(momentum2), float(eps2), bool(relu))
    return torch.ops.fastnn.batch_norm_dual.default(*args)


def batch_norm_dual_backward(grad_output: Tensor, input: Tensor, weight: Optional[Tensor],
                             input2: Tensor, weight2: Optional[Tensor], output: Optional[Tensor],
                             mean: Tensor, invstd: Tensor, mean2: Tensor, invstd2: Tensor,
                             training: bool, relu: bool, relu_mask: Optional[Tensor] = None):
    """(grad_input, grad_weight, grad_bias, grad_input2, grad_weight2, grad_bias2)."""
    args = (grad_output, input, weight, input2, weight2, output, mean, invstd, mean2, invstd2,
            bool(training), bool(relu), relu_mask)
    if torch.compiler.is_compiling() or torch.is_grad_enabled():
        return torch.ops.fastnn.batch_norm_dual_backward.default(*args)
    with torch._C._AutoDispatchBelowAutograd():  # no graph to record: skip the Autograd key
        return torch.ops.fastnn.batch_norm_dual_backward.default(*args)


def batch_norm_train_with_stats(input: Tensor, mean: Tensor, var: Tensor,
                                weight: Optional[Tensor], bias: Optional[Tensor],
                                running_mean: Optional[Tensor], running_var: Optional[Tensor],
                                momentum: float, eps: float, residual: Optional[Tensor] = None,
                                relu: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """batch_norm_train with the input's batch statistics (mean, biased var) given; they are
    treated as the functions of input they are (no gradient flows to mean and var)."""
    args = (input, mean, var, weight, bias, running_mean, running_var,
            float(momentum), float(eps), residual, bool(relu))
    return torch.ops.fastnn.batch_norm_train_with_stats.default(*args)


def batch_norm_cat_with_stats(inputs: Sequence[Tensor], mean: Tensor, var: Tensor,
                              weight: Optional[Tensor], bias: Optional[Tensor],
                              running_mean: Optional[Tensor], running_var: Optional[Tensor],
                              momentum: float, eps: float,
                              relu: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """batch_norm_train_with_stats of torch.cat(inputs, 1), without the concatenated copy."""
    inputs = list(inputs)
    args = (inputs, mean, var, weight, bias, running_mean, running_var,
            float(momentum), float(eps), bool(relu))
    return torch.ops.fastnn.batch_norm_cat_with_stats.default(*args)


# The parts of the training forward and backward (see csrc/fastnn.cpp). They are not
# differentiable: callers (SyncBatchNorm, DenseNet's shared statistics) wrap them in their own
# autograd.Function, so their inputs are detached here.

def batch_norm_stats(input: Tensor) -> Tuple[Tensor, Tensor]:
    """(mean, biased variance) per channel, in the accumulation dtype."""
    return torch.ops.fastnn.batch_norm_stats.default(input.detach())


def batch_norm_backward_reduce(grad_output: Tensor, input: Tensor, output: Optional[Tensor],
                               mean: Tensor, invstd: Tensor, relu: bool,
                               residual_grad: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(sum_dy, sum_dy_xhat, grad_residual)."""
    return torch.ops.fastnn.batch_norm_backward_reduce.default(
        grad_output.detach(), input.detach(), None if output is None else output.detach(), mean,
        invstd, bool(relu), bool(residual_grad))


def batch_norm_backward_elemt(grad_output: Tensor, input: Tensor, weight: Optional[Tensor],
                              output: Optional[Tensor], mean: Tensor, invstd: Tensor,
                              mean_dy: Tensor, mean_dy_xhat: Tensor, relu: bool) -> Tensor:
    """grad_input from the (globally) reduced mean_dy and mean_dy_xhat."""
    return torch.ops.fastnn.batch_norm_backward_elemt.default(
        grad_output.detach(), input.detach(), None if weight is None else weight.detach(),
        None if output is None else output.detach(), mean, invstd, mean_dy, mean_dy_xhat,
        bool(relu))


# ---------------------------------------------------------------------------------------------
# Fake kernels: shapes, dtypes and strides only (the same layout rule as csrc/batch_norm_common).

def output_memory_format(input: Tensor) -> torch.memory_format:
    """The memory format of the ops' outputs for `input`: torch's batch norm's rule,
    ``Tensor.suggest_memory_format()`` (channels_last when the strides are ordered like it, also
    for a tensor contiguous in both formats, such as (N, C, 1, 1) with channels_last strides)."""
    return _prims_common.suggest_memory_format(input)


def _empty_like_input(input: Tensor) -> Tensor:
    return torch.empty(input.shape, dtype=input.dtype, device=input.device,
                       memory_format=output_memory_format(input))


def _channel_stat(input: Tensor) -> Tensor:
    return input.new_empty((input.shape[1],), dtype=reference.accumulate_dtype(input.dtype))


def _check_devices(op: str, input: Tensor, **tensors: Optional[Tensor]) -> None:
    """The device check of the real kernels. A call mixing meta and real tensors dispatches to
    the fake kernel (as the Meta kernel), which must raise as the real kernel would."""
    for arg, t in tensors.items():
        if t is not None and t.device != input.device:
            raise RuntimeError(f"{op}: {arg} is on {t.device} but input is on {input.device}")


def _fake_train(input, weight, bias, running_mean, running_var, momentum, eps, residual, relu):
    _check_devices("fastnn.batch_norm_train", input, weight=weight, bias=bias,
                   running_mean=running_mean, running_var=running_var, residual=residual)
    return _empty_like_input(input), _channel_stat(input), _channel_stat(input)


def relu_mask_numel(input: Tensor, relu: bool) -> int:
    """Bytes of the ReLU mask the masked training forwards return, which their backward reads
    in place of the output: on CUDA one per 16-byte vector of the output; on CPU a bit per
    element and 8 bytes of padding, except for channels-first maps of fewer than 64 values
    (such as 7x7), where the CPU backward reads the output; none without relu (or on other
    devices)."""
    if not relu:
        return 0
    n = input.numel()
    if input.device.type == "cuda":
        vec = 16 // input.element_size()
        return (n + vec - 1) // vec
    if input.device.type == "cpu":
        if input.dim() > 2 and output_memory_format(input) == torch.contiguous_format:
            spatial = math.prod(input.shape[2:])
            if spatial < 64:
                return 0
        return 0 if n == 0 else (n + 7) // 8 + 8
    return 0


def _relu_mask(input: Tensor, relu: bool) -> Tensor:
    return input.new_empty((relu_mask_numel(input, relu),), dtype=torch.uint8)


def _fake_train_masked(input, weight, bias, running_mean, running_var, momentum, eps, residual,
                       relu):
    _check_devices("fastnn.batch_norm_train_masked", input, weight=weight, bias=bias,
                   running_mean=running_mean, running_var=running_var, residual=residual)
    return (_empty_like_input(input), _channel_stat(input), _channel_stat(input),
            _relu_mask(input, relu))


def _fake_eval(input, weight, bias, running_mean, running_var, eps, residual, relu):
    _check_devices("fastnn.batch_norm_eval", input, weight=weight, bias=bias,
                   running_mean=running_mean, running_var=running_var, residual=residual)
    return _empty_like_input(input)


def _fake_backward(grad_output, input, weight, output, mean, invstd, training, relu,
                   residual_grad, relu_mask=None):
    _check_devices("fastnn.batch_norm_backward", input, grad_output=grad_output, weight=weight,
                   output=output, mean=mean, invstd=invstd, relu_mask=relu_mask)
    grad_residual = _empty_like_input(input) if residual_grad else input.new_empty((0,))
    return _empty_like_input(input), _channel_stat(input), _channel_stat(input), grad_residual


def _fake_train_with_stats(input, mean, var, weight, bias, running_mean, running_var, momentum,
                           eps, residual, relu):
    _check_devices("fastnn.batch_norm_train_with_stats", input, mean=mean, var=var, weight=weight,
                   bias=bias, running_mean=running_mean, running_var=running_var,
                   residual=residual)
    return _empty_like_input(input), _channel_stat(input), _channel_stat(input)


def _fake_cat_with_stats(inputs, mean, var, weight, bias, running_mean, running_var, momentum,
                         eps, relu):
    if len(inputs) == 0:
        raise ValueError("fastnn.batch_norm_cat_with_stats: inputs must hold at least one tensor")
    first = inputs[0]
    _check_devices("fastnn.batch_norm_cat_with_stats", first, mean=mean, var=var, weight=weight,
                   bias=bias, running_mean=running_mean, running_var=running_var,
                   **{f"inputs[{i}]": t for i, t in enumerate(inputs)})
    # The layout rule of the kernels is torch.cat's.
    out = torch.cat(list(inputs), 1)
    return out, _channel_stat(out), _channel_stat(out)


def _fake_dual(input, weight, bias, running_mean, running_var, input2, weight2, bias2,
               running_mean2, running_var2, training, momentum, eps, momentum2, eps2, relu):
    _check_devices("fastnn.batch_norm_dual", input, weight=weight, bias=bias,
                   running_mean=running_mean, running_var=running_var, input2=input2,
                   weight2=weight2, bias2=bias2, running_mean2=running_mean2,
                   running_var2=running_var2)
    return (_empty_like_input(input), _channel_stat(input), _channel_stat(input),
            _channel_stat(input), _channel_stat(input))


def _fake_dual_masked(input, weight, bias, running_mean, running_var, input2, weight2, bias2,
                      running_mean2, running_var2, training, momentum, eps, momentum2, eps2,
                      relu):
    return (*_fake_dual(input, weight, bias, running_mean, running_var, input2, weight2, bias2,
                        running_mean2, running_var2, training, momentum, eps, momentum2, eps2,
                        relu),
            _relu_mask(input, relu and training))


def _fake_dual_backward(grad_output, input, weight, input2, weight2, output, mean, invstd, mean2,
                        invstd2, training, relu, relu_mask=None):
    _check_devices("fastnn.batch_norm_dual_backward", input, grad_output=grad_output,
                   weight=weight, input2=input2, weight2=weight2, output=output, mean=mean,
                   invstd=invstd, mean2=mean2, invstd2=invstd2, relu_mask=relu_mask)
    return (_empty_like_input(input), _channel_stat(input), _channel_stat(input),
            _empty_like_input(input), _channel_stat(input), _channel_stat(input))


def _fake_stats(input):
    return _channel_stat(input), _channel_stat(input)


def _fake_backward_reduce(grad_output, input, output, mean, invstd, relu, residual_grad):
    _check_devices("fastnn.batch_norm_backward_reduce", input, grad_output=grad_output,
                   output=output, mean=mean, invstd=invstd)
    grad_residual = _empty_like_input(input) if residual_grad else input.new_empty((0,))
    return _channel_stat(input), _channel_stat(input), grad_residual


def _fake_backward_elemt(grad_output, input, weight, output, mean, invstd, mean_dy, mean_dy_xhat,
                         relu):
    _check_devices("fastnn.batch_norm_backward_elemt", input, grad_output=grad_output,
                   weight=weight, output=output, mean=mean, invstd=invstd, mean_dy=mean_dy,
                   mean_dy_xhat=mean_dy_xhat)
    return _empty_like_input(input)


# ---------------------------------------------------------------------------------------------
# Autograd. The forward ops' Autograd kernels are C++ (csrc/autograd.cpp): each applies a
# torch::autograd::Function whose backward is the registered batch_norm_backward (or
# batch_norm_dual_backward) op, and whose first derivatives under create_graph=True come from
# the forward recomputed in differentiable ATen ops, so gradgradcheck holds.
#
# The helpers below build the same construction in Python, for mutating ops defined in Python
# (fastnn.nn.SyncBatchNorm's; torch.library.register_autograd refuses ops that mutate their
# arguments): an Autograd kernel that applies an autograd.Function whose forward redispatches
# below autograd.

def _redispatch(op, keyset, *args):
    """The op below autograd, redispatched with the Autograd kernel's keyset."""
    return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)


def _any_requires_grad_py(*args):
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


# torch._C._any_requires_grad (C++, faster) is missing from older releases such as torch 2.4.
_any_requires_grad = getattr(torch._C, "_any_requires_grad", _any_requires_grad_py)


def _autograd_kernel(op, function, differentiable):
    """The Autograd kernel of a mutating op: `function` when the call records a graph (one
    of the arguments at the indices `differentiable` requires grad), else the op below
    autograd."""
    def kernel(keyset, *args):
        if torch.is_grad_enabled() and _any_requires_grad(
                *(args[i] for i in differentiable)):
            return function.apply(keyset, *args)
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)
    return kernel


if _ext.loaded():
    _lib = torch.library.Library("fastnn", "FRAGMENT")  # noqa: TOR901

    torch.library.register_fake("fastnn::batch_norm_train", _fake_train, lib=_lib)
    torch.library.register_fake("fastnn::batch_norm_train_masked", _fake_train_masked, lib=_lib)
    torch.library.register_fake("fastnn::batch_norm_eval", _fake_eval, lib=_lib)
    torch.library.register_fake("fastnn::batch_norm_backward", _fake_backward, lib=_lib)
    torch.library.register_fake("fastnn::batch_norm_stats", _fake_stats, lib=_lib)
    torch.library.register_fake("fastnn::batch_norm_dual", _fake_dual, lib=_lib)
    torch.library.register_fake("fastnn::batch_norm_dual_masked", _fake_dual_masked, lib=_lib)
    torch.library.register_fake("fastnn::batch_norm_dual_backward", _fake_dual_backward,
                                lib=_lib)
    torch.library.register_fake("fastnn::batch_norm_train_with_stats", _fake_train_with_stats,
                                lib=_lib)
    torch.library.register_fake("fastnn::batch_norm_backward_reduce", _fake_backward_reduce,
                                lib=_lib)
    torch.library.register_fake("fastnn::batch_norm_backward_elemt", _fake_backward_elemt,
                                lib=_lib)
    torch.library.register_fake("fastnn::batch_norm_cat_with_stats", _fake_cat_with_stats,
                                lib=_lib)
