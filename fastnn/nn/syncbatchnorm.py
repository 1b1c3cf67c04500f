"""SyncBatchNorm on fastnn's kernels: batch statistics over a whole torch.distributed process group
(NCCL on GPUs, gloo on CPUs, where torch's own SyncBatchNorm refuses to run)."""
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from fastnn import functional as F
from fastnn import ops, reference
from fastnn.nn.batchnorm import _FastBatchNorm, _unlike_input

__all__ = ["SyncBatchNorm", "SyncBatchNormReLU", "SyncBatchNormAddReLU"]


# all_gather_into_tensor was renamed all_gather_single (torch 2.14 warns on the old name).
_all_gather_single = getattr(dist, "all_gather_single", None) or getattr(
    dist, "all_gather_into_tensor", None)


def _resolve_group(group_name: str):
    """The process group a SyncBatchNorm names ("" for the default group)."""
    if not group_name:
        return dist.group.WORLD
    return dist.distributed_c10d._resolve_process_group(group_name)


# The synchronized forward and backward are ops of the fastnn library, implemented here in
# Python on fastnn's kernels and torch.distributed (for every device: CompositeExplicitAutograd).
# torch.compile sees each as one opaque call with a fake kernel, so a compiled model with
# SyncBatchNorm has no graph break, and the collective runs inside the op in eager and compiled
# code alike. The process group travels as its name.
_lib = torch.library.Library("fastnn", "FRAGMENT")  # noqa: TOR901
_lib.define(
    "sync_batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor? residual, "
    "Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum, float eps, bool relu, "
    "str group_name) -> (Tensor, Tensor, Tensor, Tensor)")
_lib.define(
    "sync_batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor? output, "
    "Tensor mean, Tensor invstd, Tensor count, bool relu, bool residual_grad, str group_name) "
    "-> (Tensor, Tensor, Tensor, Tensor)")


