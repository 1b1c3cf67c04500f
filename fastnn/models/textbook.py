"""The small networks of the deep-learning textbooks (Dive into Deep Learning, ch. 7-8, and the
classic Inception example for 28x28 digits), built on fastnn's batch norms.

Each builder takes ``fused``: True (default) builds on fastnn's modules, with BN+ReLU as one
fastnn.nn.BatchNormReLU2d and a residual block's last BN, add and ReLU as one
fastnn.nn.BatchNormAddReLU2d; False builds the same network on plain torch layers. Both have the
same state_dict keys (a fused BN+ReLU keeps the ReLU's place in an nn.Sequential as an
nn.Identity), so weights copy between them with load_state_dict.
"""
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastnn import nn as fnn
from fastnn.models.googlenet import BasicConv2d

__all__ = [
    "Residual",
    "resnet_block",
    "d2l_resnet18",
    "conv_block",
    "DenseBlock",
    "transition_block",
    "d2l_densenet",
    "lenet_bn",
    "InceptionA",
    "MiniGoogLeNet",
    "mini_googlenet",
]


def _bn_relu(num_features: int, fused: bool) -> Tuple[nn.Module, nn.Module]:
    """(BN, ReLU) for an nn.Sequential: a fused BN+ReLU and an identity, or torch's two layers."""
    if fused:
        return fnn.BatchNormReLU2d(num_features), nn.Identity()
    return nn.BatchNorm2d(num_features), nn.ReLU()


def _stem(in_channels: int, fused: bool) -> nn.Sequential:
    """7x7/2 conv (64 channels), BN, ReLU, 3x3/2 max pool: H/4 x W/4."""
    return nn.Sequential(nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3),
                         *_bn_relu(64, fused),
                         nn.MaxPool2d(kernel_size=3, stride=2, padding=1))


# ---------------------------------------------------------------------------------------------
# ResNet-18 (d2l 8.6)

class Residual(nn.Module):
    """Two 3x3 convs with BN; the shortcut is the input, or a 1x1 conv (``use_1x1conv``, needed
    when the channels or the stride change): relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut)."""

    def __init__(self, input_channels: int, num_channels: int, use_1x1conv: bool = False,
                 strides: int = 1, fused: bool = True) -> None:
        super().__init__()
        self.fused = fused
        self.conv1 = nn.Conv2d(input_channels, num_channels, kernel_size=3, padding=1,
                               stride=strides)
        self.conv2 = nn.Conv2d(num_channels, num_channels, kernel_size=3, padding=1)
        if use_1x1conv:
            self.conv3 = nn.Conv2d(input_channels, num_channels, kernel_size=1, stride=strides)
        else:
            self.conv3 = None
        self.bn1 = fnn.BatchNormReLU2d(num_channels) if fused else nn.BatchNorm2d(num_channels)
        self.bn2 = fnn.BatchNormAddReLU2d(num_channels) if fused else nn.BatchNorm2d(num_channels)

    def forward(self, X: Tensor) -> Tensor:
        Y = self.bn1(self.conv1(X))
        if not self.fused:
            Y = F.relu(Y)
        Y = self.conv2(Y)
        if self.conv3 is not None:
            X = self.conv3(X)
        if self.fused:
            return self.bn2(Y, X)  # relu(bn2(Y) + X) in one kernel
        Y = self.bn2(Y)
        Y += X
        return F.relu(Y)


def resnet_block(input_channels: int, num_channels: int, num_residuals: int,
                 first_block: bool = False, fused: bool = True) -> List[Residual]:
    """num_residuals Residual blocks; all but the first stage halve the size in their first
    block."""
    blk = []
    for i in range(num_residuals):
        if i == 0 and not first_block:
            blk.append(Residual(input_channels, num_channels, use_1x1conv=True, strides=2,
                                fused=fused))
        else:
            blk.append(Residual(num_channels, num_channels, fused=fused))
    return blk


def d2l_resnet18(num_classes: int = 10, in_channels: int = 1, fused: bool = True) -> nn.Sequential:
    """d2l's ResNet-18 for 1-channel images (96 or 224 pixels in the book; any size >= 32):
    stem, four stages of two Residual blocks (64, 128, 256, 512 channels), global average pool,
    linear."""
    b1 = _stem(in_channels, fused)
    b2 = nn.Sequential(*resnet_block(64, 64, 2, first_block=True, fused=fused))
    b3 = nn.Sequential(*resnet_block(64, 128, 2, fused=fused))
    b4 = nn.Sequential(*resnet_block(128, 256, 2, fused=fused))
    b5 = nn.Sequential(*resnet_block(256, 512, 2, fused=fused))
    return nn.Sequential(b1, b2, b3, b4, b5, nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(),
                         nn.Linear(512, num_classes))


# ---------------------------------------------------------------------------------------------
# DenseNet (d2l 8.7)

def conv_block(input_channels: int, num_channels: int, fused: bool = True) -> nn.Sequential:
    """Pre-activation BN, ReLU, 3x3 conv."""
    return nn.Sequential(*_bn_relu(input_channels, fused),
                         nn.Conv2d(input_channels, num_channels, kernel_size=3, padding=1))


class DenseBlock(nn.Module):
    """num_convs conv_blocks, each on the concatenation of the input and every earlier output;
    returns input_channels + num_convs * num_channels channels."""

    def __init__(self, num_convs: int, input_channels: int, num_channels: int,
                 fused: bool = True) -> None:
        super().__init__()
        self.net = nn.Sequential(*[conv_block(num_channels * i + input_channels, num_channels,
                                              fused=fused) for i in range(num_convs)])

    def forward(self, X: Tensor) -> Tensor:
        for blk in self.net:
            Y = blk(X)
            X = torch.cat((X, Y), dim=1)  # concatenate along the channels
        return X


