"""fastnn-bench: the comparison of runs (--compare) and the goal lines on made-up run records,
and the goals' own cases (--targets) timed on the CPU."""
import json
import math

import pytest

from fastnn import bench


def _op(case, shape, dtype, layout, ms, **speedups):
    return {"case": case, "shape": list(shape), "dtype": dtype, "layout": layout,
            "impls": {"fastnn": {"median_ms": ms}}, "speedup": dict(speedups)}


def _run(ops, commit="abc", models=()):
    env = {"device": "cpu", "torch": "2.x", "fastnn_backend": "compiled", "git_commit": commit,
           "date": "2026-01-01"}
    return {"env": env, "ops": list(ops), "models": list(models)}


def test_combine_runs_takes_geometric_means_per_case():
    a1 = _run([_op("bn_eval", (2, 3, 4, 4), "float32", "nchw", 1.0, torch=2.0),
               _op("bn_eval", (2, 3, 4, 4), "float32", "channels_last", 4.0, torch=0.5)])
    a2 = _run([_op("bn_eval", (2, 3, 4, 4), "float32", "nchw", 4.0, torch=8.0)],
              models=[{"model": "resnet50", "mode": "train",
                       "variants": {"fastnn": {"images_per_s": 9.0}}}])
    a1["models"] = [{"model": "resnet50", "mode": "train",
                     "variants": {"fastnn": {"images_per_s": 1.0}}}]
    c = bench.combine_runs([a1, a2])
    ops = {(r["layout"]): r for r in c["ops"]}
    assert math.isclose(ops["nchw"]["impls"]["fastnn"]["median_ms"], 2.0)
    assert math.isclose(ops["nchw"]["speedup"]["torch"], 4.0)
    # A case only one run has keeps that run's values.
    assert math.isclose(ops["channels_last"]["speedup"]["torch"], 0.5)
    assert math.isclose(c["models"][0]["variants"]["fastnn"]["images_per_s"], 3.0)
    assert c["env"]["runs"] == 2


def test_compare_reports_groups_and_cases_slower_than_the_baseline():
    shape = (32, 64, 56, 56)
    before = [_run([_op("bn_eval", shape, "float32", "nchw", 2.0, torch=0.8),
                    _op("bn_train_fwd", shape, "bfloat16", "channels_last", 1.0, torch=1.5)])
              for _ in range(2)]
    after = [_run([_op("bn_eval", shape, "float32", "nchw", 1.0, torch=1.6),
                   _op("bn_train_fwd", shape, "bfloat16", "channels_last", 1.0, torch=1.5)],
                  commit="def") for _ in range(2)]
    text = bench.compare_runs(before, after, "before", "after")
    assert "(2 runs combined)" in text
    assert "fastnn time B/A: geometric mean 0.707" in text  # sqrt(0.5 * 1.0)
    lines = text.splitlines()
    start = lines.index("Speedup over eager, geometric mean by group")
    table = {line.split()[0]: line.split() for line in lines[start + 3:start + 8]
             if line.strip()}
    assert table["all"][2:5] == [f"{math.sqrt(0.8 * 1.5):.3f}x", f"{math.sqrt(1.6 * 1.5):.3f}x",
                                 f"{math.sqrt(2.0):.3f}"]
    assert table["bn_eval"][2:5] == ["0.800x", "1.600x", "2.000"]
    assert "slower than eager: 1 of 2 cases (A), 0 (B)" in text


def test_compare_command_line_takes_comma_lists(tmp_path, capsys):
    paths = []
    for i, speed in enumerate((1.0, 4.0, 2.0)):
        p = tmp_path / f"run{i}.json"
        p.write_text(json.dumps(_run([_op("bn_eval", (2, 3, 4, 4), "float32", "nchw", 1.0,
                                          torch=speed)])))
        paths.append(str(p))
    assert bench.main(["--compare", f"{paths[0]},{paths[1]}", paths[2]]) == 0
    out = capsys.readouterr().out
    assert "speedup vs eager: geometric mean 2.00x (A) -> 2.00x (B)" in out


def _timed(case, shape, dtype, layout, fast_ms, **base_ms):
    impls = {"fastnn": {"median_ms": fast_ms}}
    impls.update({b: {"median_ms": ms} for b, ms in base_ms.items()})
    return {"case": case, "shape": list(shape), "dtype": dtype, "layout": layout,
            "impls": impls, "speedup": {b: ms / fast_ms for b, ms in base_ms.items()}}


def test_goal_lines_give_a_verdict_on_the_goals_exact_cases_only():
    run = {"env": {"device_type": "cuda"}, "ops": [
        # the goal's (C, H, W) at another batch: numbers, no verdict
        _timed("bn_train_fwd", (128, 64, 56, 56), "float16", "nchw", 0.1, torch=0.3),
        _timed("bn_train_fwd", (64, 64, 56, 56), "bfloat16", "nchw", 0.1, torch=0.3),  # no goal
    ], "targets": [
        _timed("bn_train_fwd", (256, 64, 56, 56), "float16", "nchw", 0.14, torch=0.60),
        _timed("bn_train_fwd", (256, 64, 56, 56), "float16", "channels_last", 0.11, torch=0.118),
        _timed("bn_add_relu_fwd_bwd", (256, 256, 56, 56), "bfloat16", "nchw", 1.55, torch=5.16,
               compile=2.79),
        _timed("bn_add_relu_fwd_bwd", (256, 256, 56, 56), "bfloat16", "channels_last", 1.7,
               torch=3.78),
    ]}
    lines = bench.claim_lines(run)
    assert len(lines) == 5
    assert lines[0].endswith("= 3.00x")  # batch 128: no verdict
    assert lines[1].endswith("= 4.29x  (goal >= 4x on an H100: met)")
    assert lines[2].endswith("= 1.07x  (goal >= 1.15x on an H100: NOT met)")
    assert "1.55 ms (eager 5.16 ms, compile 2.79 ms)  (goal <= 1.6 ms on an H100: met)" \
        in lines[3]
    assert lines[4].endswith("(goal <= 1.6 ms on an H100: NOT met)")


