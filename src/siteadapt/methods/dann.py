"""DANN: domain-adversarial training of the segmenter's features through a gradient reversal layer (Ganin et al.,
JMLR 2016). This is the papers' feature-level baseline: "DANN" in the SIFA conference version (Table 1) and
"T-FeatDA" in SeUDA (Table 1: "aligning target features with the source domain as proposed in [9]", Kamnitsas et
al. 2017, a domain discriminator fed by several layers of the segmenter and trained adversarially against it).

Networks: the segmenter E∘C1 (this project's, as for every comparison row), a domain classifier D
(:class:`~siteadapt.nn.adversarial.FeatureDiscriminator`) on E's features, behind a gradient reversal layer.

Objective, one backward pass per iteration::

    min_{E,C1} max_D   L_seg(C1(E(x^s)), y^s) - λ L_dom(D(F(x^s)) -> source, D(F(x^t)) -> target)

L_dom is the sigmoid cross-entropy of D's per-location logits (mean over source and target maps). The gradient
reversal layer between F and D makes one backward pass train D to separate the domains (gradient of +L_dom) and E
to confuse it (gradient of -λ L_dom); C1 gets only L_seg. Both step from that one gradient, E∘C1 and D with their own
Adam. Target labels are never read; ``predict`` = C1(E(x^t)). For ``ctx.kind == "classification"`` the network is
the ResNet classifier and F its last stage's map (before pooling).

Where the comparison papers give no settings (choices, all options):
- Features F (``features``): ``low_high`` concatenates the outputs of E's 2xR512 and final 2xC512 blocks (both at
  stride 8), a two-level version of Kamnitsas et al.'s multi-connected discriminator; ``high`` = the last block only
  (plain DANN on the segmenter's representation). Classification always uses the last stage.
- λ = 0.05 (``lambda_adv``), Kamnitsas et al.'s final adversarial weight, reached with DANN's schedule
  λ_p = λ (2 / (1 + exp(-10 p)) - 1), p = iteration / run length (``lambda_schedule: dann``, default; the train step
  sets the run length, without it λ is constant). Why: a constant λ from the first iteration pushes the encoder's
  features together before they carry any segmentation (on the synthetic chest X-ray sites that fell below no
  adaptation); a rising λ lets the encoder learn to segment first. ``lambda_schedule: constant`` is the constant λ;
  ``ramp_iterations`` > 0 replaces the schedule by a linear rise from 0 over that many iterations (Kamnitsas et al.'s
  ramp, 0 until epoch 10 and linear to epoch 35, in iterations).
- D: two 3x3 conv layers of 256 x width channels, LeakyReLU, 1x1 output; Adam lr 2e-4 betas (0.9, 0.999) for D and
  the segmenter (weight decay 1e-4 on the segmenter, as :mod:`.segmenter`); segmentation loss = weighted CE + Dice.
- Training starts from random weights on both domains jointly (DANN's setting); ``init_from_source: true`` starts
  from the trained source segmenter.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..nn.adversarial import FeatureDiscriminator, grad_reverse
from ..nn.networks import ResNetClassifier
from ._common import IterationState, bce_gan, encode, feature_channels, head, ramp, source_net, task_loss, task_net
from .base import Context, Method, MethodOptions, adam, scalars


class DANNOptions(MethodOptions):
    lambda_adv: float = Field(0.05, ge=0, description="λ: weight of the reversed domain-classification gradient")
    lambda_schedule: Literal["dann", "constant"] = Field(
        "dann", description="dann: λ (2/(1+exp(-10p))-1) over the run (p = progress); constant: λ throughout")
    ramp_iterations: int = Field(0, ge=0, description="> 0: λ rises linearly from 0 over this many iterations "
                                                      "(replaces lambda_schedule)")
    features: Literal["low_high", "high"] = "low_high"
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    disc_lr: float = Field(2e-4, gt=0)
    disc_hidden: int = Field(256, ge=1)
    disc_layers: int = Field(2, ge=1)
    class_weights: list[float] | str | None = "batch"
    dice_weight: float = Field(1.0, ge=0)
    init_from_source: bool = False


class DANN(IterationState, Method):
    name = "dann"
    Options = DANNOptions

    def __init__(self, ctx: Context, options: DANNOptions | None = None):
        super().__init__(ctx, options)
        o = self.opts
        self.net = task_net(ctx)
        self.multi = o.features == "low_high" and not isinstance(self.net, ResNetClassifier)
        c = feature_channels(self.net) + (self.net.encoder.low_channels if self.multi else 0)
        self.D = FeatureDiscriminator(c, width=ctx.width, hidden=o.disc_hidden, n_layers=o.disc_layers)
        self.task_loss = task_loss(ctx, o.class_weights, o.dice_weight)
        self.needs_source_model = o.init_from_source
        self.iteration = 0

    def build_optimizers(self):
        o = self.opts
        return {"net": adam(self.net.parameters(), o.lr, 0.9, weight_decay=o.weight_decay),
                "D": adam(self.D.parameters(), o.disc_lr, 0.9)}

    def prepare(self, source, target, source_model=None) -> None:
        if self.opts.init_from_source:
            if source_model is None:
                raise ValueError("dann with init_from_source: true needs the trained source model")
            self.net.load_state_dict(source_net(source_model, self.ctx, self.name).state_dict())

    def coefficient(self) -> float:
        o = self.opts
        return o.lambda_adv * ramp(self.iteration, self.total_iterations, o.lambda_schedule, o.ramp_iterations)

    def _features(self, x: torch.Tensor):
        """(feature for the head, feature for D)."""
        if self.multi:
            f = self.net.encoder(x)
            return f.high, torch.cat([f.low, f.high], 1)
        h = encode(self.net, x)
        return h, h

    def train_step(self, batch):
        xs, ys, xt = batch.src_x, batch.src_y, batch.tgt_x
        size = xs.shape[-2:]
        terms = {}
        coeff = self.coefficient()
        with self.autocast():
            hs, ds = self._features(xs)
            _, dt = self._features(xt)
            terms["seg"] = self.task_loss(head(self.net, hs, size), ys)
            out = self.D(grad_reverse(torch.cat([ds, dt]), coeff))
            b = xs.shape[0]
            terms["dom"] = 0.5 * (bce_gan(out[:b], True) + bce_gan(out[b:], False))
        # one backward: D descends L_dom, E ascends λ L_dom (through the reversal), C1 descends L_seg
        self.update(terms["seg"] + terms["dom"], "net", "D")
        terms["lambda"] = coeff
        self.iteration += 1
        return scalars(terms)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return head(self.net, encode(self.net, images), images.shape[-2:])
