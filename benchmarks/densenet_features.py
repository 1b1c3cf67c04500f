"""DenseNet training step: fastnn's DenseNet normalizing each layer's earlier feature maps where
they are (batch_norm_cat_with_stats) against the same model normalizing their concatenated copy,
and torchvision's DenseNet. Median step times side by side in one run (interleaved rounds), and
the bytes autograd keeps for backward (distinct storages saved by the step's graph).

    python benchmarks/densenet_features.py --model densenet121 --batch 8 --size 64
"""
import argparse
import contextlib
import statistics
import time
from unittest import mock

import torch
import torch.nn.functional as F
import torchvision

import fastnn
from fastnn import bench
from fastnn.models import densenet as fdn


def saved_bytes(step) -> int:
    """Bytes of the distinct storages autograd saves during one forward."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(storages.values())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="densenet121")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    bench.keep_freed_memory()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 1000, (args.batch,))
    tv = getattr(torchvision.models, args.model)()
    fast = getattr(fastnn.models, args.model)()
    fast.load_state_dict(tv.state_dict())

    def concatenating():  # the same fastnn model, each norm1 given the concatenated copy
        return mock.patch.object(fdn, "_no_hooks", lambda m: False)

    variants = {"torchvision": (tv, contextlib.nullcontext),
                "fastnn, concatenated copy": (fast, concatenating),
                "fastnn, feature maps in place": (fast, contextlib.nullcontext)}

    def make_step(model, ctx):
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step():
            with ctx():
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return step

    steps = {k: make_step(m, c) for k, (m, c) in variants.items()}
    saved = {}
    for k, (m, c) in variants.items():
        steps[k]()  # warm-up
        with c():
            saved[k] = saved_bytes(lambda: F.cross_entropy(m(x), y))
    times = {k: [] for k in steps}
    for _ in range(args.rounds):
        for k, step in steps.items():
            t = time.perf_counter()
            step()
            times[k].append(time.perf_counter() - t)
    base = statistics.median(times["torchvision"])
    print(f"{args.model} training step, batch {args.batch}, {args.size}x{args.size}, fp32 NCHW, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'variant':32s} {'median ms':>10s} {'vs torchvision':>15s} {'saved MiB':>10s}")
    for k, ts in times.items():
        med = statistics.median(ts)
        print(f"{k:32s} {med * 1e3:10.1f} {base / med:14.2f}x {saved[k] / 2**20:10.1f}")


if __name__ == "__main__":
    main()
