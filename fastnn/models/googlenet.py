"""GoogLeNet (Inception v1) on fastnn's fused batch norms, with torchvision's module names and
state_dict keys.

Every convolution is a BasicConv2d: conv, then BN (eps=1e-3) and ReLU as one
fastnn.nn.BatchNormReLU2d (so `bn`'s output, and what a hook on it sees, is after the ReLU),
keeping torchvision's `conv`/`bn` names so torchvision checkpoints load with strict=True in both
directions. ``fused=False`` builds the same network on plain torch layers.
"""
import warnings
from collections import namedtuple
from functools import partial
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastnn import nn as fnn
from fastnn.models._utils import load_weights, override_kwarg, resolve_weights

__all__ = ["GoogLeNet", "GoogLeNetOutputs", "BasicConv2d", "Inception", "InceptionAux",
           "googlenet"]

GoogLeNetOutputs = namedtuple("GoogLeNetOutputs", ["logits", "aux_logits2", "aux_logits1"])
GoogLeNetOutputs.__annotations__ = {"logits": Tensor, "aux_logits2": Optional[Tensor],
                                    "aux_logits1": Optional[Tensor]}


class BasicConv2d(nn.Module):
    """relu(bn(conv(x))) with BN eps=1e-3; the BN and the ReLU are one fused module unless
    ``fused=False``. Keyword arguments go to nn.Conv2d."""

    def __init__(self, in_channels: int, out_channels: int, fused: bool = True,
                 **kwargs: Any) -> None:
        super().__init__()
        self.fused = fused
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        bn = fnn.BatchNormReLU2d if fused else nn.BatchNorm2d
        self.bn = bn(out_channels, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        x = self.bn(x)
        if self.fused:
            return x  # bn applied the ReLU
        return F.relu(x, inplace=True)


class Inception(nn.Module):
    """Four parallel branches concatenated: 1x1; 1x1 then 3x3; 1x1 then 3x3 (a 5x5 in the paper;
    torchvision's layout, kept for its checkpoints); 3x3 max pool then 1x1."""

    def __init__(self, in_channels: int, ch1x1: int, ch3x3red: int, ch3x3: int, ch5x5red: int,
                 ch5x5: int, pool_proj: int,
                 conv_block: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__()
        if conv_block is None:
            conv_block = BasicConv2d
        self.branch1 = conv_block(in_channels, ch1x1, kernel_size=1)
        self.branch2 = nn.Sequential(
            conv_block(in_channels, ch3x3red, kernel_size=1),
            conv_block(ch3x3red, ch3x3, kernel_size=3, padding=1),
        )
        self.branch3 = nn.Sequential(
            conv_block(in_channels, ch5x5red, kernel_size=1),
            conv_block(ch5x5red, ch5x5, kernel_size=3, padding=1),
        )
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True),
            conv_block(in_channels, pool_proj, kernel_size=1),
        )

    def _forward(self, x: Tensor) -> List[Tensor]:
        branch1 = self.branch1(x)
        branch2 = self.branch2(x)
        branch3 = self.branch3(x)
        branch4 = self.branch4(x)
        return [branch1, branch2, branch3, branch4]

    def forward(self, x: Tensor) -> Tensor:
        outputs = self._forward(x)
        return torch.cat(outputs, 1)


class InceptionAux(nn.Module):
    """Auxiliary classifier (used in training only): 4x4 average pool, 1x1 conv, two linears."""

    def __init__(self, in_channels: int, num_classes: int,
                 conv_block: Optional[Callable[..., nn.Module]] = None,
                 dropout: float = 0.7) -> None:
        super().__init__()
        if conv_block is None:
            conv_block = BasicConv2d
        self.conv = conv_block(in_channels, 128, kernel_size=1)
        self.fc1 = nn.Linear(2048, 1024)
        self.fc2 = nn.Linear(1024, num_classes)
        self.dropout = nn.Dropout(p=dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = F.adaptive_avg_pool2d(x, (4, 4))  # N x C x 4 x 4
        x = self.conv(x)  # N x 128 x 4 x 4
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x), inplace=True)  # N x 1024
        x = self.dropout(x)
        x = self.fc2(x)
        return x


