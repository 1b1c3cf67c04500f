"""Every bad input raises the error PyTorch raises (same type), with a message that names the
argument, and a failed call changes no running statistic and no num_batches_tracked."""
import copy

import pytest
import torch

import fastnn
from helpers import HAS_CUDA, make_input, make_params

FN = fastnn.functional.batch_norm

OTHER_DEVICES = [
    pytest.param("meta", id="meta"),
    pytest.param("cuda", id="cuda", marks=[
        pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]),
]


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()
            if v.device.type != "meta"}


def _assert_unchanged(module, before):
    after = _snapshot(module)
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed by a failed call"


def _call(module, x, residual=None):
    return module(x) if residual is None else module(x, residual)


def _module(cls, C, device, training=True, **kwargs):
    m = cls(C, **kwargs).to(device)
    with torch.no_grad():
        if m.running_mean is not None:
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 1.5)
    return m.train(training)


# (fastnn class, input shape, needs residual, error type, message pattern)
RANK_CASES = [
    (fastnn.nn.BatchNorm1d, (2, 3, 4, 4), ValueError, r"expected 2D or 3D input \(got 4D input\)"),
    (fastnn.nn.BatchNorm1d, (3,), ValueError, r"expected 2D or 3D input \(got 1D input\)"),
    (fastnn.nn.BatchNorm2d, (2, 3, 4), ValueError, r"expected 4D input \(got 3D input\)"),
    (fastnn.nn.BatchNorm2d, (2, 3, 4, 4, 4), ValueError, r"expected 4D input \(got 5D input\)"),
    (fastnn.nn.BatchNorm3d, (2, 3, 4, 4), ValueError, r"expected 5D input \(got 4D input\)"),
    (fastnn.nn.BatchNormReLU2d, (2, 3), ValueError, r"expected 4D input \(got 2D input\)"),
    (fastnn.nn.BatchNormAddReLU2d, (2, 3, 4), ValueError, r"expected 4D input \(got 3D input\)"),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cls, shape, exc, match", RANK_CASES,
                         ids=lambda v: v.__name__ if isinstance(v, type) else None)
def test_module_wrong_rank(backend, device, cls, shape, exc, match, training):
    m = _module(cls, 3, device, training)
    before = _snapshot(m)
    x = torch.randn(shape, device=device)
    ref = {fastnn.nn.BatchNorm1d: torch.nn.BatchNorm1d,
           fastnn.nn.BatchNorm3d: torch.nn.BatchNorm3d}.get(cls, torch.nn.BatchNorm2d)
    with pytest.raises(exc) as torch_err:
        ref(3).to(device).train(training)(x)
    with pytest.raises(exc, match=match) as err:
        _call(m, x, torch.randn_like(x) if cls is fastnn.nn.BatchNormAddReLU2d else None)
    assert str(err.value) == str(torch_err.value)
    _assert_unchanged(m, before)


def test_functional_wrong_rank(backend, device):
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    for training in (True, False):
        with pytest.raises(ValueError, match="input must have at least 2 dimensions"):
            FN(torch.randn(3, device=device), rm, rv, training=training)
        with pytest.raises(ValueError, match="input"):
            FN(torch.tensor(1.0, device=device), rm, rv, training=training)
    assert torch.equal(rm, torch.zeros(3, device=device))


MODULE_CLASSES = [fastnn.nn.BatchNorm2d, fastnn.nn.BatchNormReLU2d, fastnn.nn.BatchNormAddReLU2d]
CLASS_IDS = [c.__name__ for c in MODULE_CLASSES]


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cls", MODULE_CLASSES, ids=CLASS_IDS)
def test_module_channel_mismatch(backend, device, cls, training, affine):
    m = _module(cls, 3, device, training, affine=affine)
    before = _snapshot(m)
    x = torch.randn(2, 4, 5, 5, device=device)
    with pytest.raises(RuntimeError):
        torch.nn.BatchNorm2d(3, affine=affine).to(device).train(training)(x)
    arg = "weight" if affine else "running_mean"
    with pytest.raises(RuntimeError, match=rf"{arg} must be a 1-D tensor with one element per "
                                           rf"channel \(4\), got size \(3,\)"):
        _call(m, x, torch.randn_like(x) if cls is fastnn.nn.BatchNormAddReLU2d else None)
    _assert_unchanged(m, before)


def test_channel_count_free_without_params(backend, device):
    """affine=False, track_running_stats=False: no per-channel tensor, so any C works (as in
    torch)."""
    m = fastnn.nn.BatchNorm2d(3, affine=False, track_running_stats=False).to(device)
    x = torch.randn(2, 4, 5, 5, device=device)
    ref = torch.nn.BatchNorm2d(3, affine=False, track_running_stats=False).to(device)
    torch.testing.assert_close(m(x), ref(x))


