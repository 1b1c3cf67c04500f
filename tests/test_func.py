"""torch.func and forward-mode AD through fastnn's modules and models: jvp, jacfwd, grad, vjp,
jacrev, hessian and vmap give what they give through torch's batch norm, and
torch.autograd.forward_ad carries tangents. The ops' own derivatives in every mode are checked
by the gradchecks of test_functional.py and test_ops.py."""
import copy
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import (functional_call, grad, hessian, jacfwd, jacrev, jvp, stack_module_state,
                        vmap, vjp)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import fastnn
    import torchvision

D = torch.float64
C = 4

# fastnn module -> (callable of (module, x, r)) and the torch equivalent built on nn.BatchNorm2d.
FORMS = {
    "bn": (lambda m, x, r: m(x), lambda m, x, r: m(x)),
    "bn_relu": (lambda m, x, r: m(x), lambda m, x, r: torch.relu(m(x))),
    "bn_add_relu": (lambda m, x, r: m(x, r), lambda m, x, r: torch.relu(m(x) + r)),
}
MODULES = {"bn": fastnn.nn.BatchNorm2d, "bn_relu": fastnn.nn.BatchNormReLU2d,
           "bn_add_relu": fastnn.nn.BatchNormAddReLU2d}
# eval: running statistics; train: batch statistics and no running statistics, as torch.func
# asks of torch's batch norm (torch.func.replace_all_batch_norm_modules_)
MODES = ["eval", "train"]


def _pair(form, mode, device):
    """A fastnn module and a torch BatchNorm2d with the same random state."""
    track = mode == "eval"
    fast = MODULES[form](C, track_running_stats=track).to(device, D)
    ref = nn.BatchNorm2d(C, track_running_stats=track).to(device, D)
    with torch.no_grad():
        fast.weight.uniform_(0.5, 1.5)
        fast.bias.uniform_(-0.5, 0.5)
        if track:
            fast.running_mean.uniform_(-0.3, 0.3)
            fast.running_var.uniform_(0.5, 1.5)
    ref.load_state_dict(fast.state_dict())
    fast.train(mode == "train")
    ref.train(mode == "train")
    return fast, ref


def _inputs(device, n=3, hw=3):
    x = torch.randn(n, C, hw, hw, dtype=D, device=device)
    r = torch.randn(n, C, hw, hw, dtype=D, device=device)
    return x, r


def _check(got, want, rtol=1e-9, atol=1e-9):
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def _functions(form, mode, device):
    fast, ref = _pair(form, mode, device)
    call_fast, call_ref = FORMS[form]
    return (lambda x, r: call_fast(fast, x, r)), (lambda x, r: call_ref(ref, x, r))


TRANSFORMS = {
    "jvp": lambda f, x, r: jvp(f, (x, r), (torch.ones_like(x).cumsum(0), r.flip(0))),
    "jacfwd": lambda f, x, r: jacfwd(f, argnums=(0, 1))(x[:2, :, :2, :2], r[:2, :, :2, :2]),
    "grad": lambda f, x, r: grad(lambda x, r: f(x, r).pow(2).sum(), argnums=(0, 1))(x, r),
    "vjp": lambda f, x, r: vjp(f, x, r)[1](torch.cos(x)),
    "jacrev": lambda f, x, r: jacrev(f, argnums=(0, 1))(x[:2, :, :2, :2], r[:2, :, :2, :2]),
    "hessian": lambda f, x, r: hessian(lambda x: f(x, r[:2, :, :2, :2]).pow(3).sum())(
        x[:2, :, :2, :2]),
    # a batch of independent batches
    "vmap": lambda f, x, r: vmap(f)(torch.stack([x, 2 * x + 1]), torch.stack([r, -r])),
}


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("form", list(FORMS))
def test_func_transform_matches_torch(backend, device, form, mode, transform):
    f_fast, f_ref = _functions(form, mode, device)
    x, r = _inputs(device)
    _check(TRANSFORMS[transform](f_fast, x, r), TRANSFORMS[transform](f_ref, x, r))


@pytest.mark.parametrize("mode", MODES)
def test_per_sample_gradients(backend, device, mode):
    """vmap(grad) over single samples, with respect to the parameters: the per-sample gradients
    of eval mode (train: over pairs of samples, each pair a batch)."""
    fast, ref = _pair("bn_relu", mode, device)
    x, _ = _inputs(device, n=6)
    x = x.view(3, 2, C, 3, 3) if mode == "train" else x.view(6, 1, C, 3, 3)
    params = {k: p.detach() for k, p in fast.named_parameters()}

    def per_sample(module, post):
        def loss(p, xi):
            return post(functional_call(module, p, (xi,))).pow(2).sum()
        return vmap(grad(loss), in_dims=(None, 0))(params, x)
    _check(per_sample(fast, lambda y: y), per_sample(ref, torch.relu))


