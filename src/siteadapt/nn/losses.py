"""Losses as ``nn.Module``s, independent of any training loop, so methods compose them.

All losses compute in float32 (inputs are upcast and autocast is disabled inside), so they are safe to call under
``torch.autocast`` with fp16/bf16 network outputs. They return scalar tensors (mean reductions); loss weights
(lambda_cyc = 10, 0.1 x adversarial terms, ...) belong to the method, not here.

==============================  =====================================================================================
LSGANLoss                       mean squared distance of discriminator outputs to a real (1) / fake (0) label
LSGANGeneratorLoss              generator side: fakes should score "real": mean((D(fake) - 1)^2)
LSGANDiscriminatorLoss          0.5 * [mean((D(real) - 1)^2) + mean(D(fake)^2)]
CycleConsistencyLoss            mean |reconstruction - original| (L1)
WeightedCrossEntropyLoss        pixel-wise cross-entropy with per-class weights (fixed, or SIFA's batch weights)
SoftDiceLoss                    1 - mean over classes of the soft Dice of softmax probabilities
WeightedCrossEntropyDiceLoss    SIFA's segmentation loss: weighted CE + Dice
PredictionAdversarialLoss       LSGAN adversarial terms in the semantic prediction space (SIFA D_p, SeUDA, DSAN)
FeatureReconstructionLoss       TUNA-Net Eq. (5): sum_i ||f_i - f^_i||^2 / (H_i W_i C_i)
==============================  =====================================================================================
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LSGANLoss",
    "LSGANGeneratorLoss",
    "LSGANDiscriminatorLoss",
    "CycleConsistencyLoss",
    "WeightedCrossEntropyLoss",
    "SoftDiceLoss",
    "WeightedCrossEntropyDiceLoss",
    "PredictionAdversarialLoss",
    "FeatureReconstructionLoss",
]


@contextmanager
def _fp32(t: torch.Tensor) -> Iterator[None]:
    """Disable autocast for the device of ``t`` (losses upcast their inputs themselves)."""
    with torch.autocast(device_type=t.device.type, enabled=False):
        yield


# ---------------------------------------------------------------------------------------------------------------------
# GAN losses
# ---------------------------------------------------------------------------------------------------------------------


class LSGANLoss(nn.Module):
    """Least-squares GAN loss (Mao et al. 2017), as in CycleGAN and SIFA: ``mean((pred - label)^2)`` with
    ``label = real_label`` (1) or ``fake_label`` (0). ``pred`` are raw discriminator outputs (no sigmoid)."""

    def __init__(self, real_label: float = 1.0, fake_label: float = 0.0):
        super().__init__()
        self.real_label = float(real_label)
        self.fake_label = float(fake_label)

    def forward(self, pred: torch.Tensor, target_is_real: bool) -> torch.Tensor:
        label = self.real_label if target_is_real else self.fake_label
        with _fp32(pred):
            return (pred.float() - label).pow(2).mean()


class LSGANGeneratorLoss(nn.Module):
    """Generator (or encoder) side of LSGAN: ``mean((D(fake) - real_label)^2)``."""

    def __init__(self, real_label: float = 1.0):
        super().__init__()
        self.lsgan = LSGANLoss(real_label=real_label)

    def forward(self, fake_pred: torch.Tensor) -> torch.Tensor:
        return self.lsgan(fake_pred, True)


class LSGANDiscriminatorLoss(nn.Module):
    """Discriminator side of LSGAN: ``scale * [mean((D(real) - 1)^2) + mean((D(fake) - 0)^2)]``.

    ``scale=0.5`` (CycleGAN and the SIFA code halve the discriminator objective, which slows D relative to G).
    The caller computes ``fake_pred = D(fake.detach())`` (or from the image pool) so no gradient reaches the
    generator.
    """

    def __init__(self, real_label: float = 1.0, fake_label: float = 0.0, scale: float = 0.5):
        super().__init__()
        self.lsgan = LSGANLoss(real_label, fake_label)
        self.scale = float(scale)

    def forward(self, real_pred: torch.Tensor, fake_pred: torch.Tensor) -> torch.Tensor:
        return self.scale * (self.lsgan(real_pred, True) + self.lsgan(fake_pred, False))


class CycleConsistencyLoss(nn.Module):
    """Pixel-wise cycle-consistency loss: ``mean |reconstructed - original|`` (L1; SIFA Eq. 2, CycleGAN)."""

    def forward(self, reconstructed: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        if reconstructed.shape != original.shape:
            raise ValueError(f"shape mismatch: {tuple(reconstructed.shape)} vs {tuple(original.shape)}")
        with _fp32(reconstructed):
            return (reconstructed.float() - original.float()).abs().mean()


# ---------------------------------------------------------------------------------------------------------------------
# segmentation losses
# ---------------------------------------------------------------------------------------------------------------------


def _labels(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class-index map ``(N, H, W)`` (long) from ``(N, H, W)`` / ``(N, 1, H, W)`` ids or a ``(N, C, H, W)`` one-hot."""
    if target.dim() == 4 and target.shape[1] == num_classes and num_classes > 1:
        return target.argmax(1)
    if target.dim() == 4 and target.shape[1] == 1:
        target = target[:, 0]
    if target.dim() != 3:
        raise ValueError(f"target must be (N,H,W) class ids or (N,C,H,W) one-hot, got shape {tuple(target.shape)}")
    return target.long()


