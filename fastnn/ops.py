"""Typed wrappers over torch.ops.fastnn.*, their fake (meta) kernels and autograd.

The ops themselves are declared in csrc/fastnn.cpp. Registering them with TORCH_LIBRARY plus fake
kernels and autograd here is what lets them run under torch.compile(fullgraph=True), CUDA graphs
and torch.library.opcheck. When fastnn._C is not loaded none of this is registered, and
fastnn.functional runs fastnn.reference instead.
"""
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from fastnn import _ext, reference

__all__ = ["available", "has_kernel", "batch_norm_train", "batch_norm_eval", "batch_norm_backward",
           "batch_norm_dual", "batch_norm_dual_backward", "batch_norm_stats",
           "batch_norm_train_with_stats", "batch_norm_backward_reduce",
           "batch_norm_backward_elemt", "batch_norm_cat_with_stats"]

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def available() -> bool:
    return _ext.loaded()


def has_kernel(device_type: str, op: str = "batch_norm_train") -> bool:
    """True when fastnn._C has a kernel of `op` for this device type ('cpu', 'cuda'). The
    forward/backward ops have kernels on every device fastnn._C was built for; the ops that split
    them into parts (batch_norm_stats, batch_norm_train_with_stats, batch_norm_backward_reduce
    and _elemt) have CPU kernels, and elsewhere fastnn.functional runs their reference."""
    return device_type in _ext.kernel_devices(op)


def _call(name: str, args: tuple, grad_tensors: tuple):
    """Calls torch.ops.fastnn.<name>. In eager mode it skips the dispatcher's trip through the
    op's Python Autograd kernel: with no graph to record it runs below autograd, and with one it
    applies the op's autograd.Function itself where the op has one (the same Function that kernel
    applies, about half the per-call cost; batch_norm_eval's autograd is torch.library's, reached
    through the op). Under torch.compile the op is called as it is, for tracing to see it."""
    op = getattr(torch.ops.fastnn, name).default
    if torch.compiler.is_compiling():
        return op(*args)
    if torch.is_grad_enabled() and torch._C._any_requires_grad(*grad_tensors):
        function = _AUTOGRAD_FUNCTIONS.get(name)
        return function.apply(None, *args) if function is not None else op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


# The autograd.Function of each mutating op (filled in below when fastnn._C is loaded).
_AUTOGRAD_FUNCTIONS = {}


