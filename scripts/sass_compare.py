#!/usr/bin/env python
"""Compares the machine code (SASS) of fastnn's CUDA kernels between a git revision and the working
tree, kernel by kernel, without a GPU.

    python scripts/sass_compare.py [--base REV] [--arch sm_90] [--keep DIR] [--verbose]

Both sides' csrc/cuda/*.cu are compiled to device code only (nvcc -cubin, the flags setup.py
gives nvcc) and disassembled with cuobjdump. Each kernel is reported as identical, only on one
side, or different; a different kernel with its registers, stack bytes (spills), instruction count
and the change in its floating-point instructions. A change that should leave the kernels alone (a
refactor, a host-side edit) is shown to: either identical SASS, or the same number of each
floating-point instruction with only register assignment and scheduling moved (the counts do not
see an operand swapped: the emulated CUDA tests check what the kernels compute).

Exit status 1 when a kernel present on both sides uses more stack, more than 2 registers more,
over 1% more instructions, or a different count of some floating-point instruction; 0 otherwise (kernels added or
removed are listed, not counted).
"""
import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import build_env  # noqa: E402  setup.py's toolkit, header and nvcc-flag logic

# Floating-point instructions: a change in their counts is a change in what a kernel computes.
# HFMA2.MMA with zero operands is how ptxas often zeroes or moves a register, so it is left out.
FP_OPS = re.compile(r"^(FFMA|FADD|FMUL|FMNMX|FSETP|FSEL|FCHK|DFMA|DADD|DMUL|DSETP|DMNMX|HFMA2|"
                    r"HADD2|HMUL2|HMNMX2|HSETP2|F2F|F2FP|I2F|F2I|MUFU|FRND)")
NOT_COUNTED = {"NOP", "HFMA2.MMA"}


def find_cuda_home():
    home = build_env.find_cuda_home()
    if home is None:
        sys.exit("sass_compare: no CUDA toolkit (set CUDA_HOME or put nvcc on PATH)")
    return home


def find_cuobjdump(cuda_home):
    cands = [os.path.join(cuda_home, "bin", "cuobjdump"), shutil.which("cuobjdump")]
    try:  # triton, which torch installs, carries one
        import triton
        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                  "cuobjdump"))
    except ImportError:
        pass
    for c in cands:
        if c and os.access(c, os.X_OK):
            return c
    sys.exit("sass_compare: no cuobjdump (CUDA toolkit or triton's)")


def include_dirs(cuda_home):
    os.environ["CUDA_HOME"] = cuda_home  # before torch's cpp_extension reads it
    from torch.utils import cpp_extension
    try:
        dirs = list(cpp_extension.include_paths(device_type="cuda"))
    except TypeError:  # torch before 2.6
        dirs = list(cpp_extension.include_paths(cuda=True))
    dirs += build_env.nvidia_pip_includes()  # as setup.py adds them
    return list(dict.fromkeys(dirs))


def compile_cubin(nvcc, src, out, incs, arch, tree):
    # setup.py's nvcc flags, and the standard and defines torch's cpp_extension adds to them.
    cmd = [nvcc, "-cubin", f"-arch={arch}"] + build_env.NVCC_FLAGS + [
           "-std=c++20", "-DTORCH_EXTENSION_NAME=_C", "-DFASTNN_WITH_CUDA=1",
           "-DTORCH_API_INCLUDE_EXTENSION_H", "-D__CUDA_NO_HALF_OPERATORS__",
           "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
           "-D__CUDA_NO_HALF2_OPERATORS__", f"-I{os.path.join(tree, 'csrc')}"]
    cmd += [f"-I{d}" for d in incs] + [src, "-o", out]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"sass_compare: nvcc failed on {src}:\n{r.stderr[-4000:]}")


def parse_sass(text):
    """{kernel: [line, ...]} from cuobjdump -sass output: each instruction with its encoding
    (which holds the scheduling control bits), addresses dropped."""
    out, name = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            name = m.group(1)
            out[name] = []
            continue
        if name is None:
            continue
        line = re.sub(r"^\s*/\*[0-9a-f]{4}\*/", "", line).strip()
        if line and not line.startswith("."):
            out[name].append(line)
    return out


def parse_resources(text):
    """{kernel: {"REG": n, "STACK": n, ...}} from cuobjdump -res-usage output."""
    out, name = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
        elif name and "REG:" in line:
            out[name] = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}
            name = None
    return out


