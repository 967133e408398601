"""Book-keeping ghost clipping: DP-SGD's clipped gradient sum from one backward pass.

Opacus' ghost clipping (`grad_sample_mode: ghost`) runs the backward pass twice: once for every
sample's gradient norm, once more for the sum of the clipped gradients, sum_i c_i * grad(l_i)
with c_i = min(1, C / ||grad(l_i)||). Book-keeping clipping (Bu et al., ICML 2023,
"Differentially private optimization on large model at small cost") needs one. For a layer
with input a and output o, both the per-sample gradient norm and the weight gradient are
functions of a and of the output gradient g = dl/do alone, so one backward that yields the
output gradients of every trainable layer is enough: the norms come from (a, g), the clip
coefficients from the norms, and each layer's clipped gradient sum from (a, c * g) directly.

That backward is `torch.autograd.grad(sum_i l_i, [o_1 .. o_L])`. Asked only for the layers'
outputs, autograd runs each layer's input-gradient kernel and skips its weight-gradient kernel,
and the parameters' .grad stay untouched; the weight gradients are then computed once, from
the clipped g, by the same kernels a plain backward would run. A step costs one forward, one
input-gradient pass, one weight-gradient pass (as a plain step) plus the norms, instead of
ghost clipping's one forward and two full backwards. Samples must not interact in the forward
pass (no BatchNorm; DP-safe models use GroupNorm), so sample i's output gradient is dl_i/do_i.

Per layer, the squared per-sample norms: Linear (2-D or N x ... x features inputs) and Conv2d
take the cheaper of the ghost norm <a a^T, g g^T> and the per-sample gradient (the rule and
the Conv2d code are fedray.privacy.ghost_norms'; grouped convolutions take the per-sample
gradient); GroupNorm and LayerNorm from the per-sample gradients sum(g * x_hat) and sum(g),
with x_hat recomputed from a. Per-sample gradients, where computed, are kept (the rule picks
them only where they are smaller than the unfolded a and g) and the clipped sum is their
c-weighted sum; after a ghost norm it is one weight-gradient kernel on (a, c * g). The
coefficient is Opacus' own, min(1, C / (norm + 1e-6)). `backward` writes sum_i c_i *
grad(l_i) into every trainable parameter's .grad, which is what Opacus' second ghost backward
leaves there, and Opacus' DPOptimizerFastGradientClipping adds the noise, divides by the
expected batch size and steps the accountant.

Refused at wrap time, naming the layer (its module path and type): a trainable parameter in
any other layer type, and a Conv2d whose padding_mode is not "zeros"; there is no silent
fallback to the ghost mode's two backwards (such a model can train with
`privacy.grad_sample_mode: ghost`). What Opacus' validator refuses (BatchNorm) is refused too.
Refused at backward time: a trainable layer called twice in one forward pass (shared
weights), and a layer output modified in place after the layer returned it. A loss term that
reaches the weights other than through the layers' outputs (a weight penalty) gets no
gradient here.

Each backward replaces the parameters' .grad with this batch's clipped sum (Opacus' ghost
backward zeroes them between its two passes, to the same effect), so gradients never
accumulate across batches, which is what Opacus' forbid_grad_accumulation guards under
Poisson sampling.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.validators import ModuleValidator
from torch import Tensor, nn

from fedray.privacy.ghost_norms import compute_conv2d_norm_sample, ghost_is_cheaper

SUPPORTED = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm)


def _trainable(layer: nn.Module) -> list[nn.Parameter]:
    return [p for p in layer.parameters(recurse=False) if p.requires_grad]


def trainable_layers(module: nn.Module) -> dict[str, nn.Module]:
    """Every submodule holding trainable parameters of its own, by path; raises ValueError
    naming the first one book-keeping clipping cannot handle."""
    layers: dict[str, nn.Module] = {}
    for name, layer in module.named_modules():
        if not _trainable(layer):
            continue
        where = f"{name or '<the model itself>'} ({type(layer).__name__})"
        if type(layer) not in SUPPORTED:  # exact types: a subclass may change the forward
            raise ValueError(
                f"grad_sample_mode 'bk' cannot clip the trainable parameters of {where}: it "
                f"handles {', '.join(t.__name__ for t in SUPPORTED)} only; freeze that layer "
                "or use privacy.grad_sample_mode: ghost")
        if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":
            raise ValueError(f"grad_sample_mode 'bk' cannot clip {where}: padding_mode "
                             f"{layer.padding_mode!r}; use privacy.grad_sample_mode: ghost")
        layers[name] = layer
    return layers


@dataclass
class _Record:
    """One trainable layer's call in the forward pass."""

    name: str
    layer: nn.Module
    activation: Tensor  # the layer's input, detached
    output: Tensor  # the layer's output, in the graph
    version: int  # output._version when the layer returned it


