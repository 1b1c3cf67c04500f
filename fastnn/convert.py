"""Putting an existing model on fastnn: `convert` (training and inference) and
`fuse_for_inference` (inference only).

convert(model) swaps every torch batch norm (and timm's BatchNormAct2d) for fastnn's, sharing its
parameters and buffers, and fuses the patterns it finds:

* BN followed by a ReLU (an nn.ReLU module, F.relu, torch.relu or Tensor.relu, in place or not)
  becomes one fastnn.nn.BatchNormReLU2d;
* BN, an add of another tensor, then a ReLU (a residual block's tail) becomes one
  fastnn.nn.BatchNormAddReLU2d taking (input, residual).

What a module swap fuses safely is fused first: a BN directly followed by an nn.ReLU in an
nn.Sequential, and the blocks of torchvision's and fastnn's ResNet, DenseNet, GoogLeNet and
Inception v3 (they become fastnn's blocks, which run a downsampling shortcut's BN in the same
kernel). The other patterns are found with torch.fx when the model traces the same way in
training and in eval mode, and each is fused in the module whose forward holds it, which becomes
a torch.fx.GraphModule named like its class; every other module keeps its class, forward and
place, so the module tree, state_dict keys and parameter order are the model's.

fuse_for_inference(model) folds each batch norm that directly follows a convolution (or a Linear
layer) into that layer's weight and bias, on a copy of the model in eval mode.
"""
import copy
import inspect
import operator
import sys
from collections import Counter
from typing import Callable, Dict, List, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from fastnn import functional as fastnn_functional
from fastnn import nn as fnn
from fastnn.nn.batchnorm import _no_hooks, refuse_uninitialized

__all__ = ["convert", "fuse_for_inference", "AddReLU", "BatchNormAct2d"]

# torch module -> the fastnn module that replaces it (exact types: a subclass may have its own
# forward).
_SWAP = {
    nn.BatchNorm1d: fnn.BatchNorm1d,
    nn.BatchNorm2d: fnn.BatchNorm2d,
    nn.BatchNorm3d: fnn.BatchNorm3d,
    nn.SyncBatchNorm: fnn.SyncBatchNorm,
}

# fastnn batch norm -> (its fused BN+ReLU, its fused BN+add+ReLU).
_FUSED = {
    fnn.BatchNorm2d: (fnn.BatchNormReLU2d, fnn.BatchNormAddReLU2d),
    fnn.SyncBatchNorm: (fnn.SyncBatchNormReLU, fnn.SyncBatchNormAddReLU),
}


class BatchNormAct2d(fnn.BatchNorm2d):
    """timm's BatchNormAct2d (a BatchNorm2d whose forward then applies its `drop` and `act`
    modules) on fastnn's kernels, with the same modules and state_dict: what convert swaps in for
    it. A ReLU `act` (with an identity `drop`) runs in the batch norm's kernel."""

    def forward(self, input: Tensor) -> Tensor:
        if _bare_act(self):
            return self._bn_forward(input, None, type(self.act) is nn.ReLU)
        return self.act(self.drop(self._bn_forward(input, None, False)))


def _bare_act(bn: nn.Module, acts=(nn.Identity, nn.ReLU)) -> bool:
    """bn's drop is an identity and its act one of acts, neither with hooks."""
    drop, act = bn._modules.get("drop"), bn._modules.get("act")
    return (type(drop) is nn.Identity and type(act) in acts and _no_hooks(drop)
            and _no_hooks(act))


def _swaps() -> Dict[type, type]:
    """_SWAP, and timm's BatchNormAct2d when timm is loaded (a model can hold it only then)."""
    swaps = dict(_SWAP)
    timm_norm_act = sys.modules.get("timm.layers.norm_act")
    if timm_norm_act is not None and hasattr(timm_norm_act, "BatchNormAct2d"):
        swaps[timm_norm_act.BatchNormAct2d] = BatchNormAct2d
    return swaps


def _fused_forms(bn: nn.Module) -> Optional[Tuple[type, type]]:
    """(BN+ReLU, BN+add+ReLU) modules that can take bn's place, for a fastnn batch norm that
    computes just the batch norm; else None."""
    if type(bn) is BatchNormAct2d:
        return _FUSED[fnn.BatchNorm2d] if _bare_act(bn, (nn.Identity,)) else None
    return _FUSED.get(type(bn))


class AddReLU(nn.Module):
    """relu(input + residual): what remains of a fused BN+add+ReLU once its batch norm is folded
    into the preceding convolution."""

    adds_residual_and_relu = True

    def forward(self, input: Tensor, residual: Tensor) -> Tensor:
        return fastnn_functional.add_relu(input, residual)


# ---------------------------------------------------------------------------------------------
# Helpers

def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def _occurrences(model: nn.Module) -> Counter:
    """How many places of the module tree hold each module (by id)."""
    return Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))


