"""Drop-in batch-norm modules. Each subclasses its torch counterpart (same constructor, parameters,
buffers, state_dict keys and _version), so isinstance checks, checkpoints and tools written for
torch's modules keep working."""
from typing import Optional, Tuple

import torch
import torch.fx
from torch import Tensor

from fastnn import functional as F

_fastnn_ops = torch.ops.fastnn

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormReLU2d", "BatchNormAddReLU2d",
           "dual_bn_add_relu"]


def _unlike_input(input: Tensor, residual: Tensor) -> bool:
    """residual is a tensor of another size or dtype than input: relu(bn(input) + residual)
    then takes torch's broadcasting and type promotion (a float32 shortcut under autocast, a
    per-channel residual), which the fused kernel does not do. Raises, before anything is
    counted, when torch's add would fail (sizes that do not broadcast, another device)."""
    if not (isinstance(residual, Tensor) and isinstance(input, Tensor)
            and not isinstance(input, torch.fx.Proxy)):
        return False
    if residual.shape == input.shape and residual.dtype == input.dtype:
        return False
    try:
        torch.broadcast_shapes(input.shape, residual.shape)
    except RuntimeError:
        raise RuntimeError(f"batch_norm: residual of size {tuple(residual.shape)} does not "
                           f"broadcast with the input's size {tuple(input.shape)}") from None
    if residual.device != input.device and residual.dim() > 0:
        raise RuntimeError(f"batch_norm: residual is on {residual.device} but input is on "
                           f"{input.device}")
    return True


def _other_dtype(input: Tensor, input2: Tensor) -> bool:
    """input2 differs from input in dtype only (under autocast, say)."""
    return (isinstance(input2, Tensor) and isinstance(input, Tensor)
            and input2.shape == input.shape and input2.device == input.device
            and input2.dtype != input.dtype)


def _no_hooks(m: torch.nn.Module) -> bool:
    """No hook of any kind is set on module m itself."""
    return not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or m._backward_pre_hooks)


def refuse_uninitialized(model: torch.nn.Module, caller: str, only: type = torch.nn.Module) -> None:
    """Raises a ValueError naming the first lazy module of type `only` in model (a
    torch.nn.LazyBatchNorm2d, LazyConv2d, ...) whose parameters do not exist yet: such a module
    only becomes what it is (a BatchNorm2d of C channels) in its first forward, so `caller` could
    neither copy it nor swap it for fastnn's."""
    for path, m in model.named_modules():
        if (isinstance(m, torch.nn.modules.lazy.LazyModuleMixin) and isinstance(m, only)
                and m.has_uninitialized_params()):
            raise ValueError(
                f"{caller}: {path or 'the model'} is an uninitialized {type(m).__name__}; run the "
                "model once on a batch first (a lazy module creates its parameters in its first "
                f"forward), then call {caller}")


def _sharing_state(cls: type, m: torch.nn.Module) -> torch.nn.Module:
    """An instance of cls with m's attributes, sharing its parameters, buffers and children."""
    new = cls.__new__(cls)
    new.__dict__.update(m.__dict__)
    new._parameters = dict(m._parameters)
    new._buffers = dict(m._buffers)
    new._modules = dict(m._modules)
    return new


