"""User-facing functions: `batch_norm` mirrors torch.nn.functional.batch_norm, plus the fused
residual add and ReLU: out = relu(batch_norm(input) + residual)."""
import sys
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from fastnn import ops, reference

__all__ = ["batch_norm", "batch_norm_relu", "batch_norm_add_relu", "dual_batch_norm_add_relu",
           "add_relu", "onnx_exporting",
           "batch_norm_with_stats", "batch_norm_cat_with_stats",
           "batch_norm_stats",
           "batch_norm_backward_reduce", "batch_norm_backward_elemt"]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_channel_tensor(arg: str, input: Tensor, t: Optional[Tensor]) -> None:
    if t is None:
        return
    if t.device != input.device:
        raise RuntimeError(f"batch_norm: {arg} is on {t.device} but input is on {input.device}")
    C = input.shape[1]
    if t.dim() != 1 or t.shape[0] != C:
        raise RuntimeError(f"batch_norm: {arg} must be a 1-D tensor with one element per channel "
                           f"({C}), got size {tuple(t.shape)}")
    reduced = input.dtype in (torch.float16, torch.bfloat16)
    if t.dtype != input.dtype and not (reduced and t.dtype == torch.float32):
        allowed = "the input's dtype" + (", or float32" if reduced else "")
        raise RuntimeError(f"batch_norm: {arg} has dtype {t.dtype} but input has dtype "
                           f"{input.dtype} ({arg} must have {allowed})")


def _check_like_input(arg: str, input: Tensor, t: Tensor) -> None:
    """A tensor that must have the input's device, size and dtype (residual, input2)."""
    if t.device != input.device:
        raise RuntimeError(f"batch_norm: {arg} is on {t.device} but input is on {input.device}")
    if t.shape != input.shape:
        raise RuntimeError(f"batch_norm: {arg} must have the input's size {tuple(input.shape)}, "
                           f"got {tuple(t.shape)}")
    if t.dtype != input.dtype:
        raise RuntimeError(f"batch_norm: {arg} has dtype {t.dtype} but input has dtype "
                           f"{input.dtype}")


def check_args(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor], bias: Optional[Tensor], training: bool, eps: float,
               residual: Optional[Tensor]) -> None:
    """Every check a batch-norm call makes before it touches anything: a call that fails here
    leaves running statistics (and num_batches_tracked) unchanged."""
    if not isinstance(input, Tensor):
        raise TypeError(f"batch_norm: input must be a Tensor, got {type(input).__name__}")
    if input.dim() < 2:
        raise ValueError(f"batch_norm: input must have at least 2 dimensions (N, C, ...), got "
                         f"{input.dim()}-D input of size {tuple(input.shape)}")
    if input.dtype not in _FLOAT_DTYPES:
        raise NotImplementedError(f"batch_norm: input must be float32, float64, float16 or "
                                  f"bfloat16, got {input.dtype}")
    for arg, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                   ("running_var", running_var)):
        _check_channel_tensor(arg, input, t)
    if residual is not None:
        _check_like_input("residual", input, residual)
    if training:
        if input.numel() > 0 and input.numel() // input.shape[1] == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input "
                             f"size {input.size()}")
        if eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    else:
        if running_mean is None or running_var is None:
            missing = "running_mean" if running_mean is None else "running_var"
            raise RuntimeError(f"batch_norm: {missing} must be defined in evaluation mode")
        if eps < 0.0:
            raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if torch.is_grad_enabled():  # torch's rule: the running statistics are not differentiable
        for arg, t in (("running_mean", running_mean), ("running_var", running_var)):
            if t is not None and t.requires_grad:
                raise RuntimeError(f"The function 'batch_norm' is not differentiable with "
                                   f"respect to argument '{arg}'. This input cannot have "
                                   f"requires_grad True.")


def use_kernel(input: Tensor) -> bool:
    """True when this call runs a compiled fastnn kernel rather than the reference."""
    # is_cuda and is_cpu, not input.device.type: making the torch.device took longer than the
    # rest of this check, a sizeable part of a small batch norm's call in a CPU model, where
    # the convolution before it has evicted the interpreter's objects from the cache.
    if input.dtype not in _FLOAT_DTYPES:
        return False
    if input.is_cuda:
        device = "cuda"
    elif input.is_cpu:
        device = "cpu"
    else:
        return False
    return ops.has_kernel(device) and not onnx_exporting()


