"""fastnn.nn batch-norm modules against torch.nn.BatchNorm{1,2,3}d (+ ReLU, + residual add)."""
import copy

import pytest
import torch
import torch.nn.functional as F

import fastnn
from helpers import (DTYPE_CASES, LAYOUTS, REDUCED, assert_close, is_channels_last, make_input,
                     param_dtype, torch_reduced_precision_is_exact)

# name: (fastnn class, torch class, layout, fused form)
MODULE_CASES = {
    "bn1d-2d": (fastnn.nn.BatchNorm1d, torch.nn.BatchNorm1d, "2d", None),
    "bn1d-3d": (fastnn.nn.BatchNorm1d, torch.nn.BatchNorm1d, "3d", None),
    "bn2d-nchw": (fastnn.nn.BatchNorm2d, torch.nn.BatchNorm2d, "nchw", None),
    "bn2d-nhwc": (fastnn.nn.BatchNorm2d, torch.nn.BatchNorm2d, "nhwc", None),
    "bn3d-ncdhw": (fastnn.nn.BatchNorm3d, torch.nn.BatchNorm3d, "ncdhw", None),
    "bn3d-ndhwc": (fastnn.nn.BatchNorm3d, torch.nn.BatchNorm3d, "ndhwc", None),
    "relu2d-nchw": (fastnn.nn.BatchNormReLU2d, torch.nn.BatchNorm2d, "nchw", "relu"),
    "relu2d-nhwc": (fastnn.nn.BatchNormReLU2d, torch.nn.BatchNorm2d, "nhwc", "relu"),
    "addrelu2d-nchw": (fastnn.nn.BatchNormAddReLU2d, torch.nn.BatchNorm2d, "nchw", "add_relu"),
    "addrelu2d-nhwc": (fastnn.nn.BatchNormAddReLU2d, torch.nn.BatchNorm2d, "nhwc", "add_relu"),
}


def _upcast(dtype, fused, device):
    """Whether PyTorch's side runs in float32 on float32 copies. In float16/bfloat16, PyTorch
    rounds between its batch norm and the residual add, and values within that rounding of zero
    can land on the other side of the ReLU; fastnn computes in float32 and rounds once. On CUDA
    always (helpers.torch_reduced_precision_is_exact)."""
    return dtype in REDUCED and (fused is not None
                                 or not torch_reduced_precision_is_exact(device))


def _randomize(module):
    """Non-trivial parameters and running statistics (keeping their dtypes)."""
    with torch.no_grad():
        if module.weight is not None:
            module.weight.copy_(torch.randn(module.weight.shape, dtype=torch.float64))
            module.bias.copy_(torch.randn(module.bias.shape, dtype=torch.float64))
        if module.running_mean is not None:
            module.running_mean.copy_(torch.randn(module.running_mean.shape) * 0.3)
            module.running_var.copy_(torch.rand(module.running_var.shape) + 0.5)
    return module


def _pair(fast_cls, torch_cls, C, device, dtype, torch_dtype=None, **kwargs):
    """A fastnn module and a torch module with the same state; the torch one in torch_dtype."""
    fast = _randomize(fast_cls(C, **kwargs).to(device=device, dtype=dtype))
    ref = torch_cls(C, **kwargs).to(device=device, dtype=torch_dtype or dtype)
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def _torch_forward(ref, x, residual, fused):
    y = ref(x)
    if residual is not None:
        y = y + residual
    if fused is not None:
        y = F.relu(y)
    return y


def _step(fast, ref, x, residual, fused, dtype, upcast):
    """One forward + backward of both modules on copies of x (and residual); compares the
    output, its layout and the input gradients."""
    xf = x.detach().clone().requires_grad_(True)
    xr = (x.detach().float() if upcast else x.detach().clone()).requires_grad_(True)
    rf = rr = None
    if residual is not None:
        rf = residual.detach().clone().requires_grad_(True)
        rr = (residual.detach().float() if upcast else residual.detach().clone()).requires_grad_(
            True)
    out = fast(xf) if residual is None else fast(xf, rf)
    exp = _torch_forward(ref, xr, rr, fused)
    assert out.dtype == x.dtype and out.shape == x.shape
    if is_channels_last(x) and not x.is_contiguous():
        assert is_channels_last(out)
    assert_close(out, exp, dtype, msg="output")
    g = torch.randn(x.shape, dtype=torch.float64).to(x.device, x.dtype)
    out.backward(g)
    exp.backward(g.to(exp.dtype))
    assert_close(xf.grad, xr.grad, dtype, grad=True, msg="grad input")
    if residual is not None:
        assert_close(rf.grad, rr.grad, dtype, grad=True, msg="grad residual")


