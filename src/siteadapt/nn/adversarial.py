"""Feature-level adversarial pieces: a domain discriminator on encoder features and the gradient reversal layer.

==========================  ==========================================================================================
FeatureDiscriminator        domain classifier on feature maps (DANN's domain classifier, ADDA's discriminator,
                            CyCADA's feature-level discriminator); one logit per feature location
grad_reverse(x, coeff)      identity forward, gradient times ``-coeff`` backward (DANN's gradient reversal layer)
==========================  ==========================================================================================
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import ConvNormAct, init_truncated_normal, scaled

__all__ = ["FeatureDiscriminator", "grad_reverse"]


class FeatureDiscriminator(nn.Module):
    """Domain discriminator on encoder features, fully convolutional so it works on any feature-map size.

    ``n_layers`` 3x3 convolutions at ``hidden * width`` channels (stride 1, LeakyReLU 0.2, no normalization: a
    discriminator fed one domain per batch must not normalize with batch statistics), then a 1x1 convolution to one
    logit per location. A ``(N, C)`` feature vector is treated as a ``(N, C, 1, 1)`` map. The DANN and ADDA papers
    use 2-3 fully connected layers (1024 / 500 units) on a feature vector; on a feature *map* the same depth as 3x3
    convolutions keeps the spatial layout and gives per-location domain labels (as output-space and patch
    discriminators do for segmentation). Initialization: truncated N(0, 0.02) like the other discriminators.
    """

    def __init__(self, in_channels: int, *, width: float = 1.0, hidden: int = 256, n_layers: int = 2):
        super().__init__()
        if n_layers < 1:
            raise ValueError("n_layers must be >= 1")
        h = scaled(hidden, width)
        layers: list[nn.Module] = []
        ch = in_channels
        for _ in range(n_layers):
            layers.append(ConvNormAct(ch, h, 3, norm="none", act="lrelu"))
            ch = h
        layers.append(nn.Conv2d(ch, 1, 1))
        self.body = nn.Sequential(*layers)
        self.in_channels = in_channels
        init_truncated_normal(self, std=0.02)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        if feature.dim() == 2:
            feature = feature[:, :, None, None]
        return self.body(feature)


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, coeff: float):
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.coeff * grad, None


def grad_reverse(x: torch.Tensor, coeff: float = 1.0) -> torch.Tensor:
    """Gradient reversal layer (Ganin & Lempitsky 2015): identity in the forward pass; the backward pass multiplies
    the gradient by ``-coeff``, so one backward trains a domain classifier to separate the domains and the feature
    extractor before it to confuse it."""
    return _GradReverse.apply(x, float(coeff))
