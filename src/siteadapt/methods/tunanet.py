"""TUNA-Net: task-driven unsupervised adversarial network (Tang et al., MICCAI 2019) for image classification across
sites (adult -> pediatric pneumonia). One class; the paper's ablations a)-c) of Table 1 are options.

Networks (paper names; the code's attribute names)
    G_AP  source (A, adult) -> target (P, pediatric) generator       x^_p = G_AP(x_a)     ("synthetic target")
    G_PA  target -> source generator                                 x^_a = G_PA(x_p)     ("synthetic source")
    D_P   PatchGAN on target images: real x_p vs G_AP(x_a)
    D_A   PatchGAN on source images: real x_a vs G_PA(x_p)
    F_A   source classifier (ResNet-18-like), first learned on the labeled source: the trained source model
    F_P   target classifier, "fine-tuned from F_A": starts as a copy of it. ``predict`` = F_P(x_t).

Objective, eq. (6), with the terms of eqs. (1)-(5) (weights are options; defaults = the paper: all 1, lambda = 10)::

    L = L_adv(G_AP, D_P) + L_adv(G_PA, D_A)                                        eq. (1), LSGAN form
      + lambda * L_cyc,   L_cyc = |G_PA(G_AP(x_a)) - x_a|_1 + |G_AP(G_PA(x_p)) - x_p|_1           eq. (2), lambda 10
      + L_cls(F_A, A)                       CE(F_A(x_a), y_a)                       eq. (3)  ``cls_src``
      + L_cls(F_A, A')                      CE(F_A(x'_a), y_a), x'_a = G_PA(G_AP(x_a))        ``cls_rec``
      + L_cls(F_P, {G_AP(X_A), Y_A})        CE(F_P(x^_p), y_a)                                ``cls_syn``
      + L_cls(F_A, {G_PA(X_P), argmax F_P(X_P)})   CE(F_A(x^_a), argmax F_P(x_p))   eq. (4)  ``cls_pseudo``
      + L_feat(F_P) = sum_i |f_i(x_p) - f_i(x^_p)|^2 / (H_i W_i C_i), i in {conv3, conv4} of F_P   eq. (5) ``feat``

Every network minimises the terms it takes part in (one joint objective, one backward pass per iteration): the
generators get the adversarial, cycle *and* semantic terms (the classification losses flow back through x'_a, x^_p and
x^_a into G_AP / G_PA: that is what makes the translation task-driven), F_A gets cls_src, cls_rec and cls_pseudo, F_P
gets cls_syn and feat. The discriminators then take one LSGAN step each (real vs pooled fakes). Target labels are never
read: the pseudo-labels are F_P's own argmax on the unlabeled target batch (no gradient through them).

Ablations (Table 1) as flags:
    a) w/o feature loss          ``feature_loss: false``            (lambda_feat 0 does the same)
    b) w/o F_A on reconstructions ``fa_on_reconstruction: false``   (drops cls_rec)
    c) w/o F_P, offline          ``fp_online: false``: F_P is not part of the translation training (no cls_syn,
                                 cls_pseudo, feat); after the CycleGAN + F_A phase, F_P (from the source model) is
                                 trained on the frozen G_AP's synthetic target images G_AP(x_a) with y_a
                                 (cross-entropy only) for the last ``offline_fraction`` of the iterations.

Where the paper is silent (choices, all options):
- Adversarial loss: least squares (LSGAN), as the CycleGAN code the paper adopts; eq. (1) is written in the log form.
- Generators, discriminators: as :mod:`.cyclegan` (ResNet generator, 32 base channels times ``width``, 6 residual
  blocks below 256 px and 9 from 256 px (the paper's 9 at 512 px); 70x70 PatchGAN; image pools of 50).
  ``generator_skip: true`` makes each generator ``tanh(G(x) + x)``, starting near the identity: right for two X-ray
  sites of one modality and what lets a CPU run of a few hundred iterations produce usable translations (without it
  the quick profile's translations were still noise after 600 iterations); off by default (CycleGAN has no skip).
  The pneumonia task of params.yaml turns it on, with 3 residual blocks, for ``cyclegan`` and ``tunanet`` alike.
- Classifiers: :class:`~siteadapt.nn.networks.ResNetClassifier` (ResNet-18 layout) trained from scratch as the source
  model (the paper starts F_A from ImageNet weights); ``init_from_source: true`` copies the trained source classifier
  into F_A and F_P (the paper's "F_A is first learned on the labeled source data", "F_P fine-tuned from F_A").
  Mid-level features for eq. (5): the outputs of ResNet stages 2 and 3 (the paper's conv_3 and conv_4).
- F_A and F_P run once per input set (F_A on x_a, x'_a and x^_a; F_P on x^_p and x_p), so every batch-norm batch
  holds one kind of image and no loss reaches a network through another set's batch statistics (one concatenated
  pass would let e.g. cls_src train the generators through F_A's batch statistics). F_P's running statistics, used
  by ``predict``, therefore come from real and synthetic target batches alike.
- Feature loss pairing (``feature_pairing``): x_p and x^_p are unpaired images; ``pairs`` (default, literal eq. 5)
  compares the i-th real with the i-th synthetic image of the batch, as the paper's batch of one does;
  ``batch_mean`` compares the batch means of the feature maps instead (a first-moment match between the two sets).
- Optimisers: Adam, lr 2e-4 (paper) for everything; beta1 0.5 for generators and discriminators (CycleGAN), 0.9 for
  the classifiers (``cls_beta1``). Schedule: constant for the first half of the run, then linear decay to 0 (the
  paper's 100 + 100 epochs, as a fraction of the run: ``lr_decay_start``; needs the run length, which the train
  step sets; without it, constant). The offline phase of ablation c) trains F_P at a constant ``cls_lr``.
- Batch: the profile's batch size (the paper uses 1).

G_AP, G_PA, D_P, D_A, the LSGAN and cycle losses, the pools and their optimisers are the shared pair of
:mod:`._cyclegan_pair`; this file adds F_A, F_P, the classification and feature terms of eq. (6) and the schedule.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from pydantic import Field

from ..nn.losses import FeatureReconstructionLoss
from ._cyclegan_pair import CycleGANPair, CycleGANPairOptions
from .base import Context, Method, adam, scalars
from .segmenter import ClassificationLoss, classifier_net


class TUNANetOptions(CycleGANPairOptions):
    # eq. (6) weights (0 removes a term)
    lambda_adv: float = Field(1.0, ge=0)
    lambda_cyc: float = Field(10.0, ge=0, description="lambda of eq. (6)")
    lambda_cls_source: float = Field(1.0, ge=0, description="L_cls(F_A, A)")
    lambda_cls_reconstructed: float = Field(1.0, ge=0, description="L_cls(F_A, A')")
    lambda_cls_synthetic: float = Field(1.0, ge=0, description="L_cls(F_P, {G_AP(X_A), Y_A})")
    lambda_cls_pseudo: float = Field(1.0, ge=0, description="L_cls(F_A, {G_PA(X_P), argmax F_P(X_P)})")
    lambda_feat: float = Field(1.0, ge=0, description="L_feat(F_P), eq. (5)")
    # ablations of Table 1
    feature_loss: bool = Field(True, description="false: ablation a) w/o feature loss")
    fa_on_reconstruction: bool = Field(True, description="false: ablation b) w/o F_A on reconstructed source")
    fp_online: bool = Field(True, description="false: ablation c) F_P trained offline on synthetic target images")
    offline_fraction: float = Field(0.3, gt=0, lt=1, description="ablation c): share of the run for offline F_P")
    feature_pairing: Literal["pairs", "batch_mean"] = "pairs"
    # optimisation
    cls_lr: float = Field(2e-4, gt=0)
    cls_beta1: float = Field(0.9, ge=0, lt=1)
    lr_decay_start: float = Field(0.5, ge=0, le=1, description="fraction of the run after which lr decays to 0")
    init_from_source: bool = Field(True, description="F_A and F_P start from the trained source classifier")
    # networks
    generator_skip: bool = Field(False, description="tanh(G(x) + x): generators start near the identity")


class TUNANet(CycleGANPair, Method):
    name = "tunanet"
    pair = ("G_AP", "G_PA", "D_P", "D_A")
    pools = ("pool_P", "pool_A")
    Options = TUNANetOptions

    def __init__(self, ctx: Context, options: TUNANetOptions | None = None):
        super().__init__(ctx, options)
        if ctx.kind != "classification":
            raise ValueError("tunanet adapts image classifiers: the task must have kind: classification")
        o = self.opts
        self.build_pair(skip=o.generator_skip)
        self.F_A = classifier_net(ctx)
        self.F_P = copy.deepcopy(self.F_A)  # "fine-tuned from F_A"
        self.cls_loss = ClassificationLoss(ctx.n_classes)
        self.feat_loss = FeatureReconstructionLoss()
        self.needs_source_model = o.init_from_source

    # ---- set-up ---------------------------------------------------------------------------------------------------
    def build_optimizers(self):
        o = self.opts
        classifiers = {"F_A": adam(self.F_A.parameters(), o.cls_lr, o.cls_beta1),
                       "F_P": adam(self.F_P.parameters(), o.cls_lr, o.cls_beta1)}
        return self.generator_optimizer() | classifiers | self.discriminator_optimizers()

    def prepare(self, source, target, source_model=None) -> None:
        if self.opts.init_from_source:
            if source_model is None:
                raise ValueError("tunanet with init_from_source: true needs the trained source classifier")
            state = source_model.net.state_dict()
            self.F_A.load_state_dict(state)
            self.F_P.load_state_dict(state)

    # ---- schedule -------------------------------------------------------------------------------------------------
    @property
    def translation_iterations(self) -> int | None:
        """Length of the joint (translation) phase: the whole run, or the part before ablation c)'s offline F_P."""
        if self.total_iterations is None:
            return None
        if self.opts.fp_online:
            return self.total_iterations
        return max(1, int(round(self.total_iterations * (1 - self.opts.offline_fraction))))

    @property
    def offline_phase(self) -> bool:
        n = self.translation_iterations
        return not self.opts.fp_online and n is not None and self.iteration >= n

    def _set_lr(self) -> None:
        """Constant, then linear decay to 0 over the rest of the translation phase (paper: 100 + 100 epochs)."""
        o = self.opts
        n = self.translation_iterations
        f = 1.0
        if n is not None and not self.offline_phase:
            start = o.lr_decay_start * n
            if self.iteration >= start:
                f = max(0.0, 1.0 - (self.iteration - start) / max(n - start, 1.0))
        for name, opt in self.optimizers.items():
            base = o.cls_lr if name in ("F_A", "F_P") else o.lr
            for g in opt.param_groups:
                g["lr"] = base * (1.0 if (self.offline_phase and name == "F_P") else f)

    # ---- training -------------------------------------------------------------------------------------------------
    def _weights(self) -> dict[str, float]:
        o = self.opts
        online = o.fp_online
        return {
            "adv": o.lambda_adv, "cyc": o.lambda_cyc, "cls_src": o.lambda_cls_source,
            "cls_rec": o.lambda_cls_reconstructed if o.fa_on_reconstruction else 0.0,
            "cls_syn": o.lambda_cls_synthetic if online else 0.0,
            "cls_pseudo": o.lambda_cls_pseudo if online else 0.0,
            "feat": o.lambda_feat if (online and o.feature_loss) else 0.0,
        }

    def _feature_term(self, real: list[torch.Tensor], synth: list[torch.Tensor]) -> torch.Tensor:
        if self.opts.feature_pairing == "batch_mean":
            real = [f.mean(0, keepdim=True) for f in real]
            synth = [f.mean(0, keepdim=True) for f in synth]
        return self.feat_loss(real, synth)

    def train_step(self, batch):
        self.seed_pools()
        self._set_lr()
        xa, ya, xp = batch.src_x, batch.src_y, batch.tgt_x
        if self.offline_phase:
            logs = self._offline_step(xa, ya)
        else:
            logs = self._joint_step(xa, ya, xp)
        self.iteration += 1
        return scalars(logs)

    def _joint_step(self, xa, ya, xp) -> dict:
        w = self._weights()
        terms: dict = {}
        trained = ["G", "F_A"] + (["F_P"] if self.opts.fp_online else [])
        with self.frozen(self.D_P, self.D_A, *([] if self.opts.fp_online else [self.F_P])), self.autocast():
            fake_p = self.G_AP(xa)  # synthetic target, labels y_a
            fake_a = self.G_PA(xp)  # synthetic source, no labels
            rec_a = self.G_PA(fake_p)
            rec_p = self.G_AP(fake_a)
            if w["adv"] > 0:
                terms["adv_P"] = self.gen_loss(self.D_P(fake_p))
                terms["adv_A"] = self.gen_loss(self.D_A(fake_a))
            if w["cyc"] > 0:
                terms["cyc"] = self.cyc_loss(rec_a, xa) + self.cyc_loss(rec_p, xp)
            # F_P on synthetic and on real target images: cls_syn, pseudo-labels, mid-level features
            pseudo = None
            if self.opts.fp_online:
                logits_syn, f_syn = self.F_P.forward_features(fake_p)
                logits_real, f_real = self.F_P.forward_features(xp)
                pseudo = logits_real.detach().argmax(1)
                if w["cls_syn"] > 0:
                    terms["cls_syn"] = self.cls_loss(logits_syn, ya)
                if w["feat"] > 0:
                    terms["feat"] = self._feature_term(f_real, f_syn)
            # F_A on source, reconstructed source and synthetic source (pseudo-labeled) images
            if w["cls_src"] > 0:
                terms["cls_src"] = self.cls_loss(self.F_A(xa), ya)
            if w["cls_rec"] > 0:
                terms["cls_rec"] = self.cls_loss(self.F_A(rec_a), ya)
            if pseudo is not None and w["cls_pseudo"] > 0:
                terms["cls_pseudo"] = self.cls_loss(self.F_A(fake_a), pseudo)
                terms["pseudo_pos"] = pseudo.float().mean()  # share of target images F_P calls positive (log only)
        total = 0.0
        for name, v in terms.items():
            key = "adv" if name.startswith("adv_") else name
            if key in w and w[key] > 0:
                total = total + w[key] * v
        self.update(total, *trained)
        self.update_pair_discriminators(xp, fake_p, xa, fake_a, terms)
        return terms

    def _offline_step(self, xa, ya) -> dict:
        """Ablation c), second phase: F_P learns on the frozen G_AP's synthetic target images."""
        with torch.no_grad(), self.autocast():
            fake_p = self.G_AP(xa)
        with self.autocast():
            loss = self.cls_loss(self.F_P(fake_p), ya)
        self.update(loss, "F_P")
        return {"cls_syn_offline": loss}

    # ---- inference ------------------------------------------------------------------------------------------------
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.F_P(images)

    @torch.no_grad()
    def translations(self, src_x, tgt_x):
        fake_p = self.G_AP(src_x)
        return {"source -> target-like G_AP(x_a)": fake_p, "target -> source-like G_PA(x_p)": self.G_PA(tgt_x),
                "source reconstructed G_PA(G_AP(x_a))": self.G_PA(fake_p)}