def _swap_batch_norms(module: nn.Module, memo: Dict[int, nn.Module],
                      swaps: Dict[type, type]) -> None:
    for name, child in list(module.named_children()):
        if type(child) in swaps:
            if id(child) not in memo:
                memo[id(child)] = swaps[type(child)].from_module(child)
            setattr(module, name, memo[id(child)])
        else:
            _swap_batch_norms(child, memo, swaps)


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with every batch norm (torch's, fastnn's, a user's) kept as one call.

    With `plain_calls` it records, for each module whose forward it traces, whether every call
    passed it only traced values (no constant, no default left out): such a module computes the
    same when traced on its own."""

    def __init__(self, plain_calls: Optional[Dict[str, bool]] = None, **kwargs):
        super().__init__(**kwargs)
        self.plain_calls = plain_calls

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _BatchNorm) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        if self.plain_calls is not None:
            path = self.path_of_module(m)
            if not self.is_leaf_module(m, path):
                plain = _plain_call(m, args, kwargs)
                self.plain_calls[path] = self.plain_calls.get(path, True) and plain
        return super().call_module(m, forward, args, kwargs)


def _plain_call(m: nn.Module, args, kwargs) -> bool:
    """A call of m that gives every parameter of its forward a traced value."""
    try:
        params = inspect.signature(m.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    fixed = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    values = list(args) + list(kwargs.values())
    return (all(p.kind in fixed for p in params) and len(values) == len(params)
            and all(isinstance(v, fx.Proxy) for v in values))


class _LocalTracer(_Tracer):
    """Traces one module of a model: its submodules are single calls except those named in
    `inline` (paths relative to the module), whose forward is traced into the graph. The fused
    functions stay single calls too, so that a GraphModule made with it keeps them when torch
    traces it again (torch.load of a saved model)."""

    def __init__(self, inline: Set[str] = frozenset()):
        super().__init__(autowrap_functions=(fnn.bn_add_relu, fnn.dual_bn_add_relu))
        self.inline = inline

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _BatchNorm) or module_qualified_name not in self.inline


_CALL_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
               "_backward_pre_hooks")


def _trace(model: nn.Module, both_modes: bool,
           tracer: Callable[[], fx.Tracer] = _Tracer) -> Optional[fx.Graph]:
    """The model's graph, or None when it does not trace (or, with both_modes, when its graph in
    training differs from its graph in eval, e.g. a branch taken only in training). Every
    module's training flag is left as it was."""
    modes = [(m, m.training) for m in model.modules()]
    # Hooks stay out of the tracing (fx would call them with its proxies); the traced graphs
    # call every module that has hooks, which run then.
    hooks = [(m, name, getattr(m, name)) for m in model.modules() for name in _CALL_HOOKS
             if getattr(m, name, None)]
    try:
        for m, name, _ in hooks:
            setattr(m, name, type(getattr(m, name))())
        graphs = []
        for mode in ((True, False) if both_modes else (model.training,)):
            model.train(mode)
            graphs.append(tracer().trace(model))
    except Exception:  # anything fx cannot trace: data-dependent control flow, odd inputs, ...
        return None
    finally:
        for m, mode in modes:
            m.training = mode
        for m, name, value in hooks:
            setattr(m, name, value)
    if both_modes and graphs[0].python_code("self").src != graphs[1].python_code("self").src:
        return None
    return graphs[0]


def _uses_all_state(model: nn.Module, graph: fx.Graph) -> bool:
    used = [n.target for n in graph.nodes if n.op in ("call_module", "get_attr")]
    return all(any(key == t or key.startswith(t + ".") for t in used)
               for key in model.state_dict())


def _is_relu(node: fx.Node, src: fx.Node, modules: Dict[str, nn.Module]) -> bool:
    """node computes relu(src), in place or not."""
    if node.op == "call_module":
        relu = modules.get(node.target)
        return (type(relu) is nn.ReLU and node.args == (src,) and not node.kwargs
                and _no_hooks(relu))
    if node.op == "call_function":
        return (node.target in (torch.relu, torch.relu_, F.relu) and len(node.args) in (1, 2)
                and node.args[0] is src and set(node.kwargs) <= {"inplace"})
    if node.op == "call_method":
        return node.target in ("relu", "relu_") and node.args == (src,) and not node.kwargs
    return False


def _added_to(node: fx.Node, src: fx.Node) -> Optional[fx.Node]:
    """When node computes src + other (or other + src, in place or not) with `other` a tensor the
    graph computes, that other node; else None."""
    if node.kwargs or len(node.args) != 2:
        return None
    if not ((node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add))
            or (node.op == "call_method" and node.target in ("add", "add_"))):
        return None
    a, b = node.args
    other = b if a is src else a if b is src else None
    # Parameters and buffers (get_attr) are usually broadcast biases, not residuals.
    if not isinstance(other, fx.Node) or other is src or other.op == "get_attr":
        return None
    in_place = node.target in (operator.iadd, "add_")
    if in_place and a is other and len(other.users) > 1:
        return None  # other.add_(src) changes a tensor that is read elsewhere too
    return other


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    return next(iter(node.users)) if len(node.users) == 1 else None


