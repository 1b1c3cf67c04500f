"""The CPU kernels' non-temporal output stores against cached ones, side by side in one process
(FASTNN_CPU_STREAM is read at each call: unset, the size rule; 0, never streamed; 1, always
streamed where the alignment allows).

Op level: a float32 batch norm (eval or training forward; --residual: BN+add+ReLU; --dual: the
dual form relu(bn(x) + bn2(z)), against torch's modules one after the other) of
(32, C, 56, 56), NCHW or channels_last, calls of two settings (--against: the rule against never
or always) and of torch's nn.BatchNorm2d (and add and ReLU) interleaved in a random order, each
on the next of 4 input sets. --output cached first writes a buffer of the output's size and
frees it, so the output takes a block whose lines are in the cache, dirty (as a network's
activations recycle freshly written memory); --output cold leaves the block as the previous call
left it (the bench's case: the previous call's output, just freed). --solo SETTING times that
setting alone in the process, nothing interleaved (each call still on the next input set).

Model level (--model resnet50): a whole eval forward or training step (SGD) of a fastnn.models
network, the two settings alternating in a random order each round.

    python benchmarks/stream_stores.py --channels 64 --case eval --output cached
    python benchmarks/stream_stores.py --channels 64 --case eval --output cold --against always
    python benchmarks/stream_stores.py --model resnet50 --case train --batch 16 --rounds 8
"""
import argparse
import os
import random
import statistics
import time

import torch

import fastnn

SETTINGS = {"rule": None, "never": "0", "always": "1"}


def _set(setting):
    value = SETTINGS.get(setting)
    if value is None:
        os.environ.pop("FASTNN_CPU_STREAM", None)
    else:
        os.environ["FASTNN_CPU_STREAM"] = value


def op_level(args):
    memory_format = (torch.channels_last if args.layout == "channels_last"
                     else torch.contiguous_format)

    def make():
        return torch.randn(32, args.channels, 56, 56).to(memory_format=memory_format)

    sets = [make() for _ in range(4)]
    residuals = [make() for _ in range(4)] if args.residual or args.dual else None
    module = fastnn.nn.BatchNormAddReLU2d if args.residual or args.dual else fastnn.nn.BatchNorm2d
    fast = module(args.channels).train(args.case == "train")
    fast2 = fastnn.nn.BatchNorm2d(args.channels).train(args.case == "train")
    ref = torch.nn.BatchNorm2d(args.channels).train(args.case == "train")
    ref2 = torch.nn.BatchNorm2d(args.channels).train(args.case == "train")

    def call(k, x, r):
        if args.dual:
            if k == "torch":
                return torch.relu(ref(x) + ref2(r))
            return fastnn.nn.dual_bn_add_relu(fast, x, fast2, r)
        if k == "torch":
            return ref(x) if r is None else torch.relu(ref(x) + r)
        return fast(x) if r is None else fast(x, r)

    other = args.against
    names = [args.solo] if args.solo else ["rule", other, "torch"]
    times = {k: [] for k in names}
    i = 0
    with torch.no_grad():
        for _ in range(args.rounds):
            random.shuffle(names)
            for k in names:
                x = sets[i % len(sets)]
                r = residuals[i % len(sets)] if residuals else None
                i += 1
                _set(k if k != "torch" else "rule")
                if args.output == "cached":
                    scratch = torch.empty_like(x)
                    scratch.fill_(1.0)
                    del scratch
                start = time.perf_counter()
                y = call(k, x, r)
                times[k].append(time.perf_counter() - start)
                del y
    _set("rule")
    med = {k: statistics.median(v[10:]) * 1e3 for k, v in times.items()}
    mib = sets[0].numel() * 4 / 2**20
    what = f"{args.case}{' dual' if args.dual else ' +add+ReLU' if args.residual else ''}"
    if args.solo:
        print(f"{what} (32, {args.channels}, 56, 56) float32 {args.layout}, {mib:.1f} MiB, output "
              f"{args.output}, {args.solo} alone: {med[args.solo]:.3f} ms")
        return
    print(f"{what} (32, {args.channels}, 56, 56) float32 {args.layout}, {mib:.1f} MiB, output "
          f"{args.output}: the rule {med['rule']:.3f} ms, {other} {med[other]:.3f} ms, "
          f"torch {med['torch']:.3f} ms; rule / {other} = {med['rule'] / med[other]:.2f}")


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
    other = args.against
    names = ["rule", other]
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
    ratios = [round(a / b, 3) for a, b in zip(times["rule"], times[other])]
    print(f"{args.model} {args.case} batch {args.batch}: rule {med['rule']:.1f} ms, {other} "
          f"{med[other]:.1f} ms; rule / {other} = {med['rule'] / med[other]:.3f} "
          f"(each round: {ratios})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["eval", "train"], default="eval")
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--output", choices=["cached", "cold"], default="cached")
    parser.add_argument("--layout", choices=["nchw", "channels_last"], default="nchw")
    parser.add_argument("--residual", action="store_true", help="BN+add+ReLU")
    parser.add_argument("--dual", action="store_true", help="relu(bn(x) + bn2(z)) in one call")
    parser.add_argument("--against", choices=["never", "always"], default="never",
                        help="the setting timed against the rule (op level)")
    parser.add_argument("--solo", choices=sorted(SETTINGS), default=None,
                        help="op level: time only this setting, nothing interleaved")
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