# torch.compiler.is_exporting (torch 2.5 and newer) is True while torch.export traces, which is
# how torch.onnx.export's default exporter traces; before it, is_compiling covers that case too.
_is_exporting = getattr(torch.compiler, "is_exporting", torch.compiler.is_compiling)


def onnx_exporting() -> bool:
    """True while torch.onnx.export traces a model (either of its exporters). fastnn's ops then
    take PyTorch's own batch norm, add and ReLU instead of fastnn's custom ops, which no ONNX
    runtime has: the exported graph holds ONNX's BatchNormalization, Add and Relu operators, as
    it does for torch's modules. Elsewhere (eager, torch.compile, torch.export itself) False."""
    if not (torch.jit.is_tracing() or _is_exporting()):
        return False
    return _in_onnx_export()


@torch.compiler.assume_constant_result
def _in_onnx_export() -> bool:
    # Not importing torch.onnx (slow, and only there once an export has started).
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and bool(onnx.is_in_onnx_export())


def _torch_batch_norm(input: Tensor, running_mean: Optional[Tensor],
                      running_var: Optional[Tensor], weight: Optional[Tensor],
                      bias: Optional[Tensor], training: bool, momentum: float, eps: float,
                      residual: Optional[Tensor], relu: bool) -> Tensor:
    """relu(batch_norm(input) + residual) as PyTorch's ops, for an ONNX export (onnx_exporting):
    the same operators, and so the same exported graph, as torch.nn.BatchNorm2d followed by the
    add and the ReLU."""
    out = torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias,
                                         training, momentum, eps)
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out


def batch_norm_unchecked(input: Tensor, running_mean: Optional[Tensor],
                         running_var: Optional[Tensor], weight: Optional[Tensor],
                         bias: Optional[Tensor], training: bool, momentum: float, eps: float,
                         residual: Optional[Tensor], relu: bool) -> Tensor:
    """batch_norm after check_args has passed (modules check, count the batch, then call this)."""
    if use_kernel(input):
        if training:
            return ops.batch_norm_train(input, weight, bias, running_mean, running_var, momentum,
                                        eps, residual, relu)[0]
        return ops.batch_norm_eval(input, weight, bias, running_mean, running_var, eps, residual,
                                   relu)
    if onnx_exporting():
        return _torch_batch_norm(input, running_mean, running_var, weight, bias, training,
                                 momentum, eps, residual, relu)
    if training:
        return reference.batch_norm_train(input, weight, bias, running_mean, running_var,
                                          momentum, eps, residual, relu)[0]
    return reference.batch_norm_eval(input, weight, bias, running_mean, running_var, eps,
                                     residual, relu)


def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
               residual: Optional[Tensor] = None, relu: bool = False) -> Tensor:
    """torch.nn.functional.batch_norm, with an optional fused residual add and ReLU.

    Returns ``relu(bn(input) + residual)`` (each part optional). In training the batch mean and
    biased variance normalize the input and the running statistics, when given, are updated in
    place with ``momentum`` and the unbiased variance.
    """
    check_args(input, running_mean, running_var, weight, bias, training, eps, residual)
    return batch_norm_unchecked(input, running_mean, running_var, weight, bias, training,
                                momentum, eps, residual, relu)


def batch_norm_relu(input, running_mean, running_var, weight=None, bias=None, training=False,
                    momentum=0.1, eps=1e-5):
    """relu(batch_norm(input)) in one pass."""
    return batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                      relu=True)


def batch_norm_add_relu(input, residual, running_mean, running_var, weight=None, bias=None,
                        training=False, momentum=0.1, eps=1e-5):
    """relu(batch_norm(input) + residual) in one pass."""
    return batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                      residual=residual, relu=True)


def add_relu(input: Tensor, residual: Tensor) -> Tensor:
    """relu(input + residual) in one pass (the epilogue of a ResNet block whose batch norm is
    folded into its convolution): fastnn's inference kernel with unit statistics, which adds in
    the accumulation dtype and rounds once, as torch.relu(input + residual) does. Inputs of rank
    2 or more with the same size, dtype and device; elsewhere the plain PyTorch expression."""
    if (isinstance(input, Tensor) and isinstance(residual, Tensor) and input.dim() >= 2
            and use_kernel(input) and residual.shape == input.shape
            and residual.dtype == input.dtype and residual.device == input.device):
        acc = reference.accumulate_dtype(input.dtype)
        C = input.shape[1]
        zeros = torch.zeros(C, dtype=acc, device=input.device)
        ones = torch.ones(C, dtype=acc, device=input.device)
        # (x - 0) * rsqrt(1 + 0) + 0 + r: exactly x + r, rounded once.
        return ops.batch_norm_eval(input, None, None, zeros, ones, 0.0, residual, True)
    return torch.relu(input + residual)


