"""scripts/gpu_check.sh's op check is a Python program the script writes out; on the CPU kernels
(--device cpu) it must run and find nothing, so that on a GPU machine its failures are the CUDA
kernels' and not its own."""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import fastnn

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_device_prebuild_parses_and_refuses_unknown_arguments():
    prebuild = ROOT / "scripts" / "device_prebuild.sh"
    subprocess.run(["bash", "-n", str(prebuild)], check=True)
    run = subprocess.run(["bash", str(prebuild), "--tset"], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 2 and "usage" in run.stderr


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


def test_kernels_step_lists_both_implementations(tmp_path):
    """The `kernels` step (benchmarks/kernel_times.py) on the CPU: its CPU cases, fastnn's and
    nn.BatchNorm2d's ops with their times, and one span ratio per case in the summary."""
    if not fastnn.ops.has_kernel("cpu"):
        pytest.skip("fastnn._C has no CPU kernels")
    import torch
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the step profiles the CUDA cases (gpu_check.sh runs it)")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import kernel_times
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable,
           "KERNELS_ARGS": "--iters 2"}
    run = subprocess.run(["bash", str(SCRIPT), "kernels"], env=env, capture_output=True,
                         text=True, timeout=600)
    summary = (tmp_path / "summary.txt").read_text()
    assert run.returncode == 0, summary + run.stdout[-3000:] + run.stderr[-3000:]
    assert any(line.startswith("kernels") and "PASS" in line for line in summary.splitlines())
    cases = kernel_times.CASES["cpu"]
    assert summary.count("span of nn.BatchNorm2d / fastnn: ") == len(cases)
    report = (tmp_path / "kernels.txt").read_text()
    assert report.count("  fastnn  span ") == report.count("  eager   span ") == len(cases)
    assert "fastnn::batch_norm_train" in report and "aten::native_batch_norm" in report


def test_models_step_runs_each_model_on_its_own(tmp_path):
    """The `models` step: one fastnn-bench --models per model, each line of its (model, mode)
    results copied into the summary, and a model that fails leaves the others' numbers."""
    pytest.importorskip("torchvision")
    import torch
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the step times the full-size models (gpu_check.sh runs it)")
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable,
           "MODELS": "googlenet nosuchnet resnet50",
           "MODELS_ARGS": "--model-batch 2 --model-image-size 32 --reps 1"}
    run = subprocess.run(["bash", str(SCRIPT), "models"], env=env, capture_output=True,
                         text=True, timeout=600)
    summary = (tmp_path / "summary.txt").read_text()
    assert run.returncode == 1, summary + run.stdout[-3000:] + run.stderr[-3000:]
    lines = summary.splitlines()
    for name in ("googlenet", "resnet50"):
        assert any(line.startswith(f"models_{name} ") and "PASS" in line for line in lines)
        for mode in ("train", "infer"):
            assert sum(line.startswith(f"  {name} {mode} 2x32²: torchvision ") for line in lines) == 1
        assert (tmp_path / f"models_{name}" / "bench.json").exists()
    assert any(line.startswith("models_nosuchnet ") and "FAIL" in line for line in lines)
    assert "unknown model 'nosuchnet'" in (tmp_path / "models_nosuchnet.log").read_text()


# The build step's use of a fastnn._C compiled elsewhere (scripts/device_prebuild.sh): only the
# functions, run in a copy of the sources with this machine's build standing in for it.
def _tree(tmp_path):
    root = tmp_path / "tree"
    shutil.copytree(ROOT / "csrc", root / "csrc")
    shutil.copy(ROOT / "setup.py", root)
    shutil.copy(ROOT / "build_env.py", root)
    (root / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "source_hash.sh", root / "scripts")
    shutil.copytree(ROOT / "fastnn", root / "fastnn",
                    ignore=shutil.ignore_patterns("*.so", "_build_info.py", "__pycache__"))
    return root


def _source_hash(root):
    return subprocess.run(["bash", str(root / "scripts" / "source_hash.sh")], check=True,
                          capture_output=True, text=True).stdout.strip()


def _prebuilt(root, built, **stamp):
    """.device-build/ in root holding `built` (paths of files), with a stamp that matches this
    machine except for the fields given."""
    import torch
    dest = root / ".device-build"
    dest.mkdir()
    for path in built:
        os.symlink(path, dest / Path(path).name)
    fields = {"sources": _source_hash(root), "torch": torch.__version__,
              "ext_suffix": sysconfig.get_config_var("EXT_SUFFIX"), **stamp}
    (dest / "STAMP").write_text("".join(f"{k}: {v}\n" for k, v in fields.items()))


def _use_prebuilt(root, out):
    out.mkdir(exist_ok=True)
    env = {**os.environ, "ROOT": str(root), "PY": sys.executable, "OUT": str(out),
           "PYTHONPATH": str(root), "FASTNN_BACKEND": "auto"}
    return subprocess.run(
        ["bash", "-c", 'source <(sed -n "/^stamp_field() {/,/^}/p" "$0"); '
         'use_prebuilt "$OUT/build.log"', str(SCRIPT)],
        cwd=root, env=env, capture_output=True, text=True, timeout=300)


def _this_build():
    import importlib
    lib = Path(importlib.import_module("fastnn._C").__file__).parent
    return sorted(lib.glob("_C*.so")) + [lib / "_build_info.py"]


def test_prebuilt_build_is_loaded_when_its_stamp_matches(tmp_path):
    if not fastnn.ops.has_kernel("cuda"):
        pytest.skip("this build of fastnn._C has no CUDA kernels to stand in for one")
    root = _tree(tmp_path)
    assert _source_hash(root) == _source_hash(ROOT)
    _prebuilt(root, _this_build())
    run = _use_prebuilt(root, tmp_path / "out")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "prebuilt fastnn._C loaded" in run.stdout
    where = subprocess.run(
        [sys.executable, "-c", "import fastnn._C as c, fastnn; print(c.__file__); "
         "print(fastnn.ops.has_kernel('cuda'))"],
        cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True,
        check=True).stdout.split()
    assert where == [str(root / "fastnn" / Path(_this_build()[0]).name), "True"]


@pytest.mark.parametrize("stale", ["sources", "torch", "ext_suffix"])
def test_prebuilt_build_is_refused_when_its_stamp_differs(tmp_path, stale):
    root = _tree(tmp_path)
    if stale == "sources":
        _prebuilt(root, _this_build())
        with open(root / "csrc" / "batch_norm_common.h", "a") as f:
            f.write("// edited after the build\n")
    else:
        _prebuilt(root, _this_build(), **{stale: "other"})
    run = _use_prebuilt(root, tmp_path / "out")
    assert run.returncode == 1, run.stdout + run.stderr
    assert f"not used: {stale} is" in run.stdout
    assert not list((root / "fastnn").glob("_C*")), "nothing is copied from a stale build"
    assert not (root / "fastnn" / "_build_info.py").exists()


def test_prebuilt_build_that_does_not_load_is_removed(tmp_path):
    root = _tree(tmp_path)
    junk = tmp_path / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    junk.write_bytes(b"not a shared library")
    _prebuilt(root, [junk, _this_build()[-1]])
    run = _use_prebuilt(root, tmp_path / "out")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "compiling" in run.stdout
    assert not list((root / "fastnn").glob("_C*"))
    assert not (root / "fastnn" / "_build_info.py").exists()
