"""fastnn.models, fastnn.convert and the training example.

The torchvision-compatible models are checked against torchvision's with the same weights, in
float64 on small inputs, in training (outputs, every gradient, running statistics) and in eval.
The textbook networks are checked against the same network on plain torch layers.
"""
import copy
import importlib.util
import os
import sys
import warnings
from collections import Counter
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import fastnn.nn as fnn
    from fastnn import models
    from fastnn.convert import AddReLU, BatchNormAct2d, convert, fuse_for_inference

tv = pytest.importorskip("torchvision.models")
import torchvision  # noqa: E402  (present: torchvision.models imported)
from helpers import DEVICES, randomize_batch_norms, torch_threads  # noqa: E402

F64 = dict(rtol=1e-9, atol=1e-10)
REL64 = 1e-8  # float64 results agree to this, relative to the largest value of the tensor


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small float64 models run faster on one thread than on two shared ones."""
    with torch_threads(1):
        yield


@pytest.fixture
def no_random_init(monkeypatch):
    """For tests of structure only: torch.nn.init's random initializers do nothing (building a
    ResNet-152 takes a moment otherwise), constant_ still works."""
    for name in ("kaiming_normal_", "kaiming_uniform_", "trunc_normal_", "normal_", "uniform_"):
        monkeypatch.setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)


# ---------------------------------------------------------------------------------------------
# Helpers

def outputs_of(out):
    """A model's output as a list of tensors (GoogLeNet returns a named tuple in training)."""
    return [t for t in out if t is not None] if isinstance(out, tuple) else [out]


def run(model, x, train, seed=1):
    """Forward and backward of a fixed random projection of the outputs; returns (outputs,
    input gradient, parameter gradients by name)."""
    model.train(train)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same dropout masks in both models
    outs = outputs_of(model(x))
    g = torch.Generator().manual_seed(seed)
    # Drawn in float32 whatever the model's dtype: the same projection for a float64 copy.
    loss = sum((o * torch.randn(o.shape, generator=g).to(o.device, o.dtype)).sum() for o in outs)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return [o.detach() for o in outs], x.grad, grads


def assert_close_to(actual, expected, what, rel=REL64):
    """Equal to rounding: |actual - expected| <= rel * max|expected| + 1e-10 elementwise (a
    normwise test: deep gradients sum many products, so small elements carry absolute, not
    relative, rounding; and the gradient of a conv bias before a training-mode BN is zero plus
    rounding noise)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    if expected.dtype in (torch.int64, torch.int32):
        assert torch.equal(actual, expected), what
        return
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= rel * scale + 1e-10, f"{what}: max error {err:.3g}, scale {scale:.3g}"


def assert_same_training(ref, model, x, train):
    """Same outputs, input and parameter gradients, and state (running statistics, batch
    counts) after one forward/backward."""
    ref_outs, ref_dx, ref_grads = run(ref, x, train)
    outs, dx, grads = run(model, x, train)
    assert len(outs) == len(ref_outs)
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        assert_close_to(o, r, f"output {i}")
    assert_close_to(dx, ref_dx, "input gradient")
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert_close_to(grads[name], ref_grads[name], f"{name} gradient")
    ref_state, state = ref.state_dict(), model.state_dict()
    assert state.keys() == ref_state.keys()
    for name in ref_state:
        assert_close_to(state[name], ref_state[name], name)


def module_kinds(model):
    return Counter(type(m).__name__ for m in model.modules())


def torchvision_pair(name, fused=True, **kwargs):
    """(torchvision's model, fastnn's with its weights), both float64."""
    torch.manual_seed(0)
    ref = randomize_batch_norms(getattr(tv, name)(**kwargs)).double()
    model = getattr(models, name)(fused=fused, **kwargs).double()
    model.load_state_dict(ref.state_dict(), strict=True)
    return ref, model


# ---------------------------------------------------------------------------------------------
# torchvision-compatible models: names, state_dict keys, initialization

TORCHVISION_BUILDERS = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
    "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
    "densenet121", "densenet161", "densenet169", "densenet201", "googlenet",
]


@pytest.mark.parametrize("name", TORCHVISION_BUILDERS)
def test_state_dict_layout_matches_torchvision(name, no_random_init):
    """Same keys, in the same order, with the same shapes, fused or not."""
    kwargs = {"aux_logits": True, "init_weights": True} if name == "googlenet" else {}
    with torch.device("meta"):
        ref = getattr(tv, name)(**kwargs).state_dict()
        for fused in (True, False):
            ours = getattr(models, name)(fused=fused, **kwargs).state_dict()
            assert list(ours) == list(ref)
            assert [v.shape for v in ours.values()] == [v.shape for v in ref.values()]


@pytest.mark.parametrize("name", ["resnet18", "googlenet"])
def test_torchvision_state_dict_loads_strictly_both_ways(name):
    """(test_state_dict_layout_matches_torchvision covers the other builders' keys and shapes.)"""
    kwargs = {"init_weights": True} if name == "googlenet" else {}
    ref = getattr(tv, name)(num_classes=7, **kwargs)
    model = getattr(models, name)(num_classes=7)
    model.load_state_dict(ref.state_dict(), strict=True)
    back = getattr(tv, name)(num_classes=7, **kwargs)
    back.load_state_dict(model.state_dict(), strict=True)
    for key, value in ref.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "googlenet"])
def test_same_initialization_as_torchvision(name):
    """Modules are created and initialized in torchvision's order: the same seed gives the same
    weights."""
    kwargs = {"init_weights": True} if name == "googlenet" else {}
    torch.manual_seed(0)
    ref = getattr(tv, name)(**kwargs).state_dict()
    torch.manual_seed(0)
    ours = getattr(models, name)().state_dict()
    for key, value in ref.items():
        assert torch.equal(ours[key], value), key


def test_fused_modules_are_used(no_random_init):
    kinds = module_kinds(models.resnet18())
    assert kinds["BatchNormAddReLU2d"] == 8 and kinds["BatchNormReLU2d"] == 9
    assert kinds["BatchNorm2d"] == 3 and kinds["ReLU"] == 0  # the shortcut BNs
    kinds = module_kinds(models.resnet50())
    assert kinds["BatchNormAddReLU2d"] == 16 and kinds["BatchNormReLU2d"] == 33
    kinds = module_kinds(models.densenet121())
    # norm1 of each dense layer: a BatchNormReLU2d that can take the block's shared statistics
    assert kinds["_DenseBatchNormReLU2d"] == 58 and kinds["ReLU"] == 0
    assert kinds["BatchNormReLU2d"] == 1 + 58 + 3
    assert kinds["BatchNorm2d"] == 1  # norm5: `features` ends before the final ReLU
    model = models.densenet121()
    assert isinstance(model.features.denseblock1.denselayer1.norm1, fnn.BatchNormReLU2d)
    assert isinstance(model.features.denseblock1.denselayer1.relu1, nn.Identity)
    assert "features.denseblock1.denselayer1.norm1.weight" in model.state_dict()
    kinds = module_kinds(models.googlenet())
    assert kinds["BatchNormReLU2d"] == 59
    bn = models.googlenet().inception3a.branch2[0].bn
    assert isinstance(bn, fnn.BatchNormReLU2d) and bn.eps == 1e-3
    for name in ("resnet18", "densenet121", "googlenet"):
        plain = module_kinds(getattr(models, name)(fused=False))
        assert not any(k in plain for k in ("BatchNormReLU2d", "BatchNormAddReLU2d")), name
        assert all(type(m).__module__.startswith("torch.")
                   for m in getattr(models, name)(fused=False).modules()
                   if isinstance(m, nn.modules.batchnorm._BatchNorm))