def test_dual_form_transforms(backend, device):
    """dual_bn_add_relu (the ResNet downsampling block's two batch norms, add and ReLU) under
    jvp, grad and vmap, in training."""
    bns = [fastnn.nn.BatchNorm2d(C, track_running_stats=False).to(device, D) for _ in range(2)]
    refs = [nn.BatchNorm2d(C, track_running_stats=False).to(device, D) for _ in range(2)]
    for b, t in zip(bns, refs):
        with torch.no_grad():
            b.weight.uniform_(0.5, 1.5)
            b.bias.uniform_(-0.5, 0.5)
        t.load_state_dict(b.state_dict())

    def f_fast(x, z):
        return fastnn.nn.dual_bn_add_relu(bns[0], x, bns[1], z)

    def f_ref(x, z):
        return torch.relu(refs[0](x) + refs[1](z))
    x, z = _inputs(device)
    for name in ("jvp", "grad", "jacrev", "vmap"):
        _check(TRANSFORMS[name](f_fast, x, z), TRANSFORMS[name](f_ref, x, z))


@pytest.mark.parametrize("form", list(FORMS))
def test_forward_ad_updates_running_stats(backend, device, form):
    """torch.autograd.forward_ad in training with running statistics: the tangent, the output
    and the running-statistics update are torch's."""
    results = []
    x, r = _inputs(device)
    tx, tr = torch.randn_like(x), torch.randn_like(r)
    for module, call in zip(_pair(form, "eval", device), FORMS[form]):
        module.train()
        with fwAD.dual_level():
            out = call(module, fwAD.make_dual(x, tx), fwAD.make_dual(r, tr))
            primal, tangent = fwAD.unpack_dual(out)
        assert tangent is not None
        results.append((primal, tangent, module.running_mean, module.running_var,
                        module.num_batches_tracked))
    _check(results[0], results[1])


def test_vmap_ensemble_with_stacked_buffers(backend, device):
    """Model ensembling: vmap over torch.func.stack_module_state of several modules, in
    training, updates each member's own (stacked) running statistics as torch does."""
    states = []
    x = torch.randn(3, 5, C, 3, 3, dtype=D, device=device)
    for cls in (fastnn.nn.BatchNormReLU2d, nn.BatchNorm2d):
        torch.manual_seed(1)
        members = [cls(C).to(device, D) for _ in range(3)]
        for m in members:
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.running_var.uniform_(0.5, 1.5)
        params, buffers = stack_module_state(members)
        base = copy.deepcopy(members[0]).to("meta")
        out = vmap(lambda p, b, xi: functional_call(base, (p, b), (xi,)))(params, buffers, x)
        if cls is nn.BatchNorm2d:
            out = torch.relu(out)
        states.append((out, buffers["running_mean"], buffers["running_var"]))
    _check(states[0], states[1])


def test_vmap_unbatched_running_stats_fails_cleanly(backend, device):
    """vmap over a batch in training with running statistics that are not batched: an error,
    as torch gives, and the running statistics and the batch count unchanged."""
    fast, ref = _pair("bn", "eval", device)
    fast.train()
    ref.train()
    before = copy.deepcopy(fast.state_dict())
    x = torch.randn(2, 3, C, 3, 3, dtype=D, device=device)
    with pytest.raises(RuntimeError):
        vmap(ref)(x)
    with pytest.raises(RuntimeError):
        vmap(fast)(x)
    for k, v in fast.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)


def _bn_buffers_random(model):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            with torch.no_grad():
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)


@pytest.mark.parametrize("arch", ["resnet18", "densenet121"])
def test_models_under_func(backend, device, arch):
    """A fastnn model and the torchvision model with the same weights: jvp in eval, and the
    parameter gradient through functional_call in training after
    torch.func.replace_all_batch_norm_modules_, as torch.func documents for batch norm."""
    tv = getattr(torchvision.models, arch)(num_classes=10).to(device, D)
    _bn_buffers_random(tv)
    fm = getattr(fastnn.models, arch)(num_classes=10).to(device, D)
    fm.load_state_dict(tv.state_dict())
    # 64x64: the last stage's batch statistics are over 2 samples of 2x2 values. At 32x32 they
    # would be over 2 single values, whose normalized output is +-1 whatever the input: DenseNet's
    # final batch norm then passes no gradient but rounding, which no two implementations share.
    x = torch.randn(2, 3, 64, 64, dtype=D, device=device)
    tx = torch.randn_like(x)
    fm.eval()
    tv.eval()
    _check(jvp(fm, (x,), (tx,)), jvp(tv, (x,), (tx,)), rtol=1e-7, atol=1e-7)
    fm.train()
    tv.train()
    torch.func.replace_all_batch_norm_modules_(fm)
    torch.func.replace_all_batch_norm_modules_(tv)
    params = {k: p.detach() for k, p in tv.named_parameters()}

    def grads(model):
        return grad(lambda p: functional_call(model, p, (x,)).sum())(params)
    # Batch statistics over few values are ill-conditioned deep in the network: the bound is
    # relative to each gradient's size.
    got, want = grads(fm), grads(tv)
    for k in want:
        scale = float(want[k].abs().max())
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6 * max(scale, 1.0),
                                   msg=k)
