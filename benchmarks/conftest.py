"""pytest-benchmark suite for fastnn (not part of `pytest tests`).

    pytest benchmarks/ --benchmark-only
    pytest benchmarks/ --benchmark-only --benchmark-autosave      # then --benchmark-compare

Results are grouped by case, shape, dtype and layout, so each table of pytest-benchmark's report
holds fastnn and its baselines for one op side by side. fastnn-bench (fastnn/bench.py) is the
fuller tool; this suite times a few of its cases with the same inputs and callables.
"""
import warnings

import pytest

with warnings.catch_warnings():
    # A missing fastnn._C is a warning by design; the report says which backend ran.
    warnings.simplefilter("ignore", RuntimeWarning)
    import fastnn  # noqa: F401


def pytest_configure(config):
    # As fastnn-bench does on CPU: freed tensors stay in the process, so page faults of fresh
    # mmaps do not swamp the timings (FASTNN_BENCH_SYSTEM_MALLOC=1 leaves the allocator alone).
    import os

    from fastnn import bench
    if not os.environ.get("FASTNN_BENCH_SYSTEM_MALLOC"):
        bench._cpu_allocator = bench.keep_freed_memory()


def pytest_report_header(config):
    import torch
    from fastnn import bench
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = bench.collect_env(device)
    return [f"fastnn benchmarks: {line}" for line in bench.env_lines(env)]


@pytest.fixture(autouse=True)
def _deterministic_seed():
    import torch
    torch.manual_seed(0)