def test_targets_times_the_cpu_goals_cases(tmp_path, capsys):
    assert bench.main(["--device", "cpu", "--targets", "--no-ops", "--reps", "2",
                       "--no-progress", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    with open(tmp_path / "bench.json") as f:
        run = json.load(f)
    want = [(t.case, list(t.shape), t.dtype, t.layout) for t in bench.TARGETS["cpu"]]
    assert [(r["case"], r["shape"], r["dtype"], r["layout"]) for r in run["targets"]] == want
    for r in run["targets"]:
        assert r["impls"]["fastnn"]["median_ms"] > 0 and r["speedup"]["torch"] > 0
    assert text.count("on a 2-core CPU: ") == len(want)
    with open(tmp_path / "bench.md") as f:
        assert "## The goals' own cases (--targets)" in f.read()


def test_models_time_training_and_inference_at_their_own_batches(tmp_path, capsys):
    """--models: every variant of a (small-image) ResNet-50 runs a training step and inference
    (and, for inference, fastnn.models' build folded by fuse_for_inference), the training step
    at --model-batch and inference at --model-infer-batch; each (model, mode) is printed as it
    finishes and the run's files hold the same records."""
    pytest.importorskip("torchvision")
    assert bench.main(["--device", "cpu", "--no-ops", "--models", "resnet50", "--model-batch",
                       "2", "--model-infer-batch", "3", "--model-image-size", "32", "--reps",
                       "1", "--no-progress", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    with open(tmp_path / "bench.json") as f:
        run = json.load(f)
    assert [(m["model"], m["mode"], m["batch"]) for m in run["models"]] == [
        ("resnet50", "train", 2), ("resnet50", "infer", 3)]
    for m in run["models"]:
        want = {"torchvision", "fastnn", "fastnn fused", "fastnn.models"}
        assert set(m["variants"]) == want | ({"fastnn.models folded"} if m["mode"] == "infer"
                                            else set())
        for v, st in m["variants"].items():
            assert st["median_ms"] > 0, (m["mode"], v, st)
            assert math.isclose(st["images_per_s"], m["batch"] / (st["median_ms"] * 1e-3))
        assert m["speedup"] == pytest.approx(m["variants"]["torchvision"]["median_ms"]
                                             / m["variants"]["fastnn"]["median_ms"])
    assert "resnet50 train 2x32²: torchvision " in text
    assert "resnet50 infer 3x32²: torchvision " in text
    with open(tmp_path / "bench.md") as f:
        assert "3x32²" in f.read()


def test_backend_line_says_whether_the_relu_mask_is_on(monkeypatch):
    """CUDA runs name the ReLU-mask setting (it changes what the ReLU cases move and keep)."""
    env = {"fastnn_backend": "compiled", "device_type": "cuda", "fastnn_relu_mask": True}
    assert bench.backend_line(env).endswith("(ReLU mask on)")
    env["fastnn_relu_mask"] = False
    assert "ReLU mask off: FASTNN_RELU_MASK=0" in bench.backend_line(env)
    import fastnn
    monkeypatch.setenv("FASTNN_RELU_MASK", "0")
    assert fastnn.backend_info()["relu_mask"] is False
    monkeypatch.delenv("FASTNN_RELU_MASK")
    assert fastnn.backend_info()["relu_mask"] is True


def test_interleaved_medians_times_each_callable_in_turn(monkeypatch):
    """A warm-up round, then rounds that each run every callable over calls 0..calls-1; the median
    is per call, in seconds, of the rounds' times."""
    import torch

    calls = []
    clock = iter(range(1000))
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    fns = {n: (lambda n: lambda i: calls.append((n, i)))(n) for n in ("a", "b")}
    out = bench.interleaved_medians(fns, 3, 2, torch.device("cpu"))
    expect = [(n, i) for n in "ab" for i in range(3)]
    assert calls == expect * 3
    assert out == {"a": 1 / 3, "b": 1 / 3}  # each batch of 3 calls spans one clock tick
    with pytest.raises(ValueError, match="calls"):
        bench.interleaved_medians(fns, 0, 2)


def test_measure_gives_every_call_the_next_input_set(monkeypatch):
    """No call reads the inputs the call before it read, whichever implementation made it."""
    import torch

    calls = []

    def step(name):
        return lambda i: calls.append((name, i))

    monkeypatch.setattr(bench, "_process_warm", True)  # no extra warm-up calls
    names = ("fastnn", "torch", "reference")
    policy = bench.Policy(warmup=0, target_s=1e-4, min_reps=12, max_reps=12, min_reps_other=12)
    sets = 5
    out = bench.measure({n: step(n) for n in names}, sets, torch.device("cpu"), policy)
    assert all(out[n]["n"] == 12 for n in names)
    timed = calls[3:]  # after each implementation's first call
    assert len(timed) == 36
    for (_, a), (_, b) in zip(timed, timed[1:]):
        assert b == (a + 1) % sets
