"""Pretrained-weight handling shared by the torchvision-compatible builders.

fastnn's ResNet, DenseNet and GoogLeNet have torchvision's state_dict keys, so torchvision's
weights enums (``torchvision.models.ResNet50_Weights.IMAGENET1K_V2``, or a member's name such as
``"DEFAULT"``) load into them unchanged. torchvision is imported only when weights are asked for.
"""
from typing import Any, Callable, Dict, Optional

from torch import nn

from fastnn.nn.batchnorm import _no_hooks  # noqa: F401  (used by the model builders)

__all__ = []


def resolve_weights(builder: str, weights: Any) -> Optional[Any]:
    """torchvision's weights enum member for `weights` (None, a member, or a member's name) of the
    model torchvision builds with `builder` (e.g. ``"resnet50"``)."""
    if weights is None:
        return None
    try:
        from torchvision.models import get_model_weights
    except ImportError as e:
        raise ImportError(f"fastnn.models.{builder}(weights=...) loads torchvision's pretrained "
                          f"weights and needs torchvision installed") from e
    enum = get_model_weights(builder)
    try:
        return enum.verify(weights)  # a TypeError for another model's weights
    except KeyError:
        names = ", ".join(["DEFAULT"] + [w.name for w in enum])
        raise ValueError(f"unknown weights {weights!r} for {builder}; choose from {names}") from None


def override_kwarg(kwargs: Dict[str, Any], name: str, value: Any) -> None:
    """Sets kwargs[name] = value, refusing a different value the caller gave (pretrained weights
    fix some constructor arguments, e.g. num_classes)."""
    if name in kwargs and kwargs[name] != value:
        raise ValueError(f"the pretrained weights need {name}={value!r}, got {kwargs[name]!r}")
    kwargs[name] = value


def load_weights(model: nn.Module, weights: Any, progress: bool,
                 rename: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None) -> None:
    """Downloads (or reads torch hub's cache) and loads `weights` into `model` with strict=True."""
    state_dict = weights.get_state_dict(progress=progress, check_hash=True)
    if rename is not None:
        state_dict = rename(state_dict)
    model.load_state_dict(state_dict)