def opcodes(lines):
    """How many times each instruction (opcode with its modifiers) stands in a kernel."""
    c = collections.Counter()
    for line in lines:
        if line.startswith("/*"):  # an encoding's second word
            continue
        ins = re.sub(r"^@!?U?P\w+\s+", "", line.split(";")[0].strip())  # without the predicate
        op = ins.split()[0] if ins else ""
        if op and op not in NOT_COUNTED:
            c[op] += 1
    return c


def compare(before, after, res_before, res_after):
    """Rows (kernel, status, details) and the number of flagged kernels."""
    rows, flagged = [], 0
    for k in sorted(set(before) | set(after)):
        if k not in after:
            rows.append((k, "removed", ""))
            continue
        if k not in before:
            rows.append((k, "added", ""))
            continue
        if before[k] == after[k]:
            rows.append((k, "identical", ""))
            continue
        ca, cb = opcodes(before[k]), opcodes(after[k])
        fp = {o: cb[o] - ca[o] for o in set(ca) | set(cb) if FP_OPS.match(o) and cb[o] != ca[o]}
        ra, rb = res_before.get(k, {}), res_after.get(k, {})
        reg0, reg1 = ra.get("REG", 0), rb.get("REG", 0)
        st0, st1 = ra.get("STACK", 0), rb.get("STACK", 0)
        n0, n1 = sum(ca.values()), sum(cb.values())
        why = []
        if st1 > st0:
            why.append("more stack")
        if reg1 > reg0 + 2:
            why.append("more registers")
        if n1 > n0 * 1.01:
            why.append("more instructions")
        if fp:
            why.append(f"floating-point instruction counts {fp}")
        detail = f"registers {reg0} -> {reg1}, stack {st0} -> {st1}, instructions {n0} -> {n1}"
        if why:
            flagged += 1
            rows.append((k, "FLAGGED", detail + "; " + "; ".join(why)))
        else:
            rows.append((k, "scheduling", detail))
    return rows, flagged


def build_side(tree, work, nvcc, cuobjdump, incs, arch):
    srcs = sorted(f for f in os.listdir(os.path.join(tree, "csrc", "cuda")) if f.endswith(".cu"))
    os.makedirs(work, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, min(len(srcs), os.cpu_count() or 1))) as pool:
        list(pool.map(lambda s: compile_cubin(nvcc, os.path.join(tree, "csrc", "cuda", s),
                                              os.path.join(work, s + ".cubin"), incs, arch, tree),
                      srcs))
    sass, res = {}, {}
    for s in srcs:
        cubin = os.path.join(work, s + ".cubin")
        text = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True,
                              check=True).stdout
        sass.update(parse_sass(text))
        text = subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True, text=True,
                              check=True).stdout
        res.update(parse_resources(text))
    return sass, res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="HEAD", help="revision to compare against (default HEAD)")
    ap.add_argument("--arch", default="sm_90", help="GPU architecture (default sm_90)")
    ap.add_argument("--keep", help="keep the cubins under this folder")
    ap.add_argument("--verbose", action="store_true", help="list identical kernels too")
    args = ap.parse_args()

    cuda_home = find_cuda_home()
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    cuobjdump = find_cuobjdump(cuda_home)
    incs = include_dirs(cuda_home)
    tmp = tempfile.mkdtemp(prefix="fastnn-sass-")
    work = args.keep or tmp
    try:
        base_tree = os.path.join(tmp, "base")
        os.makedirs(base_tree)
        archive = subprocess.run(["git", "-C", ROOT, "archive", args.base, "csrc"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", base_tree], input=archive, check=True)
        with ThreadPoolExecutor(max_workers=2) as pool:
            fb = pool.submit(build_side, base_tree, os.path.join(work, "base"), nvcc, cuobjdump,
                             incs, args.arch)
            fa = pool.submit(build_side, ROOT, os.path.join(work, "tree"), nvcc, cuobjdump, incs,
                             args.arch)
            (sb, rb), (sa, ra) = fb.result(), fa.result()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rows, flagged = compare(sb, sa, rb, ra)
    counts = collections.Counter(status for _, status, _ in rows)
    for k, status, detail in rows:
        if status != "identical" or args.verbose:
            print(f"{status:10s} {k}" + (f"\n           {detail}" if detail else ""))
    print(f"{args.base} -> working tree ({args.arch}, {os.path.basename(nvcc)} in {cuda_home}): "
          f"{len(rows)} kernels: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return 1 if flagged else 0


if __name__ == "__main__":
    sys.exit(main())
