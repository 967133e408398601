"""DP-safe twins of torchvision blocks; imported only when a model is made DP-safe.

Opacus puts full backward hooks on every trainable module; autograd refuses an in-place op on
the output of such a module ("BackwardHookFunctionBackward ... modified inplace"). These
subclasses repeat the library forward with the in-place op made out-of-place; the conversion
swaps an instance's class, so parameter names and state_dicts are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models import densenet, efficientnet, inception, mobilenetv3, resnet


class DPBasicBlock(resnet.BasicBlock):
    """torchvision BasicBlock with `out + identity` instead of `out += identity`."""

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class DPBottleneck(resnet.Bottleneck):
    """torchvision Bottleneck with `out + identity` instead of `out += identity`."""

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class DPMBConv(efficientnet.MBConv):
    """EfficientNet MBConv without `result += input` (StochasticDepth is per-row, out-of-place: kept)."""

    def forward(self, input: Tensor) -> Tensor:
        result = self.block(input)
        if self.use_res_connect:
            result = self.stochastic_depth(result) + input
        return result


class DPInvertedResidualV3(mobilenetv3.InvertedResidual):
    """MobileNetV3 block without `result += input`."""

    def forward(self, input: Tensor) -> Tensor:
        result = self.block(input)
        return result + input if self.use_res_connect else result


class DPBasicConv2d(inception.BasicConv2d):
    """Inception conv unit without the functional `F.relu(x, inplace=True)` on the norm output."""

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


class DPDenseNet(densenet.DenseNet):
    """DenseNet without the functional in-place ReLU on norm5's output."""

    def forward(self, x: Tensor) -> Tensor:
        out = F.adaptive_avg_pool2d(F.relu(self.features(x)), (1, 1))
        return self.classifier(torch.flatten(out, 1))


# Library class -> its DP-safe twin (fedray.models.make_dp_safe swaps instances' classes).
SWAPS: dict[type, type] = {
    resnet.BasicBlock: DPBasicBlock,
    resnet.Bottleneck: DPBottleneck,
    efficientnet.MBConv: DPMBConv,
    mobilenetv3.InvertedResidual: DPInvertedResidualV3,
    inception.BasicConv2d: DPBasicConv2d,
    densenet.DenseNet: DPDenseNet,
}
