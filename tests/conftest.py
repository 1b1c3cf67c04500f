"""Shared fixtures for the fastnn test suite.

Every numerical test runs on each available (backend, device) pair:

* backend "kernel": the compiled fastnn ops (skipped where fastnn._C has no kernel for the device);
* backend "reference": fastnn's pure-PyTorch fallback, forced by making
  fastnn.functional.use_kernel return False;
* device "cpu" and "cuda" (CUDA cases carry the ``cuda`` mark and skip without a GPU).
"""
import os
import random
import warnings

import pytest
import torch

with warnings.catch_warnings():
    # A missing fastnn._C is a warning by design; test_backend.py checks it explicitly.
    warnings.simplefilter("ignore", RuntimeWarning)
    import fastnn  # noqa: E402

import helpers  # noqa: E402
from helpers import BACKENDS, DEVICES, HAS_CUDA  # noqa: E402


def pytest_configure(config):
    # Under pytest-xdist (the README's test command runs `-n auto`) each worker takes its share of
    # the cores for torch's intra-op threads, and at least two, so that the CPU kernels' parallel
    # splits still run: N workers of N threads each would oversubscribe the machine N times.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(2, torch.get_num_threads() // workers))
    # The workers (started after this, with this environment) then hold more OpenMP threads than
    # there are cores, and an OpenMP thread that has finished its share spins, by default, for a
    # while before it sleeps, on a core another worker's threads need: a small model's training
    # step, thousands of short parallel regions, took 8x as long beside another worker as alone
    # (48 s against 6 s). Threads that sleep at once took the whole suite from 474 s to 319 s on
    # two cores. OpenMP reads the variable when it starts, which in this process it already has:
    # it acts in the workers (and the processes the tests start); a value already set is kept.
    if "PYTEST_XDIST_WORKER" not in os.environ and config.getoption("numprocesses", None):
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(autouse=True)
def seed():
    """Every test starts from the same random state."""
    torch.manual_seed(0)
    random.seed(0)
    return 0


@pytest.fixture
def tolerance():
    """tolerance(dtype, grad=False) -> dict(rtol=..., atol=...) for results of `dtype` inputs."""
    return helpers.tol


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def _skip_without_kernel(device):
    if not fastnn.ops.has_kernel(device):
        why = fastnn.backend_info()["reason"] or "built without them"
        pytest.skip(f"fastnn._C has no {device} kernels ({why})")


def _use_backend(name, device, monkeypatch):
    if name == "kernel":
        _skip_without_kernel(device)
    else:
        # Every fastnn entry point (functional and modules) decides here between the compiled
        # ops and fastnn.reference; returning False forces the reference path.
        monkeypatch.setattr(fastnn.functional, "use_kernel", lambda input: False)
    return name


@pytest.fixture(params=BACKENDS)
def backend(request, device, monkeypatch):
    """The fastnn implementation under test; the test's device comes with it."""
    return _use_backend(request.param, device, monkeypatch)


@pytest.fixture(params=BACKENDS)
def cpu_backend(request, monkeypatch):
    """Like `backend`, for tests whose input is on the CPU whatever else is present."""
    return _use_backend(request.param, "cpu", monkeypatch)


@pytest.fixture
def kernel_only(device):
    """For tests of the compiled ops themselves (torch.ops.fastnn.*)."""
    _skip_without_kernel(device)
    return device


@pytest.fixture
def cpu_kernel():
    """For tests of the compiled CPU ops alone."""
    _skip_without_kernel("cpu")
    return "cpu"


def pytest_collection_modifyitems(config, items):
    large_ok = False
    if HAS_CUDA:
        free, _ = torch.cuda.mem_get_info()
        large_ok = free >= 48 * 2**30
    skip_large = pytest.mark.skip(reason="needs a CUDA device with 48 GiB free")
    for item in items:
        if "large" in item.keywords and not large_ok:
            item.add_marker(skip_large)


@pytest.fixture
def no_tf32():
    """Full float32 convolutions and matrix products on CUDA (TF32 rounds their inputs to 10 bits,
    differently wherever two paths pick different algorithms)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
