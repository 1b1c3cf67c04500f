"""The CPU kernels' non-temporal output stores against cached ones, side by side in one process
(FASTNN_CPU_STREAM is read at each call: unset, the size rule; 0, never streamed).

Op level: a float32 batch norm (eval or training forward) of (32, C, 56, 56), calls of the two
settings and of nn.BatchNorm2d interleaved in a random order, each on the next of 4 input sets.
--output cached first writes a buffer of the output's size and frees it, so the output takes a
block whose lines are in the cache, dirty (as a network's activations recycle freshly written
memory); --output cold leaves the block as the previous call left it.

Model level (--model resnet50): a whole eval forward or training step (SGD) of a fastnn.models
network, the two settings alternating in a random order each round.

    python benchmarks/stream_stores.py --channels 64 --case eval --output cached
    python benchmarks/stream_stores.py --model resnet50 --case train --batch 16 --rounds 8
"""
import argparse
import os
import random
import statistics
import time

import torch

import fastnn

SETTINGS = {"rule": None, "never": "0"}


def _set(setting):
    value = SETTINGS.get(setting)
    if value is None:
        os.environ.pop("FASTNN_CPU_STREAM", None)
    else:
        os.environ["FASTNN_CPU_STREAM"] = value


def op_level(args):
    sets = [torch.randn(32, args.channels, 56, 56) for _ in range(4)]
    fast = fastnn.nn.BatchNorm2d(args.channels).train(args.case == "train")
    ref = torch.nn.BatchNorm2d(args.channels).train(args.case == "train")
    names = ["rule", "never", "torch"]
    times = {k: [] for k in names}
    i = 0
    with torch.no_grad():
        for _ in range(args.rounds):
            random.shuffle(names)
            for k in names:
                x = sets[i % len(sets)]
                i += 1
                _set(k if k != "torch" else "rule")
                if args.output == "cached":
                    scratch = torch.empty_like(x)
                    scratch.fill_(1.0)
                    del scratch
                start = time.perf_counter()
                y = (ref if k == "torch" else fast)(x)
                times[k].append(time.perf_counter() - start)
                del y
    _set("rule")
    med = {k: statistics.median(v[10:]) * 1e3 for k, v in times.items()}
    mib = sets[0].numel() * 4 / 2**20
    print(f"{args.case} (32, {args.channels}, 56, 56) float32, {mib:.1f} MiB, output "
          f"{args.output}: streamed by the rule {med['rule']:.3f} ms, never {med['never']:.3f} ms, "
          f"nn.BatchNorm2d {med['torch']:.3f} ms; rule / never = {med['rule'] / med['never']:.2f}")


def model_level(args):
    model = getattr(fastnn.models, args.model)(num_classes=100).train(args.case == "train")
    x = torch.randn(args.batch, 3, 224, 224)
    target = torch.randint(0, 100, (args.batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        if args.case == "eval":
            with torch.no_grad():
                model(x)
        else:
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), target).backward()
            opt.step()

    step()
    step()
    names = ["rule", "never"]
    times = {k: [] for k in names}
    for _ in range(args.rounds):
        random.shuffle(names)
        for k in names:
            _set(k)
            start = time.perf_counter()
            step()
            times[k].append(time.perf_counter() - start)
    _set("rule")
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    ratios = [round(a / b, 3) for a, b in zip(times["rule"], times["never"])]
    print(f"{args.model} {args.case} batch {args.batch}: rule {med['rule']:.1f} ms, never "
          f"{med['never']:.1f} ms; rule / never = {med['rule'] / med['never']:.3f} "
          f"(each round: {ratios})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["eval", "train"], default="eval")
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--output", choices=["cached", "cold"], default="cached")
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    if not fastnn.ops.has_kernel("cpu"):
        raise SystemExit("fastnn._C has no CPU kernels")
    if args.model:
        args.rounds = args.rounds or 8
        model_level(args)
    else:
        args.rounds = args.rounds or 120
        op_level(args)


if __name__ == "__main__":
    main()