def test_builder_arguments(no_random_init):
    assert models.resnet18(num_classes=5).fc.out_features == 5
    model = models.resnet50(zero_init_residual=True)
    assert all((b.bn3.weight == 0).all() for b in model.modules()
               if isinstance(b, models.resnet.Bottleneck))
    model = models.resnext50_32x4d()
    assert model.layer1[0].conv2.groups == 32
    with pytest.raises(ValueError):
        models.resnext50_32x4d(groups=4)
    assert models.wide_resnet50_2().layer1[0].conv2.out_channels == 128
    with pytest.raises(ValueError):
        models.resnet18(groups=2)
    model = models.googlenet(aux_logits=False, transform_input=True, init_weights=False)
    assert model.aux1 is None and model.transform_input
    model = models.DenseNet(growth_rate=16, block_config=(2, 2, 2, 2), drop_rate=0.1)
    assert model.features.denseblock1.denselayer1.conv2.out_channels == 16
    model = models.resnet18(norm_layer=partial(nn.GroupNorm, 4))
    assert isinstance(model.layer1[0].bn1, nn.GroupNorm)
    assert isinstance(model.layer1[0].relu, nn.ReLU)
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        models.resnet18(weights="NO_SUCH_WEIGHTS")


def test_weights_go_through_torchvision(monkeypatch):
    """weights= takes torchvision's enum (or a member's name) and loads its state_dict strictly,
    fixing num_classes; GoogLeNet drops the auxiliary heads unless asked. (No network here: the
    enum's get_state_dict is replaced by a torchvision model's state_dict.)"""
    torch.manual_seed(0)
    source = {"resnet18": tv.resnet18().state_dict(),
              "googlenet": tv.googlenet(aux_logits=True, init_weights=True).state_dict()}
    calls = []
    from torchvision.models._api import WeightsEnum

    def fake_get_state_dict(self, *args, **kwargs):
        calls.append((self, kwargs))
        return source["googlenet" if "googlenet" in self.url else "resnet18"]

    monkeypatch.setattr(WeightsEnum, "get_state_dict", fake_get_state_dict)
    model = models.resnet18(weights="DEFAULT", progress=False)
    assert calls[-1][0] == tv.ResNet18_Weights.IMAGENET1K_V1
    assert calls[-1][1]["progress"] is False
    assert model.fc.out_features == 1000
    assert torch.equal(model.state_dict()["layer2.0.bn1.running_var"],
                       source["resnet18"]["layer2.0.bn1.running_var"])
    with pytest.raises(ValueError):
        models.resnet18(weights=tv.ResNet18_Weights.DEFAULT, num_classes=10)
    with pytest.raises(TypeError):
        models.resnet18(weights=tv.ResNet34_Weights.DEFAULT)

    model = models.googlenet(weights=tv.GoogLeNet_Weights.DEFAULT)
    assert model.aux1 is None and model.transform_input and not model.aux_logits
    with pytest.warns(UserWarning):
        model = models.googlenet(weights=tv.GoogLeNet_Weights.DEFAULT, aux_logits=True)
    assert model.aux1 is not None


# ---------------------------------------------------------------------------------------------
# torchvision-compatible models: same numbers as torchvision

@pytest.mark.parametrize("name,fused,shape,train", [
    # Small inputs, with at least 4 values per channel in the last batch norms.
    ("resnet18", True, (2, 3, 48, 48), True),
    ("resnet18", True, (2, 3, 48, 48), False),
    ("resnet18", False, (2, 3, 48, 48), True),
    ("resnet50", True, (2, 3, 48, 48), True),
    ("densenet121", True, (4, 3, 32, 32), True),
    ("densenet121", True, (4, 3, 32, 32), False),
    ("googlenet", True, (2, 3, 48, 48), True),
    ("googlenet", True, (2, 3, 48, 48), False),
])
def test_matches_torchvision(name, fused, shape, train):
    kwargs = {"num_classes": 10}
    if name == "googlenet":
        kwargs.update(aux_logits=True, init_weights=True)
    ref, model = torchvision_pair(name, fused, **kwargs)
    if name == "googlenet" and _TV_GOOGLENET_AUX_SWAPPED:
        ref.forward = partial(_aux_in_current_order, ref.forward)
    x = torch.randn(shape, dtype=torch.float64)
    assert_same_training(ref, model, x, train)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name,shape", [("resnet50", (2, 3, 48, 48)),
                                        ("densenet121", (4, 3, 32, 32)),
                                        ("googlenet", (2, 3, 48, 48))])
def test_matches_torchvision_cuda(name, shape, train):
    """On a GPU: fastnn's models on its CUDA kernels (BN+ReLU, BN+add+ReLU, the downsampling
    blocks' dual op, DenseNet's shared statistics) against torchvision's, float64."""
    kwargs = {"num_classes": 10}
    if name == "googlenet":
        kwargs.update(aux_logits=True, init_weights=True)
    ref, model = torchvision_pair(name, **kwargs)
    if name == "googlenet" and _TV_GOOGLENET_AUX_SWAPPED:
        ref.forward = partial(_aux_in_current_order, ref.forward)
    x = torch.randn(shape, dtype=torch.float64, device="cuda")
    assert_same_training(ref.cuda(), model.cuda(), x, train)


# torchvision before 0.21 returned GoogLeNet's auxiliary logits in each other's fields
# (aux_logits2 held the first classifier's); fastnn's GoogLeNet returns them as torchvision does
# since: (logits, aux_logits2, aux_logits1) = (fc, aux2, aux1).
_TV_GOOGLENET_AUX_SWAPPED = tuple(
    int(v) for v in torchvision.__version__.split("+")[0].split(".")[:2]) < (0, 21)


