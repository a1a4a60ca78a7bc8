"""Pieces shared by the adaptation baselines (ADDA, DANN, CyCADA, SeUDA, AdaOutput). Not a method: the registry skips
modules whose name starts with ``_``. The CycleGAN pair and the GAN training parts live in :mod:`._cyclegan_pair`.

- :class:`FrozenSourceMixin`: a method that keeps the trained source model beside its own networks, frozen (no
  gradients to its parameters, batch-norm statistics never updated: it stays in ``eval`` mode even when the engine
  calls ``train()``). It is held as ``self.source_model``, the attribute the adapt/predict steps use, and
  :func:`siteadapt.steps.train.save_model` leaves it out of the method's own file.
- The task network of a context (``segmentation``: E∘C1, :class:`.segmenter.SegmenterNet`; ``classification``:
  :class:`~siteadapt.nn.networks.ResNetClassifier`) split into *encoder* and *head*, so feature-level methods can
  align the encoder's output for both kinds: :func:`task_net`, :func:`encode`, :func:`head`, :func:`feature_channels`.
- :func:`task_loss`: weighted CE + Dice for segmentation (as every segmenter here), cross-entropy for
  classification.
- :func:`ramp`: the factor (0 -> 1) that DANN's schedule, or a linear warm-up, puts on an adversarial weight, and
  :class:`IterationState`, the iteration counter such a schedule reads (saved for exact resume).
- :func:`bce_gan`: the original (non-saturating, sigmoid cross-entropy) GAN / domain-classifier loss, for the
  methods whose papers use it (AdaOutput, ADDA, DANN) rather than LSGAN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.losses import WeightedCrossEntropyDiceLoss
from ..nn.networks import ResNetClassifier
from .base import Context
from .segmenter import SegmenterNet


class FrozenSourceMixin:
    """For :class:`~.base.Method` subclasses that use the trained source model as a fixed function."""

    source_model: nn.Module | None

    def attach_source(self, source_model: nn.Module | None, who: str) -> nn.Module:
        if source_model is None:
            raise ValueError(f"{who} needs the trained source model (run train-source first)")
        for p in source_model.parameters():
            p.requires_grad_(False)
        source_model.eval()
        self.source_model = source_model  # a registered sub-module: moved with the method, saved in checkpoints
        return source_model

    def require_source(self, who: str) -> nn.Module:
        if getattr(self, "source_model", None) is None:
            raise ValueError(f"{who} needs the trained source model: call prepare(..., source_model=...) first")
        return self.source_model

    def train(self, mode: bool = True):
        super().train(mode)  # type: ignore[misc]
        if getattr(self, "source_model", None) is not None:
            self.source_model.eval()  # frozen: BN uses (and keeps) the source statistics
        return self


def task_net(ctx: Context) -> nn.Module:
    if ctx.kind == "classification":
        return ResNetClassifier(ctx.in_channels, ctx.n_classes, width=ctx.width)
    return SegmenterNet(ctx)


def source_net(source_model: nn.Module, ctx: Context, who: str) -> nn.Module:
    """The network inside a trained source model (``source_model.net``), checked against the context's kind."""
    net = getattr(source_model, "net", source_model)
    want = ResNetClassifier if ctx.kind == "classification" else SegmenterNet
    if not isinstance(net, want):
        raise ValueError(f"{who}: the source model's network is a {type(net).__name__}, a {ctx.kind} task needs a "
                         f"{want.__name__}")
    return net


def encode(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The encoder output that a feature-level method aligns: E's last block (``EncoderFeatures.high``, stride 8)
    for the segmenter; the last residual stage's map (before global pooling) for the ResNet classifier."""
    if isinstance(net, ResNetClassifier):
        h = net.stem(x)
        for stage in net.stages:
            h = stage(h)
        return h
    return net.encoder(x).high


def head(net: nn.Module, feature: torch.Tensor, size) -> torch.Tensor:
    """Logits from :func:`encode`'s output: C1 + upsampling to ``size`` / global average pool + linear layer."""
    if isinstance(net, ResNetClassifier):
        return net.fc(torch.flatten(F.adaptive_avg_pool2d(feature, 1), 1))
    return net.classifier(feature, size=size)


def feature_channels(net: nn.Module) -> int:
    if isinstance(net, ResNetClassifier):
        return net.fc.in_features
    return net.encoder.out_channels


def encoder_modules(net: nn.Module) -> list[nn.Module]:
    if isinstance(net, ResNetClassifier):
        return [net.stem, net.stages]
    return [net.encoder]


def head_modules(net: nn.Module) -> list[nn.Module]:
    return [net.fc] if isinstance(net, ResNetClassifier) else [net.classifier]


class _CrossEntropy(nn.Module):
    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), target.long())


