"""DenseNet on fastnn's fused batch norms, with torchvision's module names and state_dict keys.

Every dense layer is pre-activation, BN-ReLU-conv on the concatenated earlier feature maps; each
BN+ReLU pair is one fastnn.nn.BatchNormReLU2d (whose output, and what a hook on it sees, is after
the ReLU). The ReLU modules of torchvision's layout (`relu1`, `relu2`, `relu`, `relu0`) stay in
place as identities (they hold no state), so torchvision checkpoints load with strict=True in both
directions. ``features`` still ends with norm5 before the final ReLU, as in torchvision.
``fused=False`` builds the same network on plain torch layers.
"""
import re
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import Tensor, nn

from fastnn import functional as fF
from fastnn import nn as fnn
from fastnn import ops as fnn_ops
from fastnn.models._utils import _no_hooks, load_weights, override_kwarg, resolve_weights

__all__ = ["DenseNet", "densenet121", "densenet161", "densenet169", "densenet201"]


def _bn_relu(num_features: int, fused: bool) -> Tuple[nn.Module, nn.Module]:
    """(norm, relu): a fused BN+ReLU and an identity, or torch's BatchNorm2d and ReLU."""
    if fused:
        return fnn.BatchNormReLU2d(num_features), nn.Identity()
    return nn.BatchNorm2d(num_features), nn.ReLU(inplace=True)