# ---------------------------------------------------------------------------------------------
# convert: fusion on an fx graph

class _Site:
    """One fusion found on a graph: `bn` (a call of a fastnn batch norm) followed by `relu`, or
    by `add` of `other` and then `relu`; `dual` when other is a shortcut's batch norm call that
    runs in the same kernel."""

    def __init__(self, bn: fx.Node, relu: fx.Node, add: Optional[fx.Node] = None,
                 other: Optional[fx.Node] = None, dual: bool = False):
        self.bn, self.relu, self.add, self.other, self.dual = bn, relu, add, other, dual

    def nodes(self) -> List[fx.Node]:
        """The nodes the fused call replaces."""
        return [n for n in (self.bn, self.add, self.relu, self.other if self.dual else None)
                if n is not None]

    def batch_norms(self) -> List[str]:
        return [self.bn.target] + ([self.other.target] if self.dual else [])


def _skip_identities(model: nn.Module, graph: fx.Graph) -> None:
    """Drops the graph's calls of nn.Identity modules without hooks that take a batch norm's
    output (a block's identity attention or drop path, between its last batch norm and the add),
    so that the patterns around them fuse. Other identities (a head set to nn.Identity, which may
    be replaced later) stay."""
    modules = dict(model.named_modules())
    for node in list(graph.nodes):
        m = modules.get(node.target) if node.op == "call_module" else None
        src = node.args[0] if len(node.args) == 1 else None
        if (type(m) is nn.Identity and _no_hooks(m) and not node.kwargs
                and isinstance(src, fx.Node) and src.op == "call_module"
                and _fused_forms(modules.get(src.target)) is not None):
            node.replace_all_uses_with(src)
            graph.erase_node(node)


def _fusion_sites(model: nn.Module, graph: fx.Graph,
                  allowed: Optional[Set[str]] = None) -> List[_Site]:
    """The BN->ReLU and BN->add->ReLU patterns of graph that fastnn's fused modules can run,
    each node in one site at most; with `allowed`, only sites whose batch norms it names."""
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    occurrences = _occurrences(model)
    sites, taken = [], set()
    for node in graph.nodes:
        if node.op != "call_module" or node in taken:
            continue
        bn = modules.get(node.target)
        if (_fused_forms(bn) is None or calls[node.target] != 1 or occurrences[id(bn)] != 1
                or not _no_hooks(bn)):  # a hook sees the batch norm's own output
            continue
        if len(node.args) != 1 or node.kwargs:
            continue
        user = _only_user(node)
        if user is None or user in taken:
            continue
        if _is_relu(user, node, modules):
            site = _Site(node, user)
        else:
            other = _added_to(user, node)
            relu = _only_user(user) if other is not None else None
            if relu is None or not _is_relu(relu, user, modules):
                continue
            dual = other not in taken and _plain_bn_call(other, modules, calls, occurrences)
            site = _Site(node, relu, user, other, dual)
        if allowed is not None:
            if site.dual and site.other.target not in allowed:
                site.dual = False
            if node.target not in allowed:
                continue
        sites.append(site)
        taken.update(site.nodes())
    return sites


def _inside(path: str, containers: Set[str]) -> bool:
    return any(path.startswith(c + ".") for c in containers)


def _fuse_graph(model: nn.Module, graph: fx.Graph, sites: List[_Site],
                inline: Set[str] = frozenset()) -> None:
    """Rewrites graph (and swaps the matching modules inside model) so that each site runs as
    fastnn's fused module or function. A module in `inline` (traced through) must compute, called
    itself, what it did: a BN+add+ReLU whose batch norm it holds is a call of
    fastnn.nn.bn_add_relu or dual_bn_add_relu instead of a swap, and its ReLU modules stay (a
    BN->ReLU of its own, fused, then applies its ReLU to values already through one)."""
    for site in sites:
        node = site.bn
        bn = model.get_submodule(node.target)
        bn_relu, bn_add_relu = _fused_forms(bn)
        swap = not _inside(node.target, inline)
        if site.add is None:
            _set_submodule(model, node.target, bn_relu.from_module(bn))
            site.relu.replace_all_uses_with(node)
            graph.erase_node(site.relu)
            continue
        # The add's other operand as it is now: an earlier fusion may have replaced it.
        a, b = site.add.args
        x, other = node.args[0], (b if a is node else a)
        # The residual may be computed after the BN (torchvision computes the shortcut after the
        # main branch): the fused call goes where the add was.
        with graph.inserting_before(site.add):
            if site.dual:
                # relu(bn(x) + bn2(z)): both batch norms in one kernel, both modules staying
                # where they are (same state_dict), read by the call.
                fused = graph.call_function(fnn.dual_bn_add_relu,
                                            (graph.get_attr(node.target), x,
                                             graph.get_attr(other.target), other.args[0]))
            elif swap:
                fused = graph.call_module(node.target, (x, other))
            else:
                fused = graph.call_function(fnn.bn_add_relu,
                                            (graph.get_attr(node.target), x, other))
        if swap:
            _set_submodule(model, node.target, bn_add_relu.from_module(bn))
        site.relu.replace_all_uses_with(fused)
        for n in [site.relu, site.add, node] + ([other] if site.dual else []):
            graph.erase_node(n)
    _drop_unused_relus(model, graph, sites, inline)
    graph.lint()


