"""Drop-in batch-norm modules. Each subclasses its torch counterpart (same constructor, parameters,
buffers, state_dict keys and _version), so isinstance checks, checkpoints and tools written for
torch's modules keep working."""
from typing import Optional, Tuple

import torch
from torch import Tensor

from fastnn import functional as F

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormReLU2d", "BatchNormAddReLU2d"]


class _FastBatchNorm:
    """The forward shared by every fastnn batch-norm module: torch's _BatchNorm.forward, with the
    arguments checked before num_batches_tracked is counted, so a failing call changes nothing."""

    def _bn_forward(self, input: Tensor, residual: Optional[Tensor], relu: bool,
                    batch_stats: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
        """batch_stats: (mean, biased var) of input per channel, already computed; used (instead
        of computing them again) when the call normalizes with batch statistics."""
        self._check_input_dim(input)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_running else None
        running_var = self.running_var if use_running else None
        F.check_args(input, running_mean, running_var, self.weight, self.bias, bn_training,
                     self.eps, residual)
        if bn_training and batch_stats is not None:
            F.check_batch_stats(input, *batch_stats)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        if bn_training and batch_stats is not None:
            return F.batch_norm_with_stats_unchecked(
                input, batch_stats[0], batch_stats[1], running_mean, running_var, self.weight,
                self.bias, factor, self.eps, residual, relu)
        return F.batch_norm_unchecked(input, running_mean, running_var, self.weight, self.bias,
                                      bn_training, factor, self.eps, residual, relu)

    @classmethod
    def from_module(cls, bn: torch.nn.modules.batchnorm._BatchNorm):
        """A fastnn module with bn's configuration, sharing its parameters and buffers."""
        new = cls.__new__(cls)
        new.__dict__.update(bn.__dict__)
        new._parameters = dict(bn._parameters)
        new._buffers = dict(bn._buffers)
        new._modules = dict(bn._modules)
        return new


class BatchNorm1d(_FastBatchNorm, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d on fastnn's kernels (input (N, C) or (N, C, L))."""

    def forward(self, input: Tensor) -> Tensor:
        return self._bn_forward(input, None, False)


class BatchNorm2d(_FastBatchNorm, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d on fastnn's kernels (input (N, C, H, W), NCHW or channels_last)."""

    def forward(self, input: Tensor) -> Tensor:
        return self._bn_forward(input, None, False)


class BatchNorm3d(_FastBatchNorm, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d on fastnn's kernels (input (N, C, D, H, W))."""

    def forward(self, input: Tensor) -> Tensor:
        return self._bn_forward(input, None, False)


class BatchNormReLU2d(BatchNorm2d):
    """relu(BatchNorm2d(input)) in one kernel. Same parameters and state_dict keys as
    BatchNorm2d."""

    def forward(self, input: Tensor) -> Tensor:
        return self._bn_forward(input, None, True)


class BatchNormAddReLU2d(BatchNorm2d):
    """relu(BatchNorm2d(input) + residual) in one kernel: a ResNet block's last BN, shortcut add
    and ReLU. Same parameters and state_dict keys as BatchNorm2d."""

    def forward(self, input: Tensor, residual: Tensor) -> Tensor:
        return self._bn_forward(input, residual, True)