@pytest.mark.parametrize("cls, shape", [
    (fastnn.nn.BatchNorm1d, (1, 3)), (fastnn.nn.BatchNorm1d, (1, 3, 1)),
    (fastnn.nn.BatchNorm2d, (1, 3, 1, 1)), (fastnn.nn.BatchNormReLU2d, (1, 3, 1, 1)),
    (fastnn.nn.BatchNormAddReLU2d, (1, 3, 1, 1)), (fastnn.nn.BatchNorm3d, (1, 3, 1, 1, 1)),
], ids=lambda v: v.__name__ if isinstance(v, type) else str(v))
def test_module_one_value_per_channel(backend, device, cls, shape):
    m = _module(cls, 3, device)
    before = _snapshot(m)
    x = torch.randn(shape, device=device)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        _call(m, x, torch.randn_like(x) if cls is fastnn.nn.BatchNormAddReLU2d else None)
    _assert_unchanged(m, before)  # (torch counts the batch before it raises; fastnn does not)
    # eval, and N=1 with more than one value per channel, are fine
    m.eval()
    _call(m, x, torch.randn_like(x) if cls is fastnn.nn.BatchNormAddReLU2d else None)
    m.train()
    if len(shape) > 2:
        x = torch.randn((1, 3) + (2,) * (len(shape) - 2), device=device)
        _call(m, x, torch.randn_like(x) if cls is fastnn.nn.BatchNormAddReLU2d else None)


@pytest.mark.parametrize("training, eps", [(True, 0.0), (True, -1e-5), (False, -1e-5)],
                         ids=["train-zero", "train-negative", "eval-negative"])
@pytest.mark.parametrize("cls", MODULE_CLASSES, ids=CLASS_IDS)
def test_module_bad_eps(backend, device, cls, training, eps):
    m = _module(cls, 3, device, training, eps=eps)
    before = _snapshot(m)
    x = torch.randn(2, 3, 4, 4, device=device)
    msg = "must be positive during training" if training else "must be non-negative"
    with pytest.raises(ValueError, match=rf"eps {msg}, but got {eps}"):
        _call(m, x, torch.randn_like(x) if cls is fastnn.nn.BatchNormAddReLU2d else None)
    _assert_unchanged(m, before)


@pytest.mark.parametrize("arg", ["running_mean", "running_var"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cls", MODULE_CLASSES, ids=CLASS_IDS)
def test_running_stats_requiring_grad(backend, device, cls, training, arg):
    """With grad mode on, torch refuses running statistics that require grad (they are not
    differentiable): so does fastnn, changing nothing; under no_grad both accept them."""
    x = torch.randn(2, 3, 4, 4, device=device)
    r = torch.randn_like(x) if cls is fastnn.nn.BatchNormAddReLU2d else None
    ref = torch.nn.BatchNorm2d(3).to(device).train(training)
    getattr(ref, arg).requires_grad_(True)
    with pytest.raises(RuntimeError, match=f"not differentiable with respect to argument '{arg}'"):
        ref(x)
    m = _module(cls, 3, device, training)
    getattr(m, arg).requires_grad_(True)
    before = _snapshot(m)
    with pytest.raises(RuntimeError, match=f"not differentiable with respect to argument '{arg}'"):
        _call(m, x, r)
    _assert_unchanged(m, before)
    with torch.no_grad():
        _call(m, x, r)
        ref(x)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool,
                                   torch.complex64], ids=str)
@pytest.mark.parametrize("cls", MODULE_CLASSES, ids=CLASS_IDS)
def test_module_non_float_input(backend, device, cls, dtype):
    m = _module(cls, 3, device)
    before = _snapshot(m)
    x = torch.ones(2, 3, 4, 4, device=device).to(dtype)
    with pytest.raises(NotImplementedError, match="input must be float32, float64, float16 or "
                                                  "bfloat16, got torch"):
        _call(m, x, x.clone() if cls is fastnn.nn.BatchNormAddReLU2d else None)
    _assert_unchanged(m, before)


