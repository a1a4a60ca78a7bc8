"""DSAN: Deep Symmetric Adaptation Network (Han et al.): a shared encoder E, private decoders U_s and U_t that translate
in both directions, and a segmentation sub-network E∘C_i trained on real and translated images of both styles. One
class; the Table IV ablations and the Table V design variants are options.

Networks (paper names; channel counts times ``ctx.width``)
    E      shared encoder (segmentation and both translation sub-networks)      Z^s = E(x^s), Z^t = E(x^t)
    U_t    target decoder: x^{s->t} = U_t(E(x^s)); reconstructs x^t = U_t(E(x^t))
    U_s    source decoder: x^{t->s} = U_s(E(x^t)); reconstructs x^s = U_s(E(x^s))
    C1     pixel-wise classifier on E's last block (prediction = C1(E(x^t)))
    C2     pixel-wise classifier on a lower block (deep supervision, "inspired from SIFA")
    D_t    target image discriminator: x^t (real) vs x^{s->t} (fake)                eq. (1)
    D_s    source image discriminator: x^s (real) vs x^{t->s} (fake)                eq. (2)
    D_p1, D_p2  prediction-space discriminators on softmax(C_i(.)), shared between real images (source real, target
           fake; eq. 9) and translated images (x^{s->t} real, x^{t->s} fake; eq. 10)

Losses and weights (defaults = the paper's values)::

    L_rec^t  = |U_t(E(x^t)) - x^t|_1                  (3)   L_rec^s = |U_s(E(x^s)) - x^s|_1                  (4)
    L_gen^t  = λrec L_rec^t + λadv L_adv^t            (5)   L_gen^s = λrec L_rec^s + λadv L_adv^s            (6)
    L_seg^s  = Σ_i CE + Dice (C_i(E(x^s)), y^s)       (7)   L_seg^{s->t} = Σ_i CE + Dice(C_i(E(x^{s->t})), y^s) (8)
    L_adv^p  = Σ_i D_pi(C_i(E(x^s))) vs D_pi(C_i(E(x^t)))           (9)
    L_adv^tp = Σ_i D_pi(C_i(E(x^{s->t}))) vs D_pi(C_i(E(x^{t->s})))  (10)
    L_adv^sec = L_adv^p + L_adv^tp                                  (11)
    L = λgen (L_gen^t + L_gen^s) + λseg (L_seg^s + L_seg^{s->t}) + λsecadv L_adv^sec   (12)
    {λrec, λadv} = {1.0, 0.01};  {λgen, λseg, λsecadv} = {1.0, 1.0, 0.1}

Which module each term reaches: L_gen^t -> E, U_t; L_gen^s -> E, U_s; L_seg, L_adv^sec -> E, C_i (the eqs. list
(E, C_i) as their arguments: translated images enter the segmentation sub-network detached, so segmentation and
semantic-space terms do not train the decoders). The discriminators minimise their own losses only (frozen while the
rest steps). Learning rates (Adam): E, C_i 2e-4; U_s, U_t 1e-3; D_s, D_t 1e-4; D_pi 5e-5 (Sec. IV-A2).
``predict`` = C1(E(x^t)). Target labels are never read.

Ablations (Table IV rows) and design variants (Table V) as flags:
    L_seg^s only (= no adaptation)        target_translation: false, source_translation: false,
                                          semantic_adversarial: false
    L_gen^t + L_seg^{s->t}                source_translation: false, source_segmentation: false,
                                          semantic_adversarial: false
    + L_gen^s                             source_segmentation: false, semantic_adversarial: false
    + L_seg^s                             semantic_adversarial: false
    + L_adv^sec (all) = DSAN              (defaults)
    Shared Decoders                       shared_decoders: true   (one decoder U_t translates both ways and
                                          reconstructs both domains)
    Unshared Encoders                     shared_encoder: false   (the segmentation sub-network has its own encoder
                                          E_seg; E serves only the translation sub-networks)
    Unshared Discriminators               shared_semantic_discriminators: false  (D_tp1, D_tp2 for eq. 10)
``target_translation`` switches L_gen^t and L_seg^{s->t} together (the paper never separates them); without
``source_translation`` there is no x^{t->s}, so L_adv^tp (which needs both translations) is off and L_adv^sec is
L_adv^p alone. A module whose terms are all off is not built.

Where the paper is silent (choices, all options):
- Backbone: this project's SIFA encoder (dilated residual E, C1 on its last block, C2 on the 2xR512 block) instead of
  DeepLab-ResNet50 with random initialization, so that a table compares methods on one segmentation backbone (the
  SIFA journal version does the same for its comparison rows).
- Decoders: "three residual blocks and three deconvolution layers" = :class:`ResnetDecoder` with ``n_blocks=3``,
  32 base channels, instance norm, no skip. Discriminators: "four convolution layers" = a PatchGAN with two stride-2
  layers (``disc_layers: 2``: 4x4 convs at stride 2, 2, 1 and the output conv), instance norm.
- GAN loss: least squares (as SIFA, which DSAN builds on, and every GAN here); eqs. (1), (2), (9), (10) are written
  with log-likelihoods. Discriminator losses are LSGAN's 0.5 x [(D(real)-1)^2 + D(fake)^2]; D_pi's loss sums its
  real-image and translated-image pairs (both levels in one optimizer).
- Deep-supervision weight: eqs. (7)-(11) sum over i = 1, 2 with no weight, so C2's terms count as much as C1's
  (``level2_weight: 1``; SIFA uses 0.1). Segmentation loss = class-weighted CE + Dice as :mod:`.segmenter`.
- Adam betas: the paper gives only the learning rates; PyTorch's defaults (0.9, 0.999) for every module (the paper
  is a PyTorch implementation). L2 weight decay 1e-4 on E, C_i as this project's segmenters.
- One forward pass per iteration: E, C_i, U_s, U_t take their steps on the gradient of L from that pass, then D_t,
  D_s and D_pi on that pass's (pooled, for D_t/D_s: a 50-image history as SIFA) images and detached predictions.
- Input augmentation (random crop, rotation) is left to the training engine, the same for every method: off unless
  the profile's ``augment`` turns it on (:class:`siteadapt.config.Augment`: rotation, scaling, shear).
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..nn.losses import CycleConsistencyLoss, WeightedCrossEntropyDiceLoss
from ..nn.networks import DilatedResidualEncoder, PixelClassifier, ResnetDecoder
from ._cyclegan_pair import GANTraining
from .base import Context, Method, MethodOptions, adam, scalars


class DSANOptions(MethodOptions):
    # Table IV: terms of eq. (12)
    target_translation: bool = Field(True, description="L_gen^t and L_seg^{s->t} (U_t, D_t)")
    source_translation: bool = Field(True, description="L_gen^s (U_s, D_s): bidirectional alignment")
    source_segmentation: bool = Field(True, description="L_seg^s on real source images")
    semantic_adversarial: bool = Field(True, description="L_adv^sec in the prediction space (D_p)")
    # Table V: design variants
    shared_decoders: bool = Field(False, description="one decoder for both directions (Table V 'Shared Decoders')")
    shared_encoder: bool = Field(True, description="false: segmentation has its own encoder ('Unshared Encoders')")
    shared_semantic_discriminators: bool = Field(True, description="false: separate D_p for eq. (10)")
    deep_supervision: bool = Field(True, description="C2 on a lower encoder block (+ D_p2)")
    # weights (eqs. 5, 6, 12); 0 removes a term
    lambda_rec: float = Field(1.0, ge=0)
    lambda_adv: float = Field(0.01, ge=0)
    lambda_gen: float = Field(1.0, ge=0)
    lambda_seg: float = Field(1.0, ge=0)
    lambda_sec_adv: float = Field(0.1, ge=0)
    level2_weight: float = Field(1.0, ge=0, description="weight of C2's segmentation/semantic terms relative to C1")
    # optimisation (Sec. IV-A2)
    seg_lr: float = Field(2e-4, gt=0, description="E, C_i")
    decoder_lr: float = Field(1e-3, gt=0, description="U_s, U_t")
    disc_lr: float = Field(1e-4, gt=0, description="D_s, D_t")
    semantic_disc_lr: float = Field(5e-5, gt=0, description="D_p")
    beta1: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    pool_size: int = Field(50, ge=0)
    # networks and losses
    decoder_blocks: int = Field(3, ge=0)
    decoder_channels: int = Field(32, ge=1)
    disc_layers: int = Field(2, ge=1, description="stride-2 layers of the PatchGANs; 2 = four conv layers")
    class_weights: list[float] | str | None = "batch"
    dice_weight: float = Field(1.0, ge=0)


class DSAN(GANTraining, Method):
    name = "dsan"
    pools = ("pool_t", "pool_s")
    Options = DSANOptions

    def __init__(self, ctx: Context, options: DSANOptions | None = None):
        super().__init__(ctx, options)
        o = self.opts
        w, ch, k = ctx.width, ctx.in_channels, ctx.n_classes
        tt = o.target_translation and o.lambda_gen > 0
        st = o.source_translation and o.lambda_gen > 0
        self.tt, self.st = tt, st
        self.E = DilatedResidualEncoder(ch, width=w)
        self.E_seg = DilatedResidualEncoder(ch, width=w) if not o.shared_encoder and (tt or st) else None
        self.C1 = PixelClassifier(self.E.out_channels, k)
        self.C2 = PixelClassifier(self.E.low_channels, k) if o.deep_supervision and o.level2_weight > 0 else None

        def decoder():
            return ResnetDecoder(self.E.out_channels, ch, width=w, base_channels=o.decoder_channels,
                                 n_blocks=o.decoder_blocks)

        self.U_t = decoder() if tt or (st and o.shared_decoders) else None
        self.U_s = decoder() if st and not o.shared_decoders else None
        adv = o.lambda_adv > 0
        self.D_t = self.patch_discriminator() if tt and adv else None
        self.D_s = self.patch_discriminator() if st and adv else None
        sem = o.semantic_adversarial and o.lambda_sec_adv > 0
        self.tp = sem and tt and st  # eq. (10) needs both translations
        levels = 2 if self.C2 is not None else 1
        self.D_p1 = self.patch_discriminator(k) if sem else None
        self.D_p2 = self.patch_discriminator(k) if sem and levels == 2 else None
        own_tp = self.tp and not o.shared_semantic_discriminators
        self.D_tp1 = self.patch_discriminator(k) if own_tp else None
        self.D_tp2 = self.patch_discriminator(k) if own_tp and levels == 2 else None

        self.seg_loss = WeightedCrossEntropyDiceLoss(k, class_weights=o.class_weights, dice_weight=o.dice_weight)
        self.rec_loss = CycleConsistencyLoss()  # L1
        self.init_gan_training()

    # ---- set-up ---------------------------------------------------------------------------------------------------
    @property
    def seg_encoder(self) -> DilatedResidualEncoder:
        return self.E_seg if self.E_seg is not None else self.E

    @property
    def dec_s(self) -> ResnetDecoder:
        """The decoder that produces source-style images (U_s, or the shared decoder)."""
        return self.U_s if self.U_s is not None else self.U_t

    @property
    def classifiers(self) -> list:
        return [c for c in (self.C1, self.C2) if c is not None]

    @property
    def semantic_discriminators(self) -> list:
        return [d for d in (self.D_p1, self.D_p2, self.D_tp1, self.D_tp2) if d is not None]

    @property
    def discriminators(self) -> list:
        return [d for d in (self.D_t, self.D_s) if d is not None] + self.semantic_discriminators

    def build_optimizers(self):
        o = self.opts
        seg = [p for m in (self.seg_encoder, *self.classifiers) for p in m.parameters()]
        opt = {"E_C": adam(seg, o.seg_lr, o.beta1, weight_decay=o.weight_decay)}
        if self.E_seg is not None:
            opt["E"] = adam(self.E.parameters(), o.seg_lr, o.beta1, weight_decay=o.weight_decay)
        dec = [p for m in (self.U_t, self.U_s) if m is not None for p in m.parameters()]
        if dec:
            opt["U"] = adam(dec, o.decoder_lr, o.beta1)
        if self.D_t is not None:
            opt["D_t"] = adam(self.D_t.parameters(), o.disc_lr, o.beta1)
        if self.D_s is not None:
            opt["D_s"] = adam(self.D_s.parameters(), o.disc_lr, o.beta1)
        dp = [p for d in self.semantic_discriminators for p in d.parameters()]
        if dp:
            opt["D_p"] = adam(dp, o.semantic_disc_lr, o.beta1)
        return opt

    # ---- helpers --------------------------------------------------------------------------------------------------
    def _predictions(self, feat, size) -> list[torch.Tensor]:
        """Logits of C1 (on ``feat.high``) and C2 (on ``feat.low``), at the image size."""
        out = [self.C1(feat.high, size)]
        if self.C2 is not None:
            out.append(self.C2(feat.low, size))
        return out

    def _level_weights(self) -> list[float]:
        return [1.0, self.opts.level2_weight][: len(self.classifiers)]

    def _seg_term(self, preds: list[torch.Tensor], ys: torch.Tensor) -> torch.Tensor:
        return sum(wi * self.seg_loss(p, ys) for wi, p in zip(self._level_weights(), preds) if wi > 0)

    def _adv_term(self, discs: list, preds: list[torch.Tensor]) -> torch.Tensor:
        """Segmentation side of eq. (9)/(10): predictions on the 'fake' side should score real."""
        return sum(wi * self.gen_loss(D(torch.softmax(p.float(), 1)))
                   for wi, D, p in zip(self._level_weights(), discs, preds) if D is not None)

    # ---- training -------------------------------------------------------------------------------------------------
    def train_step(self, batch):
        o = self.opts
        xs, ys, xt = batch.src_x, batch.src_y, batch.tgt_x
        self.seed_pools()
        size = xs.shape[-2:]
        sem = self.D_p1 is not None
        terms: dict = {}
        fake_t = fake_s = None
        preds: dict[str, list[torch.Tensor]] = {}
        with self.frozen(*self.discriminators), self.autocast():
            need_t = self.tt or self.st or (sem and self.E_seg is None)
            f_s = self.E(xs)
            f_t = self.E(xt) if need_t else None
            # translation sub-networks, eqs. (1)-(6)
            if self.tt:
                fake_t = self.U_t(f_s.high)  # x^{s->t}
                terms["rec_t"] = self.rec_loss(self.U_t(f_t.high), xt)
                if self.D_t is not None:
                    terms["adv_t"] = self.gen_loss(self.D_t(fake_t))
            if self.st:
                fake_s = self.dec_s(f_t.high)  # x^{t->s}
                terms["rec_s"] = self.rec_loss(self.dec_s(f_s.high), xs)
                if self.D_s is not None:
                    terms["adv_s"] = self.gen_loss(self.D_s(fake_s))
            # segmentation sub-network, eqs. (7)-(11): translated images enter detached
            enc = self.seg_encoder
            if o.source_segmentation or sem:
                preds["s"] = self._predictions(f_s if self.E_seg is None else enc(xs), size)
            if self.tt:
                preds["st"] = self._predictions(enc(fake_t.detach()), size)
            if sem:
                preds["t"] = self._predictions(f_t if self.E_seg is None else enc(xt), size)
            if self.tp:
                preds["ts"] = self._predictions(enc(fake_s.detach()), size)
            if o.source_segmentation and o.lambda_seg > 0:
                terms["seg_s"] = self._seg_term(preds["s"], ys)
            if self.tt and o.lambda_seg > 0:
                terms["seg_st"] = self._seg_term(preds["st"], ys)
            if sem:
                terms["adv_p"] = self._adv_term([self.D_p1, self.D_p2], preds["t"])
            if self.tp:
                shared = self.D_tp1 is None
                terms["adv_tp"] = self._adv_term([self.D_p1, self.D_p2] if shared else [self.D_tp1, self.D_tp2],
                                                 preds["ts"])
            loss = self._objective(terms)
        self.update(loss, *[n for n in ("E_C", "E", "U") if n in self.optimizers])
        logs = {}
        if self.D_t is not None:
            logs["D_t"] = self._d_update("D_t", self.D_t, xt, self.pool_t.query(fake_t.detach()))
        if self.D_s is not None:
            logs["D_s"] = self._d_update("D_s", self.D_s, xs, self.pool_s.query(fake_s.detach()))
        if sem:
            logs["D_p"] = self._semantic_d_update(preds)
        self.iteration += 1
        return scalars(terms | logs)

    def _objective(self, terms: dict):
        o = self.opts
        w = {"rec_t": o.lambda_gen * o.lambda_rec, "rec_s": o.lambda_gen * o.lambda_rec,
             "adv_t": o.lambda_gen * o.lambda_adv, "adv_s": o.lambda_gen * o.lambda_adv,
             "seg_s": o.lambda_seg, "seg_st": o.lambda_seg,
             "adv_p": o.lambda_sec_adv, "adv_tp": o.lambda_sec_adv}
        total = 0.0
        for k, v in terms.items():
            if w[k] > 0:
                total = total + w[k] * v
        return total

    def _semantic_d_update(self, preds: dict) -> torch.Tensor:
        """D_pi: real-image pair (source real, target fake) and, with both translations, the translated pair
        (x^{s->t} real, x^{t->s} fake) on the shared D_pi or on D_tpi."""
        pairs = [([self.D_p1, self.D_p2], preds["s"], preds["t"])]
        if self.tp:
            discs = [self.D_p1, self.D_p2] if self.D_tp1 is None else [self.D_tp1, self.D_tp2]
            pairs.append((discs, preds["st"], preds["ts"]))
        total = 0.0
        for discs, real, fake in pairs:
            for D, r, f in zip(discs, real, fake):
                if D is None:
                    continue
                b = r.shape[0]
                with self.autocast():
                    out = D(torch.softmax(torch.cat([r, f]).detach().float(), 1))
                total = total + self.disc_loss(out[:b], out[b:])
        self.update(total, "D_p")
        return total

    # ---- inference ------------------------------------------------------------------------------------------------
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.C1(self.seg_encoder(images).high, images.shape[-2:])

    @torch.no_grad()
    def translations(self, src_x, tgt_x):
        out = {}
        if self.U_t is not None and self.tt:
            out["source -> target-like U_t(E(x_s))"] = self.U_t(self.E(src_x).high)
        if self.st:
            out["target -> source-like U_s(E(x_t))"] = self.dec_s(self.E(tgt_x).high)
        return out