class BookKeepingModule(nn.Module):
    """The model for grad_sample_mode 'bk': records each trainable layer's input and output
    in the forward pass; `clipped_backward` turns per-sample losses into clipped gradients.

    The plain model is `_module` (state_dict keys get Opacus' `_module.` prefix).
    `per_sample_gradient_norms` holds the last batch's norms (not private: debugging only).
    """

    def __init__(self, module: nn.Module, *, max_grad_norm: float) -> None:
        super().__init__()
        ModuleValidator.validate(module, strict=True)
        self._module = module
        self.max_grad_norm = max_grad_norm
        self.layers = trainable_layers(module)
        self._names = {id(layer): name for name, layer in self.layers.items()}
        self._records: list[_Record] = []
        self._handles = [layer.register_forward_hook(self._record)
                         for layer in self.layers.values()]
        self.per_sample_gradient_norms: Tensor | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            self._records = []  # a new batch; a no-grad forward leaves the pending one alone
        return self._module(*args, **kwargs)

    def _record(self, layer: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if torch.is_grad_enabled() and output.requires_grad:
            self._records.append(_Record(self._names[id(layer)], layer, inputs[0].detach(),
                                         output, output._version))

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def clipped_backward(self, loss_per_sample: Tensor) -> None:
        """One backward: p.grad = sum_i c_i * grad(loss_i) for every trainable parameter."""
        records, self._records = self._records, []
        if loss_per_sample.ndim != 1:
            raise ValueError(f"per-sample losses must have shape [batch], got "
                             f"{tuple(loss_per_sample.shape)}")
        _check_records(records)
        n = loss_per_sample.shape[0]
        grads: tuple[Tensor | None, ...] = ()
        if records and n:
            grads = torch.autograd.grad(loss_per_sample.sum(), [r.output for r in records],
                                        allow_unused=True)
            if all(g is None for g in grads):
                raise RuntimeError("grad_sample_mode 'bk': the loss does not depend on the "
                                   "model's last forward pass")
        squared = loss_per_sample.new_zeros(n, dtype=torch.float32)
        work = []
        for record, g in zip(records, grads):
            if g is None:  # the layer's output does not reach the loss
                continue
            dtype = _trainable(record.layer)[0].dtype
            a, g = record.activation.to(dtype), g.to(dtype)  # float32 under autocast
            sq, cache = _squared_norms(record.layer, a, g)
            squared += sq.float()
            work.append((record.layer, a, g, cache))
        norms = squared.sqrt()
        self.per_sample_gradient_norms = norms
        coef = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)  # Opacus' get_clipping_coef
        done: set[int] = set()
        for layer, a, g, cache in work:
            c = coef.to(g.dtype)
            for p, grad in _clipped_sums(layer, a, g, c, cache).items():
                p.grad = grad.to(p.dtype)
            done.add(id(layer))
        for layer in self.layers.values():  # unused in this batch, or an empty batch
            if id(layer) not in done:
                for p in _trainable(layer):
                    p.grad = torch.zeros_like(p)


def _check_records(records: list[_Record]) -> None:
    seen: set[int] = set()
    for r in records:
        where = f"{r.name} ({type(r.layer).__name__})"
        if id(r.layer) in seen:
            raise NotImplementedError(
                f"grad_sample_mode 'bk': {where} was called more than once in one forward "
                "pass (shared weights); use privacy.grad_sample_mode: hooks")
        seen.add(id(r.layer))
        if r.output._version != r.version:
            raise RuntimeError(f"grad_sample_mode 'bk': the output of {where} was modified "
                               "in place after the layer returned it; make that op out-of-place")


