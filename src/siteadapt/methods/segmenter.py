"""The plain segmenter E∘C (SIFA's encoder + pixel-wise classifier), trained with weighted CE + Dice on labeled slices.

Two uses, one class:
- the *source segmenter* (``siteadapt train-source``): trained on the labeled source site; ``noadapt``,
  ``histmatch`` and the translate-then-segment methods apply it;
- ``supervised``: the same network trained on the target site's own labels, the upper bound every table starts with
  (an evaluation-only reference: it reads target labels, which no adaptation method does).

Optimiser: Adam, lr 2e-4, betas (0.9, 0.999) (SIFA TMI trains every module with lr 2e-4; beta1 0.5 is for GAN parts).
Augmentation: the geometric one the SIFA papers describe (rotation, scaling, affine) is the training engine's, the
same for every method (the profile's ``augment``, off by default). This option, ``augment: true``, adds random
intensity scale/shift (+-10%) and small translations (+-4 px) for this network only; no flips, which would swap left
and right structures.

``bigaug: true`` trains a robust source model: BigAug's nine stacked transformations (Zhang et al., IEEE TMI
2020: sharpening, blurring, noise, brightness, contrast, intensity perturbation, rotation, scaling, elastic
deformation, each with probability 0.5 and the paper's ranges; :func:`siteadapt.nn.bigaug.bigaug` lists them and every
choice where the paper is silent) on each training batch, label maps moved with their images (nearest neighbour,
background outside). With both flags on, the mild ``augment`` runs first and BigAug on its output. Draws come from
torch's global RNG, which the engine checkpoints, so resume stays exact; with the flag off nothing is drawn and
training is unchanged.

Classification tasks (``ctx.kind == "classification"``): the same two classes with another network and loss — a
ResNet-18-like classifier trained from scratch (:class:`~siteadapt.nn.networks.ResNetClassifier`; TUNA-Net's F_A
starts from ImageNet weights, which siteadapt cannot download) and cross-entropy, eq. (3) of TUNA-Net (plain: the paper
weights no class; ``class_weights`` as a list of floats weights them, ``"batch"`` and Dice apply to segmentation only).
The same optimiser; augmentation (``augment`` and ``bigaug``) moves the image only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..nn.bigaug import bigaug
from ..nn.losses import WeightedCrossEntropyDiceLoss
from ..nn.networks import DilatedResidualEncoder, PixelClassifier, ResNetClassifier
from .base import Context, Method, MethodOptions, adam, scalars


class SegmenterOptions(MethodOptions):
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    class_weights: list[float] | str | None = "batch"
    dice_weight: float = Field(1.0, ge=0)
    augment: bool = False
    bigaug: bool = False  # BigAug's stacked transformations on each training batch (after ``augment`` when both)


class SegmenterNet(nn.Module):
    """E∘C1: encoder + main pixel-wise classifier, logits at the input size."""

    def __init__(self, ctx: Context):
        super().__init__()
        self.encoder = DilatedResidualEncoder(ctx.in_channels, width=ctx.width)
        self.classifier = PixelClassifier(self.encoder.out_channels, ctx.n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.encoder(x).high, size=x.shape[-2:])


def classifier_net(ctx: Context) -> ResNetClassifier:
    """The image classifier of classification tasks (source model, supervised, F_A / F_P of TUNA-Net)."""
    return ResNetClassifier(ctx.in_channels, ctx.n_classes, width=ctx.width)


def task_net(ctx: Context) -> nn.Module:
    return classifier_net(ctx) if ctx.kind == "classification" else SegmenterNet(ctx)


class ClassificationLoss(nn.Module):
    """Cross-entropy on image logits (N, K) and class ids (N,), eq. (3) of TUNA-Net; optional fixed class weights
    (normalised by the number of images, as :class:`~siteadapt.nn.losses.WeightedCrossEntropyLoss`)."""

    def __init__(self, num_classes: int, class_weights: list[float] | str | None = None):
        super().__init__()
        w = torch.ones(num_classes)
        if isinstance(class_weights, (list, tuple)):
            if len(class_weights) != num_classes or min(class_weights) < 0:
                raise ValueError(f"class_weights needs {num_classes} non-negative values, got {class_weights}")
            w = torch.as_tensor([float(v) for v in class_weights])
        self.register_buffer("weight", w, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 2 or target.dim() != 1 or logits.shape[0] != target.shape[0]:
            raise ValueError(f"classification loss needs logits (N, K) and labels (N,), got {tuple(logits.shape)} "
                             f"and {tuple(target.shape)}")
        target = target.long()
        return (self.weight.to(logits.device)[target] * F.cross_entropy(logits.float(), target, reduction="none")).mean()


def task_loss(ctx: Context, class_weights, dice_weight: float) -> nn.Module:
    if ctx.kind == "classification":
        return ClassificationLoss(ctx.n_classes, class_weights)
    return WeightedCrossEntropyDiceLoss(ctx.n_classes, class_weights=class_weights, dice_weight=dice_weight)


def augment_batch(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator | None = None):
    b = x.shape[0]
    scale = 1 + (torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 0.2
    shift = (torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 0.2
    x = (x * scale.to(x) + shift.to(x)).clamp(-1, 1)
    dx, dy = (torch.randint(-4, 5, (2,), generator=gen)).tolist()
    x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
    if y.dim() >= 2:  # label maps move with the image; image-level labels do not
        y = torch.roll(y, shifts=(dy, dx), dims=(-2, -1))
    return x, y


class Supervised(Method):
    name = "supervised"
    Options = SegmenterOptions
    needs_target_images = False
    trains_on_target_labels = True

    def __init__(self, ctx: Context, options: SegmenterOptions | None = None):
        super().__init__(ctx, options)
        self.net = task_net(ctx)
        self.seg_loss = task_loss(ctx, self.opts.class_weights, self.opts.dice_weight)

    def build_optimizers(self):
        return {"seg": adam(self.net.parameters(), self.opts.lr, beta1=0.9, weight_decay=self.opts.weight_decay)}

    def train_step(self, batch):
        x, y = batch.src_x, batch.src_y
        if self.opts.augment:
            x, y = augment_batch(x, y)
        if self.opts.bigaug:
            x, y = bigaug(x, y)
        with self.autocast():
            logits = self.net(x)
        loss = self.seg_loss(logits, y)
        self.update(loss, "seg")
        return scalars({"cls" if self.ctx.kind == "classification" else "seg": loss})

    def predict(self, images):
        return self.net(images)


class SourceSegmenter(Supervised):
    """The source segmenter (classifier): the same network and loss, trained on the labeled source site."""

    name = "source"
    trains_on_target_labels = False


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    return F.softmax(logits.float(), dim=1)