def batch_norm_train(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                     running_mean: Optional[Tensor], running_var: Optional[Tensor],
                     momentum: float, eps: float, residual: Optional[Tensor] = None,
                     relu: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """(output, save_mean, save_invstd); running_mean/running_var are updated in place."""
    args = (input, weight, bias, running_mean, running_var, float(momentum), float(eps),
            residual, bool(relu))
    return _call("batch_norm_train", args, (input, weight, bias, residual))


def batch_norm_eval(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    running_mean: Tensor, running_var: Tensor, eps: float,
                    residual: Optional[Tensor] = None, relu: bool = False) -> Tensor:
    args = (input, weight, bias, running_mean, running_var, float(eps), residual, bool(relu))
    return _call("batch_norm_eval", args, (input, weight, bias, residual))


def batch_norm_backward(grad_output: Tensor, input: Tensor, weight: Optional[Tensor],
                        output: Optional[Tensor], mean: Tensor, invstd: Tensor, training: bool,
                        relu: bool, residual_grad: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_bias, grad_residual); see csrc/fastnn.cpp."""
    args = (grad_output, input, weight, output, mean, invstd, bool(training), bool(relu),
            bool(residual_grad))
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
    return _call("batch_norm_dual", args, (input, weight, bias, input2, weight2, bias2))


def batch_norm_dual_backward(grad_output: Tensor, input: Tensor, weight: Optional[Tensor],
                             input2: Tensor, weight2: Optional[Tensor], output: Optional[Tensor],
                             mean: Tensor, invstd: Tensor, mean2: Tensor, invstd2: Tensor,
                             training: bool, relu: bool):
    """(grad_input, grad_weight, grad_bias, grad_input2, grad_weight2, grad_bias2)."""
    args = (grad_output, input, weight, input2, weight2, output, mean, invstd, mean2, invstd2,
            bool(training), bool(relu))
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
    args = (input, mean.detach(), var.detach(), weight, bias, running_mean, running_var,
            float(momentum), float(eps), residual, bool(relu))
    return _call("batch_norm_train_with_stats", args, (input, weight, bias, residual))


def batch_norm_cat_with_stats(inputs: Sequence[Tensor], mean: Tensor, var: Tensor,
                              weight: Optional[Tensor], bias: Optional[Tensor],
                              running_mean: Optional[Tensor], running_var: Optional[Tensor],
                              momentum: float, eps: float,
                              relu: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """batch_norm_train_with_stats of torch.cat(inputs, 1), without the concatenated copy."""
    inputs = list(inputs)
    args = (inputs, mean.detach(), var.detach(), weight, bias, running_mean, running_var,
            float(momentum), float(eps), bool(relu))
    op = torch.ops.fastnn.batch_norm_cat_with_stats.default
    if torch.compiler.is_compiling():
        return op(*args)
    if torch.is_grad_enabled() and torch._C._any_requires_grad(*inputs, weight, bias):
        return _AUTOGRAD_FUNCTIONS["batch_norm_cat_with_stats"].apply(None, *args[1:], *inputs)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


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
    if input.dim() == 4 and not input.is_contiguous() and input.is_contiguous(
            memory_format=torch.channels_last):
        return torch.channels_last
    if input.dim() == 5 and not input.is_contiguous() and input.is_contiguous(
            memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


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


def _fake_eval(input, weight, bias, running_mean, running_var, eps, residual, relu):
    _check_devices("fastnn.batch_norm_eval", input, weight=weight, bias=bias,
                   running_mean=running_mean, running_var=running_var, residual=residual)
    return _empty_like_input(input)


def _fake_backward(grad_output, input, weight, output, mean, invstd, training, relu,
                   residual_grad):
    _check_devices("fastnn.batch_norm_backward", input, grad_output=grad_output, weight=weight,
                   output=output, mean=mean, invstd=invstd)
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


def _fake_dual_backward(grad_output, input, weight, input2, weight2, output, mean, invstd, mean2,
                        invstd2, training, relu):
    _check_devices("fastnn.batch_norm_dual_backward", input, grad_output=grad_output,
                   weight=weight, input2=input2, weight2=weight2, output=output, mean=mean,
                   invstd=invstd, mean2=mean2, invstd2=invstd2)
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
# Autograd. Both forward ops share one backward, itself the registered batch_norm_backward op.
# With create_graph=True (double backward) the first derivative is instead recomputed through the
# differentiable reference, so gradgradcheck holds.

def _save(ctx, input, weight, bias, residual, output, mean, invstd, training, relu, eps):
    ctx.training = training
    ctx.relu = relu
    ctx.eps = eps
    ctx.has_weight = weight is not None
    ctx.has_bias = bias is not None
    ctx.has_residual = residual is not None
    ctx.save_for_backward(input, weight, bias, residual, output if relu else None, mean, invstd)


def _backward(ctx, grad_output):
    input, weight, bias, residual, output, mean, invstd = ctx.saved_tensors
    need_input, need_weight, need_bias, need_residual = ctx.fastnn_needs
    if torch.is_grad_enabled():
        return _double_backward_grads(ctx, grad_output, input, weight, bias, residual, mean, invstd)
    gi, gw, gb, gr = batch_norm_backward(
        grad_output, input, weight, output, mean, invstd, ctx.training, ctx.relu,
        ctx.has_residual and need_residual)
    return (gi if need_input else None,
            gw.to(weight.dtype) if need_weight and weight is not None else None,
            gb.to(bias.dtype) if need_bias and bias is not None else None,
            gr if need_residual and residual is not None else None)


def _double_backward_grads(ctx, grad_output, input, weight, bias, residual, mean, invstd):
    """First derivatives as differentiable functions of (input, weight, bias, residual,
    grad_output), by differentiating the reference forward with create_graph=True."""
    inputs = [t for t in (input, weight, bias, residual) if t is not None and t.requires_grad]
    if ctx.training:
        out, _, _ = reference.batch_norm_train(input, weight, bias, None, None, 0.0, ctx.eps,
                                               residual, ctx.relu)
    else:
        acc = reference.accumulate_dtype(input.dtype)
        out = reference._normalize_affine(input.to(acc), mean, invstd, weight, bias, residual,
                                          ctx.relu, input.dtype)
    grads = iter(torch.autograd.grad(out, inputs, grad_output, create_graph=True,
                                     allow_unused=True))
    return tuple(next(grads) if t is not None and t.requires_grad else None
                 for t in (input, weight, bias, residual))


# Mutating ops (they update running statistics in place, which torch.library.register_autograd
# refuses) get an Autograd kernel that applies an autograd.Function whose forward redispatches
# below autograd.

def _redispatch(op, keyset, *args):
    """The op below autograd: redispatched with the Autograd kernel's keyset, or called (in
    the caller's _AutoDispatchBelowAutograd) when _call applied the Function itself."""
    if keyset is None:
        return op(*args)
    return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)

