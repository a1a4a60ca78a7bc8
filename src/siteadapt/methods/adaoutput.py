"""AdaOutput: adversarial alignment of the segmentation output space (Tsai et al., CVPR 2018, "Learning to adapt
structured output space"; the "AdaOutput" row of the SIFA journal version and of DSAN, Tables II/III).

A segmenter is trained on labeled source images while discriminators on its softmax outputs learn to tell source
predictions (real) from target predictions (fake); the segmenter is also trained to make its target predictions
look like source ones. Multi-level (the paper's best variant): a second classifier on a lower encoder block with its
own output-space discriminator.

Networks: E∘C1 (this project's segmenter; the SIFA/DSAN papers re-implement every comparison row on their own
segmentation backbone), C2 on E's 2xR512 block (``multi_level``), D1 on softmax(C1), D2 on softmax(C2).

Objective (Tsai et al. eqs. 1-4, multi-level; defaults = the paper's values)::

    segmenter:  L_seg(C1(E(x^s)), y^s) + λseg2 L_seg(C2(E(x^s)), y^s)
                + λadv1 L_adv(D1(softmax C1(E(x^t))) -> source) + λadv2 L_adv(D2(softmax C2(E(x^t))) -> source)
    D_i:        source predictions -> 1, target predictions -> 0
    {λseg2, λadv1, λadv2} = {0.1, 0.001, 0.0002};  single-level (``multi_level: false``): λadv1 = 0.001, no C2/D2

Gradients: L_seg and L_adv reach E and C_i (C2's terms only C2 and E); each D_i only from its own loss (frozen while
the segmenter steps). Target labels are never read. ``predict`` = C1(E(x^t)).

From the paper: sigmoid cross-entropy GAN loss (``gan_loss: bce``), discriminators of 4x4 convolutions with
LeakyReLU 0.2 and no normalization, Adam for D with lr 1e-4 and betas (0.9, 0.99), one segmenter step then one
discriminator step per iteration.

Where the comparison papers give no settings (choices, all options):
- Segmenter optimiser: Adam lr 2e-4, betas (0.9, 0.999), weight decay 1e-4, as this project's source segmenter (the
  paper's SGD lr 2.5e-4 with polynomial decay is tied to its ImageNet-initialised DeepLab); loss = class-weighted
  CE + Dice as every segmenter here (the paper: cross-entropy).
- The discriminator is this project's PatchGAN with ``norm: none`` (4x4 convs, LeakyReLU 0.2): Tsai's has five
  stride-2 layers; ours has ``disc_layers`` stride-2 layers (default 3) and two stride-1 layers, which keeps a map
  of patch scores at the quick profile's 64 px.
- Start: E and C1 from the trained source segmenter (``init_from_source: true``, default). The paper starts from
  an ImageNet-pretrained DeepLab, so its output space means something from the first iteration; nothing pretrained
  can be downloaded here, and from random weights the discriminators align predictions that carry no segmentation
  yet (on the synthetic chest X-ray sites that scored below the same training without alignment).
  ``init_from_source: false`` is the paper's from-scratch training.
- λadv_i are constant (the paper's). ``lambda_schedule: dann`` multiplies them by DANN's 2/(1+exp(-10p))-1 and
  ``ramp_iterations`` by a linear warm-up: neither helped on the synthetic chest X-ray sites, from random weights
  or from the source segmenter.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..nn.losses import LSGANDiscriminatorLoss, LSGANGeneratorLoss, WeightedCrossEntropyDiceLoss
from ..nn.networks import DilatedResidualEncoder, PatchDiscriminator, PixelClassifier
from ._common import IterationState, bce_gan, ramp
from .base import Context, Method, MethodOptions, adam, scalars


class AdaOutputOptions(MethodOptions):
    multi_level: bool = Field(True, description="C2 + D2 on a lower block (the paper's multi-level variant)")
    lambda_seg2: float = Field(0.1, ge=0)
    lambda_adv1: float = Field(0.001, ge=0)
    lambda_adv2: float = Field(0.0002, ge=0)
    lambda_schedule: Literal["constant", "dann"] = Field(
        "constant", description="constant: λadv_i throughout (the paper); dann: x (2/(1+exp(-10p))-1), p = progress")
    ramp_iterations: int = Field(0, ge=0, description="> 0: λadv_i rise linearly from 0 over this many iterations")
    gan_loss: Literal["bce", "lsgan"] = "bce"
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    disc_lr: float = Field(1e-4, gt=0)
    disc_betas: tuple[float, float] = (0.9, 0.99)
    disc_layers: int | None = Field(None, ge=1, description="stride-2 layers of D_i; None: 3")
    class_weights: list[float] | str | None = "batch"
    dice_weight: float = Field(1.0, ge=0)
    init_from_source: bool = Field(True, description="start E, C1 from the trained source segmenter; false: random")


class AdaOutput(IterationState, Method):
    name = "adaoutput"
    Options = AdaOutputOptions

    def __init__(self, ctx: Context, options: AdaOutputOptions | None = None):
        super().__init__(ctx, options)
        o = self.opts
        w, ch, k = ctx.width, ctx.in_channels, ctx.n_classes
        self.E = DilatedResidualEncoder(ch, width=w)
        self.C1 = PixelClassifier(self.E.out_channels, k)
        self.C2 = PixelClassifier(self.E.low_channels, k) if o.multi_level else None
        nl = o.disc_layers or 3
        self.D1 = PatchDiscriminator(k, width=w, n_layers=nl, norm="none") if o.lambda_adv1 > 0 else None
        self.D2 = (PatchDiscriminator(k, width=w, n_layers=nl, norm="none")
                   if o.multi_level and o.lambda_adv2 > 0 else None)
        self.seg_loss = WeightedCrossEntropyDiceLoss(k, class_weights=o.class_weights, dice_weight=o.dice_weight)
        self.ls_gen, self.ls_disc = LSGANGeneratorLoss(), LSGANDiscriminatorLoss()
        self.needs_source_model = o.init_from_source
        self.iteration = 0

    @property
    def discriminators(self) -> list:
        return [d for d in (self.D1, self.D2) if d is not None]

    def build_optimizers(self):
        o = self.opts
        seg = [p for m in (self.E, self.C1, self.C2) if m is not None for p in m.parameters()]
        opt = {"E_C": adam(seg, o.lr, 0.9, weight_decay=o.weight_decay)}
        if self.discriminators:
            opt["D"] = adam([p for d in self.discriminators for p in d.parameters()], o.disc_lr, *o.disc_betas)
        return opt

    def prepare(self, source, target, source_model=None) -> None:
        if self.opts.init_from_source:
            if source_model is None:
                raise ValueError("adaoutput with init_from_source: true needs the trained source segmenter")
            self.E.load_state_dict(source_model.net.encoder.state_dict())
            self.C1.load_state_dict(source_model.net.classifier.state_dict())

    def _gen(self, out):
        return bce_gan(out, True) if self.opts.gan_loss == "bce" else self.ls_gen(out)

    def _disc(self, real_out, fake_out):
        if self.opts.gan_loss == "bce":
            return bce_gan(real_out, True) + bce_gan(fake_out, False)
        return self.ls_disc(real_out, fake_out)

    def train_step(self, batch):
        o = self.opts
        xs, ys, xt = batch.src_x, batch.src_y, batch.tgt_x
        size = xs.shape[-2:]
        terms = {}
        k = ramp(self.iteration, self.total_iterations, o.lambda_schedule, o.ramp_iterations)
        with self.frozen(*self.discriminators), self.autocast():
            fs, ft = self.E(xs), self.E(xt)
            p1s, p1t = self.C1(fs.high, size), self.C1(ft.high, size)
            terms["seg1"] = self.seg_loss(p1s, ys)
            loss = terms["seg1"]
            p2s = p2t = None
            if self.C2 is not None:
                p2s, p2t = self.C2(fs.low, size), self.C2(ft.low, size)
                if o.lambda_seg2 > 0:
                    terms["seg2"] = self.seg_loss(p2s, ys)
                    loss = loss + o.lambda_seg2 * terms["seg2"]
            if self.D1 is not None:
                terms["adv1"] = self._gen(self.D1(torch.softmax(p1t.float(), 1)))
                loss = loss + k * o.lambda_adv1 * terms["adv1"]
            if self.D2 is not None:
                terms["adv2"] = self._gen(self.D2(torch.softmax(p2t.float(), 1)))
                loss = loss + k * o.lambda_adv2 * terms["adv2"]
        self.update(loss, "E_C")
        if self.discriminators:
            d_loss = 0.0
            for i, (D, ps, pt) in enumerate(((self.D1, p1s, p1t), (self.D2, p2s, p2t)), start=1):
                if D is None:
                    continue
                b = ps.shape[0]
                with self.autocast():
                    out = D(torch.softmax(torch.cat([ps, pt]).detach().float(), 1))
                terms[f"D{i}"] = self._disc(out[:b], out[b:])
                d_loss = d_loss + terms[f"D{i}"]
            self.update(d_loss, "D")
        self.iteration += 1
        return scalars(terms)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.C1(self.E(images).high, images.shape[-2:])
