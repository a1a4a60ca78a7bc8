"""CyCADA: Cycle-Consistent Adversarial Domain Adaptation (Hoffman et al., ICML 2018; the "CyCADA" rows of the SIFA
papers, DSAN Tables II/III and TUNA-Net Table 1): pixel-level adaptation by a CycleGAN whose translations must keep
the source model's semantics, plus feature-level adaptation of the target model trained on translated images.

Networks
    G_st, G_ts   CycleGAN ResNet generators (source -> target, target -> source)
    D_t, D_s     PatchGANs on target / source images
    source_model f_S: the trained source model, frozen (the semantic-consistency "labeler")
    net          f_T: the target model (E∘C1, or the ResNet classifier for ``ctx.kind == "classification"``),
                 initialised from f_S, trained on G_st(x^s) with the source labels
    D_f          feature discriminator (:class:`~siteadapt.nn.adversarial.FeatureDiscriminator`) on f_T's encoder
                 output: features of G_st(x^s) (real) vs of x^t (fake)

Objective (CyCADA eq. 6; LSGAN as CycleGAN)::

    L = L_task(f_T, G_st(X_S), Y_S)                                    -> f_T
      + λadv [L_GAN(G_st, D_t) + L_GAN(G_ts, D_s)]                     -> G_st, G_ts
      + λcyc L_cyc(G_st, G_ts)                                         -> G_st, G_ts
      + λsem L_sem(G_st, G_ts, f_S)                                    -> G_st, G_ts (through the frozen f_S)
      + λfeat L_GAN(f_T, D_f)                                          -> f_T's encoder
    L_sem = L_task(f_S, G_ts(x^t), argmax f_S(x^t)) + L_task(f_S, G_st(x^s), argmax f_S(x^s))
    weights {λadv, λcyc, λsem, λfeat} = {1, 10, 1, 0.1}

Each term reaches only the modules on its right; every discriminator learns only from its own LSGAN loss. Target
labels are never read. ``predict`` = f_T(x^t).

Where the comparison papers give no settings (choices, all options):
- One joint stage per iteration (generators, then f_T on this iteration's G_st(x^s) detached, then D_t, D_s, D_f),
  instead of CyCADA's separate stages (CycleGAN first, then the task model): the quick profile affords one schedule,
  as for this project's ``cyclegan`` row. f_T starts from f_S (``init_from_source``), the ADDA-style initialisation
  of CyCADA's feature-level stage.
- Semantic targets: the frozen source model's argmax on the untranslated image, per the paper's equation. For the
  translated *source* image the true source label is available; the released code uses it for that direction
  (``semantic_source_targets: labels``). L_task in L_sem is plain cross-entropy (the paper's "task loss"; the
  target model's own L_task is weighted CE + Dice as every segmenter here, CE for classification).
- Feature space: ``encoder`` aligns E's last block (the paper's "feature-level"); ``output`` aligns softmax
  outputs (what the released segmentation code's discriminator sees). λfeat = 0.1 (the 0.1 x adversarial weight
  of SIFA's prediction/feature terms). D_f: two 3x3 convs at 256 x width channels, LeakyReLU, per-location logits.
- Generators as this project's ``cyclegan`` (32 base channels, 6 residual blocks below 256 px, reflection padding,
  no identity loss), Adam 2e-4 beta1 0.5 for generators and discriminators, image pools of 50; f_T with Adam 2e-4,
  beta1 0.9, weight decay 1e-4 (as the source segmenter).

The CycleGAN part (generators, image discriminators, LSGAN and cycle losses, pools, their optimisers, the adversarial +
cycle objective) is the shared pair of :mod:`._cyclegan_pair`; this file adds f_S, f_T, D_f and their terms.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ..nn.adversarial import FeatureDiscriminator
from ._common import FrozenSourceMixin, encode, feature_channels, head, source_net, task_loss, task_net
from ._cyclegan_pair import CycleGANPair, CycleGANPairOptions
from .base import Context, Method, adam, scalars


class CyCADAOptions(CycleGANPairOptions):
    lambda_adv: float = Field(1.0, ge=0)
    lambda_cyc: float = Field(10.0, ge=0)
    lambda_sem: float = Field(1.0, ge=0)
    lambda_task: float = Field(1.0, ge=0)
    lambda_feat: float = Field(0.1, ge=0)
    feature_space: Literal["encoder", "output"] = "encoder"
    semantic_source_targets: Literal["source_model", "labels"] = "source_model"
    init_from_source: bool = True
    task_lr: float = Field(2e-4, gt=0)
    task_beta1: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    class_weights: list[float] | str | None = "batch"
    dice_weight: float = Field(1.0, ge=0)
    disc_hidden: int = Field(256, ge=1)


class CyCADA(FrozenSourceMixin, CycleGANPair, Method):
    name = "cycada"
    pair = ("G_st", "G_ts", "D_t", "D_s")
    pools = ("pool_t", "pool_s")
    Options = CyCADAOptions
    needs_source_model = True

    def __init__(self, ctx: Context, options: CyCADAOptions | None = None):
        super().__init__(ctx, options)
        o = self.opts
        self.build_pair()  # CyCADA's generators have no residual skip
        self.net = task_net(ctx)
        if o.lambda_feat > 0:
            c = ctx.n_classes if o.feature_space == "output" else feature_channels(self.net)
            self.D_f = FeatureDiscriminator(c, width=ctx.width, hidden=o.disc_hidden)
        else:
            self.D_f = None
        self.source_model = None
        self.task_loss = task_loss(ctx, o.class_weights, o.dice_weight)

    @property
    def discriminators(self) -> list:
        return [d for d in (self.D_t, self.D_s, self.D_f) if d is not None]

    def build_optimizers(self):
        o = self.opts
        task = {"task": adam(self.net.parameters(), o.task_lr, o.task_beta1, weight_decay=o.weight_decay)}
        opt = self.generator_optimizer() | task | self.discriminator_optimizers()
        if self.D_f is not None:
            opt["D_f"] = self.gan_adam(self.D_f)
        return opt

    def prepare(self, source, target, source_model=None) -> None:
        self.attach_source(source_model, self.name)
        if self.opts.init_from_source:
            self.net.load_state_dict(source_net(source_model, self.ctx, self.name).state_dict())

    # ---- helpers --------------------------------------------------------------------------------------------------
    def _aligned(self, feature: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """What D_f sees: the encoder feature, or the softmax output (``feature_space: output``)."""
        return torch.softmax(logits.float(), 1) if self.opts.feature_space == "output" else feature

    # ---- training -------------------------------------------------------------------------------------------------
    def train_step(self, batch):
        o = self.opts
        xs, ys, xt = batch.src_x, batch.src_y, batch.tgt_x
        f_s = source_net(self.require_source(self.name), self.ctx, self.name)
        self.seed_pools()
        size = xs.shape[-2:]
        terms = {}
        # 1. generators: GAN + cycle + semantic consistency through the frozen source model
        with self.frozen(*self.discriminators, self.net), self.autocast():
            fake_t, fake_s, loss = self.pair_objective(xs, xt, o.lambda_adv, o.lambda_cyc, terms)
            if o.lambda_sem > 0:
                with torch.no_grad():
                    tgt_t = f_s(xt).argmax(1)
                    tgt_s = ys.long() if o.semantic_source_targets == "labels" else f_s(xs).argmax(1)
                terms["sem"] = (F.cross_entropy(f_s(fake_s).float(), tgt_t)
                                + F.cross_entropy(f_s(fake_t).float(), tgt_s))
                loss = loss + o.lambda_sem * terms["sem"]
        if torch.is_tensor(loss):
            self.update(loss, "G")
        # 2. target model: task loss on G_st(x^s) + feature-level GAN on x^t
        fake_t = fake_t.detach()
        with self.frozen(*self.discriminators), self.autocast():
            h_st = encode(self.net, fake_t)
            p_st = head(self.net, h_st, size)
            terms["task"] = self.task_loss(p_st, ys)
            loss = o.lambda_task * terms["task"]
            if self.D_f is not None:
                h_t = encode(self.net, xt)
                a_t = self._aligned(h_t, head(self.net, h_t, size))
                terms["feat"] = self.gen_loss(self.D_f(a_t))
                loss = loss + o.lambda_feat * terms["feat"]
        self.update(loss, "task")
        # 3. discriminators
        self.update_pair_discriminators(xt, fake_t, xs, fake_s, terms)
        if self.D_f is not None:
            terms["D_f"] = self._d_update("D_f", self.D_f, self._aligned(h_st, p_st).detach(), a_t.detach())
        self.iteration += 1
        return scalars(terms)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return head(self.net, encode(self.net, images), images.shape[-2:])

    @torch.no_grad()
    def translations(self, src_x, tgt_x):
        return {"source -> target-like G_st(x_s)": self.G_st(src_x),
                "target -> source-like G_ts(x_t)": self.G_ts(tgt_x)}