def _check_logits(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    if logits.dim() != 4 or logits.shape[1] != num_classes:
        raise ValueError(f"logits must be (N,{num_classes},H,W), got {tuple(logits.shape)}")
    if logits.shape[0] != labels.shape[0] or logits.shape[-2:] != labels.shape[-2:]:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(labels.shape)} disagree in N, H or W")


class WeightedCrossEntropyLoss(nn.Module):
    """Pixel-wise cross-entropy with per-class weights, normalized by the number of pixels:
    ``sum_i w[y_i] * (-log softmax(logits_i)[y_i]) / n_pixels``.

    ``class_weights``:
    - ``None``: all 1 (plain cross-entropy);
    - a sequence of ``num_classes`` floats: fixed weights;
    - ``"batch"``: per batch, ``w_c = 1 - n_c / n`` from the target's class frequencies (what the SIFA code does to
      counter class imbalance; the papers only say "weighted").
    Normalizing by the pixel count (not by the sum of weights, PyTorch's ``weight=`` convention) keeps SIFA's scale;
    with uniform weights both conventions equal plain cross-entropy.
    """

    def __init__(self, num_classes: int, class_weights: Sequence[float] | str | None = None):
        super().__init__()
        self.num_classes = int(num_classes)
        self.batch_weights = False
        if isinstance(class_weights, str):
            if class_weights != "batch":
                raise ValueError(f"class_weights must be None, 'batch' or {num_classes} floats, got {class_weights!r}")
            self.batch_weights = True
            w = torch.ones(self.num_classes)
        elif class_weights is None:
            w = torch.ones(self.num_classes)
        else:
            w = torch.as_tensor([float(v) for v in class_weights])
            if w.numel() != self.num_classes or (w < 0).any():
                raise ValueError(f"class_weights needs {num_classes} non-negative values, got {list(class_weights)}")
        self.register_buffer("weight", w, persistent=False)

    def class_weight(self, labels: torch.Tensor) -> torch.Tensor:
        if not self.batch_weights:
            return self.weight.to(labels.device)
        counts = torch.bincount(labels.reshape(-1), minlength=self.num_classes).float()
        return 1.0 - counts / counts.sum().clamp_min(1.0)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels = _labels(target, self.num_classes)
        _check_logits(logits, labels, self.num_classes)
        with _fp32(logits):
            nll = F.cross_entropy(logits.float(), labels, reduction="none")
            return (self.class_weight(labels)[labels] * nll).mean()


