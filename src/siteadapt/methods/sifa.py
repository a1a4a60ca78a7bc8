"""SIFA: Synergistic Image and Feature Alignment (Chen et al., AAAI 2019 = "prior SIFA"; IEEE TMI 2020 = SIFA with
deeply supervised feature alignment). One class; the two versions and every ablation are options.

Networks (paper names; channel counts times ``ctx.width``)
    G_t   source -> target generator (CycleGAN ResNet generator)          x^{s->t} = G_t(x^s)
    D_t   PatchGAN on target images: real x^t vs x^{s->t}                 L_adv^t, eq. (1)
    E     dilated residual encoder, shared by segmentation and G_s = E∘U
    C1    pixel-wise classifier on E's last block (2xC512)                 prediction = C1(E(x^t))
    C2    pixel-wise classifier on E's 2xR512 block (TMI only)            deep supervision
    U     decoder; U(E(.)) is the target -> source generator G_s           x^{t->s} = U(E(x^t))
    D_s   PatchGAN on source images with an auxiliary head                 L_adv^s (main), L_adv^s~ eq. (5) (aux)
    D_p1  PatchGAN on C1's softmax predictions (D_p2 on C2's, TMI only)    L_adv^p_i, eq. (4)

Objective (eq. 6) and which module minimises which term (weights are options; defaults = the papers' values)::

    term                                        G_t   U             E, C_i
    L_adv^t   D_t(G_t(x^s)) -> real             1     .             .
    L_cyc     |U(E(G_t(x^s)))-x^s| + |G_t(U(E(x^t)))-x^t|
                                                λcyc  λcyc          λcyc*encoder_cyc_scale   (E only)
    L_adv^s   D_s(U(E(x^t))) -> real            .     λs*dec_scale  λs                       (E only)
    L_seg^1   CE+Dice(C1(E(x^{s->t})), y^s)     .     .             λseg1
    L_seg^2   CE+Dice(C2(E_low(x^{s->t})), y^s) .     .             λseg2                    (TMI)
    L_adv^p1  D_p1(softmax C1(E(x^t))) -> real  .     .             λp1
    L_adv^p2  D_p2(softmax C2(E_low(x^t)))      .     .             λp2                      (TMI)
    L_adv^s~  D_s.aux(U(E(x^t))) -> real        .     .             λs~                      (E only)

with {λs, λcyc, λseg1, λseg2, λp1, λp2, λs~} = {0.1, 10, 1.0, 0.1, 0.1, 0.01, 0.1} (TMI eq. 6). The discriminators
minimise the LSGAN losses: D_t real x^t vs pooled x^{s->t}; D_s main head real x^s vs pooled x^{t->s}, aux head
"reconstructed from x^{s->t}" U(E(x^{s->t})) (real) vs "transformed from x^t" U(E(x^t)) (fake); D_p_i real
C_i(E(x^{s->t})) vs fake C_i(E(x^t)). Target labels are never read. ``predict`` = C1(E(x^t)).

Where the papers are silent or ambiguous (choices, all options):
- Per-module weights. Eq. (6) is one objective; read literally E would see the cycle loss at weight 10 and U the
  adversarial L_adv^s at 0.1. SIFA's public code gives E the image-alignment losses (cycle + L_adv^s) at 0.1x the
  generators' weights, i.e. cycle 1.0 and L_adv^s 0.1 for E, and cycle 10, L_adv^s 1.0 for U (a CycleGAN generator).
  Defaults follow the code (``encoder_cyc_scale=0.1``, ``decoder_adv_s_scale=10``); the literal reading of eq. (6) is
  ``{encoder_cyc_scale: 1, decoder_adv_s_scale: 1}``. Both scales multiply a paper weight, so a paper weight set to 0
  removes its term everywhere.
- Update order. ``update_order: sequential`` is the papers' order G_t -> D_t -> E,C_i -> U -> D_s -> D_p_i, every
  group's gradient taken at the parameters left by the groups before it (fresh forward passes where an updated module
  feeds a later loss: x^{s->t} from the updated G_t for E's losses, E's updated features for U and D_p). E and C_i
  take one step on one gradient (they minimise the same terms; the public code has one optimizer for both).
  ``update_order: simultaneous`` (default) runs the generator side once per iteration and takes the gradients of
  G_t, E∘C_i and U from that one forward pass (each module the gradient of its own objective above and nothing
  else), then steps them and the discriminators in the papers' order; the discriminators learn on the fakes of that
  pass (through the pools). Same objectives, same per-module terms; it differs from ``sequential`` only in that E and U
  see G_t's (and U sees E's) parameters from the start of the iteration rather than one Adam step later. It needs
  2 encoder and 2 generator forward passes per iteration instead of 6 and 5 (speed: benchmarks/bench_train.py).
- Training strategy. TMI: Adam lr 2e-4 for every module (beta1 0.5 for G_t, U and discriminators as in the public
  code; 0.9 for E, C_i), constant. AAAI (prior SIFA): E, C with initial lr 1e-3, decayed by 0.9 every 2 epochs; the
  adversarial parts 2e-4. ``seg_lr`` / ``seg_lr_decay`` default to the version chosen by ``deep_supervision``; an
  epoch = one pass over the source training slices (set in ``prepare``; without it, no decay).
- L2 weight decay 1e-4 on E and C_i (the public code's l2 loss); class-weighted CE (weights 1 - class frequency of
  the batch) + Dice, as :mod:`.segmenter`.
- D_p sees softmax probabilities (the brief; the code feeds logits: ``prediction_activation: none``). No pool for D_p.
- D_s's aux head learns on the same pooled x^{t->s} as its main head (fake) and the current U(E(x^{s->t})) (real).
- G_t with 32 base channels and zero padding (public code). No residual skip ``tanh(out + input)`` in G_t and U
  (the papers' text; the public code enables it: ``skip: true``). The skip starts both generators near the identity,
  which is the wrong prior when intensities are remapped non-monotonically across sites (MR <-> CT); on the learning
  test's remapped target SIFA gained less over no adaptation with the skip than without it. G_t has the papers' 9
  residual blocks at 256 px; below 256 px (the CPU quick profile) 6, CycleGAN's own rule for its 128-px generator
  (``generator_blocks`` sets it). Image pools of 50 per discriminator (D_t, D_s), seeded from the engine's RNG at the
  first iteration and saved in ``extra_state`` for exact resume.
- Feature-alignment weights constant from the first iteration (the papers). ``alignment_schedule: dann`` multiplies
  E's feature-alignment terms (λp1, λp2, λs~; not the image-alignment ones) by DANN's 2/(1+exp(-10p))-1, p =
  progress: with a constant weight, alignment acts before the encoder segments anything (DANN's own motivation for
  the schedule). The papers' setting is the default; ``sifa_ramp`` in params.yaml is the variant.
- ``init_from_source: true`` starts E and C1 from the trained source segmenter (the papers train from scratch, with
  20k iterations; a warm start is this project's choice for short CPU schedules).

Ablations as flags (rows of AAAI Table 2 / TMI Fig. 5):
    prior SIFA (AAAI)            deep_supervision: false
      IA only                    deep_supervision: false, lambda_adv_p1: 0, lambda_adv_s_aux: 0
      IA + FA-P                  deep_supervision: false, lambda_adv_s_aux: 0
    SIFA (TMI)                   (defaults)
      IA only                    lambda_adv_p1: 0, lambda_adv_p2: 0, lambda_adv_s_aux: 0
      IA + FA-P1/P2              lambda_adv_s_aux: 0
      IA + FA-P1/P2 + FA-I       = SIFA
    FA only (no image alignment) not a SIFA flag: feature alignment without G_t is another method (AdaOutput).
A discriminator whose term has weight 0 is not built (D_p1, D_p2, the D_s aux head), so ablations also train faster.

G_t, the PatchGANs, the LSGAN and cycle losses, the pools and Adam at ``lr``/``beta1`` come from the shared CycleGAN
pair (:mod:`._cyclegan_pair`); SIFA's target -> source generator is E∘U, so it builds that half itself.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from ..nn.losses import WeightedCrossEntropyDiceLoss
from ..nn.networks import DilatedResidualEncoder, PixelClassifier, ResnetDecoder
from ._common import ramp
from ._cyclegan_pair import CycleGANPair, CycleGANPairOptions
from .base import Context, Method, adam, scalars


class SIFAOptions(CycleGANPairOptions):
    deep_supervision: bool = Field(True, description="TMI 2020 (C2, D_p2); false = prior SIFA (AAAI 2019)")
    update_order: Literal["simultaneous", "sequential"] = "simultaneous"
    # eq. (6) weights (0 removes the term)
    lambda_adv_t: float = Field(1.0, ge=0)
    lambda_adv_s: float = Field(0.1, ge=0)
    lambda_cyc: float = Field(10.0, ge=0)
    lambda_seg1: float = Field(1.0, ge=0)
    lambda_seg2: float = Field(0.1, ge=0)
    lambda_adv_p1: float = Field(0.1, ge=0)
    lambda_adv_p2: float = Field(0.01, ge=0)
    lambda_adv_s_aux: float = Field(0.1, ge=0, description="λ_adv^s~, eq. (5)")
    encoder_cyc_scale: float = Field(0.1, ge=0, description="E's cycle weight = this x lambda_cyc (code: 0.1)")
    decoder_adv_s_scale: float = Field(10.0, ge=0, description="U's L_adv^s weight = this x lambda_adv_s (code: 10)")
    alignment_schedule: Literal["constant", "dann"] = Field(
        "constant", description="E's feature alignment (λp1, λp2, λs~): constant (papers) or x 2/(1+exp(-10p))-1")
    # optimisation
    seg_lr: float | None = Field(None, gt=0, description="E, C_i; None: 2e-4 (TMI) or 1e-3 (AAAI)")
    seg_beta1: float = Field(0.9, ge=0, lt=1)
    seg_lr_decay: float | None = Field(None, gt=0, le=1, description="None: 1.0 (TMI) or 0.9 (AAAI)")
    seg_lr_decay_epochs: float = Field(2.0, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    # losses and networks
    class_weights: list[float] | str | None = "batch"
    dice_weight: float = Field(1.0, ge=0)
    prediction_activation: Literal["softmax", "none"] = "softmax"
    init_from_source: bool = Field(False, description="start E, C1 from the trained source segmenter")
    skip: bool = False


def _main(out):
    return out[0] if isinstance(out, tuple) else out


class SIFA(CycleGANPair, Method):
    """Half of the CycleGAN pair is SIFA's (G_t, D_t, built from the pair's parts); the other half, target -> source,
    is E∘U with D_s (an auxiliary head), so SIFA declares no ``pair`` and builds its networks itself."""

    name = "sifa"
    pools = ("pool_t", "pool_s")
    Options = SIFAOptions

    def __init__(self, ctx: Context, options: SIFAOptions | None = None):
        super().__init__(ctx, options)
        o = self.opts
        w, ch, k = ctx.width, ctx.in_channels, ctx.n_classes
        self.G_t = self.cyclegan_generator(skip=o.skip, padding_mode="zeros")  # SIFA's code: zero padding
        self.E = DilatedResidualEncoder(ch, width=w)
        self.C1 = PixelClassifier(self.E.out_channels, k)
        self.C2 = PixelClassifier(self.E.low_channels, k) if o.deep_supervision else None
        self.U = ResnetDecoder(self.E.out_channels, ch, width=w, skip=o.skip)
        self.D_t = self.patch_discriminator()
        self.D_s = self.patch_discriminator(aux_head=o.lambda_adv_s_aux > 0)
        self.D_p1 = self.patch_discriminator(k) if o.lambda_adv_p1 > 0 else None
        self.D_p2 = self.patch_discriminator(k) if o.deep_supervision and o.lambda_adv_p2 > 0 else None

        self.seg_loss = WeightedCrossEntropyDiceLoss(k, class_weights=o.class_weights, dice_weight=o.dice_weight)
        self.init_cycle_training()
        self.n_source: int | None = None
        aaai = not o.deep_supervision
        self.seg_lr0 = o.seg_lr if o.seg_lr is not None else (1e-3 if aaai else o.lr)
        self.seg_decay = o.seg_lr_decay if o.seg_lr_decay is not None else (0.9 if aaai else 1.0)
        self.needs_source_model = o.init_from_source  # the adapt step then hands the source segmenter to prepare()

    # ---- set-up ---------------------------------------------------------------------------------------------------
    @property
    def discriminators(self) -> list:
        return [d for d in (self.D_t, self.D_s, self.D_p1, self.D_p2) if d is not None]

    @property
    def classifiers(self) -> list:
        return [c for c in (self.C1, self.C2) if c is not None]

    def build_optimizers(self):
        o = self.opts
        seg = [p for m in (self.E, *self.classifiers) for p in m.parameters()]
        opt = {
            "G_t": self.gan_adam(self.G_t),
            "D_t": self.gan_adam(self.D_t),
            "E_C": adam(seg, self.seg_lr0, o.seg_beta1, weight_decay=o.weight_decay),
            "U": self.gan_adam(self.U),
            "D_s": self.gan_adam(self.D_s),
        }
        dp = [d for d in (self.D_p1, self.D_p2) if d is not None]
        if dp:
            opt["D_p"] = self.gan_adam(*dp)
        return opt

    def prepare(self, source, target, source_model=None) -> None:
        self.n_source = len(source) if source is not None else None
        if self.opts.init_from_source:
            if source_model is None:
                raise ValueError("sifa with init_from_source: true needs the trained source segmenter")
            net = source_model.net  # segmenter.SegmenterNet: the same E and C1 (same context)
            self.E.load_state_dict(net.encoder.state_dict())
            self.C1.load_state_dict(net.classifier.state_dict())

    # ---- helpers --------------------------------------------------------------------------------------------------
    def _set_seg_lr(self, batch_size: int) -> None:
        lr = self.seg_lr0
        if self.seg_decay != 1.0 and self.n_source:
            epoch = self.iteration * batch_size / self.n_source
            lr *= self.seg_decay ** math.floor(epoch / self.opts.seg_lr_decay_epochs)
        if "E_C" in self.optimizers:
            for g in self.optimizers["E_C"].param_groups:
                g["lr"] = lr

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), 1) if self.opts.prediction_activation == "softmax" else logits

    def _backward(self, loss, *names: str, retain_graph: bool = False) -> None:
        """Gradients of ``loss`` for the parameters of the named optimizers only (no step)."""
        params = [p for n in names for g in self.optimizers[n].param_groups for p in g["params"]]
        for n in names:
            self.optimizers[n].zero_grad(set_to_none=True)
        if torch.is_tensor(loss) and loss.requires_grad:
            loss.backward(inputs=params, retain_graph=retain_graph)

    def _step(self, *names: str) -> None:
        for n in names:
            self.optimizers[n].step()

    def _d_update(self, name: str, D, real: torch.Tensor, fake: torch.Tensor,
                  aux_real: torch.Tensor | None = None) -> torch.Tensor:
        """One LSGAN update of discriminator ``D`` on one concatenated forward (instance norm is per sample, so this
        equals separate forwards). With ``aux_real``, D's aux head learns ``aux_real`` (real) vs ``fake`` (fake)."""
        b = real.shape[0]
        parts = [real, fake] if aux_real is None else [real, fake, aux_real]
        with self.autocast():
            out = D(torch.cat(parts).detach())
        main = _main(out)
        loss = self.disc_loss(main[:b], main[b:2 * b])
        if aux_real is not None:
            aux = out[1]
            loss = loss + self.disc_loss(aux[2 * b:], aux[b:2 * b])
        self.update(loss, name)
        return loss

    def _d_updates(self, fake_t, fake_s, rec_s, xs, xt, preds) -> dict:
        """D_t (done by the caller in sequential order), D_s and D_p_i on the given fakes; returns their losses."""
        logs = {}
        aux_real = rec_s if self.D_s.aux_head else None
        logs["D_s"] = self._d_update("D_s", self.D_s, xs, self.pool_s.query(fake_s.detach()), aux_real)
        if "D_p" in self.optimizers:
            total = 0.0
            for i, (D, (p_st, p_t)) in enumerate(zip((self.D_p1, self.D_p2), preds), start=1):
                if D is None or p_st is None:
                    continue
                b = p_st.shape[0]
                with self.autocast():
                    out = D(torch.cat([self._probs(p_st), self._probs(p_t)]).detach())
                d = self.disc_loss(out[:b], out[b:])
                logs[f"D_p{i}"] = d
                total = total + d
            self.update(total, "D_p")
        return logs

    # ---- training -------------------------------------------------------------------------------------------------
    def train_step(self, batch):
        self.seed_pools()
        self._set_seg_lr(batch.src_x.shape[0])
        if self.opts.update_order == "simultaneous":
            logs = self._simultaneous(batch.src_x, batch.src_y, batch.tgt_x)
        else:
            logs = self._sequential(batch.src_x, batch.src_y, batch.tgt_x)
        self.iteration += 1
        return scalars(logs)

    def _source_adversarial_terms(self, fake_s, terms) -> None:
        """L_adv^s (main head) and L_adv^s~ (aux head) of D_s on x^{t->s}, from one D_s forward pass."""
        o = self.opts
        if o.lambda_adv_s > 0 or self.D_s.aux_head:
            out = self.D_s(fake_s)
            if o.lambda_adv_s > 0:
                terms["adv_s"] = self.gen_loss(_main(out))
            if self.D_s.aux_head:
                terms["adv_s_aux"] = self.gen_loss(out[1])

    def _encoder_terms(self, f_st, f_t, ys, size, terms) -> tuple:
        """Segmentation of x^{s->t} and the adversarial terms on target predictions (eq. 3, 4). Fills ``terms``;
        returns the predictions ((C1 on x^{s->t}, C1 on x^t), (C2 on x^{s->t}, C2 on x^t)), None where unused."""
        o = self.opts
        p1_st = self.C1(f_st.high, size)
        if o.lambda_seg1 > 0:
            terms["seg1"] = self.seg_loss(p1_st, ys)
        p1_t = p2_st = p2_t = None
        if self.D_p1 is not None:
            p1_t = self.C1(f_t.high, size)
            terms["adv_p1"] = self.gen_loss(self.D_p1(self._probs(p1_t)))
        if self.C2 is not None:
            p2_st = self.C2(f_st.low, size)
            if o.lambda_seg2 > 0:
                terms["seg2"] = self.seg_loss(p2_st, ys)
            if self.D_p2 is not None:
                p2_t = self.C2(f_t.low, size)
                terms["adv_p2"] = self.gen_loss(self.D_p2(self._probs(p2_t)))
        return (p1_st, p1_t), (p2_st, p2_t)

    def _objective(self, terms: dict, module: str, weights: dict[str, float] | None = None):
        """Weighted sum of ``terms`` that ``module`` ("G_t", "U" or "E_C") minimises (see the module docstring);
        ``weights`` replaces the module's own weights (the union of G_t's and U's, :meth:`_simultaneous`)."""
        o = self.opts
        w = weights if weights is not None else self._weights(module)
        if module == "E_C" and o.alignment_schedule != "constant":
            k = ramp(self.iteration, self.total_iterations, o.alignment_schedule)
            w = w | {t: k * w[t] for t in ("adv_p1", "adv_p2", "adv_s_aux")}
        total = 0.0
        for k, v in w.items():
            if v > 0 and k in terms:
                total = total + v * terms[k]
        return total

    def _weights(self, module: str) -> dict[str, float]:
        o = self.opts
        return {
            "G_t": {"adv_t": o.lambda_adv_t, "cyc": o.lambda_cyc},
            "U": {"cyc": o.lambda_cyc, "adv_s": o.lambda_adv_s * o.decoder_adv_s_scale},
            "E_C": {"cyc": o.lambda_cyc * o.encoder_cyc_scale, "adv_s": o.lambda_adv_s, "seg1": o.lambda_seg1,
                    "seg2": o.lambda_seg2, "adv_p1": o.lambda_adv_p1, "adv_p2": o.lambda_adv_p2,
                    "adv_s_aux": o.lambda_adv_s_aux},
        }[module]

    def _simultaneous(self, xs, ys, xt) -> dict:
        o = self.opts
        size = xs.shape[-2:]
        terms: dict = {}
        with self.frozen(*self.discriminators), self.autocast():
            fake_t = self.G_t(xs)  # x^{s->t}
            f_st = self.E(fake_t)
            rec_s = self.U(f_st.high, fake_t)  # x^{s->t->s}
            f_t = self.E(xt)
            fake_s = self.U(f_t.high, xt)  # x^{t->s}
            if o.lambda_adv_t > 0:
                terms["adv_t"] = self.gen_loss(self.D_t(fake_t))
            if o.lambda_cyc > 0:
                rec_t = self.G_t(fake_s)  # x^{t->s->t}
                terms["cyc"] = self.cyc_loss(rec_s, xs) + self.cyc_loss(rec_t, xt)
            self._source_adversarial_terms(fake_s, terms)
            preds = self._encoder_terms(f_st, f_t, ys, size, terms)
        # gradients of every generator-side module from this one forward pass, each for its own objective only.
        # Summing G_t's and U's objectives would hand each the other's terms (the shared L_cyc at twice its weight);
        # backward of the union of their weighted terms is exact instead: L_cyc has the weight λcyc in both,
        # L_adv^t = D_t(G_t(x^s)) does not pass through U, L_adv^s = D_s(U(E(x^t))) does not pass through G_t.
        gu = self._weights("G_t") | self._weights("U")
        self._backward(self._objective(terms, "G_t", weights=gu), "G_t", "U", retain_graph=True)
        self._backward(self._objective(terms, "E_C"), "E_C")
        # steps in the papers' order: G_t -> D_t -> E, C_i -> U -> D_s -> D_p_i
        self._step("G_t")
        logs = {"D_t": self._d_update("D_t", self.D_t, xt, self.pool_t.query(fake_t.detach()))}
        self._step("E_C", "U")
        logs |= self._d_updates(fake_t, fake_s, rec_s.detach(), xs, xt, preds)
        return terms | logs

    def _sequential(self, xs, ys, xt) -> dict:
        o = self.opts
        size = xs.shape[-2:]
        terms: dict = {}
        gen_side = [self.E, *self.classifiers, self.U]
        # 1. G_t: L_adv^t + λcyc L_cyc (through the frozen E∘U)
        with self.frozen(*self.discriminators, *gen_side), self.autocast():
            fake_t = self.G_t(xs)
            g_terms = {}
            if o.lambda_adv_t > 0:
                g_terms["adv_t"] = self.gen_loss(self.D_t(fake_t))
            if o.lambda_cyc > 0:
                rec_s = self.U(self.E(fake_t).high, fake_t)
                with torch.no_grad():
                    fake_s0 = self.U(self.E(xt).high, xt)
                rec_t = self.G_t(fake_s0)
                g_terms["cyc"] = self.cyc_loss(rec_s, xs) + self.cyc_loss(rec_t, xt)
        self._backward(self._objective(g_terms, "G_t"), "G_t")
        self._step("G_t")
        # 2. D_t on the fakes of step 1 (pooled)
        logs = {"D_t": self._d_update("D_t", self.D_t, xt, self.pool_t.query(fake_t.detach()))}
        # 3. E, C_i on x^{s->t} from the updated G_t
        with torch.no_grad(), self.autocast():
            fake_t = self.G_t(xs)
        with self.frozen(*self.discriminators, self.G_t, self.U), self.autocast():
            f_st = self.E(fake_t)
            f_t = self.E(xt)
            fake_s = self.U(f_t.high, xt)
            if o.lambda_cyc > 0:
                rec_s = self.U(f_st.high, fake_t)
                terms["cyc"] = self.cyc_loss(rec_s, xs) + self.cyc_loss(self.G_t(fake_s), xt)
            self._source_adversarial_terms(fake_s, terms)
            self._encoder_terms(f_st, f_t, ys, size, terms)
        self._backward(self._objective(terms, "E_C"), "E_C")
        self._step("E_C")
        # 4. U with the updated E's features
        with torch.no_grad(), self.autocast():
            f_st = self.E(fake_t)
            f_t = self.E(xt)
        with self.frozen(*self.discriminators, self.G_t), self.autocast():
            rec_s = self.U(f_st.high, fake_t)
            fake_s = self.U(f_t.high, xt)
            u_terms = {}
            if o.lambda_cyc > 0:
                u_terms["cyc"] = self.cyc_loss(rec_s, xs) + self.cyc_loss(self.G_t(fake_s), xt)
            if o.lambda_adv_s > 0:
                u_terms["adv_s"] = self.gen_loss(_main(self.D_s(fake_s)))
        self._backward(self._objective(u_terms, "U"), "U")
        self._step("U")
        # 5., 6. D_s on step 4's images, D_p_i on the updated E∘C_i's predictions
        with torch.no_grad(), self.autocast():
            p1 = (self.C1(f_st.high, size), self.C1(f_t.high, size)) if self.D_p1 is not None else (None, None)
            p2 = ((self.C2(f_st.low, size), self.C2(f_t.low, size)) if self.D_p2 is not None else (None, None))
        logs |= self._d_updates(fake_t, fake_s, rec_s.detach(), xs, xt, (p1, p2))
        return g_terms | terms | logs

    # ---- inference ------------------------------------------------------------------------------------------------
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.C1(self.E(images).high, images.shape[-2:])

    @torch.no_grad()
    def translations(self, src_x, tgt_x):
        fake_t = self.G_t(src_x)
        return {"source -> target-like G_t(x_s)": fake_t,
                "target -> source-like U(E(x_t))": self.U(self.E(tgt_x).high, tgt_x),
                "source reconstructed U(E(G_t(x_s)))": self.U(self.E(fake_t).high, fake_t)}