def check_input2(input: Tensor, input2: Tensor) -> None:
    if not isinstance(input2, Tensor):
        raise TypeError(f"batch_norm: input2 must be a Tensor, got {type(input2).__name__}")
    _check_like_input("input2", input, input2)


def dual_batch_norm_unchecked(input, weight, bias, running_mean, running_var, input2, weight2,
                              bias2, running_mean2, running_var2, training, momentum, eps,
                              momentum2, eps2, relu):
    """dual_batch_norm_add_relu after check_args (of both) and check_input2 have passed."""
    if use_kernel(input) and ops.has_kernel(input.device.type, "batch_norm_dual"):
        return ops.batch_norm_dual(input, weight, bias, running_mean, running_var, input2,
                                   weight2, bias2, running_mean2, running_var2, training,
                                   momentum, eps, momentum2, eps2, relu)[0]
    if not use_kernel(input) and not onnx_exporting():
        return reference.batch_norm_dual(input, weight, bias, running_mean, running_var, input2,
                                         weight2, bias2, running_mean2, running_var2, training,
                                         momentum, eps, momentum2, eps2, relu)[0]
    # Where the device has kernels but no fused dual one, and in an ONNX export: the second batch
    # norm, then the first with it as the residual (the second's output rounded to the input's
    # dtype, as PyTorch's).
    y2 = batch_norm_unchecked(input2, running_mean2, running_var2, weight2, bias2, training,
                              momentum2, eps2, None, False)
    return batch_norm_unchecked(input, running_mean, running_var, weight, bias, training,
                                momentum, eps, y2, relu)


def dual_batch_norm_add_relu(input: Tensor, input2: Tensor, running_mean: Optional[Tensor],
                             running_var: Optional[Tensor], running_mean2: Optional[Tensor],
                             running_var2: Optional[Tensor], weight: Optional[Tensor] = None,
                             bias: Optional[Tensor] = None, weight2: Optional[Tensor] = None,
                             bias2: Optional[Tensor] = None, training: bool = False,
                             momentum: float = 0.1, eps: float = 1e-5,
                             momentum2: Optional[float] = None, eps2: Optional[float] = None,
                             relu: bool = True) -> Tensor:
    """relu(batch_norm(input) + batch_norm(input2)) in one pass: a ResNet block whose shortcut
    is a downsampling conv + BN. Each batch norm has its own running statistics, weight and bias
    (momentum2/eps2 default to momentum/eps); input2 has input's size. relu=False leaves the ReLU
    out."""
    momentum2 = momentum if momentum2 is None else momentum2
    eps2 = eps if eps2 is None else eps2
    check_args(input, running_mean, running_var, weight, bias, training, eps, None)
    check_input2(input, input2)
    check_args(input2, running_mean2, running_var2, weight2, bias2, training, eps2, None)
    return dual_batch_norm_unchecked(input, weight, bias, running_mean, running_var, input2,
                                     weight2, bias2, running_mean2, running_var2, training,
                                     momentum, eps, momentum2, eps2, relu)


# The training forward and backward in parts, for statistics computed or reduced elsewhere
# (SyncBatchNorm, DenseNet's shared statistics): each runs fastnn's kernel where the device has
# one, else the reference. None of them is differentiable; normalizing with given statistics is
# batch_norm(..., training=False) with those statistics as running_mean/running_var.

def _use_part_kernel(input: Tensor, op: str) -> bool:
    return use_kernel(input) and ops.has_kernel(input.device.type, op)


def batch_norm_stats(input: Tensor):
    """(mean, biased variance) per channel of ``input`` (N, C, ...), in float32 (float64 for
    float64 input); zeros for an empty batch."""
    if _use_part_kernel(input, "batch_norm_stats"):
        return ops.batch_norm_stats(input)
    with torch.no_grad():
        return reference.batch_norm_stats(input)


def batch_norm_backward_reduce(grad_output: Tensor, input: Tensor, output: Optional[Tensor],
                               mean: Tensor, invstd: Tensor, relu: bool = False,
                               residual_grad: bool = False):
    """(sum_dy, sum_dy_xhat, grad_residual): per channel sum(g) and sum(g * (input - mean) *
    invstd), g being grad_output zeroed where output <= 0 when relu; grad_residual is the masked g
    when residual_grad, else an empty tensor."""
    if _use_part_kernel(input, "batch_norm_backward_reduce"):
        return ops.batch_norm_backward_reduce(grad_output, input, output, mean, invstd, relu,
                                              residual_grad)
    with torch.no_grad():
        return reference.batch_norm_backward_reduce(grad_output, input, output, mean, invstd,
                                                    relu, residual_grad)


