"""Long runs: 10,000 training iterations (forward, backward, optimizer step) and inference calls
through fastnn's modules must not grow memory: no tensor, autograd node or Python object kept
alive per call."""
import gc

import pytest
import torch

import fastnn
import fastnn.models
from helpers import torch_threads

ITERATIONS = 10_000


class _Net(torch.nn.Module):
    """Every fastnn module kind: BN, BN+ReLU, BN+add+ReLU, and a DenseNet block (shared
    statistics)."""

    def __init__(self, C=8):
        super().__init__()
        self.conv = torch.nn.Conv2d(C, C, 3, padding=1, bias=False)
        self.bn1 = fastnn.nn.BatchNormReLU2d(C)
        self.bn2 = fastnn.nn.BatchNormAddReLU2d(C)
        self.bn3 = fastnn.nn.BatchNorm2d(C)
        self.block = fastnn.models.densenet._DenseBlock(2, C, bn_size=2, growth_rate=4,
                                                        drop_rate=0.0)

    def forward(self, x):
        y = self.bn2(self.conv(self.bn1(x)), x)
        return self.block(self.bn3(y))


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _steps(model, opt, x, n):
    for i in range(n):
        model.train(i % 4 != 3)  # every fourth call is inference
        if model.training:
            opt.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            opt.step()
        else:
            with torch.no_grad():
                model(x)


@pytest.fixture
def one_thread():
    """One intra-op thread: the steps are of tiny tensors. With two threads beside another
    process using two (as pytest-xdist's workers are on a 2-core machine) the CPU case took
    186-209 s, with one 48 s."""
    with torch_threads(1):
        yield


def test_no_memory_growth(kernel_only, one_thread):
    device = kernel_only
    torch.manual_seed(0)
    model = _Net().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(4, 8, 6, 6, device=device).contiguous(memory_format=torch.channels_last)
    _steps(model, opt, x, 200)  # warm-up: allocator caches, lazy initialization
    if device == "cuda":
        torch.cuda.synchronize()
    gc.collect()
    objects = len(gc.get_objects())
    rss = _rss_bytes()
    cuda_allocated = torch.cuda.memory_allocated() if device == "cuda" else 0
    _steps(model, opt, x, ITERATIONS)
    if device == "cuda":
        torch.cuda.synchronize()
    gc.collect()
    assert model.bn1.num_batches_tracked.item() == (200 + ITERATIONS) * 3 // 4
    grown_objects = len(gc.get_objects()) - objects
    assert grown_objects < 100, f"{grown_objects} more Python objects after {ITERATIONS} steps"
    if device == "cuda":
        grown = torch.cuda.memory_allocated() - cuda_allocated
        assert grown == 0, f"CUDA allocated memory grew by {grown} bytes"
    # A leak of one activation per step would be 10,000 * 1 KiB at least; allocator noise is far
    # below 8 MiB.
    grown_rss = _rss_bytes() - rss
    assert grown_rss < 8 * 2**20, f"resident memory grew by {grown_rss / 2**20:.1f} MiB"
