"""Networks built on fastnn's modules.

torchvision-compatible (same arguments, module names and state_dict keys, so torchvision
checkpoints and weights enums load with strict=True): ResNet, ResNeXt and Wide ResNet, DenseNet,
GoogLeNet. The textbook networks: d2l's ResNet-18 and DenseNet, LeNet with batch norm, and a
GoogLeNet-style network for 28x28 images. Each builder takes ``fused=False`` to build the same
network on plain torch layers.
"""
from fastnn.models.densenet import DenseNet, densenet121, densenet161, densenet169, densenet201
from fastnn.models.googlenet import GoogLeNet, GoogLeNetOutputs, googlenet
from fastnn.models.resnet import (
    ResNet,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    resnext50_32x4d,
    resnext101_32x8d,
    resnext101_64x4d,
    wide_resnet50_2,
    wide_resnet101_2,
)
from fastnn.models.textbook import d2l_densenet, d2l_resnet18, lenet_bn, mini_googlenet

__all__ = [
    "ResNet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2",
    "wide_resnet101_2",
    "DenseNet", "densenet121", "densenet161", "densenet169", "densenet201",
    "GoogLeNet", "GoogLeNetOutputs", "googlenet",
    "d2l_resnet18", "d2l_densenet", "lenet_bn", "mini_googlenet",
]