def batch_norm_backward_elemt(grad_output: Tensor, input: Tensor, weight: Optional[Tensor],
                              output: Optional[Tensor], mean: Tensor, invstd: Tensor,
                              mean_dy: Tensor, mean_dy_xhat: Tensor, relu: bool = False) -> Tensor:
    """grad_input = weight * invstd * (g - mean_dy - (input - mean) * invstd * mean_dy_xhat), g
    masked as in batch_norm_backward_reduce; mean_dy and mean_dy_xhat are its sums divided by the
    number of values per channel (over every process, for a synchronized batch norm)."""
    if _use_part_kernel(input, "batch_norm_backward_elemt"):
        return ops.batch_norm_backward_elemt(grad_output, input, weight, output, mean, invstd,
                                             mean_dy, mean_dy_xhat, relu)
    with torch.no_grad():
        return reference.batch_norm_backward_elemt(grad_output, input, weight, output, mean,
                                                   invstd, mean_dy, mean_dy_xhat, relu)


class _GivenStatsBatchNorm(torch.autograd.Function):
    """Training-mode batch norm of `input` normalized with its own batch statistics, computed
    beforehand: the forward is the inference kernel with those statistics, the backward the
    training backward (the statistics treated as the functions of input they are)."""

    @staticmethod
    def forward(ctx, input, weight, bias, residual, mean, var, eps, relu):
        out = batch_norm_unchecked(input, mean, var, weight, bias, False, 0.0, eps, residual,
                                   relu)
        invstd = torch.rsqrt(var + eps)
        ctx.relu = relu
        ctx.eps = eps
        ctx.has_residual = residual is not None
        ctx.save_for_backward(input, weight, bias, residual, out if relu else None, mean, invstd)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, bias, residual, out, mean, invstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():
            # create_graph=True: the first derivatives of the training forward, recomputed so
            # that they can be differentiated again.
            ins = (input, weight, bias, residual)
            y = reference.batch_norm_train(input, weight, bias, None, None, 0.0, ctx.eps,
                                           residual, ctx.relu)[0]
            wanted = [t for t, n in zip(ins, need) if t is not None and n]
            grads = iter(torch.autograd.grad(y, wanted, grad_output, create_graph=True,
                                             allow_unused=True))
            return tuple(next(grads) if t is not None and n else None
                         for t, n in zip(ins, need)) + (None,) * 4
        need_residual = ctx.has_residual and need[3]
        if use_kernel(input):
            gi, gw, gb, gr = ops.batch_norm_backward(grad_output, input, weight, out, mean, invstd,
                                                     True, ctx.relu, need_residual)
        else:
            gi, gw, gb, gr = reference.batch_norm_backward(grad_output, input, weight, out, mean,
                                                           invstd, True, ctx.relu, need_residual)
        return (gi if need[0] else None,
                gw.to(weight.dtype) if weight is not None and need[1] else None,
                gb.to(bias.dtype) if bias is not None and need[2] else None,
                gr if need_residual else None, None, None, None, None)


def batch_norm_with_stats(input: Tensor, mean: Tensor, var: Tensor,
                          running_mean: Optional[Tensor], running_var: Optional[Tensor],
                          weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                          momentum: float = 0.1, eps: float = 1e-5,
                          residual: Optional[Tensor] = None, relu: bool = False) -> Tensor:
    """batch_norm(..., training=True) for an input whose batch statistics are already known:
    ``mean`` and ``var`` (biased) per channel, in float32 (float64 for float64 input), as
    batch_norm_stats returns them, or assembled from the statistics of the feature maps that
    ``input`` concatenates. Output, running-statistics update and gradients are those of
    batch_norm in training.
    """
    check_args(input, running_mean, running_var, weight, bias, True, eps, residual)
    check_batch_stats(input, mean, var)
    return batch_norm_with_stats_unchecked(input, mean, var, running_mean, running_var, weight,
                                           bias, momentum, eps, residual, relu)


