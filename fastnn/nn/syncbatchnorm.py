"""SyncBatchNorm on fastnn's kernels: batch statistics over a whole torch.distributed process group
(NCCL on GPUs, gloo on CPUs, where torch's own SyncBatchNorm refuses to run)."""
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from fastnn import functional as F
from fastnn import reference
from fastnn.nn.batchnorm import _FastBatchNorm

__all__ = ["SyncBatchNorm", "SyncBatchNormReLU", "SyncBatchNormAddReLU"]


class _SyncBatchNormFunction(torch.autograd.Function):
    """One all-gather of each rank's (mean, M2, count) per forward, merged with Chan's formula;
    one all-reduce of (sum g, sum g*xhat) per backward. The local statistics, the normalization
    and both halves of the backward are fastnn's kernels (the reference where a device has none).
    """

    @staticmethod
    def forward(ctx, input, weight, bias, residual, running_mean, running_var, momentum, eps,
                relu, process_group, world_size):
        C = input.shape[1]
        count = input.numel() // C if C else 0
        mean, var = F.batch_norm_stats(input)
        packed = torch.cat([mean, var * count, mean.new_full((1,), float(count))])
        parts = [torch.empty_like(packed) for _ in range(world_size)]
        dist.all_gather(parts, packed, group=process_group)
        gathered = torch.stack(parts)
        means, m2s, counts = gathered[:, :C], gathered[:, C:2 * C], gathered[:, 2 * C:]
        total = counts.sum(0)  # [1]
        global_mean = (means * counts).sum(0) / total.clamp(min=1)
        global_m2 = (m2s + counts * (means - global_mean) ** 2).sum(0)
        n_total = int(total.item())
        if n_total == 1:
            raise ValueError("Expected more than 1 value per channel when training, got "
                             f"1 value per channel over the process group (input size "
                             f"{input.size()})")
        ctx.world_size = world_size
        ctx.process_group = process_group
        ctx.relu = relu
        ctx.has_residual = residual is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.n_total = n_total
        if n_total == 0:
            ctx.empty = True
            return torch.empty_like(input)
        ctx.empty = False
        global_var = global_m2 / n_total
        reference.update_running_stats(running_mean, running_var, global_mean, global_var,
                                       momentum, n_total)
        # Normalizing with given statistics is exactly the inference kernel.
        out = F.batch_norm_unchecked(input, global_mean, global_var, weight, bias, False, 0.0,
                                     eps, residual, relu)
        invstd = torch.rsqrt(global_var + eps)
        ctx.save_for_backward(input, weight, out if relu else None, global_mean, invstd)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.empty:
            return (torch.zeros_like(grad_output), None, None,
                    torch.zeros_like(grad_output) if ctx.has_residual else None) + (None,) * 7
        input, weight, out, mean, invstd = ctx.saved_tensors
        sum_dy, sum_dy_xhat, grad_residual = F.batch_norm_backward_reduce(
            grad_output, input, out, mean, invstd, ctx.relu, ctx.has_residual)
        sums = torch.cat([sum_dy, sum_dy_xhat])
        dist.all_reduce(sums, group=ctx.process_group)
        C = mean.numel()
        if ctx.has_residual and ctx.relu:
            # The masked gradient is already in grad_residual.
            grad_input = F.batch_norm_backward_elemt(
                grad_residual, input, weight, None, mean, invstd, sums[:C] / ctx.n_total,
                sums[C:] / ctx.n_total, False)
        else:
            grad_input = F.batch_norm_backward_elemt(
                grad_output, input, weight, out, mean, invstd, sums[:C] / ctx.n_total,
                sums[C:] / ctx.n_total, ctx.relu)
        # Like torch.nn.SyncBatchNorm: parameter gradients are this rank's sums (DDP averages them).
        grad_weight = sum_dy_xhat.to(weight.dtype) if weight is not None else None
        grad_bias = sum_dy.to(ctx.bias_dtype) if ctx.bias_dtype is not None else None
        if not ctx.has_residual:
            grad_residual = None
        return (grad_input, grad_weight, grad_bias, grad_residual) + (None,) * 7


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

    def _sync_forward(self, input: Tensor, residual: Optional[Tensor]) -> Tensor:
        need_sync = self.training and dist.is_available() and dist.is_initialized()
        if need_sync:
            process_group = self.process_group or dist.group.WORLD
            world_size = dist.get_world_size(process_group)
            need_sync = world_size > 1
        if not need_sync:
            return self._bn_forward(input, residual, self._relu)

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
        count_batch = track and self.num_batches_tracked is not None
        factor = 0.0 if self.momentum is None else self.momentum
        if count_batch and self.momentum is None:  # cumulative moving average
            factor = 1.0 / float(self.num_batches_tracked + 1)
        out = _SyncBatchNormFunction.apply(input, self.weight, self.bias, residual, running_mean,
                                           running_var, factor, self.eps, self._relu,
                                           process_group, world_size)
        # Counted only once the group-wide checks passed, so a failing call changes nothing.
        if count_batch:
            self.num_batches_tracked.add_(1)
        return out

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """Replaces every torch or fastnn BatchNorm in `module` with a fastnn SyncBatchNorm sharing
        its parameters and buffers; fastnn's fused BN+ReLU and BN+add+ReLU stay fused
        (a converted BatchNormAddReLU2d still takes (input, residual))."""
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
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
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
        return self._sync_forward(input, residual)
