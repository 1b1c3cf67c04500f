"""fastnn's ops in plain PyTorch: the fallback wherever no compiled kernel exists, and the oracle
every kernel is tested against.

Each function has the semantics (and, for the op-shaped ones, the signature) of the matching
`torch.ops.fastnn` op. Statistics are accumulated in float32 (float64 for float64 input); the
output has the input's dtype. Forward functions are differentiable with respect to input, weight,
bias and residual.
"""
import torch

__all__ = [
    "accumulate_dtype",
    "batch_norm_train",
    "batch_norm_eval",
    "batch_norm_backward",
    "batch_norm_dual",
    "batch_norm_dual_backward",
    "batch_norm_stats",
    "batch_norm_backward_reduce",
    "batch_norm_backward_elemt",
    "update_running_stats",
]


def accumulate_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_channel(t, ndim):
    """[C] -> (1, C, 1, ...) so it broadcasts against an ndim-D input."""
    return t.reshape((1, -1) + (1,) * (ndim - 2))


def _reduce_dims(ndim):
    return [0] + list(range(2, ndim))


def _normalize_affine(x, mean, invstd, weight, bias, residual, relu, out_dtype):
    """[relu]((x - mean) * invstd * weight + bias [+ residual]) computed in x's dtype."""
    nd = x.dim()
    acc = x.dtype
    y = (x - _per_channel(mean, nd)) * _per_channel(invstd, nd)
    if weight is not None:
        y = y * _per_channel(weight.to(acc), nd)
    if bias is not None:
        y = y + _per_channel(bias.to(acc), nd)
    if residual is not None:
        y = y + residual.to(acc)
    if relu:
        y = torch.relu(y)
    return y.to(out_dtype)


def update_running_stats(running_mean, running_var, mean, var, momentum, count):
    """running = (1 - momentum) * running + momentum * batch, with the unbiased variance."""
    with torch.no_grad():
        if running_mean is not None:
            running_mean.copy_(mean * momentum + running_mean.to(mean.dtype) * (1.0 - momentum))
        if running_var is not None:
            bessel = count / (count - 1) if count > 1 else 1.0
            running_var.copy_(var * (momentum * bessel) + running_var.to(var.dtype) * (1.0 - momentum))


