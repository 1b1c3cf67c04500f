"""Build fastnn._C: the C++ CPU kernels always, the CUDA kernels when a toolkit and a CUDA build of
torch are present (FASTNN_CUDA=0/1 forces them off/on)."""
import glob
import importlib.util
import os
import platform
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg):
    print(f"fastnn setup: {msg}", file=sys.stderr, flush=True)


def _load_build_env():
    """build_env.py beside this file (the toolkit, header and nvcc-flag logic that
    scripts/sass_compare.py shares), loaded by path: a PEP 517 build does not put this folder on
    sys.path."""
    spec = importlib.util.spec_from_file_location("fastnn_build_env",
                                                  os.path.join(ROOT, "build_env.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_env = _load_build_env()


# CPU instruction sets the kernels can be built for: the flags, and the /proc/cpuinfo flags a CPU
# needs to run the result.
_CPU_ISAS = {
    "avx2": (["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
             ["avx2", "fma", "f16c"]),
    "avx512": (["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
               ["avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"]),
}


def _cpu_isa():
    """The instruction set of the CPU kernels: FASTNN_CPU_ARCH=auto (default: AVX2 when the
    building machine has it), avx2, avx512 (opt-in: faster bfloat16/float16 kernels on CPUs with
    AVX-512, see README) or default (portable)."""
    arch = os.environ.get("FASTNN_CPU_ARCH", "auto").strip().lower()
    if arch in _CPU_ISAS or arch == "default":
        return arch
    if arch != "auto":
        raise SystemExit(f"FASTNN_CPU_ARCH must be auto, default, avx2 or avx512, got {arch!r}")
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/cpuinfo") as f:
                flags = set(f.read().split())
            if all(flag in flags for flag in _CPU_ISAS["avx2"][1]):
                return "avx2"
        except OSError:
            pass
    return "default"


def _reduced_isa(isa):
    """The instruction set of fastnn._C_avx512, the second build of the CPU kernels that an
    AVX2 build routes bfloat16/float16 inputs to on CPUs with AVX-512; None when it is not built
    (another main instruction set, not x86-64 Linux, or FASTNN_CPU_AVX512=0)."""
    if isa != "avx2" or os.environ.get("FASTNN_CPU_AVX512", "1").strip().lower() in ("0", "off",
                                                                                   "false", "no"):
        return None
    if not (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")):
        return None
    return "avx512"


def _gcc_warns_on_avx512_intrinsics():
    """Whether the C++ compiler torch's build uses (CXX, else c++) is GCC 12.1 or 12.2, whose
    AVX-512 intrinsics start from _mm512_undefined_*() values that it then reports as
    uninitialized wherever they are inlined (GCC bug 105593, fixed in 12.3)."""
    cxx = os.environ.get("CXX", "c++")
    try:
        version = subprocess.run([cxx, "-dumpfullversion", "-dumpversion"], capture_output=True,
                                 text=True, timeout=60).stdout.strip()
        banner = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                                timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    parts = version.split(".")
    if "clang" in banner.lower() or len(parts) < 2 or not all(p.isdigit() for p in parts[:2]):
        return False
    return (int(parts[0]), int(parts[1])) in ((12, 1), (12, 2))


def _cpu_flags(isa):
    # -fno-math-errno: sqrt and friends compile to instructions (and vectorize); fastnn never
    # reads errno. -ffp-contract=off: a multiply and an add are fused only where the code says
    # fma, so a kernel's arithmetic does not depend on where the compiler inlined it (the CPU
    # kernels' two ways through a training pass give bitwise the same results). at::vec picks
    # its instruction set from CPU_CAPABILITY.
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off"]
    if isa in _CPU_ISAS:
        flags += _CPU_ISAS[isa][0]
    if isa == "avx512" and _gcc_warns_on_avx512_intrinsics():
        # Some 7,000 false warnings per build otherwise. The default build compiles the same
        # sources for AVX2 with these warnings on.
        flags += ["-Wno-maybe-uninitialized", "-Wno-uninitialized"]
    return flags


def _longest_first(sources):
    """The sources in the order ninja is to start them: on a first build (no .ninja_log to go by)
    it starts ready compiles in the order given, so the longest go first and the jobs end
    together: the CUDA units, then the CPU kernels (one unit per dtype), then the rest."""
    def rank(path):
        if path.endswith(".cu"):
            return 0
        return 1 if os.path.basename(path).startswith("batch_norm_cpu_") else 2
    return sorted(sources, key=lambda p: (rank(p), p))


def _extensions():
    import torch
    from torch.utils import cpp_extension

    sources = _longest_first(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    isa = _cpu_isa()
    cxx_flags = _cpu_flags(isa)
    define_macros = [("TORCH_EXTENSION_NAME", "_C")]

    want = os.environ.get("FASTNN_CUDA", "auto").lower()
    cuda_home = build_env.find_cuda_home()
    torch_cuda = torch.version.cuda is not None
    if want in ("0", "false", "off", "no"):
        use_cuda, why = False, "FASTNN_CUDA=0"
    elif want in ("1", "true", "on", "yes"):
        if not (cuda_home and torch_cuda):
            raise RuntimeError(
                f"FASTNN_CUDA=1 but no CUDA build is possible (toolkit: {cuda_home}, "
                f"torch CUDA: {torch.version.cuda})")
        use_cuda, why = True, "FASTNN_CUDA=1"
    else:
        use_cuda = bool(cuda_home and torch_cuda)
        why = f"toolkit {cuda_home}, torch CUDA {torch.version.cuda}"

    kwargs = dict(
        name="fastnn._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        # GOMP symbols resolve against the OpenMP runtime torch already loaded; linking a second
        # runtime would give two thread pools.
        extra_compile_args={"cxx": cxx_flags},
        py_limited_api=False,
    )
    if use_cuda:
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            try:
                visible = torch.cuda.is_available()
            except Exception:
                visible = False
            if not visible:
                os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        cu_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        kwargs["sources"] = _longest_first(sources + cu_sources)
        extra_inc = build_env.nvidia_pip_includes()
        kwargs["include_dirs"] = kwargs["include_dirs"] + extra_inc
        kwargs["define_macros"] = define_macros + [("FASTNN_WITH_CUDA", "1")]
        kwargs["extra_compile_args"] = {
            "cxx": cxx_flags,
            "nvcc": list(build_env.NVCC_FLAGS),
        }
        ext = cpp_extension.CUDAExtension(**kwargs)
        _log(f"building CPU ({isa} vectors) and CUDA kernels "
             f"({why}; arch list {os.environ.get('TORCH_CUDA_ARCH_LIST', 'detected')}; "
             f"{len(cu_sources)} CUDA sources)")
    else:
        ext = cpp_extension.CppExtension(**kwargs)
        _log(f"building CPU kernels only ({isa} vectors; "
             f"no CUDA: {why})")
    exts = [ext]
    reduced = _reduced_isa(isa)
    if reduced:
        exts.append(cpp_extension.CppExtension(
            name="fastnn._C_avx512",
            sources=_longest_first(glob.glob("csrc/cpu/avx512/*.cpp")),
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("TORCH_EXTENSION_NAME", "_C_avx512")],
            extra_compile_args={"cxx": _cpu_flags(reduced)},
            py_limited_api=False,
        ))
        _log(f"building {reduced} CPU kernels for bfloat16/float16 too (fastnn._C_avx512, with "
             f"bfloat16 also for AVX512-BF16 when the compiler is GCC 10+; "
             f"FASTNN_CPU_AVX512=0 skips them)")
    return exts, cpp_extension.BuildExtension.with_options(use_ninja=True)


def _write_build_info():
    import torch

    isa = _cpu_isa()
    with open(os.path.join(ROOT, "fastnn", "_build_info.py"), "w") as f:
        f.write("# Written by setup.py: the torch this build of fastnn._C was compiled against,\n"
                "# and the instruction set of its CPU kernels with the CPU flags it needs.\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"TORCH_CUDA = {torch.version.cuda!r}\n")
        f.write(f"CPU_ISA = {isa!r}\n")
        f.write(f"CPU_FLAGS = {tuple(_CPU_ISAS[isa][1]) if isa in _CPU_ISAS else ()!r}\n")
        reduced = _reduced_isa(isa)
        f.write("# fastnn._C_avx512 (bfloat16/float16 CPU kernels), when built.\n")
        f.write(f"CPU_REDUCED_ISA = {reduced!r}\n")
        f.write(f"CPU_REDUCED_FLAGS = {tuple(_CPU_ISAS[reduced][1]) if reduced else ()!r}\n")


_write_build_info()
ext_modules, build_ext = _extensions()
setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