# ---------------------------------------------------------------- per-layer rules

def _squared_norms(layer: nn.Module, a: Tensor, g: Tensor) -> tuple[Tensor, Any]:
    """Squared per-sample gradient norms of the layer's trainable parameters, [batch], and
    the per-sample gradients where they were computed (the clipped sum reuses them)."""
    if isinstance(layer, nn.Linear):
        return _linear_squared_norms(layer, a, g), None
    if isinstance(layer, nn.Conv2d):
        if layer.groups == 1 and ghost_is_cheaper(g[0, 0].numel(), layer.weight[0].numel(),
                                                   layer.out_channels):
            norms = compute_conv2d_norm_sample(layer, [a], g)  # the ghost norm
            return sum(v.square() for v in norms.values()), None
        per_sample = compute_conv_grad_sample(layer, [a.contiguous()], g)  # see ghost_norms
    else:
        per_sample = _norm_layer_grads(layer, a, g)
    return sum(v.flatten(1).square().sum(1) for v in per_sample.values()), per_sample


def _clipped_sums(layer: nn.Module, a: Tensor, g: Tensor, c: Tensor,
                  cache: Any) -> dict[nn.Parameter, Tensor]:
    """sum_i c_i * (sample i's gradient) for the layer's trainable parameters."""
    if cache is not None:  # per-sample gradients at hand, no larger than a and g
        return {p: torch.einsum("n,n...->...", c, ps) for p, ps in cache.items()}
    cg = g * c.view(-1, *([1] * (g.ndim - 1)))
    if isinstance(layer, nn.Linear):
        return _linear_sums(layer, a, cg)
    return _conv2d_sums(layer, a, cg)


def _linear_squared_norms(layer: nn.Linear, a: Tensor, g: Tensor) -> Tensor:
    n = a.shape[0]
    a, g = a.reshape(n, -1, a.shape[-1]), g.reshape(n, -1, g.shape[-1])  # n, T, I / O
    out = a.new_zeros(n)
    if layer.bias is not None and layer.bias.requires_grad:
        out = out + g.sum(1).square().sum(1)
    if layer.weight.requires_grad:
        t = a.shape[1]
        if t == 1:
            out = out + a.square().sum((1, 2)) * g.square().sum((1, 2))
        elif ghost_is_cheaper(t, a.shape[2], g.shape[2]):
            aa, gg = torch.bmm(a, a.transpose(1, 2)), torch.bmm(g, g.transpose(1, 2))
            out = out + (aa * gg).sum((1, 2)).clamp(min=0)
        else:
            out = out + torch.bmm(g.transpose(1, 2), a).square().sum((1, 2))
    return out


def _linear_sums(layer: nn.Linear, a: Tensor, cg: Tensor) -> dict[nn.Parameter, Tensor]:
    a, cg = a.reshape(-1, a.shape[-1]), cg.reshape(-1, cg.shape[-1])
    out: dict[nn.Parameter, Tensor] = {}
    if layer.weight.requires_grad:
        out[layer.weight] = cg.t() @ a
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = cg.sum(0)
    return out


def _conv2d_sums(layer: nn.Conv2d, a: Tensor, cg: Tensor) -> dict[nn.Parameter, Tensor]:
    padding = layer.padding
    if isinstance(padding, str):  # "valid" or "same" (maybe asymmetric): pad a explicitly
        if padding == "same":
            pads = []
            for k, d in zip(reversed(layer.kernel_size), reversed(layer.dilation)):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            a = F.pad(a, pads)
        padding = (0, 0)
    weight, bias = layer.weight, layer.bias
    want_bias = bias is not None and bias.requires_grad
    _, w_grad, b_grad = torch.ops.aten.convolution_backward(
        cg, a, weight.detach().to(cg.dtype), [weight.shape[0]] if want_bias else None,
        layer.stride, padding, layer.dilation, False, [0, 0], layer.groups,
        [False, weight.requires_grad, want_bias])
    out: dict[nn.Parameter, Tensor] = {}
    if weight.requires_grad:
        out[weight] = w_grad
    if want_bias:
        out[bias] = b_grad
    return out