def transition_block(input_channels: int, num_channels: int, fused: bool = True) -> nn.Sequential:
    """BN, ReLU, 1x1 conv to num_channels, 2x2 average pool: halves the size."""
    return nn.Sequential(*_bn_relu(input_channels, fused),
                         nn.Conv2d(input_channels, num_channels, kernel_size=1),
                         nn.AvgPool2d(kernel_size=2, stride=2))


def d2l_densenet(num_classes: int = 10, in_channels: int = 1, growth_rate: int = 32,
                 num_convs_in_dense_blocks: Tuple[int, ...] = (4, 4, 4, 4),
                 fused: bool = True) -> nn.Sequential:
    """d2l's DenseNet: stem, four dense blocks of 4 convs (growth rate 32) with transition blocks
    halving the channels and the size between them, BN, ReLU, global average pool, linear."""
    blks = []
    num_channels = 64
    for i, num_convs in enumerate(num_convs_in_dense_blocks):
        blks.append(DenseBlock(num_convs, num_channels, growth_rate, fused=fused))
        num_channels += num_convs * growth_rate
        if i != len(num_convs_in_dense_blocks) - 1:
            blks.append(transition_block(num_channels, num_channels // 2, fused=fused))
            num_channels = num_channels // 2
    return nn.Sequential(_stem(in_channels, fused), *blks, *_bn_relu(num_channels, fused),
                         nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(),
                         nn.Linear(num_channels, num_classes))


# ---------------------------------------------------------------------------------------------
# LeNet with batch normalization (d2l 8.5)

def lenet_bn(num_classes: int = 10, in_channels: int = 1, fused: bool = True) -> nn.Sequential:
    """LeNet-5 for 28x28 images with batch norm after every conv (BatchNorm2d) and every hidden
    linear layer (BatchNorm1d), sigmoid activations as in the book. ``fused`` picks fastnn's
    BatchNorm1d/2d or torch's (sigmoid leaves nothing to fuse)."""
    bn1d = fnn.BatchNorm1d if fused else nn.BatchNorm1d
    bn2d = fnn.BatchNorm2d if fused else nn.BatchNorm2d
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, kernel_size=5), bn2d(6), nn.Sigmoid(),  # N x 6 x 24 x 24
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(6, 16, kernel_size=5), bn2d(16), nn.Sigmoid(),  # N x 16 x 8 x 8
        nn.AvgPool2d(kernel_size=2, stride=2), nn.Flatten(),  # N x 256
        nn.Linear(16 * 4 * 4, 120), bn1d(120), nn.Sigmoid(),
        nn.Linear(120, 84), bn1d(84), nn.Sigmoid(),
        nn.Linear(84, num_classes))


# ---------------------------------------------------------------------------------------------
# A GoogLeNet-style network for 28x28 images

class InceptionA(nn.Module):
    """Four branches concatenated into 88 channels at the input's size: 1x1 (16); 1x1 then 5x5
    (24); 1x1 then two 3x3 (24); 3x3 average pool then 1x1 (24). Every conv is a BasicConv2d
    (conv, BN, ReLU)."""

    out_channels = 88

    def __init__(self, in_channels: int, fused: bool = True) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 16, fused=fused, kernel_size=1)

        self.branch5x5_1 = BasicConv2d(in_channels, 16, fused=fused, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(16, 24, fused=fused, kernel_size=5, padding=2)

        self.branch3x3dbl_1 = BasicConv2d(in_channels, 16, fused=fused, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(16, 24, fused=fused, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(24, 24, fused=fused, kernel_size=3, padding=1)

        self.branch_pool = BasicConv2d(in_channels, 24, fused=fused, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        branch1x1 = self.branch1x1(x)

        branch5x5 = self.branch5x5_1(x)
        branch5x5 = self.branch5x5_2(branch5x5)

        branch3x3dbl = self.branch3x3dbl_1(x)
        branch3x3dbl = self.branch3x3dbl_2(branch3x3dbl)
        branch3x3dbl = self.branch3x3dbl_3(branch3x3dbl)

        branch_pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)
        branch_pool = self.branch_pool(branch_pool)

        return torch.cat([branch1x1, branch5x5, branch3x3dbl, branch_pool], 1)


class MiniGoogLeNet(nn.Module):
    """5x5 conv (10), 2x2 max pool, InceptionA, 5x5 conv (20), 2x2 max pool, InceptionA, linear:
    28x28 -> 88 x 4 x 4 features."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, fused: bool = True) -> None:
        super().__init__()
        self.conv1 = BasicConv2d(in_channels, 10, fused=fused, kernel_size=5)
        self.incep1 = InceptionA(10, fused=fused)
        self.conv2 = BasicConv2d(InceptionA.out_channels, 20, fused=fused, kernel_size=5)
        self.incep2 = InceptionA(20, fused=fused)
        self.mp = nn.MaxPool2d(2)
        self.fc = nn.Linear(InceptionA.out_channels * 4 * 4, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.mp(self.conv1(x))  # N x 10 x 12 x 12
        x = self.incep1(x)  # N x 88 x 12 x 12
        x = self.mp(self.conv2(x))  # N x 20 x 4 x 4
        x = self.incep2(x)  # N x 88 x 4 x 4
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x


def mini_googlenet(num_classes: int = 10, in_channels: int = 1, fused: bool = True) -> MiniGoogLeNet:
    """A GoogLeNet-style network with two InceptionA blocks for 28x28 images."""
    return MiniGoogLeNet(num_classes, in_channels, fused)