def _capturing(t: Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _update_running_stats(running_mean: Optional[Tensor], running_var: Optional[Tensor],
                          mean: Tensor, var: Tensor, momentum: float, total: Tensor) -> None:
    """reference.update_running_stats with the group's count `total` ([1], float64) left on the
    device: the unbiased-variance factor is computed there, not on the host. A count of zero
    changes nothing."""
    with torch.no_grad():
        counted = total > 0
        if running_mean is not None:
            old = running_mean.to(mean.dtype)
            running_mean.copy_(torch.where(counted, mean * momentum + old * (1.0 - momentum), old))
        if running_var is not None:
            old = running_var.to(var.dtype)
            bessel = torch.where(total > 1, total / (total - 1), torch.ones_like(total))
            factor = (bessel * momentum).to(var.dtype)  # rounded once, as the reference's scalar
            running_var.copy_(torch.where(counted, var * factor + old * (1.0 - momentum), old))


def _sync_batch_norm(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                     residual: Optional[Tensor], running_mean: Optional[Tensor],
                     running_var: Optional[Tensor], momentum: float, eps: float, relu: bool,
                     group_name: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training batch norm over the process group: (output, mean, invstd, count), count being
    the number of values per channel over the group (float64, shape [1]).

    One all-gather of each rank's (mean, M2, count) in float64, merged with Chan's formula; with
    a world size of one there is no collective. The arguments are checked by the module before
    the call; the one check that needs the group (more than one value per channel over it)
    raises here, before the running statistics are touched."""
    group = _resolve_group(group_name)
    world_size = dist.get_world_size(group)
    C = input.shape[1]
    local_count = input.numel() // C if C else 0
    mean, var = F.batch_norm_stats(input)
    total = torch.full((1,), float(local_count), dtype=torch.float64, device=mean.device)
    n_total = local_count
    if world_size > 1:
        packed = torch.cat([mean.double(), var.double() * local_count, total])
        gathered = packed.new_empty((world_size * packed.numel(),))
        _all_gather_single(gathered, packed, group=group)
        gathered = gathered.view(world_size, -1)
        means, m2s, counts = gathered[:, :C], gathered[:, C:2 * C], gathered[:, 2 * C:]
        total = counts.sum(0)  # [1]
        denom = total.clamp(min=1)
        global_mean = (means * counts).sum(0) / denom
        global_var = (m2s + counts * (means - global_mean) ** 2).sum(0) / denom
        mean, var = global_mean.to(mean.dtype), global_var.to(var.dtype)
        # The host reads the group's count only for the checks below. During CUDA graph capture,
        # where it cannot, they are skipped (as torch's SyncBatchNorm skips its host-side step
        # there) and the statistics stay on the device.
        n_total = None if _capturing(input) else int(total.item())
    if n_total == 1:
        raise ValueError("Expected more than 1 value per channel when training, got 1 value "
                         f"per channel over the process group (input size {input.size()})")
    if n_total == 0:
        return torch.empty_like(input), mean, torch.zeros_like(var), total
    _update_running_stats(running_mean, running_var, mean, var, momentum, total)
    # Normalizing with given statistics is exactly the inference kernel.
    out = F.batch_norm_unchecked(input, mean, var, weight, bias, False, 0.0, eps, residual, relu)
    return out, mean, torch.rsqrt(var + eps), total


def _sync_batch_norm_backward(grad_output: Tensor, input: Tensor, weight: Optional[Tensor],
                              output: Optional[Tensor], mean: Tensor, invstd: Tensor,
                              count: Tensor, relu: bool, residual_grad: bool,
                              group_name: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_input, sum_dy_xhat, sum_dy, grad_residual): one all-reduce of (sum g, sum g*xhat)
    over the group. The sums returned are this rank's: torch.nn.SyncBatchNorm's parameter
    gradients, which DistributedDataParallel averages. grad_residual is empty unless
    residual_grad."""
    group = _resolve_group(group_name)
    sum_dy, sum_dy_xhat, grad_residual = F.batch_norm_backward_reduce(
        grad_output, input, output, mean, invstd, relu, residual_grad)
    sums = torch.cat([sum_dy, sum_dy_xhat])
    if dist.get_world_size(group) > 1:
        dist.all_reduce(sums, group=group)
    sums = sums / count.clamp(min=1).to(sums.dtype)
    C = mean.numel()
    if residual_grad and relu:
        # The masked gradient is already in grad_residual.
        grad_input = F.batch_norm_backward_elemt(grad_residual, input, weight, None, mean, invstd,
                                                 sums[:C], sums[C:], False)
    else:
        grad_input = F.batch_norm_backward_elemt(grad_output, input, weight, output, mean, invstd,
                                                 sums[:C], sums[C:], relu)
    return grad_input, sum_dy_xhat, sum_dy, grad_residual


def _fake_sync_batch_norm(input, weight, bias, residual, running_mean, running_var, momentum,
                          eps, relu, group_name):
    stat = input.new_empty((input.shape[1],), dtype=reference.accumulate_dtype(input.dtype))
    out = torch.empty(input.shape, dtype=input.dtype, device=input.device,
                      memory_format=ops.output_memory_format(input))
    return out, stat, torch.empty_like(stat), input.new_empty((1,), dtype=torch.float64)


def _fake_sync_batch_norm_backward(grad_output, input, weight, output, mean, invstd, count, relu,
                                   residual_grad, group_name):
    grad_input = torch.empty(input.shape, dtype=input.dtype, device=input.device,
                             memory_format=ops.output_memory_format(input))
    grad_residual = torch.empty_like(grad_input) if residual_grad else input.new_empty((0,))
    return grad_input, torch.empty_like(mean), torch.empty_like(mean), grad_residual


_lib.impl("sync_batch_norm", _sync_batch_norm, "CompositeExplicitAutograd")
_lib.impl("sync_batch_norm_backward", _sync_batch_norm_backward, "CompositeExplicitAutograd")
torch.library.register_fake("fastnn::sync_batch_norm", _fake_sync_batch_norm, lib=_lib)
torch.library.register_fake("fastnn::sync_batch_norm_backward", _fake_sync_batch_norm_backward,
                            lib=_lib)
_sync_op = torch.ops.fastnn.sync_batch_norm.default
_sync_backward_op = torch.ops.fastnn.sync_batch_norm_backward.default


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, keyset, input, weight, bias, residual, running_mean, running_var, momentum,
                eps, relu, group_name):
        with torch._C._AutoDispatchBelowAutograd():
            out, mean, invstd, count = ops._redispatch(
                _sync_op, keyset, input, weight, bias, residual, running_mean, running_var,
                momentum, eps, relu, group_name)
        ctx.relu = relu
        ctx.group_name = group_name
        ctx.has_residual = residual is not None
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(input, weight, out if relu else None, mean, invstd, count)
        ctx.mark_non_differentiable(mean, invstd, count)
        return out, mean, invstd, count

    @staticmethod
    def backward(ctx, grad_output, *_grad_stats):
        input, weight, out, mean, invstd, count = ctx.saved_tensors
        grad_input, sum_dy_xhat, sum_dy, grad_residual = _sync_backward_op(
            grad_output, input, weight, out, mean, invstd, count, ctx.relu, ctx.has_residual,
            ctx.group_name)
        grad_weight = None if ctx.weight_dtype is None else sum_dy_xhat.to(ctx.weight_dtype)
        grad_bias = None if ctx.bias_dtype is None else sum_dy.to(ctx.bias_dtype)
        return (None, grad_input, grad_weight, grad_bias,
                grad_residual if ctx.has_residual else None) + (None,) * 6


# input, weight, bias, residual
_lib.impl("sync_batch_norm", ops._autograd_kernel(_sync_op, _SyncBatchNormFunction, (0, 1, 2, 3)),
          "Autograd", with_keyset=True)


class SyncBatchNorm(_FastBatchNorm, _BatchNorm):
    """torch.nn.SyncBatchNorm on fastnn's kernels, with the same constructor and state_dict.
    Works with NCCL and gloo (so on CPUs too); ranks may hold different batch sizes, including
    zero. In eval, or with a world size of one, it is a plain fastnn BatchNorm and does no
    collective.

    It derives from torch's _BatchNorm rather than torch.nn.SyncBatchNorm: DistributedDataParallel
    refuses every torch.nn.SyncBatchNorm instance on CPU modules, which is where this one works
    too."""

    _relu = False
    _residual = False

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None, **kwargs):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         **kwargs)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if residual is not None and not self._residual:
            raise TypeError(f"{type(self).__name__}.forward takes no residual")
        return self._sync_forward(input, residual)

    @property
    def process_group(self):
        return self._process_group

    @process_group.setter
    def process_group(self, group) -> None:
        # The synchronized op names its group (a string is what a custom op, and torch.compile,
        # can carry); "" is the default group, looked up when the op runs.
        self._process_group = group
        self._group_name = "" if group is None else group.group_name

    def _sync_forward(self, input: Tensor, residual: Optional[Tensor],
                      relu: Optional[bool] = None) -> Tensor:
        relu = self._relu if relu is None else relu
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return self._bn_forward(input, residual, relu)
        if not torch.compiler.is_compiling() and dist.get_world_size(
                _resolve_group(self._group_name)) == 1:
            return self._bn_forward(input, residual, relu)  # nothing to synchronize

        self._check_input_dim(input)
        track = self.track_running_stats
        running_mean = self.running_mean if track else None
        running_var = self.running_var if track else None
        # Checked before anything is counted; the batch-of-one check is over the whole group.
        if input.dim() >= 2 and input.numel() > 0 and input.numel() // input.shape[1] == 1:
            probe = input.expand((2,) + tuple(input.shape[1:]))
        else:
            probe = input
        F.check_args(probe, running_mean, running_var, self.weight, self.bias, True, self.eps,
                     None if residual is None else residual.expand_as(probe))
        out = _sync_op(input, self.weight, self.bias, residual, running_mean, running_var,
                       float(self._batch_factor()), float(self.eps), relu, self._group_name)[0]
        # Counted only once the group-wide checks passed, so a failing call changes nothing.
        self._count_batch()
        return out

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """Replaces every torch or fastnn BatchNorm in `module` with a fastnn SyncBatchNorm sharing
        its parameters and buffers; fastnn's fused BN+ReLU and BN+add+ReLU stay fused
        (a converted BatchNormAddReLU2d still takes (input, residual)). A lazy batch norm
        must have run once first (it is a BatchNorm of known size only then)."""
        from fastnn.nn.batchnorm import refuse_uninitialized

        refuse_uninitialized(module, "SyncBatchNorm.convert_sync_batchnorm", _BatchNorm)
        return cls._convert_sync(module, process_group)

    @classmethod
    def _convert_sync(cls, module, process_group):
        from fastnn.nn.batchnorm import BatchNormAddReLU2d, BatchNormReLU2d

        out = module
        if isinstance(module, _BatchNorm) and not isinstance(
                module, SyncBatchNorm):
            if isinstance(module, BatchNormAddReLU2d):
                target = SyncBatchNormAddReLU
            elif isinstance(module, BatchNormReLU2d):
                target = SyncBatchNormReLU
            else:
                target = SyncBatchNorm
            out = target(module.num_features, module.eps, module.momentum, module.affine,
                         module.track_running_stats, process_group)
            out.weight = module.weight
            out.bias = module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.training = module.training
            if hasattr(module, "qconfig"):
                out.qconfig = module.qconfig
        for name, child in module.named_children():
            out.add_module(name, cls._convert_sync(child, process_group))
        return out


class SyncBatchNormReLU(SyncBatchNorm):
    """relu(SyncBatchNorm(input))."""

    _relu = True

    def forward(self, input: Tensor) -> Tensor:
        return self._sync_forward(input, None)


class SyncBatchNormAddReLU(SyncBatchNorm):
    """relu(SyncBatchNorm(input) + residual)."""

    adds_residual_and_relu = True

    _relu = True
    _residual = True

    def forward(self, input: Tensor, residual: Tensor) -> Tensor:
        if _unlike_input(input, residual):  # torch's broadcasting and type promotion
            return torch.relu(self._sync_forward(input, None, False) + residual)
        return self._sync_forward(input, residual)
