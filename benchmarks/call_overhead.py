"""Per-call cost of fastnn's batch-norm modules against torch's on an input so small that the
kernels take almost none of it: what a call spends in Python, the dispatcher and autograd.
This is what fastnn adds (or saves) per batch norm on networks whose maps are small.

Median times per call over interleaved rounds, side by side in one run:

    python benchmarks/call_overhead.py [--shape 2 8 4 4] [--threads 1] [--out results.md]
"""
import argparse

import torch

import fastnn
from fastnn import bench


def cases(shape):
    """(case, {implementation: callable}) pairs: fastnn's module against torch's modules."""
    C = shape[1]
    x = torch.randn(shape, requires_grad=True)
    r = torch.randn(shape, requires_grad=True)
    xd, rd = x.detach(), r.detach()

    def plain():
        return fastnn.nn.BatchNorm2d(C), torch.nn.BatchNorm2d(C)

    def add_relu():
        bn = torch.nn.BatchNorm2d(C)
        return fastnn.nn.BatchNormAddReLU2d(C), lambda a, b: torch.relu(bn(a) + b), bn

    def pair(fast, ref, args, grad, backward, train):
        for m in (fast, ref):
            if isinstance(m, torch.nn.Module):
                m.train(train)

        def call(m):
            if backward:
                return lambda _: m(*args).sum().backward()
            if grad:
                return lambda _: m(*args)

            def no_grad(_):
                with torch.no_grad():
                    m(*args)
            return no_grad
        return {"fastnn": call(fast), "torch": call(ref)}  # called with the call index

    for train, grad, backward, what in ((False, False, False, "inference"),
                                        (True, False, False, "training forward, no grad"),
                                        (True, True, False, "training forward"),
                                        (True, True, True, "training forward+backward")):
        fast, ref = plain()
        args = (x,) if grad else (xd,)
        yield f"BatchNorm2d, {what}", pair(fast, ref, args, grad, backward, train)
        fast, ref, bn = add_relu()
        bn.train(train)
        args = (x, r) if grad else (xd, rd)
        yield f"BN+add+ReLU, {what}", pair(fast, ref, args, grad, backward, train)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[2, 8, 4, 4])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bench.keep_freed_memory()
    torch.manual_seed(0)

    env = bench.collect_env(torch.device("cpu"))
    lines = [f"# Per-call cost of a batch-norm module, input {tuple(args.shape)} float32 CPU", ""]
    lines += [f"- {line}" for line in bench.env_lines(env)]
    lines += [f"- median µs per call over {args.rounds} interleaved rounds of {args.calls} calls",
              "- torch: nn.BatchNorm2d; for BN+add+ReLU, `relu(bn(x) + r)` with it",
              "",
              "| case | fastnn µs | torch µs | fastnn - torch µs | torch / fastnn |",
              "| --- | ---: | ---: | ---: | ---: |"]
    print("\n".join(lines))
    for case, fns in cases(tuple(args.shape)):
        medians = bench.interleaved_medians(fns, args.calls, args.rounds)
        t = {k: s * 1e6 for k, s in medians.items()}
        row = (f"| {case} | {t['fastnn']:.1f} | {t['torch']:.1f} | "
               f"{t['fastnn'] - t['torch']:+.1f} | {t['torch'] / t['fastnn']:.2f}x |")
        lines.append(row)
        print(row, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