def _drop_unused_relus(model: nn.Module, graph: fx.Graph, sites: List[_Site],
                       inline: Set[str]) -> None:
    """ReLU modules whose every call was fused become identities (as in fastnn's own models),
    but for those of a module traced through, which called itself still applies them."""
    called = {n.target for n in graph.nodes if n.op == "call_module"}
    occurrences = _occurrences(model)
    for site in sites:
        target = site.relu.target
        if (site.relu.op == "call_module" and target not in called
                and not _inside(target, inline)):
            relu = model.get_submodule(target)
            if type(relu) is nn.ReLU and occurrences[id(relu)] == 1:
                _set_submodule(model, target, nn.Identity())


def _plain_bn_call(node: fx.Node, modules: Dict[str, nn.Module], calls: Counter,
                   occurrences: Counter) -> bool:
    """node is the only call of a fastnn BatchNorm2d held in one place, on one tensor, whose
    result only the fused BN+add+ReLU uses: a downsampling shortcut's batch norm."""
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs or len(node.users) != 1:
        return False
    bn = modules.get(node.target)
    return (type(bn) in (fnn.BatchNorm2d, BatchNormAct2d)
            and _fused_forms(bn) == _FUSED[fnn.BatchNorm2d] and calls[node.target] == 1
            and occurrences[id(bn)] == 1 and _no_hooks(bn))


# ---------------------------------------------------------------------------------------------
# convert: fusion by module swap, for models fx cannot use

def _adopt(cls: type, old: nn.Module, replace: Dict[str, nn.Module], **attrs) -> nn.Module:
    """An instance of cls with old's state, children (some replaced) and hooks: for swapping a
    block's class for fastnn's fused one with the same layout."""
    new = cls.__new__(cls)
    new.__dict__.update(old.__dict__)
    new._modules = type(old._modules)(old._modules)
    for name, module in replace.items():
        new._modules[name] = module
    for name, value in attrs.items():
        setattr(new, name, value)
    return new


def _is_plain_bn(m: nn.Module) -> bool:
    return type(m) is fnn.BatchNorm2d and _no_hooks(m)


def _is_single_relu(m: nn.Module, occurrences: Counter) -> bool:
    return type(m) is nn.ReLU and occurrences[id(m)] == 1 and _no_hooks(m)


def _fuse_residual(cls: type, relu_bns: Tuple[str, ...], add_bn: str) -> Callable:
    """A rule for a residual block whose BNs are relu_bns (each followed by the block's ReLU) and
    add_bn (followed by the shortcut add and the ReLU)."""
    def rule(block: nn.Module, occurrences: Counter) -> Optional[nn.Module]:
        names = relu_bns + (add_bn,)
        if not all(_is_plain_bn(getattr(block, n, None)) for n in names):
            return None
        relu = getattr(block, "relu", None)  # shared by the block's BNs, when it has one
        if relu is not None and not _is_single_relu(relu, occurrences):
            return None
        replace = {n: fnn.BatchNormReLU2d.from_module(getattr(block, n)) for n in relu_bns}
        replace[add_bn] = fnn.BatchNormAddReLU2d.from_module(getattr(block, add_bn))
        if relu is not None:
            replace["relu"] = nn.Identity()
        return _adopt(cls, block, replace, fused=True)
    return rule


def _fuse_pairs(*pairs: Tuple[str, str]) -> Callable:
    """A rule for a module whose forward applies each (bn, relu) pair of its modules in turn."""
    def rule(block: nn.Module, occurrences: Counter) -> Optional[nn.Module]:
        for bn_name, relu_name in pairs:
            bn, relu = getattr(block, bn_name, None), getattr(block, relu_name, None)
            if _is_plain_bn(bn) and _is_single_relu(relu, occurrences):
                setattr(block, bn_name, fnn.BatchNormReLU2d.from_module(bn))
                setattr(block, relu_name, nn.Identity())
        return None
    return rule


def _fuse_basic_conv(block: nn.Module, occurrences: Counter) -> Optional[nn.Module]:
    """conv, bn, F.relu (GoogLeNet's and Inception v3's BasicConv2d) -> fastnn's BasicConv2d."""
    from fastnn.models.googlenet import BasicConv2d

    if not _is_plain_bn(getattr(block, "bn", None)):
        return None
    return _adopt(BasicConv2d, block, {"bn": fnn.BatchNormReLU2d.from_module(block.bn)},
                  fused=True)


