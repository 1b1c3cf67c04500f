"""fastnn modules: drop-in replacements for torch.nn's batch norms and their fused forms."""
from fastnn.nn.batchnorm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAddReLU2d,
    BatchNormReLU2d,
    bn_add_relu,
    dual_bn_add_relu,
)
from fastnn.nn.syncbatchnorm import SyncBatchNorm, SyncBatchNormAddReLU, SyncBatchNormReLU

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormReLU2d", "BatchNormAddReLU2d",
           "bn_add_relu", "dual_bn_add_relu", "SyncBatchNorm", "SyncBatchNormReLU",
           "SyncBatchNormAddReLU"]
