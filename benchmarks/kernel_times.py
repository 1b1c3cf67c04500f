"""Where a batch-norm call's time goes: the device kernels fastnn launches for it and their
times (torch.profiler), next to what nn.BatchNorm2d launches (cuDNN or PyTorch's own kernels) on
the same input, and each call's span from its first kernel's launch to its last one's end
(CUDA events, so the gaps between a call's kernels count too). On the CPU: the ops instead of
kernels, and wall-clock spans.

    python benchmarks/kernel_times.py [--iters 20] [--top 8] [--out kernels.txt]

The default cases are the channels-last training forward and forward+backward at 64 channels,
where fastnn was slower than nn.BatchNorm2d on an H200, with the same in NCHW and at 256
channels for comparison (fastnn.bench's case definitions and inputs).
"""
import argparse
import re
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from fastnn import bench

# (bench case, shape, dtype, layout)
CASES = {
    "cuda": [
        ("bn_train_fwd", (128, 64, 56, 56), "float16", "channels_last"),
        ("bn_train_fwd", (128, 64, 56, 56), "float16", "nchw"),
        ("bn_train_fwd", (256, 64, 56, 56), "float16", "channels_last"),
        ("bn_train_fwd", (128, 256, 56, 56), "float16", "channels_last"),
        ("bn_fwd_bwd", (128, 64, 56, 56), "float16", "channels_last"),
        ("bn_fwd_bwd", (128, 64, 56, 56), "float16", "nchw"),
        ("bn_fwd_bwd", (128, 64, 56, 56), "float32", "channels_last"),
        ("bn_add_relu_fwd_bwd", (128, 64, 56, 56), "bfloat16", "channels_last"),
    ],
    "cpu": [
        ("bn_train_fwd", (8, 64, 28, 28), "float32", "channels_last"),
        ("bn_fwd_bwd", (8, 64, 28, 28), "float32", "nchw"),
    ],
}
IMPLS = ("fastnn", "torch")


def short_name(name, width=90):
    """A kernel's demangled name without its parameter list, cut to `width`."""
    name = re.sub(r"^void ", "", name)
    depth = 0
    for i, ch in enumerate(name):  # drop the parameter list: the first '(' outside templates
        depth += {"<": 1, ">": -1}.get(ch, 0)
        if ch == "(" and depth == 0:
            name = name[:i]
            break
    return name if len(name) <= width else name[:width - 3] + "..."


def _device_events(prof, device):
    """[(name, calls, total us)] of the profiled device kernels (CUDA) or ops (CPU)."""
    rows = []
    for e in prof.key_averages():
        if device.type == "cuda":
            if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
                continue
            us = getattr(e, "device_time_total", None)
            if us is None:
                us = e.cuda_time_total
        else:
            us = e.self_cpu_time_total
        if us > 0:
            rows.append((e.key, e.count, us))
    rows.sort(key=lambda r: -r[2])
    return rows


def spans_us(step, iters, device):
    """Each call's span in µs: CUDA events around it (with a synchronize before, so the span is
    its own kernels and the gaps between them), or wall-clock on the CPU."""
    out = []
    for i in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(i % 2)
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) * 1e3)
        else:
            t = time.perf_counter()
            step(i % 2)
            out.append((time.perf_counter() - t) * 1e6)
    return out


def profile_case(case_name, shape, dtype_name, layout, device, iters, top):
    case = bench.CASES[case_name]
    dtype = getattr(torch, dtype_name)
    inputs = bench.make_inputs(shape, dtype, layout, device, sets=2)
    lines = [f"{case.title}: {dtype_name} {layout} {tuple(shape)}"]
    result = {}
    for impl in IMPLS:
        step = bench.build_step(case, impl, inputs)
        for i in range(3):  # warm-up (cuDNN's algorithm choice, the caching allocator)
            step(i % 2)
        span = spans_us(step, iters, device)
        activities = [ProfilerActivity.CPU]  # the CUDA kernels: filtered by their device type
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
            torch.cuda.synchronize(device)
        with profile(activities=activities) as prof:
            for i in range(iters):
                step(i % 2)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        events = _device_events(prof, device)
        busy = sum(us for _, _, us in events) / iters
        med = statistics.median(span)
        what = "kernel time" if device.type == "cuda" else "op self time"
        lines.append(f"  {bench.IMPL_TITLES[impl]:<7} span {med:8.1f} us (median of {iters}); "
                     f"{what} {busy:8.1f} us a call")
        for name, calls, us in events[:top]:
            lines.append(f"    {us / iters:8.1f} us  x{calls / iters:<4.3g} {short_name(name)}")
        result[impl] = {"span_us": med, "busy_us": busy,
                        "events": [(n, c / iters, us / iters) for n, c, us in events]}
    ratio = result["torch"]["span_us"] / result["fastnn"]["span_us"]
    lines.append(f"  span of nn.BatchNorm2d / fastnn: {ratio:.2f}x "
                 f"({case_name} {dtype_name} {layout} {tuple(shape)})")
    return lines, result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=20, help="calls timed and profiled per case")
    ap.add_argument("--top", type=int, default=8, help="kernels (ops) listed per implementation")
    ap.add_argument("--out", help="also write the report to this file")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    env = bench.collect_env(device)
    report = [f"fastnn kernel times: {env['device']}, torch {env['torch']}"
              f"{', CUDA ' + env['torch_cuda'] if device.type == 'cuda' else ''}, {env['date']}, "
              f"commit {(env['git_commit'] or 'unknown')[:12]}", bench.backend_line(env)]
    print("\n".join(report), flush=True)
    for case_name, shape, dtype_name, layout in CASES[device.type]:
        lines, _ = profile_case(case_name, shape, dtype_name, layout, device, args.iters,
                                args.top)
        report += [""] + lines
        print("\n".join([""] + lines), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(report) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