def batch_norm_train(input, weight, bias, running_mean, running_var, momentum, eps,
                     residual=None, relu=False):
    """Returns (output, save_mean, save_invstd) and updates the running statistics in place."""
    acc = accumulate_dtype(input.dtype)
    C = input.shape[1]
    if input.numel() == 0:
        zeros = input.new_zeros((C,), dtype=acc)
        # Through _normalize_affine so the (empty) output stays connected to the autograd graph.
        out = _normalize_affine(input.to(acc), zeros, zeros, weight, bias, residual, relu,
                                input.dtype)
        return out, zeros, zeros.clone()
    x = input.to(acc)
    dims = _reduce_dims(input.dim())
    # Two passes rather than torch.var_mean, whose mean is NaN (not Inf) for a channel holding an
    # Inf; torch's batch norm gives Inf there.
    mean = x.mean(dims)
    var = (x - _per_channel(mean, x.dim())).square().mean(dims)
    invstd = torch.rsqrt(var + eps)
    out = _normalize_affine(x, mean, invstd, weight, bias, residual, relu, input.dtype)
    update_running_stats(running_mean, running_var, mean.detach(), var.detach(), momentum,
                         input.numel() // C)
    return out, mean.detach(), invstd.detach()


def batch_norm_cat_with_stats(inputs, mean, var, weight, bias, running_mean, running_var,
                              momentum, eps, relu=False):
    """The fastnn op: torch.cat(inputs, 1) normalized with its given batch statistics (mean,
    biased var), the running statistics updated with them. Returns (output, save_mean,
    save_invstd)."""
    x = torch.cat(list(inputs), 1)
    out = _normalize_affine(x.to(mean.dtype), mean, torch.rsqrt(var + eps), weight, bias, None,
                            relu, x.dtype)
    if x.numel() > 0:
        update_running_stats(running_mean, running_var, mean, var, momentum,
                             x.numel() // x.shape[1])
    return out, mean.clone(), torch.rsqrt(var + eps)


def batch_norm_eval(input, weight, bias, running_mean, running_var, eps, residual=None, relu=False):
    acc = accumulate_dtype(input.dtype)
    mean = running_mean.to(acc)
    invstd = torch.rsqrt(running_var.to(acc) + eps)
    return _normalize_affine(input.to(acc), mean, invstd, weight, bias, residual, relu, input.dtype)


def batch_norm_dual(input, weight, bias, running_mean, running_var, input2, weight2, bias2,
                    running_mean2, running_var2, training, momentum, eps, momentum2, eps2, relu):
    """[relu](bn(input) + bn2(input2)), the sum taken in the accumulation dtype. Returns (output,
    mean, invstd, mean2, invstd2) like the fastnn op; in training the running statistics are
    updated in place."""
    acc = accumulate_dtype(input.dtype)
    C = input.shape[1]
    x, z = input.to(acc), input2.to(acc)
    if training:
        if input.numel() == 0:
            zeros = input.new_zeros((C,), dtype=acc)
            stats = [(zeros, zeros.clone()), (zeros.clone(), zeros.clone())]
        else:
            stats = []
            for t, rm, rv, m, e in ((x, running_mean, running_var, momentum, eps),
                                    (z, running_mean2, running_var2, momentum2, eps2)):
                mean, var = batch_norm_stats(t)
                update_running_stats(rm, rv, mean.detach(), var.detach(), m, input.numel() // C)
                stats.append((mean, torch.rsqrt(var + e)))
    else:
        stats = [(running_mean.to(acc), torch.rsqrt(running_var.to(acc) + eps)),
                 (running_mean2.to(acc), torch.rsqrt(running_var2.to(acc) + eps2))]
    (mean, invstd), (mean2, invstd2) = stats
    y2 = _normalize_affine(z, mean2, invstd2, weight2, bias2, None, False, acc)
    out = _normalize_affine(x, mean, invstd, weight, bias, y2, relu, input.dtype)
    return out, mean.detach(), invstd.detach(), mean2.detach(), invstd2.detach()


def batch_norm_dual_backward(grad_output, input, weight, input2, weight2, output, mean, invstd,
                             mean2, invstd2, training, relu, relu_mask=None):
    """(grad_input, grad_weight, grad_bias, grad_input2, grad_weight2, grad_bias2) like the op
    (the ReLU mask is taken from the output; relu_mask is not read)."""
    gx, gw, gb, g = batch_norm_backward(grad_output, input, weight, output, mean, invstd,
                                        training, relu, True)
    gz, gw2, gb2, _ = batch_norm_backward(g, input2, weight2, None, mean2, invstd2, training,
                                          False, False)
    return gx, gw, gb, gz, gw2, gb2


def batch_norm_stats(input):
    """(mean, biased variance) per channel in the accumulation dtype; zeros for an empty batch."""
    acc = accumulate_dtype(input.dtype)
    C = input.shape[1]
    if input.numel() == 0:
        return input.new_zeros((C,), dtype=acc), input.new_zeros((C,), dtype=acc)
    x = input.to(acc)
    dims = _reduce_dims(input.dim())
    mean = x.mean(dims)
    var = (x - _per_channel(mean, x.dim())).square().mean(dims)
    return mean, var


def _masked_grad(grad_output, output, relu, acc):
    g = grad_output.to(acc)
    if relu:
        # torch's ReLU backward: zero where output <= 0, the gradient elsewhere (NaN included).
        g = torch.where(output <= 0, torch.zeros((), dtype=acc, device=g.device), g)
    return g


def batch_norm_backward_reduce(grad_output, input, output, mean, invstd, relu, residual_grad):
    """(sum_dy, sum_dy_xhat, grad_residual) like the fastnn op."""
    acc = accumulate_dtype(input.dtype)
    nd = input.dim()
    dims = _reduce_dims(nd)
    g = _masked_grad(grad_output, output, relu, acc)
    xhat = (input.to(acc) - _per_channel(mean, nd)) * _per_channel(invstd, nd)
    grad_residual = g.to(input.dtype) if residual_grad else input.new_empty((0,))
    return g.sum(dims), (g * xhat).sum(dims), grad_residual


def batch_norm_backward_elemt(grad_output, input, weight, output, mean, invstd, mean_dy,
                              mean_dy_xhat, relu):
    """weight * invstd * (g - mean_dy - xhat * mean_dy_xhat), g masked when relu."""
    acc = accumulate_dtype(input.dtype)
    nd = input.dim()
    g = _masked_grad(grad_output, output, relu, acc)
    xhat = (input.to(acc) - _per_channel(mean, nd)) * _per_channel(invstd, nd)
    scale = invstd if weight is None else invstd * weight.to(acc)
    dx = (g - _per_channel(mean_dy, nd) - xhat * _per_channel(mean_dy_xhat, nd))
    return (dx * _per_channel(scale, nd)).to(input.dtype)


def batch_norm_backward(grad_output, input, weight, output, mean, invstd, training, relu,
                        residual_grad, relu_mask=None):
    """Returns (grad_input, grad_weight, grad_bias, grad_residual) like the fastnn op (the ReLU
    mask is taken from the output; relu_mask is not read)."""
    acc = accumulate_dtype(input.dtype)
    grad_bias, grad_weight, grad_residual = batch_norm_backward_reduce(
        grad_output, input, output, mean, invstd, relu, residual_grad)
    if training:
        count = max(input.numel() // max(input.shape[1], 1), 1)
        dx = batch_norm_backward_elemt(grad_output, input, weight, output, mean, invstd,
                                       grad_bias / count, grad_weight / count, relu)
    else:
        nd = input.dim()
        scale = invstd if weight is None else invstd * weight.to(acc)
        g = _masked_grad(grad_output, output, relu, acc)
        dx = (g * _per_channel(scale, nd)).to(input.dtype)
    return dx, grad_weight, grad_bias, grad_residual