def _block_rules() -> Dict[type, Callable]:
    """Module class -> rule(module, occurrences) that fuses in place or returns a replacement."""
    from fastnn.models.densenet import _DenseLayer, _Transition
    from fastnn.models.googlenet import BasicConv2d
    from fastnn.models.resnet import BasicBlock, Bottleneck, ResNet
    from fastnn.models.textbook import Residual

    rules = {
        BasicBlock: _fuse_residual(BasicBlock, ("bn1",), "bn2"),
        Bottleneck: _fuse_residual(Bottleneck, ("bn1", "bn2"), "bn3"),
        ResNet: _fuse_pairs(("bn1", "relu")),
        _DenseLayer: _fuse_pairs(("norm1", "relu1"), ("norm2", "relu2")),
        _Transition: _fuse_pairs(("norm", "relu")),
        BasicConv2d: _fuse_basic_conv,
        Residual: _fuse_residual(Residual, ("bn1",), "bn2"),
    }
    # torchvision's classes, when torchvision is loaded (a model can hold them only then).
    tv_resnet = sys.modules.get("torchvision.models.resnet")
    if tv_resnet is not None:
        rules[tv_resnet.BasicBlock] = rules[BasicBlock]
        rules[tv_resnet.Bottleneck] = rules[Bottleneck]
        rules[tv_resnet.ResNet] = rules[ResNet]
    tv_densenet = sys.modules.get("torchvision.models.densenet")
    if tv_densenet is not None:
        rules[tv_densenet._DenseLayer] = rules[_DenseLayer]
        rules[tv_densenet._Transition] = rules[_Transition]
    for name in ("torchvision.models.googlenet", "torchvision.models.inception"):
        tv = sys.modules.get(name)
        if tv is not None:
            rules[tv.BasicConv2d] = _fuse_basic_conv
    return rules


