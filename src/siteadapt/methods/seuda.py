"""SeUDA: semantic-aware GANs that translate target images into the source appearance, segmented by the frozen
source segmenter (Chen et al., MLMI 2018), and CyUDA, the same method without the semantic-aware loss.

The source segmenter f_s (the ``source`` model of the direction, E∘C1) is trained beforehand and never updated here:
it is a fixed function through which the semantic-aware loss back-propagates into G_t->s. At test time a target image
is translated, x^{t->s} = G_t->s(x^t), and segmented by f_s (``predict``). Target labels are never read.

Networks (paper names; channel counts times ``ctx.width``)
    G_ts   target -> source generator G_t->s (CycleGAN ResNet generator)     x^{t->s} = G_ts(x^t)
    G_st   source -> target generator G_s->t                                  x^{s->t} = G_st(x^s)
    D_s    PatchGAN on source images: real x^s vs x^{t->s}                   L_GAN(G_t->s, D_s), eq. (1)
    D_t    PatchGAN on target images: real x^t vs x^{s->t}                   L_GAN(G_s->t, D_t)
    D_m    PatchGAN on K-class masks: one-hot source labels y^s (real) vs the softmax prediction f_s(x^{t->s})
           (fake)                                                             L_sem(G_t->s, D_m), eq. (3)
    source_model   f_s, frozen

Objective (eq. 4), minimised by the two generators (one optimizer, as CycleGAN), maximised by the discriminators::

    L = L_GAN(G_s->t, D_t) + α L_GAN(G_t->s, D_s) + β L_cyc(G_t->s, G_s->t) + λ L_sem(G_t->s, D_m)
    {α, β, λ} = {0.5, 10, 0.5}   (options alpha, beta, lambda_sem; lambda_adv_t = 1 is the weight of the first term)
    L_cyc = |G_s->t(G_t->s(x^t)) - x^t|_1 + |G_t->s(G_s->t(x^s)) - x^s|_1   (eq. 2)

Which module each term reaches: L_GAN(G_s->t, D_t) -> G_st; L_GAN(G_t->s, D_s) -> G_ts; L_cyc -> both generators;
L_sem -> G_ts only (through the frozen f_s; D_m is frozen while the generators step, and learns only from its own
discriminator loss). ``semantic: false`` (= CyUDA) builds no D_m and has no L_sem term.

From the paper (Sec. 2.3): LSGAN instead of the log-likelihood of eqs. (1), (3) (CycleGAN's practice), every
discriminator updated on a history of 50 generated images, generators and discriminators "updated successively"
(every iteration: generators, then D_s, D_t, D_m), 70x70 PatchGANs (5 conv layers), CycleGAN generators, Adam.

Where the paper is silent or unclear (choices, all options):
- Learning rate. The text says Adam with an initial learning rate of 0.002, "linearly decayed every 100 epochs",
  while stating that it follows CycleGAN's training strategies, whose rate is 0.0002 (constant for 100 epochs, then
  linearly to zero over another 100). The default is the text's 2e-3 with beta1 0.5, decayed on CycleGAN's schedule
  (``lr_constant_epochs`` = ``lr_decay_epochs`` = 100, an epoch being one pass over the larger of the two training
  sets; set in ``prepare``, without it no decay). On a short schedule (the toy target of ``tests/test_sifa.py``)
  CycleGAN's 2e-4 left the generators half-trained where the text's 2e-3 adapted. ``lr: 0.0002`` is CycleGAN's value.
- The semantic discriminator sees the softmax probabilities of f_s (the paper: "the predicted lung mask") and
  one-hot ground-truth masks, K channels each (a hard argmax mask would carry no gradient to G_t->s). Its fakes
  also go through a 50-mask pool ("the discriminator loss was calculated using one image from a collection of fifty
  previously generated images").
- Discriminator losses are LSGAN's 0.5 x [(D(real) - 1)^2 + D(fake)^2], not scaled by α, λ (with Adam a constant
  factor on one module's loss barely changes its updates).
- The segmenter is this project's source segmenter (SIFA's E∘C1, the same for every method in a table) rather than
  the paper's ResNet-101 DeepLab variant; the paper stresses the segmenter is detached and interchangeable.
- Generators: CycleGAN's ResNet generator, 32 base channels (as this project's ``cyclegan`` row, so a table compares
  methods and not generator sizes; ``generator_channels: 64`` is CycleGAN's), 9 residual blocks at >= 256 px and 6
  below (CycleGAN's rule), reflection padding, no identity loss (the paper lists none). ``generator_skip: true``
  (off by default, not the paper's) makes both generators ``tanh(G(x) + x)``: they start near the identity, so at
  init SeUDA's prediction is close to no adaptation and a short CPU schedule only has to learn the appearance residual.

The generators, image discriminators, their losses, pools and optimisers are the shared pair of :mod:`._cyclegan_pair`,
declared target -> source first (``pair``); this file adds eq. (4)'s weighting (α on L_GAN(G_t->s, D_s)), D_m with
L_sem, the frozen segmenter and the learning-rate schedule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from ._common import FrozenSourceMixin
from ._cyclegan_pair import CycleGANPair, CycleGANPairOptions
from .base import Context, Method, scalars


class SeUDAOptions(CycleGANPairOptions):
    semantic: bool = Field(True, description="the semantic-aware loss L_sem and D_m; false = CyUDA")
    lambda_adv_t: float = Field(1.0, ge=0, description="weight of L_GAN(G_s->t, D_t) (1 in eq. 4)")
    alpha: float = Field(0.5, ge=0, description="α: weight of L_GAN(G_t->s, D_s)")
    beta: float = Field(10.0, ge=0, description="β: weight of L_cyc")
    lambda_sem: float = Field(0.5, ge=0, description="λ: weight of L_sem(G_t->s, D_m)")
    lr: float = Field(2e-3, gt=0, description="the paper's text; CycleGAN (which it says it follows) uses 2e-4")
    lr_constant_epochs: float = Field(100.0, ge=0)
    lr_decay_epochs: float = Field(100.0, gt=0)
    generator_skip: bool = Field(False, description="tanh(G(x) + x): generators start near the identity (not the "
                                                    "paper's; for short schedules)")


class CyUDAOptions(SeUDAOptions):
    semantic: bool = Field(False, description="CyUDA = SeUDA without the semantic-aware loss")


class SeUDA(FrozenSourceMixin, CycleGANPair, Method):
    name = "seuda"
    pair = ("G_ts", "G_st", "D_s", "D_t")  # the translation SeUDA segments with, target -> source, comes first
    pools = ("pool_s", "pool_t", "pool_m")
    Options = SeUDAOptions
    needs_source_model = True

    def __init__(self, ctx: Context, options: SeUDAOptions | None = None):
        super().__init__(ctx, options)
        self.build_pair(skip=self.opts.generator_skip)
        self.D_m = self.patch_discriminator(ctx.n_classes) if self.semantic else None  # on K-class masks
        self.source_model = None
        self.n_epoch: int | None = None

    @property
    def semantic(self) -> bool:
        return self.opts.semantic and self.opts.lambda_sem > 0

    @property
    def discriminators(self) -> list:
        return [d for d in (self.D_s, self.D_t, self.D_m) if d is not None]

    def build_optimizers(self):
        opt = self.generator_optimizer() | self.discriminator_optimizers()
        if self.D_m is not None:
            opt["D_m"] = self.gan_adam(self.D_m)
        return opt

    def prepare(self, source, target, source_model=None) -> None:
        self.attach_source(source_model, self.name)
        sizes = [len(d) for d in (source, target) if d is not None]
        self.n_epoch = max(sizes) if sizes else None

    # ---- helpers --------------------------------------------------------------------------------------------------
    def _set_lr(self, batch_size: int) -> None:
        """CycleGAN's schedule: constant for ``lr_constant_epochs``, then linearly to 0 over ``lr_decay_epochs``."""
        o = self.opts
        lr = o.lr
        if self.n_epoch:
            epoch = self.iteration * batch_size / self.n_epoch
            lr *= max(0.0, 1.0 - max(0.0, epoch - o.lr_constant_epochs) / o.lr_decay_epochs)
        for opt in self.optimizers.values():
            for g in opt.param_groups:
                g["lr"] = lr

    def _segment(self, images: torch.Tensor) -> torch.Tensor:
        return self.require_source(self.name).predict(images)

    # ---- training -------------------------------------------------------------------------------------------------
    def train_step(self, batch):
        o = self.opts
        xs, ys, xt = batch.src_x, batch.src_y, batch.tgt_x
        self.require_source(self.name)
        self.seed_pools()
        self._set_lr(xs.shape[0])
        terms = {}
        probs = None
        with self.frozen(*self.discriminators), self.autocast():
            fake_s = self.G_ts(xt)  # x^{t->s}
            fake_t = self.G_st(xs)  # x^{s->t}
            loss = 0.0
            if o.lambda_adv_t > 0:
                terms["adv_t"] = self.gen_loss(self.D_t(fake_t))
                loss = loss + o.lambda_adv_t * terms["adv_t"]
            if o.alpha > 0:
                terms["adv_s"] = self.gen_loss(self.D_s(fake_s))
                loss = loss + o.alpha * terms["adv_s"]
            if o.beta > 0:
                terms["cyc"] = self.cyc_loss(self.G_st(fake_s), xt) + self.cyc_loss(self.G_ts(fake_t), xs)
                loss = loss + o.beta * terms["cyc"]
            if self.semantic:
                probs = torch.softmax(self._segment(fake_s).float(), 1)  # f_s(G_t->s(x^t)), f_s frozen
                terms["sem"] = self.gen_loss(self.D_m(probs))
                loss = loss + o.lambda_sem * terms["sem"]
        self.update(loss, "G")
        self.update_pair_discriminators(xs, fake_s, xt, fake_t, terms)
        if self.semantic:
            onehot = F.one_hot(ys.long(), self.ctx.n_classes).permute(0, 3, 1, 2).to(probs.dtype)
            terms["D_m"] = self._d_update("D_m", self.D_m, onehot, self.pool_m.query(probs.detach()))
        self.iteration += 1
        return scalars(terms)

    # ---- inference ------------------------------------------------------------------------------------------------
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """f_s(G_t->s(x)): the target image in the source appearance, segmented by the source segmenter."""
        return self._segment(self.G_ts(images))

    @torch.no_grad()
    def translations(self, src_x, tgt_x):
        return {"target -> source-like G_t->s(x_t)": self.G_ts(tgt_x),
                "source -> target-like G_s->t(x_s)": self.G_st(src_x)}


class CyUDA(SeUDA):
    """CyUDA (SeUDA's ablation, Table 1): the same class with ``semantic: false`` by default, registered under its
    own name so a table row and a model file say which one it is."""

    name = "cyuda"
    Options = CyUDAOptions