def _aux_in_current_order(forward, x):
    out = forward(x)
    return type(out)(out[0], out[2], out[1]) if isinstance(out, tuple) else out


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_float32(device, no_tf32):
    """The layout fast GPU training uses: channels_last float32 stays channels_last through the
    fused modules and gives torchvision's numbers to float32 rounding: against the same model in
    float64, fastnn's outputs and gradients are off by at most twice what torchvision's are in
    float32 (plus 1e-6 of their size). A fixed tolerance against torchvision in float32 would
    measure the device's convolutions instead: in training, the last stage's batch statistics
    (4 samples of 1x1 maps) amplify rounding several hundred times (torchvision's float32 input
    gradient is 7e-5 off its float64 one on a CPU)."""
    torch.manual_seed(0)
    ref = randomize_batch_norms(tv.resnet18(num_classes=10)).to(
        device, memory_format=torch.channels_last)
    exact = copy.deepcopy(ref).double()
    model = models.resnet18(num_classes=10).to(device, memory_format=torch.channels_last)
    model.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(4, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    layouts = []
    model.layer1.register_forward_hook(
        lambda m, i, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last)))

    def check(what, got, ref32, ref64):
        err = (got.double() - ref64).abs().max().item()
        err_tv = (ref32.double() - ref64).abs().max().item()
        scale = ref64.abs().max().item()
        assert err <= 2 * err_tv + 1e-6 * scale, \
            f"{what}: fastnn {err:.3g} off float64, torchvision {err_tv:.3g} (scale {scale:.3g})"

    for train in (True, False):
        ref_outs, ref_dx, ref_grads = run(ref, x, train)
        outs, dx, grads = run(model, x, train)
        ex_outs, ex_dx, ex_grads = run(exact, x.double(), train)
        check(f"output (train={train})", outs[0], ref_outs[0], ex_outs[0])
        check(f"input gradient (train={train})", dx, ref_dx, ex_dx)
        for name in ("conv1.weight", "layer1.0.bn2.weight", "layer4.1.bn2.bias"):
            check(f"{name} (train={train})", grads[name], ref_grads[name], ex_grads[name])
    assert layouts == [True, True]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_resnet_variants_match_torchvision(train):
    """Grouped/dilated bottlenecks and zero-initialized last BNs; and a user norm_layer."""
    kwargs = dict(groups=4, width_per_group=8, zero_init_residual=True,
                  replace_stride_with_dilation=[False, True, True], num_classes=5)
    torch.manual_seed(0)
    ref = tv.ResNet(tv.resnet.Bottleneck, [1, 1, 2, 1], **kwargs).double()
    model = models.ResNet(models.resnet.Bottleneck, [1, 1, 2, 1], **kwargs).double()
    model.load_state_dict(ref.state_dict(), strict=True)
    assert_same_training(ref, model, torch.randn(2, 3, 48, 48, dtype=torch.float64), train)

    norm = partial(nn.GroupNorm, 8)
    ref = tv.ResNet(tv.resnet.BasicBlock, [1, 1, 1, 1], norm_layer=norm).double()
    model = models.ResNet(models.resnet.BasicBlock, [1, 1, 1, 1], norm_layer=norm).double()
    model.load_state_dict(ref.state_dict(), strict=True)
    assert_same_training(ref, model, torch.randn(2, 3, 32, 32, dtype=torch.float64), train)


@pytest.mark.parametrize("memory_efficient", [False, True])
def test_small_densenet_matches_torchvision(memory_efficient):
    """The DenseNet class with its other arguments, checkpointing included (which, like
    torchvision's, updates norm1's running statistics again when it recomputes)."""
    kwargs = dict(growth_rate=8, block_config=(2, 3), num_init_features=16, bn_size=2,
                  num_classes=4, memory_efficient=memory_efficient)
    torch.manual_seed(0)
    ref = randomize_batch_norms(tv.DenseNet(**kwargs)).double()
    model = models.DenseNet(**kwargs).double()
    model.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    assert_same_training(ref, model, x, train=True)
    assert_same_training(ref, model, x, train=False)
    # convert() of torchvision's: module swaps, in its classes. norm0, two per dense layer, the
    # transition's; norm5 stays unfused (its ReLU is in DenseNet.forward: fused, model.features
    # would return what the ReLU returns).
    ref.zero_grad(set_to_none=True)
    converted = convert(ref)
    assert type(converted) is tv.DenseNet
    assert module_kinds(converted)["BatchNormReLU2d"] == 1 + 5 * 2 + 1
    assert_same_training(ref, converted, x, train=True)


