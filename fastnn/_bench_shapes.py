"""Batch-norm layer shapes for fastnn-bench, taken from the networks themselves.

The shapes are found by running torchvision's ResNet-50, DenseNet-121 and GoogLeNet once on the
meta device (no memory, no arithmetic) with a forward hook on every BatchNorm2d, so they always
match the models' real layers at the requested batch size and image size.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import torch

__all__ = ["MODELS", "BNShape", "model_bn_layers", "distinct_bn_shapes", "quick_shapes",
           "headline_shapes"]

MODELS = ("resnet50", "densenet121", "googlenet")

# The quick set: ResNet-50 layer shapes, as (C, H, W) picked from the derived list (so a typo
# cannot invent a layer). (64, 56, 56) is layer1's BN, the shape fastnn's CPU goals are stated at;
# (256, 56, 56) is layer1's last BN before the shortcut add; (256, 14, 14) is from layer3.
_QUICK_CHW = {
    "cpu": [(64, 56, 56), (256, 14, 14)],
    "cuda": [(64, 56, 56), (256, 56, 56), (1024, 14, 14)],
}


@dataclass
class BNShape:
    """One distinct BN input shape and where it occurs (model -> number of layers)."""
    shape: Tuple[int, int, int, int]
    eps: float
    layers: Dict[str, int] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def where(self) -> str:
        return ", ".join(f"{m} x{c}" for m, c in self.layers.items())


def _build(name: str) -> torch.nn.Module:
    import torchvision
    kwargs = {}
    if name == "googlenet":
        kwargs = {"aux_logits": False, "init_weights": False}
    with torch.device("meta"):
        return getattr(torchvision.models, name)(weights=None, **kwargs)


def model_bn_layers(name: str, batch_size: int, image_size: int = 224
                    ) -> List[Tuple[str, Tuple[int, ...], float]]:
    """(layer name, input shape, eps) of every BatchNorm2d call in one forward of model `name`."""
    model = _build(name).eval()
    found = []
    hooks = []
    for layer_name, module in model.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            def hook(mod, inputs, output, layer_name=layer_name):
                found.append((layer_name, tuple(inputs[0].shape), float(mod.eps)))
            hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(torch.empty(batch_size, 3, image_size, image_size, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return found


def distinct_bn_shapes(models: Sequence[str], batch_size: int, image_size: int = 224
                       ) -> List[BNShape]:
    """The distinct BN input shapes of `models`, in order of first appearance."""
    shapes: Dict[Tuple[int, ...], BNShape] = {}
    for name in models:
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
        for _, shape, eps in model_bn_layers(name, batch_size, image_size):
            entry = shapes.setdefault(shape, BNShape(shape, eps))
            entry.layers[name] = entry.layers.get(name, 0) + 1
    return list(shapes.values())


def quick_shapes(device_type: str, batch_size: int) -> List[BNShape]:
    """The quick set for a device type: a few ResNet-50 shapes."""
    by_chw = {s.shape[1:]: s for s in distinct_bn_shapes(["resnet50"], batch_size)}
    picked = []
    for chw in _QUICK_CHW["cuda" if device_type == "cuda" else "cpu"]:
        if chw not in by_chw:
            raise RuntimeError(f"ResNet-50 has no BN layer of shape {chw}")
        picked.append(by_chw[chw])
    return picked


def headline_shapes(device_type: str) -> List[Tuple[int, int, int]]:
    """(C, H, W) of the quick set, where torch.compile runs by default."""
    return list(_QUICK_CHW["cuda" if device_type == "cuda" else "cpu"])
