"""torch.onnx.export of fastnn's modules and models, with both of torch's exporters (the
torch.export-based one and the TorchScript one): the exported graph holds only standard ONNX
operators, the same ones, as many, as the model built on torch's own layers exports to, and
ONNX Runtime computes the outputs fastnn's kernels give. An export changes no state of the
model, and the model runs fastnn's kernels again afterwards."""
import collections
import copy
import inspect
import warnings

import pytest
import torch

import fastnn
from fastnn.models import textbook
from helpers import randomize_batch_norms

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

_HAS_DYNAMO_ARG = "dynamo" in inspect.signature(torch.onnx.export).parameters


def _exporter_available(name):
    if name == "dynamo":
        if not _HAS_DYNAMO_ARG:
            pytest.skip("this torch's torch.onnx.export has no torch.export-based exporter")
        pytest.importorskip("onnxscript")


def _export(model, args, path, exporter):
    _exporter_available(exporter)
    kwargs = {"dynamo": exporter == "dynamo"} if _HAS_DYNAMO_ARG else {}
    with warnings.catch_warnings():
        # The TorchScript exporter's deprecation warning, and export-time notes of torch's.
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(path), **kwargs)
    return onnx.load(str(path))


def _ops(model_proto):
    return collections.Counter((n.domain or "ai.onnx", n.op_type) for n in model_proto.graph.node)


def _run(model_proto, inputs):
    session = ort.InferenceSession(model_proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})


class _Residual(torch.nn.Module):
    """A ResNet block's tail as a user writes it with fastnn's modules: relu(bn(conv(x)) + x)
    through BatchNormAddReLU2d, and a shortcut BN through dual_bn_add_relu."""

    def __init__(self, fused):
        super().__init__()
        self.fused = fused
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = (fastnn.nn.BatchNormAddReLU2d if fused else torch.nn.BatchNorm2d)(8)
        self.conv2 = torch.nn.Conv2d(8, 8, 1, bias=False)
        self.bn2 = (fastnn.nn.BatchNorm2d if fused else torch.nn.BatchNorm2d)(8)
        self.bn3 = (fastnn.nn.BatchNorm2d if fused else torch.nn.BatchNorm2d)(8)
        self.bn4 = (fastnn.nn.BatchNorm2d if fused else torch.nn.BatchNorm2d)(8)

    def forward(self, x):
        a = self.bn4(x)   # a batch norm on the input itself: nothing to fold it into
        if self.fused:
            y = self.bn(self.conv(a), a)
            return fastnn.nn.dual_bn_add_relu(self.bn2, self.conv2(y), self.bn3, y)
        y = torch.relu(self.bn(self.conv(a)) + a)
        return torch.relu(self.bn2(self.conv2(y)) + self.bn3(y))


def _models():
    """name -> (builder(fused), input size): each model on fastnn's modules (fused=True) and on
    torch's (fused=False), with the same state_dict keys (convert: torchvision's ResNet-18 through
    fastnn.convert, and as it is)."""
    def resnet18(fused):
        return fastnn.models.resnet18(num_classes=10, fused=fused)

    def densenet(fused):
        return fastnn.models.densenet.DenseNet(growth_rate=8, block_config=(2, 2, 2, 2),
                                               num_init_features=16, num_classes=10, fused=fused)

    def converted(fused):
        torchvision = pytest.importorskip("torchvision")
        model = torchvision.models.resnet18(num_classes=10)
        return fastnn.convert(model) if fused else model

    return {
        "residual": (_Residual, (2, 8, 12, 12)),
        "convert": (converted, (1, 3, 32, 32)),
        "lenet_bn": (lambda fused: textbook.lenet_bn(fused=fused), (2, 1, 28, 28)),
        "mini_googlenet": (lambda fused: textbook.mini_googlenet(fused=fused), (2, 1, 28, 28)),
        "resnet18": (resnet18, (1, 3, 32, 32)),
        "densenet": (densenet, (1, 3, 32, 32)),
    }