def task_loss(ctx: Context, class_weights=None, dice_weight: float = 1.0) -> nn.Module:
    if ctx.kind == "classification":
        return _CrossEntropy()
    return WeightedCrossEntropyDiceLoss(ctx.n_classes, class_weights=class_weights, dice_weight=dice_weight)


def bce_gan(logits: torch.Tensor, real: bool) -> torch.Tensor:
    """Sigmoid cross-entropy of discriminator logits against the label real (1) / fake (0), mean over all outputs,
    in float32 (safe under autocast)."""
    logits = logits.float()
    with torch.autocast(device_type=logits.device.type, enabled=False):
        target = torch.ones_like(logits) if real else torch.zeros_like(logits)
        return F.binary_cross_entropy_with_logits(logits, target)


def ramp(iteration: int, total: int | None, schedule: str = "dann", ramp_iterations: int = 0) -> float:
    """Factor in [0, 1] on an adversarial weight at ``iteration`` of a run of ``total`` iterations.

    ``ramp_iterations`` > 0: linear from 0 to 1 over that many iterations (Kamnitsas et al.'s warm-up).
    ``schedule == "dann"``: DANN's 2 / (1 + exp(-10 p)) - 1 with p = iteration / total (Ganin et al. 2016), 1 when the
    run length is unknown (unit tests). ``"constant"``: 1."""
    if ramp_iterations > 0:
        return min(1.0, iteration / ramp_iterations)
    if schedule == "dann" and total:
        p = min(1.0, iteration / total)
        return 2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0
    return 1.0


class IterationState:
    """The iteration counter of a method whose schedule depends on progress, saved with checkpoints (exact resume).
    Methods with image pools save it through :meth:`~.base.Method.extra_state` already."""

    iteration: int = 0

    def extra_state(self) -> dict:
        return {"iteration": self.iteration}

    def load_extra_state(self, state: dict) -> None:
        if state:
            self.iteration = int(state["iteration"])


@torch.no_grad()
def reestimate_bn(net: nn.Module, images, batch_size: int = 32) -> int:
    """AdaBN (Li et al., "Revisiting Batch Normalization For Practical Domain Adaptation", 2016): every
    ``BatchNorm2d`` of ``net`` forgets its running statistics and re-estimates them on ``images`` ((N, H, W) or
    (N, 1, H, W), array or tensor): a forward pass in training mode over consecutive batches of ``batch_size`` with
    ``momentum=None``, PyTorch's cumulative average, so the running mean is the mean of the batch means (with one
    batch: exactly that batch's statistics; the variance is the unbiased batch variance). Nothing else of the
    network changes (no gradient is taken) and each layer's momentum and the network's train/eval mode are restored.
    Returns the number of batch-norm layers re-estimated."""
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns:
        return 0
    x = torch.as_tensor(images, dtype=torch.float32)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    dev = next(net.parameters()).device
    saved = [(m, m.momentum) for m in bns]
    was_training = net.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    net.train()
    try:
        for i in range(0, len(x), batch_size):
            net(x[i:i + batch_size].to(dev))
    finally:
        for m, mom in saved:
            m.momentum = mom
        net.train(was_training)
    return len(bns)


def freeze(*modules: nn.Module) -> None:
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(False)


__all__ = ["FrozenSourceMixin", "task_net", "source_net", "encode", "head", "feature_channels",
           "encoder_modules", "head_modules", "task_loss", "bce_gan", "freeze", "ramp", "IterationState", "reestimate_bn"]