def check_batch_stats(input: Tensor, mean: Tensor, var: Tensor) -> None:
    acc = reference.accumulate_dtype(input.dtype)
    for arg, t in (("mean", mean), ("var", var)):
        if not isinstance(t, Tensor) or t.shape != (input.shape[1],) or t.dtype != acc or \
                t.device != input.device:
            got = (f"{t.dtype} of size {tuple(t.shape)} on {t.device}" if isinstance(t, Tensor)
                   else type(t).__name__)
            raise RuntimeError(f"batch_norm_with_stats: {arg} must be a {acc} tensor of size "
                               f"({input.shape[1]},) on {input.device}, got {got}")


def batch_norm_with_stats_unchecked(input, mean, var, running_mean, running_var, weight, bias,
                                    momentum, eps, residual, relu):
    """batch_norm_with_stats after check_args and check_batch_stats have passed."""
    if _use_part_kernel(input, "batch_norm_train_with_stats"):
        return ops.batch_norm_train_with_stats(input, mean, var, weight, bias, running_mean,
                                               running_var, momentum, eps, residual, relu)[0]
    mean, var = mean.detach(), var.detach()
    if input.numel() > 0:
        reference.update_running_stats(running_mean, running_var, mean, var, momentum,
                                       input.numel() // input.shape[1])
    if not use_kernel(input):
        # The reference's training forward, differentiable in every mode of autograd and
        # torch.func: it computes the statistics again, as the reference computed them.
        return reference.batch_norm_train(input, weight, bias, None, None, 0.0, eps, residual,
                                          relu)[0]
    # A kernel without its with-stats form: the inference kernel with these statistics and the
    # training backward.
    return _GivenStatsBatchNorm.apply(input, weight, bias, residual, mean, var, eps, relu)


def batch_norm_cat_with_stats(inputs: Sequence[Tensor], mean: Tensor, var: Tensor,
                              running_mean: Optional[Tensor], running_var: Optional[Tensor],
                              weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                              momentum: float = 0.1, eps: float = 1e-5,
                              relu: bool = False) -> Tensor:
    """batch_norm_with_stats(torch.cat(inputs, 1), mean, var, ...): the feature maps a DenseNet
    layer normalizes, read where they are instead of from a concatenated copy where the device
    has the kernel (elsewhere they are concatenated first). ``mean`` and ``var`` are the
    concatenation's statistics (those of each input, concatenated). Output, running-statistics
    update and gradients are those of batch_norm in training on the concatenation.
    """
    inputs = list(inputs)
    if not _cat_kernel_inputs(inputs):
        # torch.cat's own rules and errors (type promotion among them).
        return batch_norm_with_stats(torch.cat(inputs, 1), mean, var, running_mean, running_var,
                                     weight, bias, momentum, eps, None, relu)
    probe = cat_probe(inputs)
    check_args(probe, running_mean, running_var, weight, bias, True, eps, None)
    check_batch_stats(probe, mean, var)
    return batch_norm_cat_with_stats_unchecked(inputs, mean, var, running_mean, running_var,
                                               weight, bias, momentum, eps, relu)


def _cat_kernel_inputs(inputs: List[Tensor]) -> bool:
    """Whether the inputs are what batch_norm_cat_with_stats's kernel takes (one dtype, device
    and rank, sizes equal but for dim 1); anything else goes through torch.cat."""
    if not inputs or not all(isinstance(t, Tensor) for t in inputs):
        return False
    first = inputs[0]
    return all(t.dtype == first.dtype and t.device == first.device and t.dim() == first.dim()
               and t.dim() >= 2 and t.shape[:1] == first.shape[:1]
               and t.shape[2:] == first.shape[2:] for t in inputs)


def cat_probe(inputs: List[Tensor]) -> Tensor:
    """A tensor of the concatenation's size, dtype and device that stores one value (an expanded
    scalar), for checks that take the whole input."""
    first = inputs[0]
    size = list(first.shape)
    size[1] = sum(t.shape[1] for t in inputs)
    return first.new_empty(()).expand(size)


def batch_norm_cat_with_stats_unchecked(inputs, mean, var, running_mean, running_var, weight,
                                        bias, momentum, eps, relu):
    """batch_norm_cat_with_stats once its checks have passed."""
    if _use_part_kernel(inputs[0], "batch_norm_cat_with_stats"):
        return ops.batch_norm_cat_with_stats(inputs, mean, var, weight, bias, running_mean,
                                             running_var, momentum, eps, relu)[0]
    return batch_norm_with_stats_unchecked(torch.cat(inputs, 1), mean, var, running_mean,
                                           running_var, weight, bias, momentum, eps, None, relu)
