"""What a model's batch norms cost where they run: inside a torchvision model's inference, after
the convolution before each one (which has evicted much of the interpreter's and the
dispatcher's code and data from the cache), unlike one call repeated on its own.

Every BatchNorm2d of the model is timed call by call (time.perf_counter around the module's
forward, or around the bare op with --op), in torchvision's model and in the same model with
fastnn's modules swapped in (same weights), the two forwards alternating. Prints the summed
median time per forward of each, their ratio, and the layers where they differ most.

    python benchmarks/model_bn_calls.py --model resnet50 --threads 2
    python benchmarks/model_bn_calls.py --model densenet121 --op
"""
import argparse
import collections
import copy
import statistics
import time

import torch

import fastnn
from fastnn.bench import swap_batchnorm


def timed(model, use_op, sink):
    """Wraps the forward of every BatchNorm2d of `model` to append its time to sink[name]."""
    fast_op = torch.ops.fastnn.batch_norm_eval.default
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.BatchNorm2d):
            continue
        if use_op and isinstance(m, fastnn.nn.BatchNorm2d):
            def call(x, m=m):
                return fast_op(x, m.weight, m.bias, m.running_mean, m.running_var, m.eps, None,
                               False)
        elif use_op:
            def call(x, m=m):
                return torch.batch_norm(x, m.weight, m.bias, m.running_mean, m.running_var,
                                        False, 0.0, m.eps, False)
        else:
            call = m.forward

        def forward(x, call=call, times=sink[name]):
            start = time.perf_counter()
            out = call(x)
            times.append(time.perf_counter() - start)
            return out
        m.forward = forward


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50", help="a torchvision model name")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=30, help="forwards of each model")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--op", action="store_true",
                   help="time the bare ops (fastnn.batch_norm_eval, torch.batch_norm) instead "
                        "of the modules")
    p.add_argument("--top", type=int, default=8, help="layers listed")
    args = p.parse_args(argv)
    import torchvision
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": True} if args.model == "googlenet" else {}
    base = getattr(torchvision.models, args.model)(weights=None, **kwargs).eval()
    fast = swap_batchnorm(copy.deepcopy(base)).eval()
    sinks = {"torch": collections.defaultdict(list), "fastnn": collections.defaultdict(list)}
    timed(base, args.op, sinks["torch"])
    timed(fast, args.op, sinks["fastnn"])
    x = torch.randn(args.batch, 3, args.image_size, args.image_size)
    warm = 5
    with torch.inference_mode():
        for r in range(args.rounds + warm):
            for model in ((base, fast) if r % 2 else (fast, base)):
                model(x)
    med = {k: {n: statistics.median(v[warm:]) * 1e6 for n, v in s.items()}
           for k, s in sinks.items()}
    total = {k: sum(v.values()) / 1e3 for k, v in med.items()}
    what = "ops" if args.op else "modules"
    print(f"{args.model}, {len(med['torch'])} BatchNorm2d {what}, batch {args.batch} of "
          f"{args.image_size}x{args.image_size}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, {fastnn.backend_info()}")
    print(f"per forward (sum of per-call medians): torch {total['torch']:.3f} ms, fastnn "
          f"{total['fastnn']:.3f} ms, fastnn / torch {total['fastnn'] / total['torch']:.3f}")
    rows = sorted(((med["fastnn"][n] - med["torch"][n], n) for n in med["torch"]), reverse=True)
    print(f"largest differences (us, fastnn - torch):")
    for d, n in rows[:args.top]:
        print(f"  {n:28s} torch {med['torch'][n]:8.1f}  fastnn {med['fastnn'][n]:8.1f}  {d:+7.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
