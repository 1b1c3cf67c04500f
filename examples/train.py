#!/usr/bin/env python
"""Train an image classifier on fastnn: the classic loop, for any of fastnn.models.

    python examples/train.py --model lenet_bn --epochs 10
    python examples/train.py --model d2l_resnet18 --dataset fashion-mnist --download --lr 0.05 \\
        --optimizer sgd
    python examples/train.py --model resnet18 --plain      # the same network on plain PyTorch

Cross-entropy, Adam (lr 1e-3 by default) or SGD with momentum, train and test accuracy every
epoch, a progress bar, and a PNG of the loss and accuracy curves.

Data: FashionMNIST or MNIST when its files are on disk (torchvision's layout under --data-root,
or the Debian package dataset-fashion-mnist's /usr/share/datasets/fashion-mnist), downloaded
through torchvision with --download; otherwise scikit-learn's handwritten digits (1797 real 8x8
images, shipped with scikit-learn), upscaled. Never random data: with none of these it stops and
says what to install.
"""
import argparse
import gzip
import os
import struct
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

try:
    import fastnn
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
    import fastnn
from fastnn import models
from fastnn.convert import convert

DATASETS = ("auto", "fashion-mnist", "mnist", "digits")

# (folder under --data-root in torchvision's layout, other folders that may hold the files)
_IDX_LOCATIONS = {
    "fashion-mnist": ("FashionMNIST", ["/usr/share/datasets/fashion-mnist"]),
    "mnist": ("MNIST", ["/usr/share/datasets/mnist"]),
}
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# name -> (builder, default image size, input channels)
MODELS: Dict[str, Tuple[Callable[..., nn.Module], int, int]] = {
    "lenet_bn": (models.lenet_bn, 28, 1),
    "mini_googlenet": (models.mini_googlenet, 28, 1),
    "d2l_resnet18": (models.d2l_resnet18, 96, 1),
    "d2l_densenet": (models.d2l_densenet, 96, 1),
    "resnet18": (models.resnet18, 64, 3),
    "resnet34": (models.resnet34, 64, 3),
    "resnet50": (models.resnet50, 64, 3),
    "resnet101": (models.resnet101, 64, 3),
    "resnet152": (models.resnet152, 64, 3),
    "densenet121": (models.densenet121, 64, 3),
    "densenet161": (models.densenet161, 64, 3),
    "densenet169": (models.densenet169, 64, 3),
    "densenet201": (models.densenet201, 64, 3),
    "googlenet": (models.googlenet, 64, 3),
}


# ---------------------------------------------------------------------------------------------
# Data

def _read_idx(path: str) -> np.ndarray:
    """An IDX file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    _, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if dtype_code != 0x08:
        raise ValueError(f"{path}: expected unsigned bytes (IDX type 0x08), got {dtype_code:#x}")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(name: str, root: str) -> Optional[Dict[str, str]]:
    """Paths of the four IDX files of `name`, or None when they are not all in one folder."""
    folder, others = _IDX_LOCATIONS[name]
    for directory in [os.path.join(root, folder, "raw"), os.path.join(root, folder),
                      os.path.join(root, name)] + others:
        paths = {}
        for split, files in _IDX_FILES.items():
            for i, base in enumerate(files):
                for candidate in (base, base + ".gz"):
                    if os.path.isfile(os.path.join(directory, candidate)):
                        paths[(split, i)] = os.path.join(directory, candidate)
                        break
        if len(paths) == 4:
            return paths
    return None


def load_mnist_like(name: str, root: str, download: bool = False
                    ) -> Optional[Tuple[Tensor, Tensor, Tensor, Tensor]]:
    """(x_train, y_train, x_test, y_test) of FashionMNIST or MNIST: images (N, 1, 28, 28) float32
    in [0, 1], labels int64. None when the files are not on disk (and not downloaded)."""
    paths = _find_idx(name, root)
    if paths is None and download:
        import torchvision

        cls = torchvision.datasets.FashionMNIST if name == "fashion-mnist" else torchvision.datasets.MNIST
        for train in (True, False):
            cls(root, train=train, download=True)
        paths = _find_idx(name, root)
    if paths is None:
        return None
    out = []
    for split in ("train", "test"):
        images = torch.from_numpy(_read_idx(paths[(split, 0)]).copy())
        labels = torch.from_numpy(_read_idx(paths[(split, 1)]).astype(np.int64))
        out += [images.unsqueeze(1).float().div_(255.0), labels]
    return tuple(out)


def load_digits(test_fraction: float = 0.2, seed: int = 0
                ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's handwritten digits (1797 8x8 images, 10 classes) as (x_train, y_train,
    x_test, y_test): images (N, 1, 8, 8) float32 in [0, 1], labels int64, a seeded split."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as e:
        raise SystemExit("no data set found: FashionMNIST/MNIST are not on disk (use --download "
                         "where a network is reachable, or --data-root), and scikit-learn, whose "
                         "digits data set is the offline fallback, is not installed "
                         "(pip install scikit-learn)") from e
    digits = sklearn_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(labels) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return images[train], labels[train], images[test], labels[test]


def load_data(name: str = "auto", root: str = "data", download: bool = False
              ) -> Tuple[Tuple[Tensor, Tensor, Tensor, Tensor], str]:
    """The data set's four tensors and its name. "auto": FashionMNIST, then MNIST, from disk;
    then FashionMNIST downloaded, if `download`; then scikit-learn's digits."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose from {DATASETS}")
    for candidate in ("fashion-mnist", "mnist"):
        if name in ("auto", candidate):
            data = load_mnist_like(candidate, root, download=False)
            if data is None and download and name == candidate:
                data = load_mnist_like(candidate, root, download=True)
            if data is not None:
                return data, candidate
            if name == candidate:
                places = ", ".join([repr(root)] + _IDX_LOCATIONS[candidate][1])
                raise SystemExit(f"{candidate} was not found (looked in {places}); pass "
                                 f"--download to fetch it through torchvision")
    if download and name == "auto":
        try:
            data = load_mnist_like("fashion-mnist", root, download=True)
        except Exception as e:  # no network, no torchvision, ...
            print(f"FashionMNIST could not be downloaded ({type(e).__name__}: {e})",
                  file=sys.stderr)
            data = None
        if data is not None:
            return data, "fashion-mnist"
    if name == "auto":
        print("FashionMNIST/MNIST not found on disk: using scikit-learn's digits (8x8 images, "
              "upscaled)", file=sys.stderr)
    return load_digits(), "digits"