class SoftDiceLoss(nn.Module):
    """``1 - mean_c dice_c`` with ``dice_c = (2 sum p_c g_c + smooth) / (sum p_c^2 + sum g_c + smooth)`` on softmax
    probabilities ``p`` and one-hot targets ``g``, sums pooled over the whole batch (as in the SIFA code).

    - ``squared=True``: squared probabilities in the denominator (V-Net; the SIFA code); ``False``: ``sum p_c``.
    - ``include_background``: average over all classes (SIFA code) or skip class 0.
    - ``smooth`` is added to numerator and denominator, so a class absent from both target and prediction scores
      Dice 1 (loss 0 for a perfect prediction). The SIFA code adds 1e-7 to the denominator only, which gives an
      absent class Dice 0 whatever is predicted (a constant offset without gradient).
    """

    def __init__(
        self, num_classes: int, *, include_background: bool = True, squared: bool = True, smooth: float = 1e-5
    ):
        super().__init__()
        self.num_classes = int(num_classes)
        self.include_background = include_background
        self.squared = squared
        self.smooth = float(smooth)

    def per_class(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Soft Dice per class, shape ``(C,)`` (or ``(C-1,)`` without background)."""
        labels = _labels(target, self.num_classes)
        _check_logits(logits, labels, self.num_classes)
        with _fp32(logits):
            p = torch.softmax(logits.float(), dim=1)
            g = F.one_hot(labels, self.num_classes).permute(0, 3, 1, 2).to(p.dtype)
            dims = (0, 2, 3)
            inter = (p * g).sum(dims)
            psum = (p * p).sum(dims) if self.squared else p.sum(dims)
            dice = (2 * inter + self.smooth) / (psum + g.sum(dims) + self.smooth)
        return dice if self.include_background else dice[1:]

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 1.0 - self.per_class(logits, target).mean()


class WeightedCrossEntropyDiceLoss(nn.Module):
    """SIFA's hybrid segmentation loss (TMI Eq. 3): ``ce_weight * WeightedCE + dice_weight * SoftDice``.

    ``forward(logits, target)`` returns the total; ``terms(logits, target)`` returns ``(ce, dice)`` for logging.
    ``logits``: ``(N, C, H, W)`` (any float dtype); ``target``: ``(N, H, W)`` class ids (or ``(N, 1, H, W)``, or a
    float one-hot ``(N, C, H, W)``). See :class:`WeightedCrossEntropyLoss` and :class:`SoftDiceLoss` for the options.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        class_weights: Sequence[float] | str | None = None,
        ce_weight: float = 1.0,
        dice_weight: float = 1.0,
        include_background: bool = True,
        squared: bool = True,
        smooth: float = 1e-5,
    ):
        super().__init__()
        self.ce = WeightedCrossEntropyLoss(num_classes, class_weights)
        self.dice = SoftDiceLoss(num_classes, include_background=include_background, squared=squared, smooth=smooth)
        self.ce_weight = float(ce_weight)
        self.dice_weight = float(dice_weight)

    def terms(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ce(logits, target), self.dice(logits, target)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce, dice = self.terms(logits, target)
        return self.ce_weight * ce + self.dice_weight * dice


# ---------------------------------------------------------------------------------------------------------------------
# adaptation helpers
# ---------------------------------------------------------------------------------------------------------------------


class PredictionAdversarialLoss(nn.Module):
    """LSGAN adversarial terms in the semantic prediction space (SIFA's D_p1 / D_p2, Eq. 4; SeUDA's mask
    discriminator; DSAN's D_p). Owns no parameters: the discriminator is passed in.

    Convention (SIFA Eq. 4): predictions on the labeled side (source, or source-to-target images x^{s->t}) are
    "real", predictions on target images are "fake"; the segmenter is trained so that target predictions score
    "real".

    - ``activation="softmax"``: the discriminator sees class probabilities (AdaptSegNet's choice; bounded inputs);
      ``"none"``: raw logits (what the SIFA code feeds to D_p). The papers do not say.
    - ``generator_loss(D, target_logits)``: ``mean((D(act(target_logits)) - 1)^2)``; gradients reach the segmenter
      (and D's parameters: do not step D with them, or zero D's gradients before its own update).
    - ``discriminator_loss(D, source_logits, target_logits)``: LSGAN D loss on detached predictions.
    - ``forward`` is ``generator_loss``.
    """

    def __init__(self, activation: Literal["softmax", "none"] = "softmax", d_scale: float = 0.5):
        super().__init__()
        if activation not in ("softmax", "none"):
            raise ValueError(f"activation must be 'softmax' or 'none', got {activation!r}")
        self.activation = activation
        self.g_loss = LSGANGeneratorLoss()
        self.d_loss = LSGANDiscriminatorLoss(scale=d_scale)

    def prepare(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=1) if self.activation == "softmax" else logits

    @staticmethod
    def _main(out):
        return out[0] if isinstance(out, tuple) else out

    def generator_loss(self, discriminator: nn.Module, target_logits: torch.Tensor) -> torch.Tensor:
        return self.g_loss(self._main(discriminator(self.prepare(target_logits))))

    def discriminator_loss(
        self, discriminator: nn.Module, source_logits: torch.Tensor, target_logits: torch.Tensor
    ) -> torch.Tensor:
        real = self._main(discriminator(self.prepare(source_logits.detach())))
        fake = self._main(discriminator(self.prepare(target_logits.detach())))
        return self.d_loss(real, fake)

    def forward(self, discriminator: nn.Module, target_logits: torch.Tensor) -> torch.Tensor:
        return self.generator_loss(discriminator, target_logits)


class FeatureReconstructionLoss(nn.Module):
    """TUNA-Net's feature reconstruction loss (Eq. 5): ``sum_i ||f_i - f^_i||_2^2 / (H_i W_i C_i)``, averaged over the
    batch, for matching lists of feature maps (e.g. ``ResNetClassifier.features`` of real and synthetic target
    images). A single tensor is accepted as a one-element list."""

    def forward(
        self, features: Sequence[torch.Tensor] | torch.Tensor, reference: Sequence[torch.Tensor] | torch.Tensor
    ) -> torch.Tensor:
        if isinstance(features, torch.Tensor):
            features = [features]
        if isinstance(reference, torch.Tensor):
            reference = [reference]
        if len(features) != len(reference) or not features:
            raise ValueError(f"need equally many (>0) feature maps, got {len(features)} and {len(reference)}")
        total = None
        for f, r in zip(features, reference):
            if f.shape != r.shape:
                raise ValueError(f"feature shape mismatch: {tuple(f.shape)} vs {tuple(r.shape)}")
            with _fp32(f):
                term = (f.float() - r.float()).pow(2).mean()  # mean over N*C*H*W = batch mean of ||.||^2/(HWC)
            total = term if total is None else total + term
        return total
