"""The two sides of the ReLU mask a training forward with ReLU keeps for its backward, timed
side by side on the same inputs: the masked forward (what autograd runs) against the plain one,
and the backward reading the mask against the backward reading the output. The backward's
inputs rotate through `--sets` copies, so that the output (or mask) it reads is not the one the
forward has just written, as in a network, where other layers run in between.

    python benchmarks/relu_mask.py [--device cpu] [--dtypes float32,bfloat16]
        [--layouts nchw,channels_last] [--shape 32 1024 7 7 ...] [--out results.md]

Prints a markdown table: median ms per call over interleaved rounds, and the ratios.
"""
import argparse

import torch

from fastnn import bench  # also registers torch.ops.fastnn

DEFAULT_SHAPES = [(32, 1024, 7, 7), (32, 256, 14, 14), (32, 128, 28, 28), (32, 64, 56, 56)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def measure(shape, dtype, layout, device, sets, rounds, residual):
    ops = torch.ops.fastnn
    gen = torch.Generator().manual_seed(0)

    def tensor():
        t = torch.randn(shape, generator=gen).to(dtype)
        return t.contiguous(memory_format=LAYOUTS[layout]).to(device)

    xs = [tensor() for _ in range(sets)]
    gs = [tensor() for _ in range(sets)]
    rs = [tensor() for _ in range(sets)] if residual else [None] * sets
    C = shape[1]
    w = torch.randn(C, generator=gen).to(device)
    b = torch.randn(C, generator=gen).to(device)
    saved = [ops.batch_norm_train_masked(xs[i], w, b, None, None, 0.1, 1e-5, rs[i], True)
             for i in range(sets)]
    fns = {
        "forward": lambda i: ops.batch_norm_train(xs[i], w, b, None, None, 0.1, 1e-5, rs[i],
                                                  True),
        "forward, masked": lambda i: ops.batch_norm_train_masked(xs[i], w, b, None, None, 0.1,
                                                                 1e-5, rs[i], True),
        "backward, from the output": lambda i: ops.batch_norm_backward(
            gs[i], xs[i], w, saved[i][0], saved[i][1], saved[i][2], True, True, residual),
        "backward, from the mask": lambda i: ops.batch_norm_backward(
            gs[i], xs[i], w, saved[i][0], saved[i][1], saved[i][2], True, True, residual,
            saved[i][3]),
    }
    t = bench.interleaved_medians(fns, sets, rounds, device)
    return {name: s * 1e3 for name, s in t.items()}, saved[0][3].numel()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--layouts", default="nchw,channels_last")
    p.add_argument("--shape", type=int, nargs=4, action="append", metavar=("N", "C", "H", "W"))
    p.add_argument("--residual", action="store_true", help="BN+add+ReLU instead of BN+ReLU")
    p.add_argument("--sets", type=int, default=32, help="input sets rotated through")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="also write the table to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shapes = [tuple(s) for s in args.shape] if args.shape else DEFAULT_SHAPES
    what = "BN+add+ReLU" if args.residual else "BN+ReLU"
    lines = [f"{what} training forward and backward, {device.type}, torch "
             f"{torch.__version__}, {torch.get_num_threads()} threads, {args.sets} input sets",
             "",
             "| shape | dtype | layout | mask KiB | forward ms | masked ms | backward from "
             "output ms | from mask ms | forward+backward with / without the mask |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for shape in shapes:
        for dt in args.dtypes.split(","):
            for layout in args.layouts.split(","):
                t, mask_bytes = measure(shape, DTYPES[dt], layout, device, args.sets,
                                        args.rounds, args.residual)
                ratio = ((t["forward, masked"] + t["backward, from the mask"]) /
                         (t["forward"] + t["backward, from the output"]))
                line = (f"| {'x'.join(map(str, shape))} | {dt} | {layout} | "
                        f"{mask_bytes / 1024:.0f} | {t['forward']:.3f} | "
                        f"{t['forward, masked']:.3f} | {t['backward, from the output']:.3f} | "
                        f"{t['backward, from the mask']:.3f} | {ratio:.3f} |")
                lines.append(line)
                print(line, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