def make_prepare(image_size: int, channels: int, channels_last: bool = False
                 ) -> Callable[[Tensor], Tensor]:
    """A batch transform to the model's input: resize (bilinear) and repeat the gray channel."""
    def prepare(x: Tensor) -> Tensor:
        if x.shape[-1] != image_size or x.shape[-2] != image_size:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear",
                              align_corners=False)
        if x.shape[1] != channels:
            x = x.expand(-1, channels, -1, -1)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x
    return prepare


# ---------------------------------------------------------------------------------------------
# Model, loop, plot

def build_model(name: str, num_classes: int = 10, fused: bool = True) -> Tuple[nn.Module, int, int]:
    """(model, default image size, input channels). fused=False: the same network on plain
    PyTorch layers."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    builder, size, channels = MODELS[name]
    return builder(num_classes=num_classes, fused=fused), size, channels


def _loss(outputs, target: Tensor, aux_weight: float) -> Tuple[Tensor, Tensor]:
    """(loss, logits). GoogLeNet in training also returns auxiliary logits, weighted in."""
    if isinstance(outputs, tuple):
        logits, *aux = outputs
        loss = F.cross_entropy(logits, target)
        for a in aux:
            if a is not None:
                loss = loss + aux_weight * F.cross_entropy(a, target)
        return loss, logits
    return F.cross_entropy(outputs, target), outputs


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, prepare: Callable[[Tensor], Tensor],
             device: torch.device, autocast: bool = False) -> float:
    """Accuracy in eval mode."""
    model.eval()
    correct = total = 0
    for x, y in loader:
        x, y = prepare(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(x)
        correct += (logits.argmax(1) == y).sum().item()
        total += y.numel()
    return correct / max(total, 1)


def train(model: nn.Module, train_loader: DataLoader, test_loader: DataLoader, epochs: int,
          optimizer: torch.optim.Optimizer, prepare: Callable[[Tensor], Tensor],
          device: torch.device, progress: bool = True, autocast: bool = False,
          aux_weight: float = 0.3, log: Callable[[str], None] = print) -> Dict[str, List[float]]:
    """The classic loop. Returns the history: per-step training loss ("step_loss"), per-epoch
    mean training loss, training accuracy (on the fly, in train mode), test accuracy (eval mode)
    and seconds."""
    from tqdm import tqdm

    history: Dict[str, List[float]] = {"step_loss": [], "train_loss": [], "train_acc": [],
                                       "test_acc": [], "epoch_time": []}
    for epoch in range(1, epochs + 1):
        model.train()
        start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{epochs}", leave=False,
                   disable=not progress, dynamic_ncols=True)
        for x, y in bar:
            x, y = prepare(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss, logits = _loss(model(x), y, aux_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                loss_sum += loss.detach() * y.numel()
                correct += (logits.argmax(1) == y).sum()
            seen += y.numel()
            history["step_loss"].append(loss.item())
            bar.set_postfix(loss=f"{history['step_loss'][-1]:.4f}")
        history["epoch_time"].append(time.perf_counter() - start)
        history["train_loss"].append(loss_sum.item() / seen)
        history["train_acc"].append(correct.item() / seen)
        history["test_acc"].append(evaluate(model, test_loader, prepare, device, autocast))
        log(f"epoch {epoch}: loss {history['train_loss'][-1]:.4f}, "
            f"train acc {history['train_acc'][-1]:.3f}, test acc {history['test_acc'][-1]:.3f}, "
            f"{seen / history['epoch_time'][-1]:.1f} img/s")
    return history


def plot_history(history: Dict[str, List[float]], path: str, title: str = "") -> None:
    """Loss (per batch and per epoch) and accuracy (per epoch) curves, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = range(1, len(history["train_loss"]) + 1)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    steps = history.get("step_loss", [])
    if steps and history["train_loss"]:
        per_epoch = len(steps) / len(history["train_loss"])
        ax_loss.plot([(i + 1) / per_epoch for i in range(len(steps))], steps, alpha=0.35,
                     linewidth=0.8, label="batch loss")
    ax_loss.plot(epochs, history["train_loss"], marker="o", label="epoch mean")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross entropy")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_acc.plot(epochs, history["train_acc"], marker="o", label="train acc")
    ax_acc.plot(epochs, history["test_acc"], marker="s", label="test acc")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    ax_acc.legend()
    ax_acc.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def make_optimizer(name: str, params, lr: float, momentum: float = 0.9,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose 'adam' or 'sgd'")


def main(argv: Optional[List[str]] = None) -> Dict[str, List[float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lenet_bn", choices=sorted(MODELS))
    parser.add_argument("--dataset", default="auto", choices=DATASETS)
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--download", action="store_true",
                        help="download FashionMNIST/MNIST through torchvision if not on disk")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--optimizer", default="adam", choices=("adam", "sgd"))
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--image-size", type=int, default=None,
                        help="resize the images (default: the model's usual size)")
    parser.add_argument("--plain", action="store_true",
                        help="build the network on plain PyTorch layers instead of fastnn's")
    parser.add_argument("--convert", action="store_true",
                        help="build it on plain PyTorch layers, then put it on fastnn with "
                             "fastnn.convert")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads")
    parser.add_argument("--plot", default=None,
                        help="PNG of the curves (default: train_<model>.png; 'none' for none)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    (x_train, y_train, x_test, y_test), data_name = load_data(args.dataset, args.data_root,
                                                              args.download)
    num_classes = int(y_train.max()) + 1
    model, size, channels = build_model(args.model, num_classes,
                                        fused=not (args.plain or args.convert))
    if args.convert:
        model = convert(model)
    size = args.image_size or size
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    prepare = make_prepare(size, channels, args.channels_last)
    run_model = torch.compile(model) if args.compile else model

    pin = device.type == "cuda"
    train_loader = DataLoader(TensorDataset(x_train, y_train), batch_size=args.batch_size,
                              shuffle=True, drop_last=False, pin_memory=pin,
                              generator=torch.Generator().manual_seed(args.seed))
    test_loader = DataLoader(TensorDataset(x_test, y_test), batch_size=args.batch_size,
                             pin_memory=pin)
    optimizer = make_optimizer(args.optimizer, model.parameters(), args.lr, args.momentum,
                               args.weight_decay)
    if args.plain:
        backend = "plain PyTorch"
    else:
        devices = fastnn.backend_info()["devices"]
        kernels = f"compiled kernels: {', '.join(devices)}" if devices else "reference"
        backend = f"fastnn{' convert()' if args.convert else ''} ({kernels})"
    print(f"{args.model} on {data_name} ({len(y_train)} train / {len(y_test)} test images, "
          f"{size}x{size}), {backend}, {device}")

    history = train(run_model, train_loader, test_loader, args.epochs, optimizer, prepare, device,
                    progress=not args.no_progress, autocast=args.bf16)
    plot = args.plot or f"train_{args.model}.png"
    if plot.lower() != "none":
        plot_history(history, plot, f"{args.model} on {data_name} ({backend})")
        print(f"curves: {plot}")
    return history


if __name__ == "__main__":
    main()
