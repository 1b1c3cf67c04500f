"""ResNet on fastnn's fused batch norms, with torchvision's module names and state_dict keys.

A residual block's last batch norm, the shortcut add and the final ReLU run as one
fastnn.nn.BatchNormAddReLU2d; every other BN followed by a ReLU is a fastnn.nn.BatchNormReLU2d
(so a fused BN module's output, and what a hook on it sees, is after the ReLU).
The ReLU modules of torchvision's layout stay in place as identities (they hold no state), so
torchvision checkpoints load with strict=True in both directions. ``fused=False`` builds the same
network on plain torch layers.
"""
from typing import Any, Callable, List, Optional, Type, Union

import torch
from torch import Tensor, nn

from fastnn import nn as fnn
from fastnn.models._utils import _no_hooks, load_weights, override_kwarg, resolve_weights

__all__ = [
    "ResNet",
    "BasicBlock",
    "Bottleneck",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1,
            dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding (no bias: a batch norm follows)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation,
                     groups=groups, bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution (no bias: a batch norm follows)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def _norm_layers(norm_layer: Optional[Callable[..., nn.Module]], fused: bool):
    """(fused, bn, bn_relu, bn_add_relu, relu) for a block.

    A caller's own norm_layer (GroupNorm, FrozenBatchNorm2d, ...) is used as torchvision uses it,
    with separate ReLU and add; without one, ``fused`` picks fastnn's fused modules or torch's
    BatchNorm2d.
    """
    if norm_layer is None and fused:
        return True, fnn.BatchNorm2d, fnn.BatchNormReLU2d, fnn.BatchNormAddReLU2d, nn.Identity
    norm_layer = nn.BatchNorm2d if norm_layer is None else norm_layer
    return False, norm_layer, norm_layer, norm_layer, lambda: nn.ReLU(inplace=True)




def _dual_shortcut(downsample: Optional[nn.Module], last_bn: nn.Module) -> bool:
    """Whether a block's last BN and its shortcut (torchvision's Sequential(conv1x1, BatchNorm2d))
    can run as one dual BN+add+ReLU: fastnn's own (not synchronized) modules, and no hooks that
    expect the shortcut's modules to be called."""
    return (type(downsample) is nn.Sequential and len(downsample) == 2
            and type(downsample[1]) is fnn.BatchNorm2d
            and type(last_bn) is fnn.BatchNormAddReLU2d
            and _no_hooks(downsample) and _no_hooks(downsample[1]) and _no_hooks(last_bn))


def _add_shortcut(block: nn.Module, last_bn: nn.Module, out: Tensor, x: Tensor) -> Tensor:
    """A block's end, relu(last_bn(out) + shortcut(x)): with fused modules one kernel (both batch
    norms, the add and the ReLU, when the shortcut is a fastnn conv1x1 + BatchNorm2d), else
    torchvision's three steps."""
    if block.fused and _dual_shortcut(block.downsample, last_bn):
        return fnn.dual_bn_add_relu(last_bn, out, block.downsample[1], block.downsample[0](x))
    identity = x if block.downsample is None else block.downsample(x)
    if block.fused:
        return last_bn(out, identity)  # relu(last_bn(out) + identity) in one kernel
    out = last_bn(out)
    out += identity
    return block.relu(out)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a shortcut: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""

    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer: Optional[Callable[..., nn.Module]] = None,
                 fused: bool = True) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.fused, _, bn_relu, bn_add_relu, relu = _norm_layers(norm_layer, fused)
        # conv1 and the downsample shortcut both carry the stride.
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = bn_relu(planes)
        self.relu = relu()
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = bn_add_relu(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)  # an identity when bn1 applies the ReLU itself

        out = self.conv2(out)
        return _add_shortcut(self, self.bn2, out, x)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (with the stride: ResNet v1.5), 1x1 expand, and a shortcut."""

    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer: Optional[Callable[..., nn.Module]] = None,
                 fused: bool = True) -> None:
        super().__init__()
        self.fused, _, bn_relu, bn_add_relu, relu = _norm_layers(norm_layer, fused)
        width = int(planes * (base_width / 64.0)) * groups
        # conv2 and the downsample shortcut both carry the stride.
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = bn_relu(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = bn_relu(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = bn_add_relu(planes * self.expansion)
        self.relu = relu()
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)  # an identity when the batch norms apply the ReLU themselves

        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)

        out = self.conv3(out)
        return _add_shortcut(self, self.bn3, out, x)


class ResNet(nn.Module):
    """torchvision's ResNet (same arguments, module names and initialization) on fastnn.

    Args (beyond torchvision's): fused: build on fastnn's fused batch-norm modules (default) or,
    with False, on torch.nn.BatchNorm2d and separate ReLUs. A given ``norm_layer`` is used as
    torchvision uses it (no fusion).
    """

    def __init__(self, block: Type[Union[BasicBlock, Bottleneck]], layers: List[int],
                 num_classes: int = 1000, zero_init_residual: bool = False, groups: int = 1,
                 width_per_group: int = 64,
                 replace_stride_with_dilation: Optional[List[bool]] = None,
                 norm_layer: Optional[Callable[..., nn.Module]] = None,
                 fused: bool = True) -> None:
        super().__init__()
        self._norm_layer = norm_layer
        self.fused = fused and norm_layer is None
        _, _, bn_relu, _, relu = _norm_layers(norm_layer, fused)

        self.inplanes = 64
        self.dilation = 1
        if replace_stride_with_dilation is None:
            # Each element says whether to replace that stage's 2x2 stride with a dilation.
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError("replace_stride_with_dilation should be None or a 3-element tuple, "
                             f"got {replace_stride_with_dilation}")
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = bn_relu(self.inplanes)
        self.relu = relu()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2,
                                       dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2,
                                       dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2,
                                       dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

        # Zero-initialize the last BN of each residual branch, so that every block starts as an
        # identity (https://arxiv.org/abs/1706.02677).
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck) and m.bn3.weight is not None:
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block: Type[Union[BasicBlock, Bottleneck]], planes: int, blocks: int,
                    stride: int = 1, dilate: bool = False) -> nn.Sequential:
        _, bn, _, _, _ = _norm_layers(self._norm_layer, self.fused)
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            # Its BN output is the residual that the block's last fused BN adds.
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                bn(planes * block.expansion),
            )

        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width,
                        previous_dilation, self._norm_layer, fused=self.fused)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups,
                                base_width=self.base_width, dilation=self.dilation,
                                norm_layer=self._norm_layer, fused=self.fused))
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)  # N x 64 x H/2 x W/2
        x = self.bn1(x)
        x = self.relu(x)  # an identity when bn1 applies the ReLU itself
        x = self.maxpool(x)  # N x 64 x H/4 x W/4

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)  # N x 512*expansion x H/32 x W/32

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x


def _resnet(builder: str, block: Type[Union[BasicBlock, Bottleneck]], layers: List[int],
            weights: Any, progress: bool, **kwargs: Any) -> ResNet:
    weights = resolve_weights(builder, weights)
    if weights is not None:
        override_kwarg(kwargs, "num_classes", len(weights.meta["categories"]))
    model = ResNet(block, layers, **kwargs)
    if weights is not None:
        load_weights(model, weights, progress)
    return model


def resnet18(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-18 (He et al., 2015), as ``torchvision.models.resnet18``.

    Args:
        weights: None (random initialization), or one of torchvision's ``ResNet18_Weights``
            members or its name (e.g. ``"DEFAULT"``), loaded through torchvision, which downloads
            it or reads torch hub's cache.
        progress: show the download's progress bar.
        **kwargs: passed to :class:`ResNet` (``num_classes``, ``zero_init_residual``,
            ``norm_layer``, ``fused``, ...).
    """
    return _resnet("resnet18", BasicBlock, [2, 2, 2, 2], weights, progress, **kwargs)


def resnet34(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-34; arguments as :func:`resnet18` (weights: ``ResNet34_Weights``)."""
    return _resnet("resnet34", BasicBlock, [3, 4, 6, 3], weights, progress, **kwargs)


def resnet50(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-50 v1.5 (the stride in the 3x3 convolution); arguments as :func:`resnet18`
    (weights: ``ResNet50_Weights``)."""
    return _resnet("resnet50", Bottleneck, [3, 4, 6, 3], weights, progress, **kwargs)


def resnet101(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-101 v1.5; arguments as :func:`resnet18` (weights: ``ResNet101_Weights``)."""
    return _resnet("resnet101", Bottleneck, [3, 4, 23, 3], weights, progress, **kwargs)


def resnet152(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-152 v1.5; arguments as :func:`resnet18` (weights: ``ResNet152_Weights``)."""
    return _resnet("resnet152", Bottleneck, [3, 8, 36, 3], weights, progress, **kwargs)


def resnext50_32x4d(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNeXt-50 32x4d (Xie et al., 2016); arguments as :func:`resnet18`
    (weights: ``ResNeXt50_32X4D_Weights``)."""
    override_kwarg(kwargs, "groups", 32)
    override_kwarg(kwargs, "width_per_group", 4)
    return _resnet("resnext50_32x4d", Bottleneck, [3, 4, 6, 3], weights, progress, **kwargs)


def resnext101_32x8d(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNeXt-101 32x8d; arguments as :func:`resnet18` (weights: ``ResNeXt101_32X8D_Weights``)."""
    override_kwarg(kwargs, "groups", 32)
    override_kwarg(kwargs, "width_per_group", 8)
    return _resnet("resnext101_32x8d", Bottleneck, [3, 4, 23, 3], weights, progress, **kwargs)


def resnext101_64x4d(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNeXt-101 64x4d; arguments as :func:`resnet18` (weights: ``ResNeXt101_64X4D_Weights``)."""
    override_kwarg(kwargs, "groups", 64)
    override_kwarg(kwargs, "width_per_group", 4)
    return _resnet("resnext101_64x4d", Bottleneck, [3, 4, 23, 3], weights, progress, **kwargs)


def wide_resnet50_2(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """Wide ResNet-50-2 (Zagoruyko and Komodakis, 2016): twice the bottleneck width; arguments as
    :func:`resnet18` (weights: ``Wide_ResNet50_2_Weights``)."""
    override_kwarg(kwargs, "width_per_group", 64 * 2)
    return _resnet("wide_resnet50_2", Bottleneck, [3, 4, 6, 3], weights, progress, **kwargs)


def wide_resnet101_2(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """Wide ResNet-101-2; arguments as :func:`resnet18` (weights: ``Wide_ResNet101_2_Weights``)."""
    override_kwarg(kwargs, "width_per_group", 64 * 2)
    return _resnet("wide_resnet101_2", Bottleneck, [3, 4, 23, 3], weights, progress, **kwargs)
