"""ADDA: Adversarial Discriminative Domain Adaptation (Tzeng et al., CVPR 2017; the "ADDA" rows of the SIFA
conference version, Table 1, and of TUNA-Net, Table 1).

Stage 1 is the trained source model (encoder M_s and classifier C, the ``source`` model of the direction). Stage 2,
this method: a target encoder M_t initialised from M_s is trained adversarially against a domain discriminator D
until D cannot tell M_t(x^t) from M_s(x^s); M_s and C stay fixed. At test time ``predict`` = C(M_t(x^t)).

Networks: ``source_model`` (M_s∘C, frozen: no gradients, batch-norm statistics kept), ``net`` (M_t∘C: a copy of
the source network whose encoder trains and whose classifier C is frozen), D
(:class:`~siteadapt.nn.adversarial.FeatureDiscriminator`) on the encoder output: E's last block (stride 8) for
segmentation, the last ResNet stage's map for ``ctx.kind == "classification"`` (then the source model must hold a
:class:`~siteadapt.nn.networks.ResNetClassifier` as ``.net``).

Objective (ADDA eqs. 8-9, the GAN loss with inverted labels)::

    min_D    - log D(M_s(x^s)) - log(1 - D(M_t(x^t)))
    min_M_t  - log D(M_t(x^t))

Each iteration: D steps on the current features, then M_t steps against the updated D (the paper alternates the
two). D's gradient never reaches M_t (features detached) and M_t's loss never steps D (frozen). Target labels are
never read.

From the paper: the standard sigmoid cross-entropy GAN loss with inverted labels for M_t, Adam with beta1 0.5,
unshared encoder weights initialised from the source, frozen classifier.

Where the papers that compare with ADDA give no settings (choices, all options):
- Learning rate 1e-5 for M_t (``lr``, the released code's value) and 2e-4 for D (``disc_lr``, the paper's digits
  setting). With M_t at 2e-4 on the synthetic chest X-ray sites, D's loss sat at chance from the start while M_t
  drifted, and target Dice fell below no adaptation. Nothing ties M_t to the task once D is fooled (ADDA's known
  weakness), so the step size is what keeps M_t near the source.
- D: two 3x3 conv layers of 256 x width channels, LeakyReLU, per-location logits (ADDA's is three fully connected
  layers of 500/500 units on a feature vector; a feature map keeps its layout, as for DANN here).
- M_t's batch-norm layers train (their statistics move to the target), which is part of adapting an encoder with
  batch norm; the frozen classifier C has none.

"""

from __future__ import annotations

import torch
from pydantic import Field

from ..nn.adversarial import FeatureDiscriminator
from ._common import (FrozenSourceMixin, bce_gan, encode, feature_channels, freeze, head, head_modules, source_net,
                      task_net)
from .base import Context, Method, MethodOptions, adam, scalars


class ADDAOptions(MethodOptions):
    lr: float = Field(1e-5, gt=0, description="M_t (the released code's value)")
    disc_lr: float = Field(2e-4, gt=0)
    beta1: float = Field(0.5, ge=0, lt=1)
    disc_hidden: int = Field(256, ge=1)
    disc_layers: int = Field(2, ge=1)


class ADDA(FrozenSourceMixin, Method):
    name = "adda"
    Options = ADDAOptions
    needs_source_model = True

    def __init__(self, ctx: Context, options: ADDAOptions | None = None):
        super().__init__(ctx, options)
        o = self.opts
        self.net = task_net(ctx)  # M_t∘C
        freeze(*head_modules(self.net))
        self.D = FeatureDiscriminator(feature_channels(self.net), width=ctx.width, hidden=o.disc_hidden,
                                      n_layers=o.disc_layers)
        self.source_model = None

    def build_optimizers(self):
        o = self.opts
        return {"M_t": adam(self.net.parameters(), o.lr, o.beta1),  # adam() skips the frozen classifier
                "D": adam(self.D.parameters(), o.disc_lr, o.beta1)}

    def prepare(self, source, target, source_model=None) -> None:
        self.attach_source(source_model, self.name)
        self.net.load_state_dict(source_net(source_model, self.ctx, self.name).state_dict())

    def train_step(self, batch):
        xs, xt = batch.src_x, batch.tgt_x
        src = source_net(self.require_source(self.name), self.ctx, self.name)
        terms = {}
        with torch.no_grad(), self.autocast():
            fs = encode(src, xs)  # M_s(x^s), fixed
        with self.autocast():
            ft = encode(self.net, xt)  # M_t(x^t)
            b = xs.shape[0]
            out = self.D(torch.cat([fs, ft.detach()]))
            terms["D"] = 0.5 * (bce_gan(out[:b], True) + bce_gan(out[b:], False))
        self.update(terms["D"], "D")
        with self.frozen(self.D), self.autocast():
            terms["adv"] = bce_gan(self.D(ft), True)  # inverted label: target features should look like source
        self.update(terms["adv"], "M_t")
        return scalars(terms)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return head(self.net, encode(self.net, images), images.shape[-2:])
