"""Where fastnn's CUDA build finds its toolkit and headers, and the flags it gives nvcc.

Loaded by file path (it is not part of the fastnn package) by setup.py, which compiles
fastnn._C, and by scripts/sass_compare.py, which compiles the same device code to compare its
machine code: both must see the same toolkit, headers and flags.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

# nvcc flags of csrc/cuda beyond what torch's cpp_extension adds (the C++ standard, torch's
# defines, the architectures of TORCH_CUDA_ARCH_LIST). -lineinfo keeps source lines for ncu.
NVCC_FLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]


def find_cuda_home():
    """CUDA_HOME (or CUDA_PATH) if it holds nvcc, else the toolkit that the `nvcc` on PATH really
    runs (it may be a wrapper script: `nvcc --dryrun` names the toolkit as TOP), else
    /usr/local/cuda; None when there is no toolkit."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return home
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            out = subprocess.run([nvcc, "--dryrun", "x.cu"], capture_output=True, text=True,
                                 timeout=60)
            m = re.search(r"^#\$ TOP=(.*)$", out.stdout + out.stderr, re.M)
            if m:
                top = os.path.realpath(m.group(1).strip())
                if os.path.exists(os.path.join(top, "bin", "nvcc")):
                    return top
        except (OSError, subprocess.SubprocessError):
            pass
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    for cand in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    return None


def nvidia_pip_includes():
    """Include folders of the pip-installed nvidia-* packages (cusparse.h, cublas, cudnn, ...)
    that torch's CUDA headers need and a bare toolkit may lack, in sys.path order."""
    dirs = []
    for base in sys.path:
        nv = os.path.join(base, "nvidia")
        if os.path.isdir(nv):
            dirs += sorted(glob.glob(os.path.join(nv, "*", "include")))
    return list(dict.fromkeys(dirs))