def _check_state(fast, ref, dtype):
    for name in ("running_mean", "running_var"):
        a, b = getattr(fast, name), getattr(ref, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert_close(a, b, dtype, msg=name)
    if ref.num_batches_tracked is not None:
        assert fast.num_batches_tracked.item() == ref.num_batches_tracked.item()
        assert fast.num_batches_tracked.dtype == torch.long
    for name in ("weight", "bias"):
        a, b = getattr(fast, name), getattr(ref, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert (a.grad is None) == (b.grad is None), name
            if a.grad is not None:
                assert a.grad.dtype == a.dtype
                assert_close(a.grad, b.grad, dtype, grad=True, msg=f"grad {name}")


def _run_steps(fast, ref, shape, fmt, fused, dtype, device, modes, upcast):
    for training in modes:
        fast.train(training)
        ref.train(training)
        x = make_input(shape, dtype, device, fmt)
        r = make_input(shape, dtype, device, fmt, shift=0.0) if fused == "add_relu" else None
        _step(fast, ref, x, r, fused, dtype, upcast)
        _check_state(fast, ref, dtype)
        # Parameter gradients are compared per step: accumulated in bfloat16 they would cancel.
        fast.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)


@pytest.mark.parametrize("case", list(MODULE_CASES))
@pytest.mark.parametrize("dtype, half_params", DTYPE_CASES)
def test_module_matches_torch(backend, device, dtype, half_params, case):
    """Two training steps then one eval step: output, layout, running stats,
    num_batches_tracked and the gradients of input, residual, weight and bias."""
    fast_cls, torch_cls, layout, fused = MODULE_CASES[case]
    shape, fmt = LAYOUTS[layout]
    pdt = param_dtype(dtype, half_params)
    upcast = _upcast(dtype, fused, device)
    fast, ref = _pair(fast_cls, torch_cls, shape[1], device, pdt,
                      torch.float32 if upcast else pdt)
    assert isinstance(fast, torch_cls)
    _run_steps(fast, ref, shape, fmt, fused, dtype, device, (True, True, False), upcast)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(4, 64, 28, 28), (2, 256, 14, 14), (2, 480, 7, 7)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_layer_shapes(backend, device, dtype, shape, fmt):
    """ResNet-50 / DenseNet-121 / GoogLeNet-like layer shapes, BN and BN+add+ReLU."""
    for fast_cls, fused in ((fastnn.nn.BatchNorm2d, None),
                            (fastnn.nn.BatchNormAddReLU2d, "add_relu")):
        upcast = _upcast(dtype, fused, device)
        fast, ref = _pair(fast_cls, torch.nn.BatchNorm2d, shape[1], device,
                          param_dtype(dtype), torch.float32)
        _run_steps(fast, ref, shape, fmt, fused, dtype, device, (True, False), upcast)


@pytest.mark.parametrize("case", ["bn1d-3d", "bn2d-nchw", "bn2d-nhwc", "bn3d-ndhwc",
                                  "addrelu2d-nhwc"])
def test_momentum_none_cumulative_average(backend, device, case):
    fast_cls, torch_cls, layout, fused = MODULE_CASES[case]
    shape, fmt = LAYOUTS[layout]
    fast, ref = _pair(fast_cls, torch_cls, shape[1], device, torch.float64, momentum=None)
    _run_steps(fast, ref, shape, fmt, fused, torch.float64, device,
               (True, True, True, False, True, False), False)
    assert fast.num_batches_tracked.item() == 4


@pytest.mark.parametrize("momentum, eps", [(0.0, 1e-5), (0.3, 1e-3), (1.0, 0.1)])
def test_momentum_and_eps(backend, device, momentum, eps):
    fast, ref = _pair(fastnn.nn.BatchNormReLU2d, torch.nn.BatchNorm2d, 5, device, torch.float64,
                      momentum=momentum, eps=eps)
    _run_steps(fast, ref, (4, 5, 6, 7), torch.contiguous_format, "relu", torch.float64, device,
               (True, True, False), False)


@pytest.mark.parametrize("case", ["bn1d-2d", "bn2d-nhwc", "bn3d-ncdhw", "relu2d-nchw",
                                  "addrelu2d-nhwc"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_no_running_stats(backend, device, dtype, case):
    """track_running_stats=False: no buffers, batch statistics in train and in eval."""
    fast_cls, torch_cls, layout, fused = MODULE_CASES[case]
    shape, fmt = LAYOUTS[layout]
    fast, ref = _pair(fast_cls, torch_cls, shape[1], device, dtype, track_running_stats=False)
    assert fast.running_mean is None and fast.running_var is None
    assert fast.num_batches_tracked is None
    _run_steps(fast, ref, shape, fmt, fused, dtype, device, (True, False, True, False), False)


@pytest.mark.parametrize("case", ["bn1d-3d", "bn2d-nchw", "bn2d-nhwc", "relu2d-nhwc",
                                  "addrelu2d-nchw", "bn3d-ndhwc"])
@pytest.mark.parametrize("track", [True, False], ids=["track", "notrack"])
@pytest.mark.parametrize("dtype, half_params", [DTYPE_CASES[0], DTYPE_CASES[1], DTYPE_CASES[2]])
def test_affine_false(backend, device, dtype, half_params, track, case):
    fast_cls, torch_cls, layout, fused = MODULE_CASES[case]
    shape, fmt = LAYOUTS[layout]
    upcast = _upcast(dtype, fused, device)
    fast, ref = _pair(fast_cls, torch_cls, shape[1], device, param_dtype(dtype, half_params),
                      torch.float32 if upcast else None, affine=False, track_running_stats=track)
    assert fast.weight is None and fast.bias is None
    _run_steps(fast, ref, shape, fmt, fused, dtype, device, (True, False), upcast)


def test_eval_without_buffers_uses_batch_stats(backend, device):
    """Like torch: buffers set to None after construction -> batch statistics in eval."""
    fast, ref = _pair(fastnn.nn.BatchNorm2d, torch.nn.BatchNorm2d, 3, device, torch.float64)
    for m in (fast, ref):
        m.running_mean = None
        m.running_var = None
    _run_steps(fast, ref, (4, 3, 5, 5), torch.contiguous_format, None, torch.float64, device,
               (False, True), False)


@pytest.mark.parametrize("case", ["bn1d-2d", "bn2d-nchw", "bn2d-nhwc", "bn3d-ncdhw",
                                  "relu2d-nchw", "addrelu2d-nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_empty_batch(backend, device, dtype, case):
    """N=0: works, running stats unchanged, num_batches_tracked counted as torch counts it."""
    fast_cls, torch_cls, layout, fused = MODULE_CASES[case]
    shape, fmt = LAYOUTS[layout]
    shape = (0,) + shape[1:]
    fast, ref = _pair(fast_cls, torch_cls, shape[1], device, param_dtype(dtype),
                      torch.float32)
    rm0, rv0 = fast.running_mean.clone(), fast.running_var.clone()
    for training in (True, False):
        fast.train(training)
        ref.train(training)
        x = make_input(shape, dtype, device, fmt).requires_grad_(True)
        r = torch.zeros_like(x) if fused == "add_relu" else None
        out = fast(x) if r is None else fast(x, r)
        exp = _torch_forward(ref, x.detach().float(), r if r is None else r.float(), fused)
        assert out.shape == exp.shape and out.dtype == dtype
        out.sum().backward()
        assert x.grad.shape == x.shape
        assert torch.equal(fast.running_mean, rm0) and torch.equal(fast.running_var, rv0)
        assert fast.num_batches_tracked.item() == ref.num_batches_tracked.item()
        assert torch.count_nonzero(fast.weight.grad) == 0
        assert torch.count_nonzero(fast.bias.grad) == 0
    assert fast.num_batches_tracked.item() == 1


# ---------------------------------------------------------------------------------------------
# Drop-in: class hierarchy, state_dict, checkpoints

ALL_CLASSES = {
    fastnn.nn.BatchNorm1d: torch.nn.BatchNorm1d,
    fastnn.nn.BatchNorm2d: torch.nn.BatchNorm2d,
    fastnn.nn.BatchNorm3d: torch.nn.BatchNorm3d,
    fastnn.nn.BatchNormReLU2d: torch.nn.BatchNorm2d,
    fastnn.nn.BatchNormAddReLU2d: torch.nn.BatchNorm2d,
}
CLASS_IDS = [c.__name__ for c in ALL_CLASSES]


@pytest.mark.parametrize("fast_cls", list(ALL_CLASSES), ids=CLASS_IDS)
@pytest.mark.parametrize("kwargs", [{}, {"affine": False}, {"track_running_stats": False},
                                    {"momentum": None, "eps": 1e-3}], ids=str)
def test_state_dict_matches_torch(fast_cls, kwargs):
    torch_cls = ALL_CLASSES[fast_cls]
    fast, ref = fast_cls(6, **kwargs), torch_cls(6, **kwargs)
    assert isinstance(fast, torch_cls)
    assert isinstance(fast, torch.nn.modules.batchnorm._BatchNorm)
    sd_fast, sd_ref = fast.state_dict(), ref.state_dict()
    assert list(sd_fast) == list(sd_ref)
    assert sd_fast._metadata[""]["version"] == sd_ref._metadata[""]["version"]
    assert fast._version == ref._version
    for k in sd_ref:
        assert sd_fast[k].dtype == sd_ref[k].dtype and sd_fast[k].shape == sd_ref[k].shape
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in fast.named_buffers()] == [n for n, _ in ref.named_buffers()]
    assert fast.extra_repr() == ref.extra_repr()


@pytest.mark.parametrize("fast_cls", [fastnn.nn.BatchNorm2d, fastnn.nn.BatchNormReLU2d,
                                      fastnn.nn.BatchNormAddReLU2d],
                         ids=lambda c: c.__name__)
def test_torchvision_state_dict_round_trip(fast_cls):
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))  # non-default running statistics
    bn = model.layer1[0].bn2
    sd = bn.state_dict()
    fast = fast_cls(bn.num_features)
    fast.load_state_dict(sd, strict=True)
    for k, v in sd.items():
        assert torch.equal(fast.state_dict()[k], v), k
    # and back into torchvision's module
    fast_sd = copy.deepcopy(fast.state_dict())
    with torch.no_grad():
        fast_sd["running_mean"].add_(1.0)
    bn.load_state_dict(fast_sd, strict=True)
    assert torch.equal(bn.running_mean, fast_sd["running_mean"])
    # a whole block's state dict into a copy where every BN is fastnn's
    block = model.layer1[0]
    fast_block = copy.deepcopy(block)
    fast_block.bn1 = fastnn.nn.BatchNormReLU2d(bn.num_features)
    fast_block.bn2 = fast_cls(bn.num_features)
    fast_block.load_state_dict(block.state_dict(), strict=True)
    block.load_state_dict(fast_block.state_dict(), strict=True)


def test_old_checkpoint_without_num_batches_tracked():
    """A version-1 state dict (no num_batches_tracked) loads as it does into torch's module."""
    sd = torch.nn.BatchNorm2d(4).state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1
    fast, ref = fastnn.nn.BatchNorm2d(4), torch.nn.BatchNorm2d(4)
    fast.load_state_dict(sd, strict=True)
    ref.load_state_dict(sd, strict=True)
    assert torch.equal(fast.num_batches_tracked, ref.num_batches_tracked)


@pytest.mark.parametrize("fast_cls", list(ALL_CLASSES), ids=CLASS_IDS)
def test_from_module(backend, device, fast_cls):
    torch_cls = ALL_CLASSES[fast_cls]
    ref = _randomize(torch_cls(3, momentum=0.2, eps=1e-3)).to(device=device, dtype=torch.float64)
    fast = fast_cls.from_module(ref)
    assert type(fast) is fast_cls
    assert fast.weight is ref.weight and fast.running_mean is ref.running_mean
    assert fast.eps == ref.eps and fast.momentum == ref.momentum
    shape = {torch.nn.BatchNorm1d: (4, 3, 5), torch.nn.BatchNorm2d: (4, 3, 5, 5),
             torch.nn.BatchNorm3d: (2, 3, 3, 3, 3)}[torch_cls]
    x = make_input(shape, torch.float64, device)
    r = make_input(shape, torch.float64, device, shift=0.0)
    ref.eval()
    fast.eval()
    out = fast(x, r) if fast_cls is fastnn.nn.BatchNormAddReLU2d else fast(x)
    exp = ref(x)
    if fast_cls is fastnn.nn.BatchNormAddReLU2d:
        exp = F.relu(exp + r)
    elif fast_cls is fastnn.nn.BatchNormReLU2d:
        exp = F.relu(exp)
    assert_close(out, exp, torch.float64)


def test_torchscript():
    """torch.jit.script takes fastnn's BatchNorm1d/2d/3d as their torch counterparts (shared
    parameters and buffers: the same outputs and running statistics); the fused modules raise an
    error that says what works instead."""
    import warnings

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), fastnn.nn.BatchNorm2d(4),
                                torch.nn.ReLU())
    ref = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation warnings
        scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(scripted(x), ref(x))
    torch.testing.assert_close(model[1].running_mean, ref[1].running_mean)
    assert model[1].num_batches_tracked.item() == 1
    scripted.eval()
    ref.eval()
    torch.testing.assert_close(scripted(x), ref(x))
    with pytest.raises(RuntimeError,
                       match="BatchNormReLU2d cannot be compiled by torch.jit.script"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.script(fastnn.nn.BatchNormReLU2d(4))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_jit_trace_and_export(training):
    """torch.jit.trace and torch.export take the fused modules and the dual form: the same
    outputs and running statistics as the eager modules."""
    import warnings

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
            self.bn_relu = fastnn.nn.BatchNormReLU2d(4)
            self.bn_add = fastnn.nn.BatchNormAddReLU2d(4)
            self.bn_ds = fastnn.nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn_relu(self.conv(x))
            return fastnn.nn.dual_bn_add_relu(self.bn_add, self.conv(y), self.bn_ds, x)

    torch.manual_seed(0)
    model = Block().train(training)
    x = torch.randn(2, 4, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced_model = copy.deepcopy(model)
        traced = torch.jit.trace(traced_model, x, check_trace=False)
    exported = torch.export.export(copy.deepcopy(model), (x,)).module()
    twice = copy.deepcopy(model)
    twice(x)  # tracing ran the model once
    expected = model(x)
    torch.testing.assert_close(traced(x), expected)
    torch.testing.assert_close(exported(x), expected)
    torch.testing.assert_close(twice(x), expected)
    for name in ("bn_relu", "bn_add", "bn_ds"):  # the trace updates the running statistics too
        torch.testing.assert_close(getattr(traced_model, name).running_mean,
                                   getattr(twice, name).running_mean)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bn_add_relu_function(backend, device, training):
    """fastnn.nn.bn_add_relu(bn, x, r): torch's relu(bn(x) + r) (outputs, gradients, running
    statistics) with bn left a plain batch norm; a hook on bn sees its own call; a module that
    is not a fastnn batch norm (what folding leaves) is called as it is."""
    x = make_input((3, 4, 5, 5), torch.float64, device)
    r = make_input((3, 4, 5, 5), torch.float64, device, shift=0.0)
    fast = fastnn.nn.BatchNorm2d(4).to(device, torch.float64).train(training)
    ref = torch.nn.BatchNorm2d(4).to(device, torch.float64).train(training)
    with torch.no_grad():
        fast.weight.uniform_(0.5, 1.5)
        fast.running_var.uniform_(0.5, 1.5)
    ref.load_state_dict(fast.state_dict())
    results = []
    for fn in (lambda a, b: fastnn.nn.bn_add_relu(fast, a, b),
               lambda a, b: torch.relu(ref(a) + b)):
        a, b = x.clone().requires_grad_(), r.clone().requires_grad_()
        out = fn(a, b)
        out.backward(torch.cos(out))
        results.append((out, a.grad, b.grad))
    for got, want in zip(*results):
        assert_close(got, want, torch.float64, grad=True)
    for key, value in ref.state_dict().items():
        assert_close(fast.state_dict()[key].double(), value.double(), torch.float64, msg=key)
    seen = []
    fast.register_forward_hook(lambda m, i, o: seen.append(o))
    out = fastnn.nn.bn_add_relu(fast, x, r)
    assert len(seen) == 1 and (seen[0] < 0).any()  # the batch norm's own output, before ReLU
    assert_close(out, torch.relu(seen[0] + r), torch.float64)
    assert_close(fastnn.nn.bn_add_relu(torch.nn.Identity(), x, r), torch.relu(x + r),
                 torch.float64)


class _Exp(torch.nn.Module):
    def forward(self, w):
        return w.exp()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fast_cls", [fastnn.nn.BatchNorm2d, fastnn.nn.BatchNormReLU2d])
def test_parametrized_weight(backend, device, fast_cls, training):
    """torch.nn.utils.parametrize on weight and bias (they become computed attributes): the
    values torch's batch norm uses, and gradients reach the parametrizations' originals."""
    from torch.nn.utils import parametrize

    x = make_input((3, 4, 5, 5), torch.float64, device)
    ref = torch.nn.BatchNorm2d(4).to(device, torch.float64)
    with torch.no_grad():
        ref.weight.uniform_(-1, 1)
        ref.bias.uniform_(-1, 1)
    fast = fast_cls(4).to(device, torch.float64)
    fast.load_state_dict(ref.state_dict())
    results = []
    for m, post in ((fast, lambda y: y),
                    (ref, torch.relu if fast_cls is fastnn.nn.BatchNormReLU2d else lambda y: y)):
        parametrize.register_parametrization(m, "weight", _Exp())
        parametrize.register_parametrization(m, "bias", _Exp())
        m.train(training)
        out = post(m(x))
        out.backward(torch.cos(out))
        results.append((out, m.parametrizations.weight.original.grad,
                        m.parametrizations.bias.original.grad, m.running_mean, m.running_var))
    for got, want in zip(*results):
        assert_close(got, want, torch.float64, grad=True)
