"""The source distribution: `pip install fastnn-<version>.tar.gz` compiles fastnn._C from it, so it
must hold every C++/CUDA source and header (not only the .cpp/.cu files setup.py names), and the
tests it ships must find what they import (helpers, the CUDA emulation)."""
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Tracked files an sdist leaves out: CI's script, git's own file, recorded benchmark results.
NOT_SHIPPED = (".ci/", ".gitignore", "benchmarks/results/")


def _tracked_files():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are the list an sdist must hold")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    return sorted(p for p in out.stdout.decode().split("\0") if p and (ROOT / p).is_file())


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """The sdist built (setuptools' PEP 517 backend) from a copy of the tracked files and the
    names in it, relative to its top folder."""
    tracked = _tracked_files()
    tree = tmp_path_factory.mktemp("tree")
    for rel in tracked:
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, tree / rel)
    dist = tree / "dist"
    code = ("import sys; from setuptools import build_meta; "
            "print(build_meta.build_sdist(sys.argv[1]))")
    proc = subprocess.run([sys.executable, "-c", code, str(dist)], cwd=tree, capture_output=True,
                          text=True, env={**os.environ, "FASTNN_CUDA": "0"}, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    name = proc.stdout.strip().splitlines()[-1]
    with tarfile.open(dist / name) as tar:
        members = [m.name for m in tar.getmembers() if m.isfile()]
        top = name[:-len(".tar.gz")] + "/"
        assert all(m.startswith(top) for m in members), members
        files = {m[len(top):] for m in members}
        pkg_info = tar.extractfile(top + "PKG-INFO").read().decode()
    return tracked, files, pkg_info, proc.stderr


def test_sdist_holds_every_tracked_source(sdist):
    tracked, files, _, _ = sdist
    wanted = [p for p in tracked if not p.startswith(NOT_SHIPPED)]
    missing = [p for p in wanted if p not in files]
    assert not missing, f"the sdist lacks {missing}"
    # The headers the build needs, named so that the check above cannot pass on an empty list.
    for rel in ("csrc/batch_norm_common.h", "csrc/cuda/batch_norm_kernels.cuh",
                "csrc/cpu/batch_norm_cpu_vec.h", "tests/cuda_emu/emu.h", "tests/helpers.py",
                "LICENSE"):
        assert rel in wanted and rel in files, rel


def test_sdist_leaves_out_build_outputs(sdist):
    _, files, _, _ = sdist
    # fastnn/_build_info.py is written by setup.py for the torch of each build.
    assert "fastnn/_build_info.py" not in files
    stray = [p for p in files if p.endswith((".so", ".o", ".pyc")) or "__pycache__" in p
             or p.startswith("benchmarks/results/")]
    assert not stray, stray


def test_sdist_metadata_license(sdist):
    """The license as a PEP 639 expression with its file (the TOML-table form is deprecated in
    setuptools, with builds to stop working after 2027-02-18)."""
    _, _, pkg_info, stderr = sdist
    headers = pkg_info.split("\n\n")[0].splitlines()  # the fields, without the README
    assert "License-Expression: BSD-3-Clause" in headers, headers
    assert "License-File: LICENSE" in headers, headers
    assert "project.license` as a TOML table is deprecated" not in stderr
