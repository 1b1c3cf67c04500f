"""backend_info(), the compiled/reference choice, and the fallback when fastnn._C cannot load."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastnn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_backend_info():
    info = fastnn.backend_info()
    assert set(info) >= {"compiled", "devices", "reason", "torch", "built_against_torch",
                         "cuda_available"}
    assert info["compiled"] == fastnn.ops.available()
    assert isinstance(info["devices"], tuple)
    assert set(info["devices"]) <= {"cpu", "cuda"}
    assert info["torch"] == torch.__version__
    assert info["cuda_available"] == torch.cuda.is_available()
    for dev in ("cpu", "cuda"):
        assert fastnn.ops.has_kernel(dev) == (dev in info["devices"])
    if info["compiled"]:
        assert info["reason"] is None
        assert "cpu" in info["devices"]  # the CPU kernels are always built
        assert hasattr(torch.ops.fastnn, "batch_norm_train")
        built = info["built_against_torch"]
        if built is not None:
            assert built.split(".")[:2] == torch.__version__.split("+")[0].split(".")[:2]
    else:
        assert info["devices"] == ()
        assert isinstance(info["reason"], str) and info["reason"]


def test_use_kernel_follows_backend():
    x = torch.randn(2, 3)
    assert fastnn.functional.use_kernel(x) == fastnn.ops.has_kernel("cpu")
    assert not fastnn.functional.use_kernel(x.to(torch.int64))


def _run(code, env=None):
    """Runs `code` in a fresh interpreter from the repository root; returns its JSON result."""
    full_env = dict(os.environ)
    full_env.pop("FASTNN_BACKEND", None)
    full_env.update(env or {})
    full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


# A short check run inside the subprocess: module and fused module against torch, train + eval,
# outputs, running statistics, num_batches_tracked and gradients.
_CHECK = """
import json, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import fastnn
import torch
import torch.nn.functional as F
torch.manual_seed(0)
ok = True
for fast_cls in (fastnn.nn.BatchNorm2d, fastnn.nn.BatchNormAddReLU2d):
    fast = fast_cls(3).double()
    ref = torch.nn.BatchNorm2d(3).double()
    with torch.no_grad():
        fast.weight.normal_()
        fast.bias.normal_()
    ref.load_state_dict(fast.state_dict())
    for training in (True, True, False):
        fast.train(training)
        ref.train(training)
        x = torch.randn(4, 3, 5, 5, dtype=torch.float64).contiguous(
            memory_format=torch.channels_last)
        r = torch.randn_like(x)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        if fast_cls is fastnn.nn.BatchNorm2d:
            y1, y2 = fast(x1), ref(x2)
        else:
            y1, y2 = fast(x1, r), F.relu(ref(x2) + r)
        g = torch.randn_like(y1)
        y1.backward(g)
        y2.backward(g)
        ok &= torch.allclose(y1, y2, rtol=1e-10, atol=1e-10)
        ok &= y1.is_contiguous(memory_format=torch.channels_last)
        ok &= torch.allclose(x1.grad, x2.grad, rtol=1e-10, atol=1e-10)
        ok &= torch.allclose(fast.weight.grad, ref.weight.grad, rtol=1e-10, atol=1e-10)
        ok &= torch.allclose(fast.running_var, ref.running_var, rtol=1e-10, atol=1e-10)
        ok &= bool(fast.num_batches_tracked == ref.num_batches_tracked)
        fast.zero_grad()
        ref.zero_grad()
info = fastnn.backend_info()
print(json.dumps({
    "ok": bool(ok),
    "info": {k: (list(v) if isinstance(v, tuple) else v) for k, v in info.items()},
    "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
    "ops_registered": hasattr(torch.ops.fastnn, "batch_norm_train")
                      and fastnn.functional.use_kernel(torch.zeros(2, 2)),
}))
"""


def test_forced_reference_backend_subprocess():
    """FASTNN_BACKEND=reference: pure PyTorch path, same results as torch."""
    res, _ = _run(_CHECK, {"FASTNN_BACKEND": "reference"})
    assert res["ok"]
    assert res["info"]["compiled"] is False
    assert res["info"]["devices"] == []
    assert "FASTNN_BACKEND=reference" in res["info"]["reason"]
    assert not res["ops_registered"]


_BLOCK_C = """
import sys
sys.modules["fastnn._C"] = None  # any later import of fastnn._C raises ImportError
"""


def test_fallback_warning_when_extension_cannot_load():
    """A missing (unloadable) fastnn._C is a RuntimeWarning naming the reason, not an error, and
    everything still matches torch on the reference."""
    res, _ = _run(_BLOCK_C + _CHECK)
    assert res["ok"]
    assert res["info"]["compiled"] is False
    assert res["info"]["devices"] == []
    assert "fastnn._C could not be loaded" in res["info"]["reason"]
    assert len(res["warnings"]) == 1, res["warnings"]
    assert "fastnn._C could not be loaded" in res["warnings"][0]
    assert "reference" in res["warnings"][0]


def test_fallback_when_built_against_other_torch():
    code = """
import sys, types
info = types.ModuleType("fastnn._build_info")
info.TORCH_VERSION = "1.0.0"
sys.modules["fastnn._build_info"] = info
""" + _CHECK
    res, _ = _run(code)
    assert res["ok"]
    assert res["info"]["compiled"] is False
    assert "built against torch 1.0.0" in res["info"]["reason"]
    assert len(res["warnings"]) == 1 and "1.0.0" in res["warnings"][0]


def test_backend_environment_variable_values():
    code = "import json, fastnn; print(json.dumps(fastnn.backend_info()['compiled']))"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    bad = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env=dict(env, FASTNN_BACKEND="fastest"), timeout=240)
    assert bad.returncode != 0 and "FASTNN_BACKEND must be" in bad.stderr
    forced = subprocess.run([sys.executable, "-c", _BLOCK_C + code], cwd=ROOT,
                            capture_output=True, text=True,
                            env=dict(env, FASTNN_BACKEND="compiled"), timeout=240)
    assert forced.returncode != 0 and "FASTNN_BACKEND=compiled" in forced.stderr


@pytest.mark.skipif(not fastnn.ops.available(), reason="fastnn._C is not loaded")
def test_default_backend_uses_kernels_subprocess():
    res, _ = _run(_CHECK)
    assert res["ok"]
    assert res["info"]["compiled"] is True
    assert res["warnings"] == []
    assert res["ops_registered"]