def test_resnet_downsample_blocks_use_the_dual_kernel(monkeypatch):
    """A block with a downsampling shortcut runs its last BN, the shortcut's BN, the add and the
    ReLU as one batch_norm_dual where the device has it; a hook on the shortcut makes the block
    call its modules one by one. Both give torchvision's numbers."""
    import fastnn.ops

    if not fastnn.ops.has_kernel("cpu", "batch_norm_dual"):
        pytest.skip("no CPU kernel of batch_norm_dual")
    calls = []
    original = fastnn.ops.batch_norm_dual

    def counting(*args, **kwargs):
        calls.append(args[0].shape[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(fastnn.ops, "batch_norm_dual", counting)
    ref, model = torchvision_pair("resnet18", num_classes=10)
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    copy.deepcopy(model).train()(x)
    assert calls == [128, 256, 512]
    calls.clear()
    seen = []
    model.layer2[0].downsample.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert_same_training(ref, model, x, train=True)
    assert calls == [256, 512] * (len(calls) // 2) and seen
    calls.clear()
    resnet50 = models.resnet50(num_classes=10).eval()
    resnet50(torch.randn(1, 3, 32, 32))
    assert calls == [256, 512, 1024, 2048]
    calls.clear()
    seen.clear()
    resnet50.layer3[0].bn3.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    resnet50(torch.randn(1, 3, 32, 32))
    assert calls == [256, 512, 2048] and len(seen) == 1


def count_dual_calls(monkeypatch):
    """The list each fused dual BN+add+ReLU call appends to."""
    import fastnn.functional as fF

    calls = []
    original = fF.dual_batch_norm_unchecked

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)
    monkeypatch.setattr(fF, "dual_batch_norm_unchecked", counting)
    return calls


def test_convert_fuses_downsampling_shortcuts(monkeypatch):
    """convert() of torchvision's ResNet-18: each block with a downsampling shortcut runs
    fastnn.nn.dual_bn_add_relu; same numbers and state as torchvision, and it still folds for
    inference."""
    ref, _ = torchvision_pair("resnet18", num_classes=10)
    converted = convert(copy.deepcopy(ref))
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    duals = count_dual_calls(monkeypatch)
    with torch.no_grad():
        converted.eval()(x)
    assert len(duals) == 3
    assert_same_training(ref, converted, x, train=True)
    assert_same_training(ref, converted, x, train=False)
    folded = fuse_for_inference(converted)
    torch.testing.assert_close(folded(x), converted.eval()(x), **F64)
    assert module_kinds(folded)["AddReLU"] == 8


def test_densenet_shares_batch_statistics(monkeypatch):
    """In training a dense block computes each feature map's batch statistics once: every dense
    layer's norm1 then normalizes the feature maps themselves with them
    (batch_norm_cat_with_stats: no concatenated copy, no statistics pass); with a hook on norm1 it
    gets the concatenation torchvision's layer passes (batch_norm_train_with_stats); in eval none
    of this happens. test_small_densenet_matches_torchvision checks the numbers."""
    import fastnn.ops
    from fastnn.models import densenet as dn

    if not dn._shares_statistics(torch.zeros(2, 2, dtype=torch.float64)) or not \
            fastnn.ops.has_kernel("cpu", "batch_norm_cat_with_stats"):
        pytest.skip("no CPU kernels for the shared statistics")
    calls = []

    def counting(name):
        original = getattr(fastnn.ops, name)

        def op(*args, **kwargs):
            first = args[0]
            calls.append((name, [t.shape[1] for t in first] if isinstance(first, list)
                          else first.shape[1]))
            return original(*args, **kwargs)
        monkeypatch.setattr(fastnn.ops, name, op)

    counting("batch_norm_train_with_stats")
    counting("batch_norm_cat_with_stats")
    model = models.DenseNet(growth_rate=8, block_config=(2, 3), num_init_features=16, bn_size=2,
                            num_classes=4).double()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    model.train()
    model(x).sum().backward()
    # Block 1: 16 and 16 + 8 input channels; transition to 16; block 2: 16, 16 + 8, 16 + 8 + 8.
    cat = "batch_norm_cat_with_stats"
    assert calls == [(cat, [16]), (cat, [16, 8]), (cat, [16]), (cat, [16, 8]),
                     (cat, [16, 8, 8])]
    calls.clear()
    seen = []
    model.features.denseblock2.denselayer3.norm1.register_forward_hook(
        lambda m, args, out: seen.append(args[0].shape))
    model(x).sum().backward()
    assert calls[-1] == ("batch_norm_train_with_stats", 32) and seen == [(3, 32, 4, 4)]
    calls.clear()
    model.eval()
    model(x)
    assert calls == []


def test_googlenet_options_match_torchvision():
    kwargs = dict(num_classes=6, aux_logits=False, transform_input=True, init_weights=True)
    ref, model = torchvision_pair("googlenet", **kwargs)
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    assert_same_training(ref, model, x, train=True)
    model.train()
    assert isinstance(model(x), torch.Tensor)  # no auxiliary outputs
    ref, model = torchvision_pair("googlenet", num_classes=6, aux_logits=True, init_weights=True)
    model.train()
    out = model(x)
    assert isinstance(out, models.GoogLeNetOutputs) and out.aux_logits1.shape == (2, 6)
    model.eval()
    assert model(x).shape == (2, 6)


# ---------------------------------------------------------------------------------------------
# Textbook networks

TEXTBOOK = [  # builder, input shape
    ("d2l_resnet18", (2, 1, 32, 32)),
    ("d2l_densenet", (2, 1, 32, 32)),
    ("lenet_bn", (4, 1, 28, 28)),
    ("mini_googlenet", (2, 1, 28, 28)),
]


@pytest.mark.parametrize("name,shape", TEXTBOOK)
def test_textbook_shapes_forward_backward(name, shape):
    model = getattr(models, name)(num_classes=10)
    x = torch.randn(shape)
    for train in (True, False):
        model.train(train)
        out = model(x)
        assert out.shape == (shape[0], 10) and out.dtype == torch.float32
        out.sum().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert getattr(models, name)(num_classes=3, in_channels=3)(
        torch.randn((2, 3) + shape[2:])).shape == (2, 3)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name,shape", TEXTBOOK)
def test_textbook_matches_plain_torch(name, shape, train):
    """The fastnn network against the same network on plain torch layers with copied weights."""
    torch.manual_seed(0)
    model = randomize_batch_norms(getattr(models, name)()).double()
    plain = getattr(models, name)(fused=False).double()
    plain.load_state_dict(model.state_dict(), strict=True)
    def fastnn_norms(net):
        return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                and type(m).__module__.startswith("fastnn")]
    assert not fastnn_norms(plain) and fastnn_norms(model)
    assert_same_training(plain, model, torch.randn(shape, dtype=torch.float64), train)


def test_textbook_structure():
    kinds = module_kinds(models.d2l_resnet18())
    assert kinds["Residual"] == 8 and kinds["BatchNormAddReLU2d"] == 8
    assert sum(r.conv3 is not None for r in models.d2l_resnet18().modules()
               if isinstance(r, models.textbook.Residual)) == 3
    net = models.d2l_densenet()
    assert module_kinds(net)["DenseBlock"] == 4 and net[-1].in_features == 248
    assert all(len(b.net) == 4 for b in net if isinstance(b, models.textbook.DenseBlock))
    kinds = module_kinds(models.lenet_bn())
    assert kinds["BatchNorm2d"] == 2 and kinds["BatchNorm1d"] == 2
    assert isinstance(models.lenet_bn()[10], fnn.BatchNorm1d)
    assert module_kinds(models.mini_googlenet())["InceptionA"] == 2


# ---------------------------------------------------------------------------------------------
# convert

def converted_pair(ref):
    ref = randomize_batch_norms(ref).double()
    return ref, convert(ref)


@pytest.mark.parametrize("name,shape", [("resnet18", (2, 3, 48, 48)),
                                        ("densenet121", (4, 3, 32, 32))])
def test_convert_torchvision_model(name, shape):
    torch.manual_seed(0)
    ref, model = converted_pair(getattr(tv, name)(num_classes=10))
    # The model's module tree: same names, containers of the same classes.
    assert [n for n, _ in model.named_modules()] == [n for n, _ in ref.named_modules()]
    for (n, a), (_, b) in zip(model.named_modules(), ref.named_modules()):
        assert isinstance(a, nn.Sequential) == isinstance(b, nn.Sequential), n
    kinds = module_kinds(model)
    assert not any(type(m) in (nn.BatchNorm2d, nn.ReLU) for m in model.modules())
    if name == "resnet18":
        assert kinds["BatchNormAddReLU2d"] == 8 and kinds["BatchNormReLU2d"] == 9
    else:
        # All but norm5, whose ReLU is in DenseNet.forward: fused, model.features would return
        # what the ReLU returns.
        assert kinds["BatchNormReLU2d"] == 120
    # The original is untouched and shares nothing with the result.
    assert type(ref.layer1[0].bn1 if name == "resnet18" else ref.features.norm0) is nn.BatchNorm2d
    x = torch.randn(shape, dtype=torch.float64)
    for train in (True, False):
        assert_same_training(ref, model, x, train)
    # A training step with the same optimizer keeps them together.
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt_ref.step()
    opt.step()
    assert_same_training(ref, model, x, True)
    assert_same_training(ref, model, x, False)
    # Parameters and state in the model's order: an optimizer's state saved for the model loads
    # into one over the converted model's parameters and lines up with them.
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert list(model.state_dict()) == list(ref.state_dict())
    opt_ref.step()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.load_state_dict(opt_ref.state_dict())
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(opt.state[p]["momentum_buffer"],
                                   opt_ref.state[ref_params[name]]["momentum_buffer"], **F64)


# torchvision families beyond ResNet/DenseNet/GoogLeNet: batch norms before ReLU6, SiLU or
# Hardswish (left unfused), before ReLU inside squeeze-excitation-free blocks, channel shuffles,
# stochastic depth (random in training: the same seed gives both models the same draws) and
# BN momenta other than 0.1. name: (input size, fused BN+ReLU modules).
OTHER_FAMILIES = {
    "mobilenet_v2": (64, 0),
    "mobilenet_v3_small": (32, 5),
    "efficientnet_b0": (64, 0),
    "shufflenet_v2_x0_5": (64, 37),
    "mnasnet0_5": (64, 35),
}


@pytest.mark.parametrize("name", list(OTHER_FAMILIES))
def test_convert_other_torchvision_families(name):
    size, n_fused = OTHER_FAMILIES[name]
    torch.manual_seed(0)
    ref, model = converted_pair(getattr(tv, name)(num_classes=10))
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    assert module_kinds(model)["BatchNormReLU2d"] == n_fused
    # Every batch norm keeps its momentum and eps (MNASNet: 0.0003, 1e-5; EfficientNet: eps 1e-3).
    ref_bns = [m for m in ref.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == len(ref_bns)
    assert [(m.momentum, m.eps) for m in bns] == [(m.momentum, m.eps) for m in ref_bns]
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    for train in (True, False, True):
        assert_same_training(ref, model, x, train)


class CifarBlock(nn.Module):
    """The residual block of common CIFAR ResNets: the shortcut an nn.Sequential (empty, or a
    1x1 conv and a batch norm), the adds and ReLUs in the forward."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class CifarNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.layer1 = nn.Sequential(CifarBlock(8, 8, 1), CifarBlock(8, 16, 2))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))  # the ReLU of the batch norm that ends the stem
        return self.head(self.layer1(x).mean((2, 3)))


@pytest.mark.parametrize("name", ["cifar", "regnet_x_400mf"])
def test_convert_keeps_module_tree(monkeypatch, name):
    """Each fusion is made in the module whose forward holds it: a block becomes a GraphModule
    of its class's name, everything around it keeps its class and place. Containers index, and a
    hook set after converting on a block or a stage fires with the original's values."""
    torch.manual_seed(0)
    if name == "cifar":
        ref, model = converted_pair(CifarNet())
        blocks, n_duals, shape = ["layer1.0", "layer1.1", "layer1", "stem"], 1, (2, 3, 8, 8)
        # The stem's batch norm stays unfused: fused with the ReLU after it, the stem itself
        # would return what the ReLU returns.
        assert type(model.stem[1]) is fnn.BatchNorm2d and type(model.layer1) is nn.Sequential
        assert type(model.layer1[1].bn2) is fnn.BatchNormAddReLU2d
        assert [type(b).__name__ for b in model.layer1] == ["CifarBlock"] * 2
        assert type(model.layer1[1].shortcut) is nn.Sequential
    else:
        ref, model = converted_pair(tv.regnet_x_400mf(num_classes=10))
        blocks = ["trunk_output.block1.block1-0", "trunk_output.block4", "stem"]
        # 2x2 maps in the last stage: batch statistics over 2 values per channel would make
        # twelve blocks in a row amplify rounding beyond any tolerance
        n_duals, shape = 4, (2, 3, 64, 64)
        block = model.trunk_output.block1[0]
        assert type(block).__name__ == "ResBottleneckBlock"
        # The residual branch's last batch norm and the shortcut's stay inside their
        # nn.Sequential, unchanged: the block calls them through fastnn.nn.bn_add_relu and
        # dual_bn_add_relu.
        assert type(block.f.c[1]) is fnn.BatchNorm2d and type(block.proj[1]) is fnn.BatchNorm2d
    kinds = module_kinds(model)
    expected = ({"BatchNormReLU2d": 2, "BatchNormAddReLU2d": 2, "BatchNorm2d": 2} if name == "cifar"
                else {"BatchNormReLU2d": 45, "BatchNormAddReLU2d": 0, "BatchNorm2d": 26})
    assert {k: kinds[k] for k in expected} == expected
    assert [n for n, _ in model.named_modules()] == [n for n, _ in ref.named_modules()]
    seen = {}
    for label, net in (("ref", ref), ("fastnn", model)):
        for path in blocks:
            net.get_submodule(path).register_forward_hook(
                lambda m, i, o, key=(label, path): seen.setdefault(key, []).append(o.detach()))
    x = torch.randn(shape, dtype=torch.float64)
    duals = count_dual_calls(monkeypatch)
    for train in (True, False):
        assert_same_training(ref, model, x, train)
    assert len(duals) == 2 * n_duals
    for path in blocks:
        assert len(seen["fastnn", path]) == len(seen["ref", path]) == 2, path
        for got, want in zip(seen["fastnn", path], seen["ref", path]):
            assert_close_to(got, want, path)
    folded = fuse_for_inference(model)
    torch.testing.assert_close(folded(x), ref.eval()(x), **F64)


def test_convert_keeps_hooks_of_converted_blocks():
    """Hooks set before converting: convert does not call them (fx would pass them its proxies),
    and a block that becomes a GraphModule keeps them, so they fire once per call with the
    original's values."""
    torch.manual_seed(0)
    ref = CifarNet().double()
    seen = []
    ref.layer1[1].register_forward_pre_hook(lambda m, args: seen.append("pre"))
    ref.layer1[1].register_forward_hook(lambda m, args, out: seen.append(out.detach()))
    model = convert(ref)
    assert seen == [] and isinstance(model.layer1[1], torch.fx.GraphModule)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    model(x)
    ref(x)
    assert seen[0] == seen[2] == "pre"
    assert_close_to(seen[1], seen[3], "hooked block output")


class InnerBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))


class OuterBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.branch = InnerBranch()

    def forward(self, x):
        return F.relu(self.branch(x) + x)


def test_convert_traces_through_a_branch():
    """A residual branch ending in a batch norm, the add and ReLU in the block: the block traces
    through the branch and fuses both of its patterns, and the branch, called itself, still
    returns its batch norm's output."""
    torch.manual_seed(0)
    ref, model = converted_pair(OuterBlock())
    assert isinstance(model, torch.fx.GraphModule) and type(model.branch) is InnerBranch
    assert type(model.branch.bn1) is fnn.BatchNormReLU2d
    assert type(model.branch.bn2) is fnn.BatchNorm2d and type(model.branch.relu) is nn.ReLU
    assert any(n.target is fnn.bn_add_relu for n in model.graph.nodes)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    for train in (True, False):
        assert_same_training(ref, model, x, train)
    torch.testing.assert_close(model.branch(x), ref.branch(x), **F64)


class _BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d as it computes: BatchNorm2d, then its drop and act modules."""

    def __init__(self, C, act_layer=nn.ReLU):
        super().__init__(C)
        self.drop = nn.Identity()
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


class TimmLikeBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = _BatchNormAct2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = _BatchNormAct2d(4, act_layer=None)
        self.drop_path = nn.Identity()
        self.act = nn.ReLU()
        self.bn3 = _BatchNormAct2d(4, act_layer=nn.SiLU)

    def forward(self, x):
        y = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return self.bn3(self.act(self.drop_path(y) + x))


def test_convert_timm_batch_norm_act(monkeypatch):
    """timm's BatchNormAct2d becomes fastnn.convert.BatchNormAct2d (its drop and act kept; a
    ReLU in the kernel), one with an identity act fuses with an add and ReLU after it (across an
    identity drop path), and the numbers are the model's."""
    import types

    fake = types.ModuleType("timm.layers.norm_act")
    fake.BatchNormAct2d = _BatchNormAct2d
    monkeypatch.setitem(sys.modules, "timm.layers.norm_act", fake)
    torch.manual_seed(0)
    ref, model = converted_pair(TimmLikeBlock())
    assert type(model.bn1) is BatchNormAct2d and type(model.bn1.act) is nn.ReLU
    assert type(model.bn2) is fnn.BatchNormAddReLU2d
    assert type(model.bn3) is BatchNormAct2d and type(model.bn3.act) is nn.SiLU
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    for train in (True, False):
        assert_same_training(ref, model, x, train)
    folded = fuse_for_inference(model)
    torch.testing.assert_close(folded(x), ref.eval()(x), **F64)


class HeadNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Identity()  # a placeholder, replaced later

    def forward(self, x):
        return self.head(F.relu(self.bn(self.conv(x)) + x).mean((2, 3)))


def test_convert_keeps_placeholder_identities():
    """An nn.Identity that does not take a batch norm's output is still called: replaced after
    converting (a new head), the converted model runs the replacement."""
    torch.manual_seed(0)
    ref, model = converted_pair(HeadNet())
    assert isinstance(model, torch.fx.GraphModule)
    head = nn.Linear(4, 3).double()
    ref.head, model.head = head, copy.deepcopy(head)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    for train in (True, False):
        assert_same_training(ref, model, x, train)


def test_convert_survives_save_and_load(tmp_path):
    """torch.save of a converted model and torch.load give the same model, fused calls kept
    (torch traces a GraphModule again when it loads it)."""
    torch.manual_seed(0)
    model = convert(CifarNet().double()).eval()
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False).eval()
    calls = [n.target for n in loaded.layer1[1].graph.nodes if n.op == "call_function"]
    assert fnn.dual_bn_add_relu in calls
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert torch.equal(loaded(x), model(x))


class DefaultArgBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x, scale=None):
        y = self.bn(self.conv(x))
        if scale is not None:
            y = y * scale
        return F.relu(y + x)


class DefaultArgNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = DefaultArgBlock()

    def forward(self, x):
        return self.block(x)


def test_convert_block_called_with_defaults():
    """A block whose forward has an argument its caller leaves to its default traces otherwise
    on its own (the default becomes a traced value): its BN+add+ReLU is fused by its caller,
    which calls the block's modules itself; the block, called itself, is unchanged."""
    torch.manual_seed(0)
    ref, model = converted_pair(DefaultArgNet())
    assert isinstance(model, torch.fx.GraphModule)
    assert type(model.block) is DefaultArgBlock and type(model.block.bn) is fnn.BatchNorm2d
    assert any(n.target is fnn.bn_add_relu for n in model.graph.nodes)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    for train in (True, False):
        assert_same_training(ref, model, x, train)
    torch.testing.assert_close(model.block(x, 2.0), ref.block(x, 2.0), **F64)


def test_convert_googlenet_by_module_swap():
    """GoogLeNet computes its auxiliary heads in training only, so fx is not used: its classes
    and forward stay, the BasicConv2d blocks are swapped for fused ones."""
    torch.manual_seed(0)
    ref, model = converted_pair(tv.googlenet(num_classes=10, aux_logits=True, init_weights=True))
    assert type(model) is tv.GoogLeNet
    assert module_kinds(model)["BatchNormReLU2d"] == 59
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    assert_same_training(ref, model, x, True)
    assert_same_training(ref, model, x, False)


def test_convert_fastnn_plain_models():
    """convert() of fastnn's own networks built on plain layers fuses what fused=True builds."""
    for name, shape in [("resnet18", (2, 3, 32, 32)), ("d2l_resnet18", (2, 1, 32, 32)),
                        ("d2l_densenet", (2, 1, 32, 32)), ("mini_googlenet", (2, 1, 28, 28))]:
        torch.manual_seed(0)
        ref, model = converted_pair(getattr(models, name)(fused=False))
        fused = module_kinds(getattr(models, name)())
        kinds = module_kinds(model)
        for kind in ("BatchNormReLU2d", "BatchNormAddReLU2d"):
            assert kinds[kind] == fused[kind], (name, kind)
        assert_same_training(ref, model, torch.randn(shape, dtype=torch.float64), True)


class Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.shared_relu = nn.ReLU()
        self.tail = nn.Sequential(nn.BatchNorm2d(8), self.shared_relu)
        self.other = nn.Sequential(nn.BatchNorm2d(8), self.shared_relu)
        self.bn1d = nn.BatchNorm1d(8)
        self.bn3d = nn.BatchNorm3d(8)

    def forward(self, x):
        y = self.body(x)
        if y.sum() > 0:
            y = y * 2
        y = self.other(self.tail(y))
        z = self.bn3d(y.unsqueeze(2)).squeeze(2)
        return self.bn1d(z.mean((2, 3)))


def test_convert_untraceable_model():
    torch.manual_seed(0)
    ref, model = converted_pair(Untraceable())
    assert type(model) is Untraceable
    assert type(model.body[1]) is fnn.BatchNormReLU2d and type(model.body[2]) is nn.Identity
    assert type(model.body[4]) is fnn.BatchNorm2d
    # A ReLU module used in two places is not fused away.
    assert type(model.tail[0]) is fnn.BatchNorm2d and type(model.tail[1]) is nn.ReLU
    assert type(model.bn1d) is fnn.BatchNorm1d and type(model.bn3d) is fnn.BatchNorm3d
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert_same_training(ref, model, x, True)
    assert_same_training(ref, model, x, False)