def _autograd_kernel(op, function, differentiable):
    """The Autograd kernel of a mutating op: `function` when the call records a graph (one
    of the arguments at the indices `differentiable` requires grad), else the op below
    autograd."""
    def kernel(keyset, *args):
        if torch.is_grad_enabled() and torch._C._any_requires_grad(
                *(args[i] for i in differentiable)):
            return function.apply(keyset, *args)
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)
    return kernel


if _ext.loaded():
    _lib = torch.library.Library("fastnn", "FRAGMENT")  # noqa: TOR901

    torch.library.register_fake("fastnn::batch_norm_train", _fake_train, lib=_lib)
    torch.library.register_fake("fastnn::batch_norm_eval", _fake_eval, lib=_lib)
    torch.library.register_fake("fastnn::batch_norm_backward", _fake_backward, lib=_lib)
    torch.library.register_fake("fastnn::batch_norm_stats", _fake_stats, lib=_lib)
    torch.library.register_fake("fastnn::batch_norm_dual", _fake_dual, lib=_lib)
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

    # batch_norm_eval is functional: torch.library.register_autograd.
    def _setup_eval(ctx, inputs, output):
        input, weight, bias, running_mean, running_var, eps, residual, relu = inputs
        acc = reference.accumulate_dtype(input.dtype)
        # Copies (.to(acc) of an acc tensor would return the input itself, which an op below
        # autograd must not do), so the backward also sees this forward's statistics.
        mean = running_mean.to(acc, copy=True)
        invstd = torch.rsqrt(running_var.to(acc, copy=True) + eps)
        ctx.fastnn_needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                            ctx.needs_input_grad[2], ctx.needs_input_grad[6])
        _save(ctx, input, weight, bias, residual, output, mean, invstd, False, relu, eps)

    def _backward_eval(ctx, grad_output):
        gi, gw, gb, gr = _backward(ctx, grad_output)
        return gi, gw, gb, None, None, None, gr, None

    torch.library.register_autograd("fastnn::batch_norm_eval", _backward_eval,
                                    setup_context=_setup_eval, lib=_lib)

    # batch_norm_train mutates the running statistics, which register_autograd refuses; its
    # Autograd kernel is the same construction written out: an autograd.Function whose forward
    # redispatches below autograd.
    _train_op = torch.ops.fastnn.batch_norm_train.default

    class _BatchNormTrainFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, keyset, input, weight, bias, running_mean, running_var, momentum, eps,
                    residual, relu):
            with torch._C._AutoDispatchBelowAutograd():
                out, mean, invstd = _redispatch(_train_op, keyset, input, weight, bias,
                                                running_mean, running_var, momentum, eps,
                                                residual, relu)
            ctx.fastnn_needs = (ctx.needs_input_grad[1], ctx.needs_input_grad[2],
                                ctx.needs_input_grad[3], ctx.needs_input_grad[8])
            _save(ctx, input, weight, bias, residual, out, mean, invstd, True, relu, eps)
            ctx.mark_non_differentiable(mean, invstd)
            return out, mean, invstd

        @staticmethod
        def backward(ctx, grad_output, _grad_mean, _grad_invstd):
            gi, gw, gb, gr = _backward(ctx, grad_output)
            return None, gi, gw, gb, None, None, None, None, gr, None

    # input, weight, bias, residual
    _lib.impl("batch_norm_train", _autograd_kernel(_train_op, _BatchNormTrainFunction,
                                                   (0, 1, 2, 7)), "Autograd", with_keyset=True)

    # batch_norm_train_with_stats: the same construction; mean and var get no gradient.
    _train_stats_op = torch.ops.fastnn.batch_norm_train_with_stats.default

    class _BatchNormTrainWithStatsFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, keyset, input, mean, var, weight, bias, running_mean, running_var,
                    momentum, eps, residual, relu):
            with torch._C._AutoDispatchBelowAutograd():
                out, save_mean, invstd = _redispatch(_train_stats_op, keyset, input, mean, var,
                                                     weight, bias, running_mean, running_var,
                                                     momentum, eps, residual, relu)
            ctx.fastnn_needs = (ctx.needs_input_grad[1], ctx.needs_input_grad[4],
                                ctx.needs_input_grad[5], ctx.needs_input_grad[10])
            _save(ctx, input, weight, bias, residual, out, save_mean, invstd, True, relu, eps)
            ctx.mark_non_differentiable(save_mean, invstd)
            return out, save_mean, invstd

        @staticmethod
        def backward(ctx, grad_output, _grad_mean, _grad_invstd):
            gi, gw, gb, gr = _backward(ctx, grad_output)
            return None, gi, None, None, gw, gb, None, None, None, None, gr, None

    # input, weight, bias, residual
    _lib.impl("batch_norm_train_with_stats",
              _autograd_kernel(_train_stats_op, _BatchNormTrainWithStatsFunction, (0, 3, 4, 9)),
              "Autograd", with_keyset=True)

    # batch_norm_dual: the gradient is batch_norm_backward of each input, the second taking the
    # (ReLU-masked) output gradient the first returns as its residual gradient.
    _dual_op = torch.ops.fastnn.batch_norm_dual.default

    class _BatchNormDualFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, keyset, input, weight, bias, running_mean, running_var, input2, weight2,
                    bias2, running_mean2, running_var2, training, momentum, eps, momentum2, eps2,
                    relu):
            with torch._C._AutoDispatchBelowAutograd():
                out, mean, invstd, mean2, invstd2 = _redispatch(
                    _dual_op, keyset, input, weight, bias, running_mean, running_var, input2,
                    weight2, bias2, running_mean2, running_var2, training, momentum, eps,
                    momentum2, eps2, relu)
            n = ctx.needs_input_grad
            ctx.fastnn_needs = (n[1], n[2], n[3], n[6], n[7], n[8])
            ctx.training, ctx.relu, ctx.eps, ctx.eps2 = training, relu, eps, eps2
            ctx.save_for_backward(input, weight, bias, input2, weight2, bias2,
                                  out if relu else None, mean, invstd, mean2, invstd2)
            ctx.mark_non_differentiable(mean, invstd, mean2, invstd2)
            return out, mean, invstd, mean2, invstd2

        @staticmethod
        def backward(ctx, grad_output, *_grad_stats):
            grads = _dual_backward(ctx, grad_output)
            gx, gw, gb, gz, gw2, gb2 = grads
            return (None, gx, gw, gb, None, None, gz, gw2, gb2) + (None,) * 8

    def _dual_backward(ctx, grad_output):
        (input, weight, bias, input2, weight2, bias2, out, mean, invstd, mean2,
         invstd2) = ctx.saved_tensors
        need = ctx.fastnn_needs
        if torch.is_grad_enabled():  # double backward: differentiate the reference
            return _dual_double_backward_grads(ctx, grad_output)
        need_second = need[3] or need[4] or need[5]
        if need_second and has_kernel(input.device.type, "batch_norm_dual_backward"):
            # One reduction pass and one element-wise pass over both inputs.
            gx, gw, gb, gz, gw2, gb2 = batch_norm_dual_backward(
                grad_output, input, weight, input2, weight2, out, mean, invstd, mean2, invstd2,
                ctx.training, ctx.relu)
        else:
            gx, gw, gb, gm = batch_norm_backward(grad_output, input, weight, out, mean, invstd,
                                                 ctx.training, ctx.relu, need_second and ctx.relu)
            gz = gw2 = gb2 = None
            if need_second:
                g2 = gm if ctx.relu else grad_output
                gz, gw2, gb2, _ = batch_norm_backward(g2, input2, weight2, None, mean2, invstd2,
                                                      ctx.training, False, False)
        return (gx if need[0] else None,
                gw.to(weight.dtype) if need[1] and weight is not None else None,
                gb.to(bias.dtype) if need[2] and bias is not None else None,
                gz if need[3] else None,
                gw2.to(weight2.dtype) if need[4] and weight2 is not None else None,
                gb2.to(bias2.dtype) if need[5] and bias2 is not None else None)

    def _dual_double_backward_grads(ctx, grad_output):
        (input, weight, bias, input2, weight2, bias2, _, mean, invstd, mean2,
         invstd2) = ctx.saved_tensors
        ins = (input, weight, bias, input2, weight2, bias2)
        if ctx.training:
            out = reference.batch_norm_dual(input, weight, bias, None, None, input2, weight2,
                                            bias2, None, None, True, 0.0, ctx.eps, 0.0, ctx.eps2,
                                            ctx.relu)[0]
        else:
            acc = reference.accumulate_dtype(input.dtype)
            y2 = reference._normalize_affine(input2.to(acc), mean2, invstd2, weight2, bias2, None,
                                             False, acc)
            out = reference._normalize_affine(input.to(acc), mean, invstd, weight, bias, y2,
                                              ctx.relu, input.dtype)
        wanted = [t for t in ins if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad_output, create_graph=True,
                                         allow_unused=True))
        return tuple(next(grads) if t is not None and t.requires_grad else None for t in ins)

    # input, weight, bias, input2, weight2, bias2
    _lib.impl("batch_norm_dual", _autograd_kernel(_dual_op, _BatchNormDualFunction,
                                                  (0, 1, 2, 5, 6, 7)), "Autograd",
              with_keyset=True)

    # batch_norm_cat_with_stats: the inputs are passed to the Function one by one (autograd sees
    # tensors only as direct arguments). The backward is the training backward of their
    # concatenation, made for the call and freed with it; the gradient of each input is its
    # slice of the concatenation's.
    _cat_op = torch.ops.fastnn.batch_norm_cat_with_stats.default

    class _BatchNormCatWithStatsFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, keyset, mean, var, weight, bias, running_mean, running_var, momentum,
                    eps, relu, *inputs):
            with torch._C._AutoDispatchBelowAutograd():
                out, save_mean, invstd = _redispatch(_cat_op, keyset, list(inputs), mean, var,
                                                     weight, bias, running_mean, running_var,
                                                     momentum, eps, relu)
            ctx.relu, ctx.eps = relu, eps
            ctx.widths = [t.shape[1] for t in inputs]
            ctx.save_for_backward(weight, bias, out if relu else None, save_mean, invstd,
                                  *inputs)
            ctx.mark_non_differentiable(save_mean, invstd)
            return out, save_mean, invstd

        @staticmethod
        def backward(ctx, grad_output, _grad_mean, _grad_invstd):
            weight, bias, out, mean, invstd, *inputs = ctx.saved_tensors
            need = ctx.needs_input_grad
            need_inputs = need[10:]
            if torch.is_grad_enabled():  # double backward: differentiate the reference
                x = torch.cat(inputs, 1)
                y = reference.batch_norm_train(x, weight, bias, None, None, 0.0, ctx.eps, None,
                                               ctx.relu)[0]
                wanted = [t for t, n in zip([weight, bias] + inputs, need[3:5] + need_inputs)
                          if t is not None and n]
                grads = iter(torch.autograd.grad(y, wanted, grad_output, create_graph=True,
                                                 allow_unused=True))
                gw = next(grads) if weight is not None and need[3] else None
                gb = next(grads) if bias is not None and need[4] else None
                gis = [next(grads) if n else None for n in need_inputs]
            else:
                x = torch.cat(inputs, 1)
                gi, gw, gb, _ = batch_norm_backward(grad_output, x, weight, out, mean, invstd,
                                                    True, ctx.relu, False)
                del x
                gis = [g if n else None for g, n in zip(gi.split(ctx.widths, 1), need_inputs)]
                gw = gw.to(weight.dtype) if weight is not None and need[3] else None
                gb = gb.to(bias.dtype) if bias is not None and need[4] else None
            return (None, None, None, gw, gb, None, None, None, None, None, *gis)

    def _cat_autograd_kernel(keyset, inputs, mean, var, weight, bias, running_mean, running_var,
                             momentum, eps, relu):
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*inputs, weight, bias):
            return _BatchNormCatWithStatsFunction.apply(keyset, mean, var, weight, bias,
                                                        running_mean, running_var, momentum,
                                                        eps, relu, *inputs)
        with torch._C._AutoDispatchBelowAutograd():
            return _cat_op.redispatch(keyset & torch._C._after_autograd_keyset, inputs, mean,
                                      var, weight, bias, running_mean, running_var, momentum,
                                      eps, relu)

    _lib.impl("batch_norm_cat_with_stats", _cat_autograd_kernel, "Autograd", with_keyset=True)

    _AUTOGRAD_FUNCTIONS.update({
        "batch_norm_cat_with_stats": _BatchNormCatWithStatsFunction,
        "batch_norm_train": _BatchNormTrainFunction,
        "batch_norm_train_with_stats": _BatchNormTrainWithStatsFunction,
        "batch_norm_dual": _BatchNormDualFunction,
    })