# input dtype, parameter dtype
DTYPE_MISMATCH = [
    (torch.float64, torch.float32), (torch.float32, torch.float64), (torch.float32,
                                                                      torch.bfloat16),
    (torch.bfloat16, torch.float64), (torch.float16, torch.bfloat16),
    (torch.bfloat16, torch.float16),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("in_dtype, p_dtype", DTYPE_MISMATCH, ids=str)
@pytest.mark.parametrize("cls", MODULE_CLASSES, ids=CLASS_IDS)
def test_module_dtype_mismatch(backend, device, cls, in_dtype, p_dtype, training):
    m = _module(cls, 3, device, training).to(p_dtype)
    before = _snapshot(m)
    x = torch.randn(2, 3, 4, 4, device=device, dtype=in_dtype)
    with pytest.raises(RuntimeError, match=rf"weight has dtype {p_dtype} but input has dtype "
                                           rf"{in_dtype}"):
        _call(m, x, torch.randn_like(x) if cls is fastnn.nn.BatchNormAddReLU2d else None)
    _assert_unchanged(m, before)


@pytest.mark.parametrize("arg", ["weight", "bias", "running_mean", "running_var"])
def test_functional_dtype_mismatch_names_argument(backend, device, arg):
    x = make_input((2, 3, 4, 4), torch.float64, device)
    params = dict(zip(("weight", "bias", "running_mean", "running_var"),
                      make_params(3, torch.float64, device)))
    params[arg] = params[arg].float()
    rm0, rv0 = params["running_mean"].clone(), params["running_var"].clone()
    for training in (True, False):
        with pytest.raises(RuntimeError, match=rf"{arg} has dtype torch.float32 but input has "
                                               rf"dtype torch.float64"):
            FN(x, params["running_mean"], params["running_var"], params["weight"],
               params["bias"], training)
        assert torch.equal(params["running_mean"], rm0)
        assert torch.equal(params["running_var"], rv0)


@pytest.mark.parametrize("arg", ["weight", "bias", "running_mean", "running_var"])
def test_functional_size_mismatch_names_argument(backend, device, arg):
    x = make_input((2, 3, 4, 4), torch.float32, device)
    params = dict(zip(("weight", "bias", "running_mean", "running_var"),
                      make_params(3, torch.float32, device)))
    rm0, rv0 = params["running_mean"].clone(), params["running_var"].clone()
    for bad in (params[arg][:2].clone(), params[arg].reshape(3, 1).clone(),
                params[arg].new_ones(())):
        p = dict(params, **{arg: bad})
        for training in (True, False):
            with pytest.raises(RuntimeError, match=rf"{arg} must be a 1-D tensor with one "
                                                   rf"element per channel \(3\)"):
                FN(x, p["running_mean"], p["running_var"], p["weight"], p["bias"], training)
            assert torch.equal(params["running_mean"], rm0)
            assert torch.equal(params["running_var"], rv0)


@pytest.mark.parametrize("other", OTHER_DEVICES)
@pytest.mark.parametrize("arg", ["weight", "bias", "running_mean", "running_var"])
def test_functional_device_mismatch(cpu_backend, arg, other):
    """CPU input with one argument on another device."""
    x = make_input((2, 3, 4, 4), torch.float32, "cpu")
    params = dict(zip(("weight", "bias", "running_mean", "running_var"),
                      make_params(3, torch.float32, "cpu")))
    rm0, rv0 = params["running_mean"].clone(), params["running_var"].clone()
    params[arg] = params[arg].to(other)
    for training in (True, False):
        with pytest.raises(RuntimeError, match=rf"{arg} is on {other}\S* but input is on cpu"):
            FN(x, params["running_mean"], params["running_var"], params["weight"],
               params["bias"], training)
    for name, before in (("running_mean", rm0), ("running_var", rv0)):
        if name != arg:
            assert torch.equal(params[name], before)


@pytest.mark.parametrize("other", OTHER_DEVICES)
@pytest.mark.parametrize("cls", MODULE_CLASSES, ids=CLASS_IDS)
def test_module_params_on_other_device(cpu_backend, cls, other):
    """A CPU input with the module's weight (then its buffers) on another device."""
    m = _module(cls, 3, "cpu")
    with torch.no_grad():
        m.weight = torch.nn.Parameter(m.weight.to(other))
    before = _snapshot(m)
    x = torch.randn(2, 3, 4, 4)
    r = torch.randn_like(x) if cls is fastnn.nn.BatchNormAddReLU2d else None
    with pytest.raises(RuntimeError, match=rf"weight is on {other}\S* but input is on cpu"):
        _call(m, x, r)
    _assert_unchanged(m, before)
    m = _module(cls, 3, other)  # the whole module elsewhere
    before = _snapshot(m)  # (meta tensors hold no values to compare)
    with pytest.raises(RuntimeError, match=rf"is on {other}\S* but input is on cpu"):
        _call(m, x, r)
    _assert_unchanged(m, before)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_residual_mismatch(backend, device, training):
    """The functional op's residual must be like the input. The module stands for
    relu(bn(x) + residual): a residual that broadcasts, or of another dtype, gets torch's
    broadcasting and type promotion; sizes that do not broadcast and another device raise before
    anything changes."""
    m = _module(fastnn.nn.BatchNormAddReLU2d, 3, device, training)
    before = _snapshot(m)
    x = torch.randn(2, 3, 4, 4, device=device)
    module_bad = {
        "size": (torch.randn(2, 3, 4, 5, device=device),
                 r"residual of size \(2, 3, 4, 5\) does not broadcast with the input's size"),
        "device": (torch.randn(2, 3, 4, 4, device="meta"),
                   r"residual is on meta but input is on " + device),
    }
    for name, (r, match) in module_bad.items():
        with pytest.raises(RuntimeError, match=match):
            m(x, r)
        _assert_unchanged(m, before)
    for r in (torch.randn(1, 3, 1, 1, device=device),
              torch.randn(2, 3, 4, 4, device=device, dtype=torch.float64),
              torch.randn(2, 3, 4, 4, device=device).half()):
        ref = torch.nn.BatchNorm2d(3).to(device).train(training)
        ref.load_state_dict(m.state_dict())
        mc = copy.deepcopy(m)
        expected = torch.relu(ref(x) + r)
        got = mc(x, r)
        assert got.dtype == expected.dtype
        # The batch norm runs in float32 whatever the residual's dtype: float32's tolerance.
        torch.testing.assert_close(got, expected, rtol=1.3e-6, atol=1e-5)
        torch.testing.assert_close(mc.running_mean, ref.running_mean)
        torch.testing.assert_close(mc.running_var, ref.running_var)
    bad = {
        "size": (torch.randn(2, 3, 4, 5, device=device), r"residual must have the input's size"),
        "broadcastable": (torch.randn(1, 3, 1, 1, device=device),
                          r"residual must have the input's size"),
        "dtype": (torch.randn(2, 3, 4, 4, device=device, dtype=torch.float64),
                  r"residual has dtype torch.float64 but input has dtype torch.float32"),
        "half": (torch.randn(2, 3, 4, 4, device=device).half(),
                 r"residual has dtype torch.float16 but input has dtype torch.float32"),
        "device": (torch.randn(2, 3, 4, 4, device="meta"),
                   r"residual is on meta but input is on " + device),
    }
    for name, (r, match) in bad.items():
        rm, rv = m.running_mean.clone(), m.running_var.clone()
        with pytest.raises(RuntimeError, match=match):
            FN(x, rm, rv, m.weight, m.bias, training, residual=r, relu=True)
        assert torch.equal(rm, m.running_mean) and torch.equal(rv, m.running_var)


def test_functional_eval_needs_running_stats(backend, device):
    x = torch.randn(2, 3, 4, 4, device=device)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    with pytest.raises(RuntimeError, match="running_mean must be defined in evaluation mode"):
        FN(x, None, None, training=False)
    with pytest.raises(RuntimeError, match="running_mean must be defined in evaluation mode"):
        FN(x, None, rv, training=False)
    with pytest.raises(RuntimeError, match="running_var must be defined in evaluation mode"):
        FN(x, rm, None, training=False)
    assert torch.equal(rm, torch.zeros(3, device=device))
    # like torch: training without running statistics is fine
    FN(x, None, None, training=True)


def test_functional_bad_eps_and_batch(backend, device):
    x = torch.randn(2, 3, 4, 4, device=device)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    with pytest.raises(ValueError, match="eps must be positive during training, but got 0.0"):
        FN(x, rm, rv, training=True, eps=0.0)
    with pytest.raises(ValueError, match="eps must be non-negative, but got -0.001"):
        FN(x, rm, rv, training=False, eps=-1e-3)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        FN(x[:1, :, :1, :1], rm, rv, training=True)
    assert torch.equal(rm, torch.zeros(3, device=device))
    assert torch.equal(rv, torch.ones(3, device=device))
    with pytest.raises(TypeError, match="input must be a Tensor"):
        FN([[1.0, 2.0]], rm, rv)


# ---------------------------------------------------------------------------------------------
# The ops themselves: bad arguments raise a Python exception (never a crash), naming the argument.

OP_ERRORS = (RuntimeError, ValueError, NotImplementedError, TypeError, IndexError)


def _train_args(device, **over):
    x = make_input((2, 3, 4, 4), torch.float32, device)
    w, b, rm, rv = make_params(3, torch.float32, device)
    args = dict(input=x, weight=w, bias=b, running_mean=rm, running_var=rv, momentum=0.1,
                eps=1e-5, residual=None, relu=False)
    args.update(over)
    return args


def _bad_train_cases(device):
    x = make_input((2, 3, 4, 4), torch.float32, device)
    w = torch.ones(3, device=device)
    return {
        "rank1": (dict(input=torch.randn(3, device=device)), "input"),
        "int": (dict(input=torch.ones(2, 3, 4, 4, dtype=torch.int32, device=device)), "input"),
        "weight-size": (dict(weight=torch.ones(4, device=device)), "weight"),
        "weight-2d": (dict(weight=torch.ones(3, 1, device=device)), "weight"),
        "weight-dtype": (dict(weight=w.double()), "weight"),
        "weight-meta": (dict(weight=torch.ones(3, device="meta")), "weight"),
        "bias-size": (dict(bias=torch.ones(2, device=device)), "bias"),
        "rm-size": (dict(running_mean=torch.zeros(5, device=device)), "running_mean"),
        "rv-dtype": (dict(running_var=torch.ones(3, device=device, dtype=torch.float16)),
                     "running_var"),
        "residual-size": (dict(residual=x[:, :, :2]), "residual"),
        "residual-dtype": (dict(residual=x.double()), "residual"),
        "eps-zero": (dict(eps=0.0), "eps"),
        "eps-negative": (dict(eps=-1.0), "eps"),
        "one-value": (dict(input=x[:1, :, :1, :1]), "value per channel"),
    }


@pytest.mark.parametrize("op", ["train", "eval"])
def test_op_bad_args(kernel_only, op):
    device = kernel_only
    for name, (over, arg) in _bad_train_cases(device).items():
        if op == "eval" and name in ("one-value", "eps-zero"):
            continue  # fine in eval
        args = _train_args(device, **over)
        rm0, rv0 = args["running_mean"].clone(), args["running_var"].clone()
        with pytest.raises(OP_ERRORS, match=arg):
            if op == "train":
                torch.ops.fastnn.batch_norm_train(*args.values())
            else:
                del args["momentum"]
                torch.ops.fastnn.batch_norm_eval(*args.values())
        if args["running_mean"].device.type != "meta" and args["running_mean"].shape == (3,):
            assert torch.equal(args["running_mean"], rm0.to(args["running_mean"].dtype)), name
        if args["running_var"].shape == (3,) and args["running_var"].dtype == torch.float32:
            assert torch.equal(args["running_var"], rv0), name


def test_op_bad_backward_args(kernel_only):
    device = kernel_only
    x = make_input((2, 3, 4, 4), torch.float32, device)
    w = torch.ones(3, device=device)
    out, mean, invstd = torch.ops.fastnn.batch_norm_train(x, w, None, None, None, 0.1, 1e-5,
                                                          None, True)
    g = torch.randn_like(out)
    good = dict(grad_output=g, input=x, weight=w, output=out, mean=mean, invstd=invstd,
                training=True, relu=True, residual_grad=False)
    torch.ops.fastnn.batch_norm_backward(*good.values())
    cases = {
        "grad-size": (dict(grad_output=g[:, :, :2]), "grad_output"),
        "grad-dtype": (dict(grad_output=g.double()), "grad_output"),
        "input-rank": (dict(input=torch.randn(3, device=device)), "input"),
        "weight-size": (dict(weight=torch.ones(4, device=device)), "weight"),
        "mean-dtype": (dict(mean=mean.double()), "mean"),
        "mean-size": (dict(mean=mean[:2]), "mean"),
        "invstd-size": (dict(invstd=invstd.repeat(2)), "invstd"),
        "invstd-meta": (dict(invstd=torch.ones(3, device="meta")), "invstd"),
        "output-missing": (dict(output=None), "output"),
        "output-size": (dict(output=out[:1]), "output"),
    }
    for name, (over, arg) in cases.items():
        with pytest.raises(OP_ERRORS, match=arg):
            torch.ops.fastnn.batch_norm_backward(*dict(good, **over).values())


def test_op_wrong_argument_types(kernel_only):
    device = kernel_only
    args = list(_train_args(device).values())
    with pytest.raises(OP_ERRORS):
        torch.ops.fastnn.batch_norm_train(*args[:-1])  # missing relu
    with pytest.raises(OP_ERRORS):
        torch.ops.fastnn.batch_norm_train(*args[:5], "0.1", *args[6:])
    with pytest.raises(OP_ERRORS):
        torch.ops.fastnn.batch_norm_train([1.0, 2.0], *args[1:])