class Patterns(nn.Module):
    """Traceable, with patterns that must and must not be fused."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_relu = nn.BatchNorm2d(4)  # -> relu_ method: fused
        self.bn_add = nn.BatchNorm2d(4)  # identity + bn, then F.relu: fused
        self.bn_twice = nn.BatchNorm2d(4)  # output used twice: not fused
        self.bn_param = nn.BatchNorm2d(4)  # + a parameter (broadcast): not fused
        self.shared = nn.BatchNorm2d(4)  # called twice: not fused
        self.bias = nn.Parameter(torch.randn(1, 4, 1, 1))

    def forward(self, x):
        y = self.bn_relu(self.conv(x)).relu_()
        y = F.relu(x + self.bn_add(y))
        t = self.bn_twice(y)
        y = torch.relu(t) + t
        y = torch.relu(self.bn_param(y) + self.bias)
        return torch.relu(self.shared(self.shared(y)))


def test_convert_patterns():
    torch.manual_seed(0)
    ref, model = converted_pair(Patterns())
    assert isinstance(model, torch.fx.GraphModule)
    assert type(model.bn_relu) is fnn.BatchNormReLU2d
    assert type(model.bn_add) is fnn.BatchNormAddReLU2d
    for name in ("bn_twice", "bn_param", "shared"):
        assert type(getattr(model, name)) is fnn.BatchNorm2d, name
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    assert_same_training(ref, model, x, True)
    assert_same_training(ref, model, x, False)


class UnlikeResiduals(nn.Module):
    """BN->add->ReLU whose residual is not the BN output's like: a per-channel residual
    (broadcast), the block's input (float32 under autocast while the BN output is bfloat16), an
    in-place add into a residual read again later, and a downsampling-style sum of two BNs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_bcast = nn.BatchNorm2d(4)
        self.bn_skip = nn.BatchNorm2d(4)
        self.bn_inplace = nn.BatchNorm2d(4)
        self.bn_a = nn.BatchNorm2d(4)
        self.bn_b = nn.BatchNorm2d(4)

    def forward(self, x):
        y = F.relu(self.bn_bcast(self.conv(x)) + x.mean((2, 3), keepdim=True))
        y = F.relu(self.bn_skip(self.conv(y)) + x)
        idt = y * 1
        out = idt.add_(self.bn_inplace(self.conv(y)))  # idt changes: read again below
        y = F.relu(out) + idt
        return F.relu(self.bn_a(self.conv(y)) + self.bn_b(y))


def test_convert_unlike_residuals():
    """A residual of another size falls back on torch's broadcasting, an in-place add into a
    residual that is read again is not fused, and under autocast (a float32 shortcut added to a
    bfloat16 BN output) the converted model gives torch's dtype and values."""
    torch.manual_seed(0)
    ref, model = converted_pair(UnlikeResiduals())
    assert type(model.bn_inplace) is fnn.BatchNorm2d
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    assert_same_training(ref, model, x, True)
    assert_same_training(ref, model, x, False)
    ref32, model32 = copy.deepcopy(ref).float(), copy.deepcopy(model).float()
    for m in (ref32, model32):
        m.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = ref32(x.float()), model32(x.float())
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)


def test_convert_leaves_hooked_modules_unfused():
    """A hook on a batch norm sees its own output, and a hook on a ReLU module still runs:
    convert does not fuse either; hooks set after converting fire on the dual path too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    model[1].register_forward_hook(lambda m, i, o: o - 10)
    seen = []
    model[5].register_forward_hook(lambda m, i, o: seen.append(o.min().item()))
    ref = copy.deepcopy(model).double()
    conv = convert(model).double()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(conv(x), ref(x), **F64)
    assert len(seen) == 2
    modules = dict(conv.named_modules())
    assert type(modules["1"]) is fnn.BatchNorm2d and type(modules["4"]) is fnn.BatchNorm2d

    ref = randomize_batch_norms(tv.resnet18(num_classes=10)).double()
    conv = convert(ref)
    modules = dict(conv.named_modules())
    calls = []
    for name in ("layer2.0.bn2", "layer2.0.downsample.1"):  # the first dual call's modules
        modules[name].register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(conv(x), ref(x), **F64)
    assert sorted(calls) == ["layer2.0.bn2", "layer2.0.downsample.1"]


def test_fuse_for_inference_leaves_hooked_layers():
    """nn.utils.spectral_norm recomputes the conv's weight in a pre-hook: the BN stays."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.spectral_norm(nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4)).eval()
    fused = fuse_for_inference(model)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fused(x), model(x))
    torch.testing.assert_close(fused(x), model(x))


def test_convert_shares_parameters_inplace():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
    bn = model[1]
    out = convert(model, inplace=True)
    assert type(model[1]) is fnn.BatchNormReLU2d  # replaced inside the model itself
    assert out.get_submodule("1") is model[1]
    assert out.get_submodule("1").weight is bn.weight
    assert out.get_submodule("1").running_mean is bn.running_mean
    assert type(convert(nn.BatchNorm2d(3))) is fnn.BatchNorm2d


def test_convert_refuses_uninitialized_lazy_modules():
    """A lazy batch norm becomes torch's BatchNorm2d only in its first forward, so before it
    convert could neither swap nor copy it: a clear error instead of a model left on torch's
    batch norm (inplace) or torch's error from deepcopy. Once it has run, it converts."""
    def make():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.LazyBatchNorm2d(), nn.ReLU())

    for call in (convert, partial(convert, inplace=True), fuse_for_inference):
        with pytest.raises(ValueError, match=r"1 is an uninitialized LazyBatchNorm2d; run the"):
            call(make())
    # In place, a lazy convolution is no obstacle (only batch norms are swapped); a copy is.
    lazy_conv = nn.Sequential(nn.LazyConv2d(4, 3), nn.BatchNorm2d(4), nn.ReLU())
    assert type(convert(lazy_conv, inplace=True)[1]) is fnn.BatchNormReLU2d
    with pytest.raises(ValueError, match=r"fastnn.convert: 0 is an uninitialized LazyConv2d"):
        convert(nn.Sequential(nn.LazyConv2d(4, 3), nn.BatchNorm2d(4)))

    torch.manual_seed(0)
    model = make()
    x = torch.randn(2, 3, 6, 6)
    model(x)  # materializes the lazy batch norm (a BatchNorm2d of 4 channels now)
    ref = copy.deepcopy(model)
    out = convert(model)
    assert type(out[1]) is fnn.BatchNormReLU2d
    torch.testing.assert_close(out(x), ref(x))
    torch.testing.assert_close(out[1].running_mean, ref[1].running_mean)