MODELS = _models()


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("name", list(MODELS))
def test_export_matches_torch_layers_and_onnx_runtime(name, exporter, tmp_path):
    if not fastnn.ops.has_kernel("cpu"):
        pytest.skip("fastnn._C has no CPU kernels: the export would compare the reference")
    build, size = MODELS[name]
    model = randomize_batch_norms(build(True)).eval()
    plain = build(False).eval()
    plain.load_state_dict(model.state_dict())
    def fastnn_norms(m):
        return [n for n in m.modules() if isinstance(n, torch.nn.modules.batchnorm._BatchNorm)
                and type(n).__module__.startswith("fastnn")]

    assert fastnn_norms(model) and not fastnn_norms(plain)
    x = torch.randn(size)
    with torch.no_grad():
        expected = model(x)
    state = copy.deepcopy(model.state_dict())

    exported = _export(model, (x,), tmp_path / "fastnn.onnx", exporter)
    reference = _export(plain, (x,), tmp_path / "torch.onnx", exporter)

    ops = _ops(exported)
    assert all(domain == "ai.onnx" for domain, _ in ops), ops
    assert ops == _ops(reference)
    (got,) = _run(exported, [x])
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-4, atol=1e-4)

    # Nothing changed by the export, and the model is on fastnn's kernels again.
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert not fastnn.functional.onnx_exporting()
    assert fastnn.functional.use_kernel(x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_export_keeps_a_batch_norm_with_nothing_to_fold_into(exporter, tmp_path):
    """A batch norm on the model's input stays one: ONNX's BatchNormalization, with the
    module's running statistics, then the ReLU, in float32 to rounding."""
    bn = randomize_batch_norms(fastnn.nn.BatchNormReLU2d(6)).eval()
    x = torch.randn(3, 6, 5, 5)
    exported = _export(bn, (x,), tmp_path / "bn.onnx", exporter)
    ops = _ops(exported)
    assert ops[("ai.onnx", "BatchNormalization")] == 1 and ops[("ai.onnx", "Relu")] == 1, ops
    (got,) = _run(exported, [x])
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), bn(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_export_of_a_folded_model(exporter, tmp_path):
    """fuse_for_inference's copy (batch norms folded into the convolutions, the residual add
    and ReLU fastnn's add_relu) exports to what its eval model computes."""
    model = randomize_batch_norms(fastnn.models.resnet18(num_classes=10)).eval()
    folded = fastnn.fuse_for_inference(model)
    x = torch.randn(1, 3, 32, 32)
    exported = _export(folded, (x,), tmp_path / "folded.onnx", exporter)
    ops = _ops(exported)
    assert all(domain == "ai.onnx" for domain, _ in ops), ops
    assert ("ai.onnx", "BatchNormalization") not in ops
    (got,) = _run(exported, [x])
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-4, atol=1e-4)


def test_onnx_exporting_only_inside_an_onnx_export(tmp_path):
    """torch.export and torch.compile keep fastnn's ops; only an ONNX export swaps them."""
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(fastnn.functional.onnx_exporting())
            return x + 1

    x = torch.randn(2, 3)
    Probe()(x)
    torch.export.export(Probe(), (x,), strict=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace's deprecation
        torch.jit.trace(Probe(), (x,))
    assert len(seen) >= 3 and not any(seen), seen
    seen.clear()
    _export(Probe(), (x,), tmp_path / "probe.onnx", "torchscript")
    assert seen and all(seen), seen

    bn = fastnn.nn.BatchNorm2d(3).eval()
    graph = torch.export.export(bn, (torch.randn(2, 3, 4, 4),)).graph
    targets = {str(n.target) for n in graph.nodes if n.op == "call_function"}
    if fastnn.ops.has_kernel("cpu"):
        assert any(t.startswith("fastnn.") for t in targets), targets


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_export_of_a_cuda_model(exporter, tmp_path, no_tf32):
    """A model on the GPU exports the same way: its ONNX graph, run by ONNX Runtime on the CPU,
    gives what fastnn's CUDA kernels give, and the export leaves its state as it was."""
    model = randomize_batch_norms(fastnn.models.resnet18(num_classes=10)).cuda().eval()
    x = torch.randn(2, 3, 32, 32, device="cuda")
    with torch.no_grad():
        expected = model(x)
    state = copy.deepcopy(model.state_dict())
    exported = _export(model, (x,), tmp_path / "cuda.onnx", exporter)
    ops = _ops(exported)
    assert all(domain == "ai.onnx" for domain, _ in ops), ops
    (got,) = _run(exported, [x.cpu()])
    torch.testing.assert_close(torch.from_numpy(got), expected.cpu(), rtol=1e-4, atol=1e-4)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
