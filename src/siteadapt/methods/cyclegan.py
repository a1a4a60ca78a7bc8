"""CycleGAN image alignment (the papers' "CycleGAN" row; Zhu et al. 2017): source images are translated to the target
look by a CycleGAN, and a segmenter E∘C (the source segmenter's network) is trained on the translated source images
G_s->t(x_s) with the source labels. ``predict`` applies that segmenter to real target images.

Networks: G_st (source -> target), G_ts (target -> source): ResNet generators; D_t, D_s: 70x70 PatchGANs; segmenter
E∘C1 (:class:`.segmenter.SegmenterNet`). Losses: LSGAN (weight ``lambda_adv`` = 1), cycle L1 both ways
(``lambda_cyc`` = 10), optional identity loss (``lambda_identity``, CycleGAN's, off by default: with intensities
swapped between modalities an identity prior is wrong), weighted CE + Dice for the segmenter. Adam lr 2e-4,
beta1 0.5 for generators and discriminators (CycleGAN); the segmenter as :mod:`.segmenter` (lr 2e-4, beta1 0.9,
weight decay 1e-4). Image pools of 50 per discriminator, saved in ``extra_state`` for exact resume. The generators,
discriminators, their losses, pools and optimisers are the shared pair of :mod:`._cyclegan_pair` (``pair``); this file
adds the segmenter, CycleGAN's identity loss and the classification reading below.

Choices (the papers name the baseline, not its training):
- Joint training, one stage: every iteration updates the generators, then the segmenter on this iteration's
  G_st(x_s), then the discriminators. (Two stages, CycleGAN first and the segmenter afterwards on a frozen G_st, is
  the other common reading; joint training reaches a trained segmenter in one schedule, which is what the quick
  profile can afford, and the segmenter keeps following G_st as it improves.)
- The segmenter's gradient does not reach the generator (``seg_through_generator: false``): this row is image
  alignment only. With ``true`` the segmentation loss also shapes G_st (a task-driven translation, a step towards
  CyCADA/SeUDA-like methods, not the papers' CycleGAN row).
- The segmenter starts from scratch (the papers' CycleGAN row trains a segmenter on translated images);
  ``init_from_source: true`` starts it from the trained source segmenter instead, as SIFA's option of the same name
  does for E and C1, so that a short CPU schedule compares the two methods from the same start.
- Generators: CycleGAN's ResNet generator with reflection padding and no skip, but SIFA's G_t width (32 base channels
  rather than CycleGAN's 64, so a table compares methods, not generator sizes) and CycleGAN's block rule: 9 residual
  blocks for images of 256 px and more, 6 below (``generator_blocks``). ``generator_skip: true`` returns
  ``tanh(G(x) + x)`` (generators start near the identity; for same-modality sites such as two X-ray sites).

Classification tasks (``ctx.kind == "classification"``, TUNA-Net's "Cycle-GAN" row): "a model trained on labeled real
adult X-rays is applied to synthetic adult X-rays generated from pediatric X-rays", i.e. ``predict`` = F_A(G_ts(x_t))
with F_A the trained source classifier (``siteadapt train-source``, frozen, loaded as for ``noadapt``). Only the
CycleGAN (G_st, G_ts, D_t, D_s) trains; there is no task network and no task loss (``lambda_seg`` and the segmenter
options are unused), so the translation knows nothing of the labels (the paper's point about this row).
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..nn.losses import WeightedCrossEntropyDiceLoss
from ._cyclegan_pair import CycleGANPair, CycleGANPairOptions
from .base import Context, Method, adam, scalars
from .segmenter import SegmenterNet

class CycleGANOptions(CycleGANPairOptions):
    lambda_adv: float = Field(1.0, ge=0)
    lambda_cyc: float = Field(10.0, ge=0)
    lambda_identity: float = Field(0.0, ge=0, description="CycleGAN identity loss weight (x lambda_cyc); 0 = off")
    lambda_seg: float = Field(1.0, ge=0)
    seg_through_generator: bool = False
    seg_lr: float = Field(2e-4, gt=0)
    seg_beta1: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    class_weights: list[float] | str | None = "batch"
    dice_weight: float = Field(1.0, ge=0)
    generator_skip: bool = Field(False, description="tanh(G(x) + x): generators start near the identity (a fit "
                                 "for same-modality sites; wrong for MR <-> CT)")
    init_from_source: bool = Field(False, description="segmentation: start the segmenter from the trained source "
                                   "segmenter")


class CycleGAN(CycleGANPair, Method):
    name = "cyclegan"
    pair = ("G_st", "G_ts", "D_t", "D_s")
    pools = ("pool_t", "pool_s")
    Options = CycleGANOptions

    def __init__(self, ctx: Context, options: CycleGANOptions | None = None):
        super().__init__(ctx, options)
        o = self.opts
        self.build_pair(skip=o.generator_skip)
        self.classify = ctx.kind == "classification"
        # classification: no task network here; predict = source classifier on G_ts(x_t) (module docstring)
        self.seg = None if self.classify else SegmenterNet(ctx)
        self.seg_loss = None if self.classify else WeightedCrossEntropyDiceLoss(
            ctx.n_classes, class_weights=o.class_weights, dice_weight=o.dice_weight)
        self.needs_source_model = self.classify or o.init_from_source

    def build_optimizers(self):
        o = self.opts
        opt = self.generator_optimizer()
        if self.seg is not None:
            opt["seg"] = adam(self.seg.parameters(), o.seg_lr, o.seg_beta1, weight_decay=o.weight_decay)
        return opt | self.discriminator_optimizers()

    def prepare(self, source, target, source_model=None) -> None:
        if self.seg is not None and self.opts.init_from_source:
            if source_model is None:
                raise ValueError("cyclegan with init_from_source: true needs the trained source segmenter")
            self.seg.load_state_dict(source_model.net.state_dict())  # segmenter.SegmenterNet: the same E∘C1
            return
        if self.classify:
            if source_model is None:
                raise ValueError("cyclegan on a classification task needs the trained source classifier")
            self.source_model = source_model.eval()
            for p in self.source_model.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "source_model", None) is not None:
            self.source_model.eval()  # frozen: its BN statistics stay those of the source
        return self

    def train_step(self, batch):
        o = self.opts
        xs, ys, xt = batch.src_x, batch.src_y, batch.tgt_x
        self.seed_pools()
        terms = {}
        with self.frozen(self.D_t, self.D_s), self.autocast():
            fake_t, fake_s, loss = self.pair_objective(xs, xt, o.lambda_adv, o.lambda_cyc, terms)
            if o.lambda_identity > 0:  # CycleGAN's identity loss: G_st(x_t) ~ x_t, G_ts(x_s) ~ x_s
                terms["idt"] = self.cyc_loss(self.G_st(xt), xt) + self.cyc_loss(self.G_ts(xs), xs)
                loss = loss + o.lambda_identity * o.lambda_cyc * terms["idt"]
            seg_in = fake_t if o.seg_through_generator else fake_t.detach()
            if o.lambda_seg > 0 and self.seg is not None:
                terms["seg"] = self.seg_loss(self.seg(seg_in), ys)
                loss = loss + o.lambda_seg * terms["seg"]
        # one backward: the segmenter sees a detached G_st(x_s) (unless seg_through_generator), D's are frozen
        self.update(loss, *(n for n in ("G", "seg") if n in self.optimizers))
        self.update_pair_discriminators(xt, fake_t, xs, fake_s, terms)
        self.iteration += 1
        return scalars(terms)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        if self.classify:
            return self.source_model.predict(self.G_ts(images))
        return self.seg(images)

    @torch.no_grad()
    def translations(self, src_x, tgt_x):
        return {"source -> target-like G_st(x_s)": self.G_st(src_x), "target -> source-like G_ts(x_t)": self.G_ts(tgt_x)}