class _DenseBatchNormReLU2d(fnn.BatchNormReLU2d):
    """A dense layer's first BN+ReLU. In training it can take the batch statistics of its input
    from the block, which computes each feature map's statistics once for all its layers: every
    layer normalizes the same earlier feature maps, so their per-channel batch mean and variance
    are the same for each. With those statistics it also takes the feature maps themselves (a
    list) and reads them where they are, never making their concatenated copy. Its own running
    statistics, weight and bias are its own, and outputs and gradients are those of
    BatchNormReLU2d on the concatenation."""

    def forward(self, input: Union[Tensor, List[Tensor]],
                batch_stats: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
        if isinstance(input, (list, tuple)):
            inputs = list(input)
            if batch_stats is None or not self.training or not fF._cat_kernel_inputs(inputs):
                input = torch.cat(inputs, 1)
            else:
                probe = fF.cat_probe(inputs)
                _, running_mean, running_var = self._bn_args(probe, None)
                fF.check_batch_stats(probe, *batch_stats)
                out = fF.batch_norm_cat_with_stats_unchecked(
                    inputs, batch_stats[0], batch_stats[1], running_mean, running_var,
                    self.weight, self.bias, self._batch_factor(), self.eps, True)
                self._count_batch()
                return out
        return self._bn_forward(input, None, True, batch_stats)


def _shares_statistics(input: Tensor) -> bool:
    """Whether a dense block computes each feature map's batch statistics once for its layers:
    where fastnn has kernels for the statistics and for the training forward with given
    statistics on the device (elsewhere each layer's fused training kernel, statistics included,
    is the faster path)."""
    device = input.device.type
    return (fF.use_kernel(input) and fnn_ops.has_kernel(device, "batch_norm_stats")
            and fnn_ops.has_kernel(device, "batch_norm_train_with_stats"))


class _DenseLayer(nn.Module):
    """BN-ReLU-conv1x1 (bottleneck to bn_size * growth_rate channels), BN-ReLU-conv3x3 (growth_rate
    new channels), on the concatenation of every earlier feature map of the block."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int,
                 drop_rate: float, memory_efficient: bool = False, fused: bool = True) -> None:
        super().__init__()
        self.norm1, self.relu1 = _bn_relu(num_input_features, fused)
        if fused:
            self.norm1 = _DenseBatchNormReLU2d(num_input_features)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1,
                               stride=1, bias=False)
        self.norm2, self.relu2 = _bn_relu(bn_size * growth_rate, fused)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1,
                               padding=1, bias=False)
        self.drop_rate = float(drop_rate)
        self.memory_efficient = memory_efficient

    def bn_function(self, inputs: List[Tensor],
                    stats: Optional[List[Tuple[Tensor, Tensor]]] = None) -> Tensor:
        if stats is not None and isinstance(self.norm1, _DenseBatchNormReLU2d):
            batch_stats = (torch.cat([m for m, _ in stats]), torch.cat([v for _, v in stats]))
            # The feature maps as they are (no concatenated copy), unless a hook on norm1 expects
            # the concatenation torchvision's layer passes it.
            features = inputs if _no_hooks(self.norm1) else torch.cat(inputs, 1)
            normed = self.norm1(features, batch_stats=batch_stats)
        else:
            normed = self.norm1(torch.cat(inputs, 1))
        bottleneck_output = self.conv1(self.relu1(normed))
        return bottleneck_output

    def any_requires_grad(self, inputs: List[Tensor]) -> bool:
        for tensor in inputs:
            if tensor.requires_grad:
                return True
        return False

    def call_checkpoint_bottleneck(self, inputs: List[Tensor],
                                   stats: Optional[List[Tuple[Tensor, Tensor]]] = None) -> Tensor:
        # The concatenation and the bottleneck are recomputed in backward instead of stored. As
        # in torchvision, the recomputation runs norm1 again, so in training its running
        # statistics are updated a second time. The block appends to its statistics list
        # afterwards: the recomputation takes the statistics of this call.
        stats = None if stats is None else list(stats)

        def closure(*tensors):
            return self.bn_function(list(tensors), stats)

        return cp.checkpoint(closure, *inputs, use_reentrant=False)

    def forward(self, input: Union[Tensor, List[Tensor]],
                shared_stats: Optional[List[Tuple[Tensor, Tensor]]] = None) -> Tensor:
        """input: the earlier feature maps (or one tensor). shared_stats: the batch (mean, var)
        of each of them, from the block, in training."""
        prev_features = [input] if isinstance(input, Tensor) else input

        if self.memory_efficient and self.any_requires_grad(prev_features):
            bottleneck_output = self.call_checkpoint_bottleneck(prev_features, shared_stats)
        else:
            bottleneck_output = self.bn_function(prev_features, shared_stats)

        new_features = self.conv2(self.relu2(self.norm2(bottleneck_output)))
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features


class _DenseBlock(nn.ModuleDict):
    """num_layers dense layers; each sees every earlier output of the block, and the block returns
    all of them concatenated."""

    _version = 2

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int,
                 drop_rate: float, memory_efficient: bool = False, fused: bool = True) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(num_input_features + i * growth_rate, growth_rate=growth_rate,
                                bn_size=bn_size, drop_rate=drop_rate,
                                memory_efficient=memory_efficient, fused=fused)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, init_features: Tensor) -> Tensor:
        features = [init_features]
        layers = list(self.values())
        # In training each feature map's batch statistics are computed once, for every layer.
        share = self.training and _shares_statistics(init_features) and any(
            isinstance(getattr(layer, "norm1", None), _DenseBatchNormReLU2d) for layer in layers)
        stats = [fF.batch_norm_stats(init_features)] if share else None
        for i, layer in enumerate(layers):
            new_features = layer(features, shared_stats=stats) if share else layer(features)
            features.append(new_features)
            if share and i + 1 < len(layers):
                stats.append(fF.batch_norm_stats(new_features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    """BN-ReLU-conv1x1 (halving the channels) and a 2x2 average pool."""

    def __init__(self, num_input_features: int, num_output_features: int,
                 fused: bool = True) -> None:
        super().__init__()
        norm, relu = _bn_relu(num_input_features, fused)
        self.add_module("norm", norm)
        self.add_module("relu", relu)
        self.add_module("conv", nn.Conv2d(num_input_features, num_output_features, kernel_size=1,
                                          stride=1, bias=False))
        self.add_module("pool", nn.AvgPool2d(kernel_size=2, stride=2))


class DenseNet(nn.Module):
    """torchvision's DenseNet-BC (Huang et al., 2016; same arguments, module names and
    initialization) on fastnn.

    Args:
        growth_rate: channels each layer adds (k in the paper).
        block_config: layers in each of the four dense blocks.
        num_init_features: channels of the first convolution.
        bn_size: the bottleneck has bn_size * growth_rate channels.
        drop_rate: dropout after each dense layer.
        num_classes: classifier outputs.
        memory_efficient: recompute each layer's concatenation and bottleneck in backward
            (gradient checkpointing): less memory, slower.
        fused: build on fastnn's fused BN+ReLU (default) or, with False, on torch.nn.BatchNorm2d
            and separate ReLUs.
    """

    def __init__(self, growth_rate: int = 32, block_config: Tuple[int, int, int, int] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, drop_rate: float = 0,
                 num_classes: int = 1000, memory_efficient: bool = False,
                 fused: bool = True) -> None:
        super().__init__()
        self.fused = fused

        norm0, relu0 = _bn_relu(num_init_features, fused)
        self.features = nn.Sequential(OrderedDict([
            ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3,
                                bias=False)),
            ("norm0", norm0),
            ("relu0", relu0),
            ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
        ]))

        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(num_layers=num_layers, num_input_features=num_features,
                                bn_size=bn_size, growth_rate=growth_rate, drop_rate=drop_rate,
                                memory_efficient=memory_efficient, fused=fused)
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features = num_features + num_layers * growth_rate
            if i != len(block_config) - 1:
                trans = _Transition(num_input_features=num_features,
                                    num_output_features=num_features // 2, fused=fused)
                self.features.add_module(f"transition{i + 1}", trans)
                num_features = num_features // 2

        # `features` ends before the final ReLU, as in torchvision (feature extractors read it).
        self.features.add_module("norm5", fnn.BatchNorm2d(num_features) if fused
                                 else nn.BatchNorm2d(num_features))

        self.classifier = nn.Linear(num_features, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        features = self.features(x)  # N x C x H/32 x W/32
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        out = self.classifier(out)
        return out


# Checkpoints saved before torchvision renamed "norm.1" to "norm1" (the released ImageNet weights)
# name a dense layer's modules "norm.1", "relu.1", "conv.1", ...
_OLD_DENSE_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _rename_old_keys(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    renamed = OrderedDict()
    for key, value in state_dict.items():
        match = _OLD_DENSE_KEY.match(key)
        renamed[match.group(1) + match.group(2) if match else key] = value
    return renamed


def _densenet(builder: str, growth_rate: int, block_config: Tuple[int, int, int, int],
              num_init_features: int, weights: Any, progress: bool, **kwargs: Any) -> DenseNet:
    weights = resolve_weights(builder, weights)
    if weights is not None:
        override_kwarg(kwargs, "num_classes", len(weights.meta["categories"]))
    model = DenseNet(growth_rate, block_config, num_init_features, **kwargs)
    if weights is not None:
        load_weights(model, weights, progress, rename=_rename_old_keys)
    return model


def densenet121(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-121, as ``torchvision.models.densenet121``.

    Args:
        weights: None (random initialization), or one of torchvision's ``DenseNet121_Weights``
            members or its name (e.g. ``"DEFAULT"``), loaded through torchvision, which downloads
            it or reads torch hub's cache.
        progress: show the download's progress bar.
        **kwargs: passed to :class:`DenseNet` (``num_classes``, ``bn_size``, ``drop_rate``,
            ``memory_efficient``, ``fused``, ...).
    """
    return _densenet("densenet121", 32, (6, 12, 24, 16), 64, weights, progress, **kwargs)


def densenet161(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-161 (growth rate 48); arguments as :func:`densenet121`
    (weights: ``DenseNet161_Weights``)."""
    return _densenet("densenet161", 48, (6, 12, 36, 24), 96, weights, progress, **kwargs)


def densenet169(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-169; arguments as :func:`densenet121` (weights: ``DenseNet169_Weights``)."""
    return _densenet("densenet169", 32, (6, 12, 32, 32), 64, weights, progress, **kwargs)


def densenet201(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-201; arguments as :func:`densenet121` (weights: ``DenseNet201_Weights``)."""
    return _densenet("densenet201", 32, (6, 12, 48, 32), 64, weights, progress, **kwargs)