class GoogLeNet(nn.Module):
    """torchvision's GoogLeNet (same arguments, module names and initialization) on fastnn.

    In training with ``aux_logits`` the forward returns GoogLeNetOutputs(logits, aux_logits2,
    aux_logits1), otherwise the logits. ``init_weights=None`` means True (torchvision warns there
    about a future change of default; fastnn keeps truncated-normal initialization). ``fused``:
    build on fastnn's fused BN+ReLU (default) or, with False, on torch.nn.BatchNorm2d and ReLU;
    it applies to the default ``blocks`` (given blocks are used as they are).
    """

    __constants__ = ["aux_logits", "transform_input"]

    def __init__(self, num_classes: int = 1000, aux_logits: bool = True,
                 transform_input: bool = False, init_weights: Optional[bool] = None,
                 blocks: Optional[List[Callable[..., nn.Module]]] = None, dropout: float = 0.2,
                 dropout_aux: float = 0.7, fused: bool = True) -> None:
        super().__init__()
        if blocks is None:
            conv = partial(BasicConv2d, fused=fused)
            blocks = [conv, partial(Inception, conv_block=conv),
                      partial(InceptionAux, conv_block=conv)]
        if init_weights is None:
            init_weights = True
        if len(blocks) != 3:
            raise ValueError(f"blocks length should be 3 instead of {len(blocks)}")
        conv_block, inception_block, inception_aux_block = blocks

        self.aux_logits = aux_logits
        self.transform_input = transform_input

        self.conv1 = conv_block(3, 64, kernel_size=7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = conv_block(64, 64, kernel_size=1)
        self.conv3 = conv_block(64, 192, kernel_size=3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)

        self.inception3a = inception_block(192, 64, 96, 128, 16, 32, 32)
        self.inception3b = inception_block(256, 128, 128, 192, 32, 96, 64)
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)

        self.inception4a = inception_block(480, 192, 96, 208, 16, 48, 64)
        self.inception4b = inception_block(512, 160, 112, 224, 24, 64, 64)
        self.inception4c = inception_block(512, 128, 128, 256, 24, 64, 64)
        self.inception4d = inception_block(512, 112, 144, 288, 32, 64, 64)
        self.inception4e = inception_block(528, 256, 160, 320, 32, 128, 128)
        self.maxpool4 = nn.MaxPool2d(2, stride=2, ceil_mode=True)

        self.inception5a = inception_block(832, 256, 160, 320, 32, 128, 128)
        self.inception5b = inception_block(832, 384, 192, 384, 48, 128, 128)

        if aux_logits:
            self.aux1 = inception_aux_block(512, num_classes, dropout=dropout_aux)
            self.aux2 = inception_aux_block(528, num_classes, dropout=dropout_aux)
        else:
            self.aux1 = None
            self.aux2 = None

        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(1024, num_classes)

        if init_weights:
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01, a=-2, b=2)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.constant_(m.weight, 1)
                    nn.init.constant_(m.bias, 0)

    def _transform_input(self, x: Tensor) -> Tensor:
        if self.transform_input:
            # From ImageNet normalization (torchvision's transforms) to the (x - 0.5) / 0.5 range
            # the original weights were trained with.
            x_ch0 = torch.unsqueeze(x[:, 0], 1) * (0.229 / 0.5) + (0.485 - 0.5) / 0.5
            x_ch1 = torch.unsqueeze(x[:, 1], 1) * (0.224 / 0.5) + (0.456 - 0.5) / 0.5
            x_ch2 = torch.unsqueeze(x[:, 2], 1) * (0.225 / 0.5) + (0.406 - 0.5) / 0.5
            x = torch.cat((x_ch0, x_ch1, x_ch2), 1)
        return x

    def _forward(self, x: Tensor) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        x = self.conv1(x)  # N x 64 x H/2 x W/2
        x = self.maxpool1(x)
        x = self.conv2(x)
        x = self.conv3(x)  # N x 192 x H/4 x W/4
        x = self.maxpool2(x)

        x = self.inception3a(x)
        x = self.inception3b(x)  # N x 480 x H/8 x W/8
        x = self.maxpool3(x)
        x = self.inception4a(x)  # N x 512 x H/16 x W/16

        aux1: Optional[Tensor] = None
        if self.aux1 is not None and self.training:
            aux1 = self.aux1(x)

        x = self.inception4b(x)
        x = self.inception4c(x)
        x = self.inception4d(x)  # N x 528 x H/16 x W/16

        aux2: Optional[Tensor] = None
        if self.aux2 is not None and self.training:
            aux2 = self.aux2(x)

        x = self.inception4e(x)  # N x 832 x H/16 x W/16
        x = self.maxpool4(x)
        x = self.inception5a(x)
        x = self.inception5b(x)  # N x 1024 x H/32 x W/32

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.dropout(x)
        x = self.fc(x)
        return x, aux2, aux1

    def forward(self, x: Tensor):
        x = self._transform_input(x)
        x, aux2, aux1 = self._forward(x)
        if self.training and self.aux_logits:
            return GoogLeNetOutputs(x, aux2, aux1)
        return x


def googlenet(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> GoogLeNet:
    """GoogLeNet (Szegedy et al., 2014), as ``torchvision.models.googlenet``.

    Args:
        weights: None (random initialization), or one of torchvision's ``GoogLeNet_Weights``
            members or its name (e.g. ``"DEFAULT"``), loaded through torchvision, which downloads
            it or reads torch hub's cache. With weights, ``transform_input`` defaults to True and
            the auxiliary heads (not pretrained) are dropped unless ``aux_logits=True``.
        progress: show the download's progress bar.
        **kwargs: passed to :class:`GoogLeNet` (``num_classes``, ``aux_logits``,
            ``transform_input``, ``init_weights``, ``dropout``, ``dropout_aux``, ``fused``, ...).
    """
    weights = resolve_weights("googlenet", weights)
    original_aux_logits = kwargs.get("aux_logits", False)
    if weights is not None:
        if "transform_input" not in kwargs:
            override_kwarg(kwargs, "transform_input", True)
        # The checkpoint holds the auxiliary heads; they are dropped after loading if not wanted.
        kwargs["aux_logits"] = True
        kwargs["init_weights"] = False
        override_kwarg(kwargs, "num_classes", len(weights.meta["categories"]))

    model = GoogLeNet(**kwargs)

    if weights is not None:
        load_weights(model, weights, progress)
        if not original_aux_logits:
            model.aux_logits = False
            model.aux1 = None
            model.aux2 = None
        else:
            warnings.warn("the auxiliary heads of the pretrained GoogLeNet are not pretrained: "
                          "train them before use")
    return model