def _runs_in_order(module: nn.Module) -> bool:
    """An nn.Sequential (or a subclass keeping its forward): each child feeds the next only."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _fuse_modules(model: nn.Module) -> nn.Module:
    """Fuses what a module swap can fuse safely; returns the (possibly replaced) root."""
    rules = _block_rules()
    occurrences = _occurrences(model)

    def visit(module: nn.Module) -> nn.Module:
        for name, child in list(module.named_children()):
            new = visit(child)
            if new is not child:
                setattr(module, name, new)
        if _runs_in_order(module):
            items = list(module._modules.items())
            for (bn_name, bn), (relu_name, relu) in zip(items, items[1:]):
                if (_fused_forms(bn) is not None and occurrences[id(bn)] == 1
                        and _no_hooks(bn) and _is_single_relu(relu, occurrences)):
                    module._modules[bn_name] = _fused_forms(bn)[0].from_module(bn)
                    module._modules[relu_name] = nn.Identity()
        rule = rules.get(type(module))
        if rule is not None:
            new = rule(module, occurrences)
            if new is not None:
                return new
        return module

    return visit(model)


# ---------------------------------------------------------------------------------------------
# convert: each fusion made in the module whose forward holds it

def _enclosing(node: fx.Node) -> str:
    """The path of the module whose forward made node ('' for the model's own forward)."""
    names = [name for name, _ in node.meta.get("nn_module_stack", {}).values()]
    if node.op == "call_module":
        names = names[:-1]  # the called module itself
    return names[-1] if names else ""


def _parts(path: str) -> List[str]:
    return path.split(".") if path else []


def _common_ancestor(paths) -> str:
    parts = [_parts(p) for p in paths]
    common = []
    for level in zip(*parts):
        if any(name != level[0] for name in level):
            break
        common.append(level[0])
    return ".".join(common)


def _between(owner: str, path: str) -> List[str]:
    """The modules from owner (excluded) down to path (included)."""
    base, parts = _parts(owner), _parts(path)
    return [".".join(parts[:i]) for i in range(len(base) + 1, len(parts) + 1)]


def _relative(owner: str, path: str) -> str:
    return path[len(owner) + 1:] if owner else path


_HOOK_DICTS = _CALL_HOOKS + ("_is_full_backward_hook", "_state_dict_hooks",
                             "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                             "_load_state_dict_post_hooks")


def _graph_module(module: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """module with its forward replaced by graph: a GraphModule named like its class, holding
    module's own children (the same objects, containers included, in their order), parameters,
    buffers, plain attributes and hooks."""
    gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
    gm._modules = type(gm._modules)(module._modules)
    gm._parameters = type(gm._parameters)(module._parameters)
    gm._buffers = type(gm._buffers)(module._buffers)
    gm._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    for source in (vars(type(module)), vars(module)):
        for name, value in source.items():
            if (not name.startswith("_") and name not in vars(gm) and not callable(value)
                    and not isinstance(value, (property, classmethod, staticmethod))):
                vars(gm)[name] = value
    for name in _HOOK_DICTS:  # the same dicts: the handles of hooks set before still work
        if hasattr(module, name):
            setattr(gm, name, getattr(module, name))
    gm.training = module.training
    return gm


class _Planned:
    """A site of the model's graph and where it is fused: in `owner`'s own forward, tracing
    through the modules in `through`."""

    def __init__(self, site: _Site, owner: str, through: Set[str]):
        self.site, self.owner, self.through = site, owner, through


def _plan(site: _Site, modules: Dict[str, nn.Module]) -> Optional[_Planned]:
    inside = {_enclosing(n) for n in site.nodes()}
    owner = _common_ancestor(inside)
    through = {p for path in inside for p in _between(owner, path)}
    if through and site.add is None:
        # A BN->ReLU across modules (a Sequential ending in a batch norm, the ReLU after it):
        # fusing it would change what the module holding the batch norm returns.
        return None
    if not all(_no_hooks(modules[p]) for p in through):
        return None  # a hook on a module traced through would no longer fire
    if isinstance(modules.get(owner), _CONTAINERS):
        return None  # a GraphModule would not index like the container
    return _Planned(site, owner, through)


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _fuse_by_graph(model: nn.Module, graph: fx.Graph, plain_calls: Dict[str, bool]) -> nn.Module:
    """Makes the fusions found on the model's graph, each in the module whose forward holds it:
    the innermost module that computes every node of the fusion (its owner). The owner is traced
    on its own, with only the modules between it and those nodes traced through (a shortcut's
    nn.Sequential(conv, bn), say), and becomes a GraphModule named like its class. Every other
    module keeps its class, its forward and its place in the tree, so hooks on a block still
    fire, containers still index, and a module traced through still computes, called itself,
    what it did. An owner whose calls pass constants or leave defaults out (it could trace
    otherwise on its own) hands its fusions to its parent."""
    modules = dict(model.named_modules())
    groups: Dict[str, List[_Planned]] = {}
    _skip_identities(model, graph)
    for site in _fusion_sites(model, graph):
        planned = _plan(site, modules)
        if planned is not None:
            groups.setdefault(planned.owner, []).append(planned)

    def through(owner: str) -> Set[str]:
        return set().union(*(p.through for p in groups[owner]))

    def absorb() -> None:
        """An owner traced through by another is fused by that other."""
        merged = True
        while merged:
            merged = False
            for inner in list(groups):
                outer = next((o for o in groups if o != inner and inner in through(o)), None)
                if outer is not None:
                    for p in groups[inner]:
                        p.through |= set(_between(outer, inner))
                    groups[outer].extend(groups.pop(inner))
                    merged = True

    absorb()
    while groups:
        owner = max(groups, key=lambda p: len(_parts(p)))  # innermost first
        planned = groups.pop(owner)
        module = model.get_submodule(owner) if owner else model
        inline = {_relative(owner, p) for p in set().union(*(p.through for p in planned))}
        local = None
        if owner == "" or plain_calls.get(owner, False):
            local = _trace(module, both_modes=True, tracer=lambda: _LocalTracer(inline))
        if local is None or not _uses_all_state(module, local):
            if not owner:
                continue
            # Fused by the parent instead, tracing through this module (BN->add->ReLU only).
            parent = owner.rpartition(".")[0]
            for p in planned:
                if p.site.add is not None and not isinstance(modules.get(parent), _CONTAINERS):
                    p.owner, p.through = parent, p.through | {owner}
                    groups.setdefault(parent, []).append(p)
            absorb()
            continue
        allowed = {_relative(owner, t) for p in planned for t in p.site.batch_norms()}
        _skip_identities(module, local)
        local_sites = _fusion_sites(module, local, allowed)
        if not local_sites:
            continue
        _fuse_graph(module, local, local_sites, inline)
        gm = _graph_module(module, local)
        if not owner:
            return gm
        _set_submodule(model, owner, gm)
    return model


def convert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The model on fastnn: same outputs, gradients and running statistics, faster.

    Every torch.nn.BatchNorm1d/2d/3d and SyncBatchNorm (exactly those classes; subclasses may
    have their own forward), and timm's BatchNormAct2d (as fastnn.convert.BatchNormAct2d), becomes
    fastnn's, sharing its parameters and buffers, and BN->ReLU
    and BN->add->ReLU are fused into fastnn.nn.BatchNormReLU2d / BatchNormAddReLU2d. A
    BN->add->ReLU whose residual is another batch norm's output (a ResNet block's downsampling
    shortcut) becomes one fastnn.nn.dual_bn_add_relu of both.

    Known blocks (torchvision's and fastnn's ResNet, DenseNet, GoogLeNet and Inception v3) and
    nn.Sequential containers are fused by module swaps. When the model traces with torch.fx to
    the same graph in training and in eval mode, the other patterns are found on that graph and
    each is fused in the innermost module whose forward computes all of it (a residual block,
    say), which becomes a torch.fx.GraphModule named like its class with the same children,
    parameters, buffers, attributes and hooks; every other module keeps its class, forward and
    place. So the module tree and state_dict keys are the model's, containers index as before,
    and hooks set on a block after converting fire. When a fusion needs a batch norm inside
    another module (a shortcut's nn.Sequential(conv, bn), a residual branch ending in a batch
    norm), that module is traced through: it is no longer called itself (its hooks would not
    fire, so it has none at conversion), and its batch norm stays as it is, fused by the call
    (fastnn.nn.bn_add_relu, dual_bn_add_relu), so the module called itself still computes what
    it did. A BN->ReLU across modules (a Sequential ending in a batch norm, the ReLU after it)
    is left unfused: fusing it would change what that Sequential returns.

    Calls of nn.Identity modules without hooks that take a batch norm's output (an identity drop
    path or attention before the add) are dropped from the fused modules' graphs; other
    identities (a head set to nn.Identity, to be replaced) are still called. A fused add whose residual has another size or
    dtype (a per-channel residual; a float32
    shortcut under autocast) is computed as torch would. A batch norm or ReLU module with hooks,
    and an in-place add into a residual that is read again, are left unfused.

    Args:
        model: any module.
        inplace: convert `model` itself instead of a deep copy: its batch norms are replaced
            in place (no parameter or buffer is copied), and the returned module is the one to
            call (`model`'s own forward may not call a fused module the way it expects).
    """
    # A lazy batch norm would stay torch's (it becomes a BatchNorm2d only in its first forward);
    # the copy would fail on any lazy module.
    refuse_uninitialized(model, "fastnn.convert", torch.nn.Module if not inplace else _BatchNorm)
    if not inplace:
        model = copy.deepcopy(model)
    swaps = _swaps()
    if type(model) in swaps:
        return swaps[type(model)].from_module(model)
    _swap_batch_norms(model, {}, swaps)
    # Known blocks and nn.Sequential first: module swaps keep every class and forward.
    model = _fuse_modules(model)
    plain_calls: Dict[str, bool] = {}
    graph = _trace(model, both_modes=True, tracer=lambda: _Tracer(plain_calls))
    # A GraphModule keeps only what its graph uses: fx is used only when that is all the state.
    if graph is not None and _uses_all_state(model, graph):
        return _fuse_by_graph(model, graph, plain_calls)
    return model


# ---------------------------------------------------------------------------------------------
# fuse_for_inference

_CONV_FOR_BN = {
    1: (nn.Conv1d, nn.Linear),
    2: (nn.Conv2d,),
    3: (nn.Conv3d,),
}


def _bn_rank(bn: nn.Module) -> Optional[int]:
    for cls, rank in ((nn.BatchNorm1d, 1), (nn.BatchNorm2d, 2), (nn.BatchNorm3d, 3)):
        if isinstance(bn, cls):
            return rank
    return None


def _folded_replacement(bn: nn.Module) -> Optional[nn.Module]:
    """What is left of bn once folded: None when it cannot be folded."""
    if not isinstance(bn, _BatchNorm) or bn.running_mean is None or bn.running_var is None:
        return None  # without running statistics eval normalizes with the batch's
    if isinstance(bn, (fnn.BatchNormAddReLU2d, fnn.SyncBatchNormAddReLU)):
        return AddReLU()
    if isinstance(bn, (fnn.BatchNormReLU2d, fnn.SyncBatchNormReLU)):
        return nn.ReLU()
    if type(bn) in _SWAP or type(bn) in _SWAP.values():
        return nn.Identity()
    if type(bn) is BatchNormAct2d and _bare_act(bn):
        return nn.ReLU() if type(bn.act) is nn.ReLU else nn.Identity()
    return None  # a subclass with its own forward


def _can_fold(layer: nn.Module, bn: nn.Module) -> bool:
    if isinstance(bn, (nn.SyncBatchNorm, fnn.SyncBatchNorm)):
        ranks = (1, 2, 3)  # SyncBatchNorm takes any rank
    else:
        ranks = (_bn_rank(bn),)
    if not any(type(layer) in _CONV_FOR_BN.get(r, ()) for r in ranks):
        return False
    if parametrize.is_parametrized(layer) or not _no_hooks(layer) or not _no_hooks(bn):
        # A parametrized weight, or one that a pre-hook recomputes (nn.utils.spectral_norm,
        # weight_norm), cannot take the folded values; a hook on either module would no
        # longer see what it saw.
        return False
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    return out == bn.num_features and _folded_replacement(bn) is not None


def _fold(layer: nn.Module, bn: nn.Module) -> None:
    """layer's weight and bias <- those of bn(layer(x)) in eval (computed in float64)."""
    with torch.no_grad():
        acc = torch.float64
        weight = layer.weight
        scale = torch.rsqrt(bn.running_var.to(acc) + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.to(acc)
        shift = -bn.running_mean.to(acc) * scale
        if bn.bias is not None:
            shift = shift + bn.bias.to(acc)
        bias = layer.bias.to(acc) if layer.bias is not None else torch.zeros_like(shift)
        new_weight = weight.to(acc) * scale.reshape((-1,) + (1,) * (weight.dim() - 1))
        layer.weight = nn.Parameter(new_weight.to(weight.dtype), weight.requires_grad)
        layer.bias = nn.Parameter((bias * scale + shift).to(weight.dtype), weight.requires_grad)


class _FoldedLinearBatchNorm(nn.Identity):
    """A BatchNorm1d folded into the Linear layer before it; that holds for (N, C) inputs only
    (BatchNorm1d normalizes dim 1, Linear's features are the last dim)."""

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() != 2:
            raise RuntimeError(f"this BatchNorm1d was folded into the Linear layer before it for "
                               f"2-D (N, C) inputs, got a {input.dim()}-D input")
        return input


def _fold_pairs_from_graph(model: nn.Module, graph: fx.Graph) -> List[Tuple[str, str]]:
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1 or not node.args:
            continue
        src = node.args[0]
        if (not isinstance(src, fx.Node) or src.op != "call_module" or calls[src.target] != 1
                or len(src.users) != 1):
            continue
        if _can_fold(modules[src.target], modules[node.target]):
            pairs.append((src.target, node.target))
    return pairs


# Classes whose forward applies each (layer, bn) pair directly in turn.
def _fold_pair_rules() -> Dict[type, Tuple[Tuple[str, str], ...]]:
    from fastnn.models.googlenet import BasicConv2d
    from fastnn.models.resnet import BasicBlock, Bottleneck, ResNet
    from fastnn.models.textbook import Residual

    rules = {
        ResNet: (("conv1", "bn1"),),
        BasicBlock: (("conv1", "bn1"), ("conv2", "bn2")),
        Bottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
        BasicConv2d: (("conv", "bn"),),
        Residual: (("conv1", "bn1"), ("conv2", "bn2")),
    }
    tv_resnet = sys.modules.get("torchvision.models.resnet")
    if tv_resnet is not None:
        rules[tv_resnet.ResNet] = rules[ResNet]
        rules[tv_resnet.BasicBlock] = rules[BasicBlock]
        rules[tv_resnet.Bottleneck] = rules[Bottleneck]
    for name in ("torchvision.models.googlenet", "torchvision.models.inception"):
        tv = sys.modules.get(name)
        if tv is not None:
            rules[tv.BasicConv2d] = rules[BasicConv2d]
    return rules


def _fold_pairs_from_modules(model: nn.Module) -> List[Tuple[str, str]]:
    rules = _fold_pair_rules()
    pairs = []
    for path, module in model.named_modules():
        prefix = path + "." if path else ""
        if _runs_in_order(module):
            names = list(module._modules)
            candidates = list(zip(names, names[1:]))
        else:
            candidates = rules.get(type(module), ())
        for layer_name, bn_name in candidates:
            layer, bn = module._modules.get(layer_name), module._modules.get(bn_name)
            if layer is not None and bn is not None and _can_fold(layer, bn):
                pairs.append((prefix + layer_name, prefix + bn_name))
    return pairs


def _refuse_training(module: nn.Module, args) -> None:
    if module.training:
        raise RuntimeError("this model was made by fastnn.fuse_for_inference: its batch norms are "
                           "folded into the convolutions before them, so it runs in eval mode "
                           "only; train the original model and fold it again")


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """A copy of the model for inference, with each batch norm that directly follows a
    convolution (or a Linear layer, for (N, C) inputs) folded into that layer's weight and bias.

    The result gives the model's eval-mode outputs. It is a copy in eval mode: the model itself
    is untouched and can go on training, and the copy never sees those updates (fold again after
    training: nothing is ever stale). The copy refuses to run in training mode. A folded BN
    becomes an nn.Identity, a fused BN+ReLU an nn.ReLU and a fused BN+add+ReLU an AddReLU; batch
    norms that do not directly follow a convolution (DenseNet's pre-activations) stay as they
    are, in eval mode.

    The conv->BN pairs are found with torch.fx when the model traces in eval mode, otherwise in
    nn.Sequential containers and the blocks of fastnn's and torchvision's ResNet and GoogLeNet.
    A pair is folded only when each module is called once and the conv's output goes nowhere
    else.
    """
    refuse_uninitialized(model, "fastnn.fuse_for_inference")
    model = copy.deepcopy(model)
    model.eval()
    graph = _trace(model, both_modes=False)
    if graph is not None:
        pairs = _fold_pairs_from_graph(model, graph)
    else:
        pairs = _fold_pairs_from_modules(model)
    occurrences = _occurrences(model)
    for layer_path, bn_path in pairs:
        layer, bn = model.get_submodule(layer_path), model.get_submodule(bn_path)
        if occurrences[id(layer)] != 1 or occurrences[id(bn)] != 1:
            continue
        replacement = _folded_replacement(bn)
        if isinstance(layer, nn.Linear) and isinstance(replacement, nn.Identity):
            replacement = _FoldedLinearBatchNorm()
        _fold(layer, bn)
        _set_submodule(model, bn_path, replacement)
    model.register_forward_pre_hook(_refuse_training)
    return model