def test_convert_sync_batch_norm():
    """torch's SyncBatchNorm becomes fastnn's (fused with its ReLU); without a process group it
    is a plain batch norm, like torch's."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4), nn.ReLU())
    ref, model = converted_pair(ref)
    assert type(model.get_submodule("1")) is fnn.SyncBatchNormReLU
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    assert_same_training(ref, model, x, False)
    folded = fuse_for_inference(model)
    assert type(folded.get_submodule("1")) is nn.ReLU
    torch.testing.assert_close(folded(x), ref.eval()(x), **F64)


# ---------------------------------------------------------------------------------------------
# fuse_for_inference

def trained(model, x, steps=2):
    """A model whose running statistics moved away from their initial values."""
    randomize_batch_norms(model)
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(x)
    return model.eval()


@pytest.mark.parametrize("make,shape,remaining", [
    (lambda: tv.resnet18(num_classes=10), (2, 3, 32, 32), {"Identity": 20, "BatchNorm2d": 0}),
    (lambda: models.resnet50(num_classes=10), (2, 3, 32, 32), {"AddReLU": 16, "ReLU": 33}),
    (lambda: models.googlenet(num_classes=10), (2, 3, 32, 32), {"BatchNormReLU2d": 2}),
    (lambda: models.densenet121(num_classes=10), (2, 3, 32, 32),
     {"BatchNormReLU2d": 3, "_DenseBatchNormReLU2d": 58, "BatchNorm2d": 1}),
    (lambda: models.lenet_bn(), (4, 1, 28, 28), {"_FoldedLinearBatchNorm": 2}),
    (lambda: models.d2l_resnet18(), (2, 1, 32, 32), {"AddReLU": 8}),
    (lambda: Untraceable(), (2, 3, 8, 8), {"BatchNorm1d": 1}),
])
def test_fuse_for_inference(make, shape, remaining):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64)
    model = trained(make().double(), x)
    before = copy.deepcopy(model.state_dict())
    folded = fuse_for_inference(model)
    torch.testing.assert_close(folded(x), model(x), **F64)
    kinds = module_kinds(folded)
    for kind, count in remaining.items():
        assert kinds[kind] == count, (kind, kinds)
    # The model itself is untouched.
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert model.training is False and folded.training is False


def test_fuse_for_inference_is_a_fresh_copy():
    """train -> fold -> train -> fold: each copy has the weights of its moment, never stale
    ones, and a folded copy refuses training."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model = randomize_batch_norms(models.resnet18(num_classes=10)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    folded_copies = []
    for _ in range(2):
        model.train()
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.eval()
        expected = model(x)
        folded = fuse_for_inference(model)
        torch.testing.assert_close(folded(x), expected, **F64)
        folded_copies.append((folded, expected))
    first, first_expected = folded_copies[0]
    torch.testing.assert_close(first(x), first_expected, **F64)  # unaffected by later training
    assert not torch.allclose(folded_copies[1][1], first_expected)
    first.train()
    with pytest.raises(RuntimeError, match="fuse_for_inference"):
        first(x)


def test_fuse_for_inference_of_converted_model():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model = trained(convert(tv.resnet18(num_classes=10)).double(), x)
    folded = fuse_for_inference(model)
    torch.testing.assert_close(folded(x), model(x), **F64)
    assert module_kinds(folded)["AddReLU"] == 8
    # A BatchNorm1d folded into a Linear layer holds for (N, C) inputs only, and says so.
    folded = fuse_for_inference(models.lenet_bn())
    with pytest.raises(RuntimeError, match="2-D"):
        folded[10](torch.randn(2, 3, 120))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "nhwc"])
def test_add_relu(dtype, fmt):
    """The folded block's epilogue, one pass on fastnn's kernel: bitwise torch.relu(a + b),
    with its layout and gradients."""
    a = torch.randn(4, 6, 5, 3).to(dtype).contiguous(memory_format=fmt).requires_grad_(True)
    b = torch.randn(4, 6, 5, 3).to(dtype).contiguous(memory_format=fmt).requires_grad_(True)
    out = AddReLU()(a, b)
    expected = torch.relu(a + b)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert out.dtype == dtype and out.is_contiguous(memory_format=fmt)
    g = torch.randn_like(out)
    ga, gb = torch.autograd.grad(out, (a, b), g)
    ea, eb = torch.autograd.grad(expected, (a, b), g)
    torch.testing.assert_close(ga, ea, rtol=0, atol=0)
    torch.testing.assert_close(gb, eb, rtol=0, atol=0)
    x, y = torch.randn(5), torch.randn(5)  # rank 1: the plain expression
    torch.testing.assert_close(AddReLU()(x, y), torch.relu(x + y), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# The training example

def load_example():
    path = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "train.py")
    spec = importlib.util.spec_from_file_location("fastnn_train_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_example_fastnn_matches_pytorch(tmp_path):
    """LeNet-BN trained on scikit-learn's digits (real data, shipped with scikit-learn) with
    fastnn and with plain PyTorch from the same initial weights: the same loss curve, and over
    90% test accuracy."""
    pytest.importorskip("sklearn")
    example = load_example()
    (x_train, y_train, x_test, y_test), name = example.load_data("digits")
    assert name == "digits" and x_train.shape[1:] == (1, 8, 8) and len(y_test) > 300
    prepare = example.make_prepare(28, 1)
    histories = []
    torch.manual_seed(0)
    fast, _, _ = example.build_model("lenet_bn", 10, fused=True)
    plain, _, _ = example.build_model("lenet_bn", 10, fused=False)
    plain.load_state_dict(fast.state_dict(), strict=True)
    for model in (fast, plain):
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x_train, y_train), batch_size=32, shuffle=True,
            generator=torch.Generator().manual_seed(0))
        test_loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x_test, y_test), batch_size=256)
        opt = example.make_optimizer("adam", model.parameters(), lr=2e-3)
        histories.append(example.train(model, loader, test_loader, 3, opt, prepare,
                                       torch.device("cpu"), progress=False, log=lambda s: None))
    fast_h, plain_h = histories
    assert len(fast_h["step_loss"]) == len(plain_h["step_loss"]) == 3 * 45
    torch.testing.assert_close(torch.tensor(fast_h["step_loss"]),
                               torch.tensor(plain_h["step_loss"]), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(torch.tensor(fast_h["train_loss"]),
                               torch.tensor(plain_h["train_loss"]), rtol=1e-4, atol=1e-4)
    assert fast_h["train_loss"][-1] < fast_h["train_loss"][0]
    assert fast_h["test_acc"][-1] > 0.9 and plain_h["test_acc"][-1] > 0.9
    png = tmp_path / "curves.png"
    example.plot_history(fast_h, str(png), "lenet_bn")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_example_reads_mnist_files(tmp_path, monkeypatch):
    """FashionMNIST/MNIST in torchvision's layout (gzipped IDX files) are found and read; a
    missing data set asked for by name is an error, never a silent substitute."""
    import gzip
    import struct

    example = load_example()
    for name, (folder, _) in list(example._IDX_LOCATIONS.items()):
        monkeypatch.setitem(example._IDX_LOCATIONS, name, (folder, []))  # this folder only
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        labels = torch.arange(n, dtype=torch.uint8) % 10
        with gzip.open(raw / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">HBB", 0, 8, 3) + struct.pack(">III", n, 28, 28)
                    + images.numpy().tobytes())
        with open(raw / f"{prefix}-labels-idx1-ubyte", "wb") as f:
            f.write(struct.pack(">HBB", 0, 8, 1) + struct.pack(">I", n) + labels.numpy().tobytes())
        if prefix == "train":
            first = images[0]
    (x_train, y_train, x_test, y_test), name = example.load_data("auto", str(tmp_path))
    assert name == "fashion-mnist"
    assert x_train.shape == (12, 1, 28, 28) and x_test.shape == (5, 1, 28, 28)
    assert torch.equal(x_train[0, 0], first.float() / 255) and y_test.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(SystemExit, match="mnist"):
        example.load_data("mnist", str(tmp_path))


def test_training_example_main_runs(tmp_path):
    pytest.importorskip("sklearn")
    example = load_example()
    png = tmp_path / "out.png"
    history = example.main(["--model", "lenet_bn", "--dataset", "digits", "--epochs", "1",
                            "--batch-size", "128", "--no-progress", "--plot", str(png),
                            "--data-root", str(tmp_path)])
    assert len(history["test_acc"]) == 1 and png.exists()