class _FastBatchNorm:
    """The forward shared by every fastnn batch-norm module: torch's _BatchNorm.forward, counting
    the batch in num_batches_tracked only once the call has succeeded, so a failing call changes
    nothing. In eager mode with a kernel for the input the op itself checks the arguments
    (_kernel_forward); elsewhere (torch.compile, fx tracing, the reference) _bn_args does."""

    def _bn_args(self, input: Tensor, residual: Optional[Tensor]):
        """Checks a call (before anything is counted) and returns (bn_training, running_mean,
        running_var)."""
        self._check_input_dim(input)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_running else None
        running_var = self.running_var if use_running else None
        F.check_args(input, running_mean, running_var, self.weight, self.bias, bn_training,
                     self.eps, residual)
        return bn_training, running_mean, running_var

    def _counts_batch(self) -> bool:
        return (self.training and self.track_running_stats
                and self.num_batches_tracked is not None)

    def _batch_factor(self) -> float:
        """The running-average factor of this call, the batch counted (_count_batch, once the
        call has succeeded)."""
        if self.momentum is not None:
            return self.momentum
        if self._counts_batch():  # cumulative moving average
            return 1.0 / float(self.num_batches_tracked + 1)
        return 0.0

    def _count_batch(self) -> None:
        """Counts the batch in num_batches_tracked."""
        if self._counts_batch():
            self.num_batches_tracked.add_(1)

    def _bn_forward(self, input: Tensor, residual: Optional[Tensor], relu: bool,
                    batch_stats: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
        """batch_stats: (mean, biased var) of input per channel, already computed; used (instead
        of computing them again) when the call normalizes with batch statistics."""
        if (batch_stats is None and isinstance(input, Tensor) and F.use_kernel(input)
                and not torch.compiler.is_compiling()):
            return self._kernel_forward(input, residual, relu)
        bn_training, running_mean, running_var = self._bn_args(input, residual)
        if bn_training and batch_stats is not None:
            F.check_batch_stats(input, *batch_stats)
        factor = self._batch_factor()
        if bn_training and batch_stats is not None:
            out = F.batch_norm_with_stats_unchecked(
                input, batch_stats[0], batch_stats[1], running_mean, running_var, self.weight,
                self.bias, factor, self.eps, residual, relu)
        else:
            out = F.batch_norm_unchecked(input, running_mean, running_var, self.weight,
                                         self.bias, bn_training, factor, self.eps, residual, relu)
        self._count_batch()
        return out

    def _kernel_forward(self, input: Tensor, residual: Optional[Tensor], relu: bool) -> Tensor:
        """_bn_forward in eager mode where the input's device has fastnn's kernels. The op
        checks every argument before it changes anything, so this path calls it first and
        counts the batch once it has returned; when it fails, the checks of _bn_args run to
        raise the error torch's batch norm gives for that argument. The same semantics as the
        checked path, with a fraction of its Python cost per call."""
        self._check_input_dim(input)
        buffers, params = self._buffers, self._parameters
        # Read from the dicts (the attribute lookup costs more than the kernel on small
        # inputs), unless a name has left them: torch.nn.utils.parametrize and weight_norm make
        # it a computed attribute.
        running_mean = buffers["running_mean"] if "running_mean" in buffers else self.running_mean
        running_var = buffers["running_var"] if "running_var" in buffers else self.running_var
        num_batches = None
        momentum = self.momentum
        factor = 0.0 if momentum is None else momentum
        if self.training:
            bn_training = True
            if self.track_running_stats:
                num_batches = buffers.get("num_batches_tracked")
                if num_batches is not None and momentum is None:  # cumulative moving average
                    factor = 1.0 / (float(num_batches) + 1.0)
            else:
                running_mean = running_var = None
        else:
            bn_training = running_mean is None and running_var is None
        weight = params["weight"] if "weight" in params else self.weight
        bias = params["bias"] if "bias" in params else self.bias
        try:
            # The ops themselves, not fastnn.ops' wrappers: a Python call less per batch norm.
            if bn_training:
                out = _fastnn_ops.batch_norm_train.default(
                    input, weight, bias, running_mean, running_var, factor, self.eps, residual,
                    relu)[0]
            else:
                out = _fastnn_ops.batch_norm_eval.default(
                    input, weight, bias, running_mean, running_var, self.eps, residual, relu)
        except Exception as error:  # noqa: BLE001 (re-raised below)
            failure = error
        else:
            if num_batches is not None:
                num_batches.add_(1)
            return out
        self._bn_args(input, residual)  # torch's error for an argument it rejects
        raise failure

    @classmethod
    def from_module(cls, bn: torch.nn.modules.batchnorm._BatchNorm):
        """A fastnn module with bn's configuration, sharing its parameters and buffers."""
        return _sharing_state(cls, bn)

    def __prepare_scriptable__(self):
        """What torch.jit.script compiles instead: TorchScript cannot call fastnn's forward. A
        BatchNorm1d/2d/3d becomes its torch counterpart sharing its parameters and buffers (the
        same numbers, on torch's kernels); the fused modules raise a clear error."""
        base = _SCRIPTABLE_AS.get(type(self))
        if base is None:
            raise RuntimeError(
                f"fastnn.nn.{type(self).__name__} cannot be compiled by torch.jit.script "
                "(TorchScript); torch.compile, torch.jit.trace and torch.export take it")
        return _sharing_state(base, self)


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


_SCRIPTABLE_AS = {BatchNorm1d: torch.nn.BatchNorm1d, BatchNorm2d: torch.nn.BatchNorm2d,
                  BatchNorm3d: torch.nn.BatchNorm3d}


class BatchNormReLU2d(BatchNorm2d):
    """relu(BatchNorm2d(input)) in one kernel. Same parameters and state_dict keys as
    BatchNorm2d."""

    def forward(self, input: Tensor) -> Tensor:
        return self._bn_forward(input, None, True)


class BatchNormAddReLU2d(BatchNorm2d):
    """relu(BatchNorm2d(input) + residual) in one kernel: a ResNet block's last BN, shortcut add
    and ReLU. Same parameters and state_dict keys as BatchNorm2d."""

    adds_residual_and_relu = True  # forward(input, residual) = relu(f(input) + residual)

    def forward(self, input: Tensor, residual: Tensor) -> Tensor:
        if _unlike_input(input, residual):
            return torch.relu(self._bn_forward(input, None, False) + residual)
        return self._bn_forward(input, residual, True)


def bn_add_relu(bn: torch.nn.Module, input: Tensor, residual: Tensor) -> Tensor:
    """relu(bn(input) + residual) in one kernel for a fastnn batch-norm module, which stays what
    it is (called itself it still returns bn(input)). A module with hooks (each hook sees its
    module's own call), any other module (what fuse_for_inference leaves: an Identity) and a
    residual of another size or dtype take ``relu(bn(input) + residual)``."""
    if (isinstance(input, torch.fx.Proxy) or not isinstance(bn, _FastBatchNorm)
            or not _no_hooks(bn) or _unlike_input(input, residual)):
        return torch.relu(bn(input) + residual)
    if hasattr(bn, "_sync_forward"):  # a SyncBatchNorm
        return bn._sync_forward(input, residual, True)
    return bn._bn_forward(input, residual, True)


def dual_bn_add_relu(bn: torch.nn.Module, input: Tensor, bn2: torch.nn.Module,
                     input2: Tensor) -> Tensor:
    """relu(bn(input) + bn2(input2)) for two fastnn batch-norm modules, in one kernel where the
    device has it: the last BN, the downsampling shortcut's BN, the add and the ReLU of a ResNet
    block. Each module keeps its own semantics (momentum, eps, running statistics,
    num_batches_tracked) as if called on its own; a failing call changes neither.

    bn may be a BatchNormAddReLU2d (its ReLU is applied here either way) or a plain BatchNorm2d;
    bn2 is applied without ReLU, whatever its type. Other modules (synchronized or torch batch
    norms, or what fuse_for_inference leaves) are called one after the other instead:
    ``bn(input, bn2(input2))`` when bn adds a residual itself, else
    ``relu(bn(input) + bn2(input2))``.
    """
    def fusable(m):
        return (isinstance(m, _FastBatchNorm) and not hasattr(m, "process_group")
                and _no_hooks(m))

    if (isinstance(input, torch.fx.Proxy) or isinstance(input2, torch.fx.Proxy)
            or not fusable(bn) or not fusable(bn2) or _other_dtype(input, input2)):
        # The two modules called one after the other: under torch.fx tracing (so that a traced
        # graph shows each batch norm, for fuse_for_inference to fold each into its
        # convolution), for other modules (synchronized batch norms, torch's, what folding
        # left: an AddReLU and an Identity), for modules with hooks (each hook sees its own
        # module's call), and for inputs of different dtypes (torch's type promotion).
        if getattr(bn, "adds_residual_and_relu", False):
            return bn(input, bn2(input2))
        return torch.relu(bn(input) + bn2(input2))
    train1, rm1, rv1 = bn._bn_args(input, None)
    F.check_input2(input, input2)
    train2, rm2, rv2 = bn2._bn_args(input2, None)
    if train1 != train2:  # one normalizes with batch statistics, the other with running ones
        y2 = bn2._bn_forward(input2, None, False)
        return bn._bn_forward(input, y2, True)
    out = F.dual_batch_norm_unchecked(input, bn.weight, bn.bias, rm1, rv1, input2, bn2.weight,
                                      bn2.bias, rm2, rv2, train1, bn._batch_factor(), bn.eps,
                                      bn2._batch_factor(), bn2.eps, True)
    bn._count_batch()
    bn2._count_batch()
    return out
