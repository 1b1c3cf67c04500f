"""Build csrc/cuda as a CPU extension that runs the CUDA kernels on emulated threads (emu.h).

The sources are copied with these mechanical changes and nothing else:

* ``kernel<<<grid, block, shared, stream>>>(args)`` becomes
  ``::fastnn_emu::launch(kernel, grid, block, shared, stream)(args)``;
* ``__shared__ T name[n];`` becomes a static array filled with 0xFF at the start of each block;
* ``__launch_bounds__(n, ...)`` is dropped and the kernel's body starts by checking that the
  block has at most n threads (a larger block fails to launch on the device);
* ``.is_cuda()`` becomes ``.is_cpu()`` (the emulated "device" is the CPU).

``load()`` compiles them with torch.utils.cpp_extension (ninja, cached under build/cuda_emu) and
returns the module of tests/cuda_emu/bindings.cpp.
"""
import fcntl
import os
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CUDA_SRC = ROOT / "csrc" / "cuda"

_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)
_SHARED = re.compile(r"__shared__\s+([^;\[]+?)\s+(\w+)\s*\[([^\];]+)\]\s*;")


def _strip_comments(text):
    # The sources have no "//" or "/*" inside string literals that matter to the build; keeping
    # line breaks keeps compiler line numbers equal to the originals'.
    return _COMMENT.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def _rewrite_launches(text):
    out = []
    pos = 0
    while True:
        i = text.find("<<<", pos)
        if i < 0:
            out.append(text[pos:])
            return "".join(out)
        # The kernel expression starts after the previous statement or brace (or where the
        # previous launch ended).
        start = max([pos] + [text.rfind(ch, pos, i) + 1 for ch in ";{}"])
        while text[start].isspace():
            start += 1
        j = text.find(">>>(", i)
        if j < 0:
            raise ValueError(f"cuda_emu: unterminated launch near {text[i - 40:i + 40]!r}")
        kernel = text[start:i].strip()
        config = text[i + 3:j]
        out.append(text[pos:start])
        out.append(f"::fastnn_emu::launch({kernel}, {config})(")
        pos = j + 4


def _rewrite_shared(text):
    return _SHARED.sub(
        lambda m: f"static {m.group(1)} {m.group(2)}[{m.group(3)}]; "
                  f"::fastnn_emu::shared_poison({m.group(2)}, sizeof({m.group(2)}));",
        text)


def _closing_paren(text, open_at):
    depth = 0
    for k in range(open_at, len(text)):
        depth += {"(": 1, ")": -1}.get(text[k], 0)
        if depth == 0:
            return k
    raise ValueError(f"cuda_emu: unbalanced parentheses near {text[open_at:open_at + 60]!r}")


def _rewrite_launch_bounds(text):
    """`__launch_bounds__(max_threads[, min_blocks]) kernel(...) {` loses the attribute and its
    body starts by checking the block against max_threads (a larger block fails to launch)."""
    out = []
    pos = 0
    while True:
        i = text.find("__launch_bounds__(", pos)
        if i < 0:
            out.append(text[pos:])
            return "".join(out)
        open_at = i + len("__launch_bounds__")
        close = _closing_paren(text, open_at)
        args = text[open_at + 1:close]
        depth, first = 0, args
        for k, ch in enumerate(args):
            depth += {"(": 1, ")": -1, "<": 1, ">": -1}.get(ch, 0)
            if ch == "," and depth == 0:
                first = args[:k]
                break
        body = text.find("{", close)
        out.append(text[pos:i])
        out.append(text[close + 1:body + 1])
        out.append(f" ::fastnn_emu::check_launch_bounds({first.strip()});")
        pos = body + 1


def translate(text):
    text = _strip_comments(text)
    text = _rewrite_launches(text)
    text = _rewrite_shared(text)
    text = _rewrite_launch_bounds(text)
    return text.replace(".is_cuda()", ".is_cpu()")


def _write_if_changed(path, text):
    if path.exists() and path.read_text() == text:
        return
    path.write_text(text)


def generate(out_dir):
    """Translated copies of csrc/cuda's sources (and of the emulation's own check kernels) in
    out_dir; returns the .cpp files to compile."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = []
    for src in sorted(CUDA_SRC.iterdir()) + [HERE / "selfcheck.cu"]:
        if src.suffix in (".cuh", ".h"):
            _write_if_changed(out_dir / src.name, translate(src.read_text()))
        elif src.suffix == ".cu":
            dst = out_dir / (src.stem + ".cpp")
            _write_if_changed(dst, translate(src.read_text()))
            sources.append(str(dst))
    return sources


def load(verbose=False, sanitize=False):
    """Compile (or reuse) and import the emulated build."""
    from torch.utils import cpp_extension

    name = "fastnn_cuda_emu_asan" if sanitize else "fastnn_cuda_emu"
    build_dir = ROOT / "build" / name
    gen_dir = build_dir / "src"
    build_dir.mkdir(parents=True, exist_ok=True)
    # Test processes started together (pytest-xdist workers) take turns: the first translates
    # and compiles, the others then find nothing changed and load what it built.
    with open(build_dir / "load.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _load(cpp_extension, name, build_dir, gen_dir, verbose, sanitize)


def _load(cpp_extension, name, build_dir, gen_dir, verbose, sanitize):
    sources = generate(gen_dir)
    sources += [str(ROOT / "csrc" / "batch_norm_common.cpp"), str(HERE / "bindings.cpp")]
    flags = ["-O1"]
    # With sanitize: AddressSanitizer (out-of-bounds accesses) and UBSan's alignment check, for
    # what a GPU faults on ("misaligned address") and x86 performs silently: a vector load or
    # store at an address its width does not divide. The check traps (SIGILL) rather than
    # reporting: UBSan's runtime crashes reporting from a fiber's stack.
    sanitizers = "-fsanitize=address,alignment"
    if sanitize:
        flags += [sanitizers, "-fsanitize-undefined-trap-on-error", "-fno-omit-frame-pointer"]
    return cpp_extension.load(
        name=name,
        sources=sources,
        extra_include_paths=[str(HERE / "include"), str(HERE), str(gen_dir),
                             str(ROOT / "csrc")],
        extra_cflags=flags,
        extra_ldflags=[sanitizers] if sanitize else [],
        build_directory=str(build_dir),
        verbose=verbose,
    )


if __name__ == "__main__":
    import sys
    mod = load(verbose=True, sanitize="--asan" in sys.argv)
    print(mod.__file__)