def _norm_layer_grads(layer: nn.GroupNorm | nn.LayerNorm, a: Tensor,
                      g: Tensor) -> dict[nn.Parameter, Tensor]:
    """Per-sample gradients of a GroupNorm's ([batch, C]) or LayerNorm's ([batch,
    *normalized_shape]) weight and bias: sums of g * x_hat and of g."""
    if isinstance(layer, nn.GroupNorm):
        x_hat = F.group_norm(a, layer.num_groups, eps=layer.eps)
        dims = tuple(range(2, a.ndim))  # channels are dim 1
    else:
        x_hat = F.layer_norm(a, layer.normalized_shape, eps=layer.eps)
        dims = tuple(range(1, a.ndim - len(layer.normalized_shape)))
    out: dict[nn.Parameter, Tensor] = {}
    if layer.weight is not None and layer.weight.requires_grad:
        out[layer.weight] = (g * x_hat).sum(dims) if dims else g * x_hat
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = g.sum(dims) if dims else g
    return out


# ---------------------------------------------------------------- the loss

class BookKeepingLoss:
    """The hospital's loss for grad_sample_mode 'bk': `loss_fn(outputs, targets)` returns a
    BookKeepingLoss.Value. The criterion runs with reduction "none", so a class-weighted loss
    stays per record (see fedray.privacy.wrap.PerRecordMean) and the batch loss is the plain
    mean of the per-record losses, as in Opacus' ghost mode."""

    def __init__(self, module: BookKeepingModule, criterion: nn.Module) -> None:
        if getattr(criterion, "reduction", "mean") != "mean":
            raise ValueError("grad_sample_mode 'bk' needs a loss with reduction 'mean'")
        self.module = module
        self.criterion = copy.copy(criterion)
        self.criterion.reduction = "none"

    def __call__(self, *args: Any, **kwargs: Any) -> BookKeepingTensor:
        return BookKeepingTensor(self.module, self.criterion(*args, **kwargs))


class BookKeepingTensor:
    """A batch's per-sample losses, read as their mean (item, detach), combined with scalars
    or other such losses, and with a `backward` that leaves the clipped gradient sum in .grad:
    what Opacus' DPTensorFastGradientClipping does with one backward instead of two.

    An empty batch (Poisson sampling) reads as loss 0, not the mean's nan, so a loss weighted
    by batch size stays finite; its backward leaves zero gradients for the noise to go on.
    """

    def __init__(self, module: BookKeepingModule, loss_per_sample: Tensor) -> None:
        self.module = module
        self.loss_per_sample = loss_per_sample

    def detach(self) -> Tensor:
        if self.loss_per_sample.numel() == 0:
            return self.loss_per_sample.new_zeros(())
        return self.loss_per_sample.mean().detach()

    def item(self) -> float:
        return self.detach().item()

    def backward(self) -> None:
        self.module.clipped_backward(self.loss_per_sample)

    def _new(self, loss_per_sample: Tensor) -> BookKeepingTensor:
        return BookKeepingTensor(self.module, loss_per_sample)

    def _other(self, other: Any) -> Any:
        if isinstance(other, BookKeepingTensor):
            if other.module is not self.module:
                raise ValueError("cannot combine the losses of two different models")
            return other.loss_per_sample
        return other

    def __add__(self, other: Any) -> BookKeepingTensor:
        return self._new(self.loss_per_sample + self._other(other))

    __radd__ = __add__

    def __sub__(self, other: Any) -> BookKeepingTensor:
        return self._new(self.loss_per_sample - self._other(other))

    def __rsub__(self, other: Any) -> BookKeepingTensor:
        return self._new(self._other(other) - self.loss_per_sample)

    def __mul__(self, other: Any) -> BookKeepingTensor:
        return self._new(self.loss_per_sample * self._other(other))

    __rmul__ = __mul__

    def __truediv__(self, other: Any) -> BookKeepingTensor:
        return self._new(self.loss_per_sample / self._other(other))

    def __neg__(self) -> BookKeepingTensor:
        return self._new(-self.loss_per_sample)

    def __repr__(self) -> str:
        return f"BookKeepingTensor(shape={tuple(self.loss_per_sample.shape)})"

    def __str__(self) -> str:
        return f"BookKeepingTensor({self.item():.4f})"
