"""Per-sample gradient norms of Conv2d layers for Opacus' ghost clipping, the cheaper of two ways.

Opacus 1.6 ships ghost norms for Linear and Embedding only; for a convolution its ghost mode
materialises every sample's weight gradient, which is what makes DP-SGD slow on CNNs: at
64 px, resnet18's last stage holds 8 of its 11 million parameters on a 2x2 feature map, so a
batch of 32 writes a gigabyte of per-sample gradients to read one norm each. For a conv with
unfolded activations a (P x L) and output gradients g (O x L) per sample, the weight gradient is
g a^T and its squared norm is <a^T a, g^T g>, which costs L^2 (P + O) instead of O P L and needs
no O x P tensor ("ghost norm", Li et al. 2021; the per-layer choice between the two is Bu et al.
2022's mixed ghost clipping). Each layer takes whichever is smaller.

Registered with Opacus' own `register_norm_sampler` when fedray.privacy.wrap is imported; it applies
only to `grad_sample_mode="ghost"`.
"""

from __future__ import annotations

import torch
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.utils import register_norm_sampler
from opacus.utils.tensor_utils import unfold2d
from torch import Tensor, nn


def ghost_is_cheaper(locations: int, in_features: int, out_features: int) -> bool:
    """L^2 (P + O) multiply-adds for the ghost norm against O P L for the per-sample gradient."""
    return locations * (in_features + out_features) <= in_features * out_features


@register_norm_sampler(nn.Conv2d)
def compute_conv2d_norm_sample(layer: nn.Conv2d, activations: list[Tensor],
                               backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    """Per-sample gradient norms of a Conv2d's weight and bias, shape [batch] each."""
    # Opacus' unfold2d reads its input's strides as NCHW's: channels_last must be copied.
    x = activations[0].to(backprops.dtype).contiguous()
    n = x.shape[0]
    if n == 0:  # an empty Poisson batch: unfold and reshape(-1) cannot size one
        return {p: x.new_zeros(0) for p in (layer.weight, layer.bias)
                if p is not None and p.requires_grad}
    out: dict[nn.Parameter, Tensor] = {}
    g = backprops.reshape(n, backprops.shape[1], -1)  # n, O, L
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = g.sum(dim=2).norm(dim=1)
    if not layer.weight.requires_grad:
        return out
    locations = g.shape[2]
    in_features = layer.weight[0].numel()
    if layer.groups != 1 or not ghost_is_cheaper(locations, in_features, g.shape[1]):
        grads = compute_conv_grad_sample(layer, [x], backprops)
        out[layer.weight] = grads[layer.weight].reshape(n, -1).norm(dim=1)
        return out
    a = unfold2d(x, kernel_size=layer.kernel_size, padding=layer.padding,
                 stride=layer.stride, dilation=layer.dilation)  # n, P, L
    aa = torch.bmm(a.transpose(1, 2), a)  # n, L, L
    gg = torch.bmm(g.transpose(1, 2), g)
    out[layer.weight] = (aa * gg).sum(dim=(1, 2)).clamp(min=0).sqrt()
    return out
