"""scripts/gpu_check.sh's op check is a Python program the script writes out; on the CPU kernels
(--device cpu) it must run and find nothing, so that on a GPU machine its failures are the CUDA
kernels' and not its own."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fastnn

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_op_check_passes_on_cpu_kernels(tmp_path):
    if not fastnn.ops.has_kernel("cpu"):
        pytest.skip("fastnn._C has no CPU kernels")
    # Only the function that writes the program: sourcing the whole script would run it.
    writer = subprocess.run(
        ["bash", "-c", 'source <(sed -n "/^write_op_check() {/,/^}/p" "$0"); write_op_check',
         str(SCRIPT)],
        env={**os.environ, "OUT": str(tmp_path)}, check=True, capture_output=True, text=True)
    program = tmp_path / "cuda_op_check.py"
    assert program.exists(), writer.stderr
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                     os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, str(program), "--device", "cpu", "--small"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert ", 0 failures" in run.stdout
    checked = int(run.stdout.split("cuda op check: ")[1].split(" comparisons")[0])
    assert checked > 1000


def test_targets_step_reports_each_goal(tmp_path):
    """The script's `targets` step (fastnn-bench --targets) runs on whatever device is present:
    here the CPU goals, each with its verdict copied into the summary."""
    if not fastnn.ops.has_kernel("cpu"):
        pytest.skip("fastnn._C has no CPU kernels")
    import torch
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the step times the CUDA goals (gpu_check.sh runs it)")
    from fastnn import bench
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(SCRIPT), "targets"], env=env, capture_output=True,
                         text=True, timeout=600)
    summary = (tmp_path / "summary.txt").read_text()
    assert run.returncode == 0, summary + run.stdout[-3000:] + run.stderr[-3000:]
    assert any(line.startswith("targets") and "PASS" in line for line in summary.splitlines())
    assert summary.count("on a 2-core CPU: ") == len(bench.TARGETS["cpu"])
    assert (tmp_path / "targets" / "bench.json").exists()
