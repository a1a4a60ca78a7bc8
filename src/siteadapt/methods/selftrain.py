"""Self-training on the target site with a mean teacher and confidence-filtered, class-balanced pseudo-labels.

Two papers, combined:

- French, Mackiewicz & Fisher, "Self-ensembling for visual domain adaptation" (ICLR 2018): a *student* network learns
  from the predictions of a *teacher* on target images seen under different augmentation; the teacher is the
  exponential moving average of the student's weights,

      θ'_t = α θ'_{t-1} + (1 - α) θ_t,

  and teacher predictions whose confidence is below a threshold are masked out of the target loss.
- Zou, Yu, Kumar & Wang, "Unsupervised Domain Adaptation for Semantic Segmentation via Class-Balanced
  Self-Training" (CBST, ECCV 2018): the labeled source loss stays beside a pseudo-label loss on the target,

      min_{w, ŷ}  - Σ_s Σ_n y_{s,n}ᵀ log p_n(w, I_s)
                  - Σ_t Σ_n Σ_c [ ŷ^{(c)}_{t,n} log p_n(c | w, I_t) + k_c ŷ^{(c)}_{t,n} ],
                  ŷ_{t,n} ∈ {e^{(1)}, ..., e^{(C)}} ∪ {0},

  whose solution in ŷ keeps pixel n with label c* = argmax_c p_n(c) / exp(-k_c) when p_n(c*) > exp(-k_{c*}); the
  per-class threshold exp(-k_c) is the confidence at rank p·N_c among the N_c pixels predicted as class c, so a fixed
  portion p of *each* class is kept and rare classes are not swamped by confident background.

This method, per iteration (source batch (x^s, y^s), target batch x^t)::

    P       = softmax(T(x^t))                           teacher T, eval mode, no gradient
    ŷ_n     = argmax_c P_n(c),  conf_n = max_c P_n(c)
    τ_c     = the ⌈p N_c⌉-th largest conf among the batch's N_c pixels with ŷ_n = c     (CBST's exp(-k_c))
    M       = { n : conf_n >= τ_{ŷ_n}  and  conf_n >= min_confidence }                  (both must pass)
    x̃, ỹ    = aug(x^t), aug(ŷ with the pixels outside M marked "ignore")                (one draw, one translation)
    L_t     = (1 / |M|) Σ_{n ∈ M} - log softmax(S(x̃))_n(ỹ_n)        (0, and no target forward, when M is empty)
    L_s     = weighted CE + Dice of S(x^s) against y^s                  (the project's segmentation loss)
    L       = λ_s L_s + λ_t L_t         -> one Adam step on the student S
    θ'      = α θ' + (1 - α) θ          -> the teacher's parameters follow the student

Choices where the papers are silent or differ (all options unless stated):

- Start: student and teacher are copies of the trained source segmenter's network (E∘C1, weights and batch-norm
  statistics; the copies are built in ``__init__`` and loaded from ``source_model.net`` in :meth:`prepare`). The
  source model itself is kept beside them, frozen (:class:`~._common.FrozenSourceMixin`), and left out of the saved
  model as for every method that uses it. The teacher never receives gradients and always runs in eval mode.
- EMA (``ema`` = α, default 0.99, French et al.'s value) on the teacher's *parameters* only, after every student step,
  with a fixed α: the teacher starts from an already trained network, so no warm-up schedule of α is needed.
  The teacher's *buffers* (batch-norm statistics) are not averaged and not updated during training: they are the
  target statistics estimated in :meth:`prepare` (``adabn``; otherwise the source segmenter's), and the predicting
  network's statistics are re-estimated on the target once more in :meth:`finish`, because the weights they
  normalise have moved. α = 1 keeps the teacher fixed (plain self-training with the source model's labels).
- Target loss: cross-entropy against the teacher's hard labels (CBST's loss); French et al.'s squared difference of
  probabilities is not used. Pseudo-labels are the plain argmax of the teacher's probabilities and a pixel is kept
  when its confidence clears the threshold of *its* class (CBST's closed form argmaxes p_c / exp(-k_c) instead, which
  can move a pixel to a rare class with a low threshold; the plain argmax never relabels what the teacher predicts).
  The loss is the mean over kept pixels (no class weights: the class balance comes from the thresholds).
- Thresholds (``portion`` = p, default 0.5, CBST's final portion): computed on the *current target batch* (online),
  not over the whole target set once per round as CBST does, and p is fixed rather than grown over rounds (the
  teacher already changes slowly). ⌈p N_c⌉ is the rank; ties at the threshold are kept. A second, absolute filter
  (``min_confidence``, default 0.9, in the spirit of French et al.'s confidence threshold) removes pixels below it
  whatever their class's threshold; 0 disables it.
- Augmentation: the teacher sees the target batch as drawn (after the engine's own augmentation, when the profile
  turns it on); the student sees it through :func:`~.segmenter.augment_batch` (per-image intensity scale/shift within
  ±10 %, and one translation of up to ±4 px per batch, as a circular roll). The pseudo-label map and its mask travel
  as *one* tensor (label, or -1 = ignore) through the *same* ``augment_batch`` call, which rolls image and label by
  the same (dy, dx): the geometry of image, labels and mask is identical by construction (:func:`student_view`).
- Source term (``lambda_source``, default 1): the project's weighted CE + Dice (``class_weights``, ``dice_weight`` as
  the source segmenter). 0 disables it, and then the source images are not passed through the student at all.
  The student's source and target forward passes are separate calls in train mode, so batch-norm batch statistics
  are per domain. ``lambda_target`` = 0 likewise skips the teacher and the student's target pass.
- An iteration with nothing to learn (λ_s = 0 and no kept pixel) makes no update at all: neither an Adam step
  (Adam's moments would move the weights on a zero gradient; weight decay too) nor an EMA step.
- Optimiser: Adam, β = (0.9, 0.999), lr 1e-4 (``lr``; half the source segmenter's, as it fine-tunes a trained
  network), weight decay 1e-4 as the source segmenter (``weight_decay``).
- Input (``input``): ``raw``, or ``histmatch``: every target image, in training and at prediction, is first
  quantile-matched onto the source training images' pooled quantiles by
  :meth:`~.histmatch.HistMatch.match` (a :class:`~.histmatch.HistMatch` instance held as ``matcher``, with its
  default ``n_quantiles``; its ``source_quantiles`` buffer is saved with the model), so self-training starts from the
  histogram-matching baseline. ``predict_subject`` and the batch-norm re-estimation match each target subject as a
  whole, as the baseline does; ``train_step`` (and ``predict``) only see a batch of slices without their subject, so
  they match the batch as one pool of pixels (the histogram of a few slices drawn across subjects stands in for a
  subject's).
- AdaBN (``adabn``, default on; Li et al. 2016 via :func:`~._common.reestimate_bn`): in :meth:`prepare` the
  student's (and so the teacher's) batch-norm statistics are re-estimated on the (matched) target training images,
  so the first pseudo-labels come from a network normalised for the target; in :meth:`finish` the predicting
  network's once more. Off: the teacher keeps the source segmenter's statistics until the end (and with
  ``input: histmatch`` starts exactly as the histogram-matching baseline).
- Prediction (``predict_with``): the teacher (default; French et al. evaluate the teacher) or the student.
- Segmentation only: pseudo-labels are per pixel; a classification context is refused in ``__init__``.
- Resume: the teacher's parameters and buffers and the matcher's quantiles are in the state dict, the Adam state is
  the engine's, the augmentation draws from the global RNG the engine checkpoints, and the iteration counter is
  :class:`~._common.IterationState`'s extra state.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from ._common import FrozenSourceMixin, IterationState, freeze, reestimate_bn, source_net, task_loss
from .base import Batch, Context, Method, MethodOptions, adam, scalars
from .histmatch import HistMatch
from .segmenter import SegmenterNet, augment_batch, probabilities

IGNORE = -1  # pseudo-label value of the pixels left out of the target loss


class SelfTrainOptions(MethodOptions):
    ema: float = Field(0.99, ge=0, le=1, description="α of the teacher's moving average (1: fixed teacher)")
    portion: float = Field(0.5, gt=0, le=1, description="CBST's p: portion of each class's pixels kept per batch")
    min_confidence: float = Field(0.9, ge=0, description="kept pixels also need teacher confidence >= this (0: off)")
    lambda_target: float = Field(1.0, ge=0, description="weight of the pseudo-label loss (0: off)")
    lambda_source: float = Field(1.0, ge=0, description="weight of the source labeled loss (0: off)")
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    class_weights: list[float] | str | None = "batch"
    dice_weight: float = Field(1.0, ge=0)
    input: Literal["raw", "histmatch"] = Field(
        "raw", description="histmatch: target images are quantile-matched onto the source's before the networks")
    adabn: bool = Field(True, description="re-estimate batch-norm statistics on the target in prepare and finish")
    predict_with: Literal["teacher", "student"] = "teacher"


@torch.no_grad()
def pseudo_labels(probs: torch.Tensor, portion: float, min_confidence: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-balanced pseudo-labels from probabilities ``probs`` (B, K, H, W).

    Returns ``(labels, mask)``: ``labels`` (B, H, W) long = argmax over classes; ``mask`` (B, H, W) bool = the pixel
    is kept. Per class c, among the N_c pixels labelled c the ⌈portion·N_c⌉ most confident are kept (the threshold
    is that rank's confidence, ties at it kept: CBST's exp(-k_c)); then pixels with confidence below
    ``min_confidence`` are dropped too."""
    if not 0 < portion <= 1:
        raise ValueError(f"portion must be in (0, 1], got {portion}")
    conf, labels = probs.float().max(1)
    mask = torch.zeros_like(labels, dtype=torch.bool)
    for c in range(probs.shape[1]):
        of_c = labels == c
        conf_c = conf[of_c]
        n = conf_c.numel()
        if n == 0:
            continue
        keep = min(n, max(1, math.ceil(portion * n - 1e-9)))  # guard p*N landing a hair above an integer
        threshold = torch.kthvalue(conf_c, n - keep + 1).values  # the keep-th largest confidence
        mask |= of_c & (conf >= threshold)
    if min_confidence > 0:
        mask &= conf >= min_confidence
    return labels, mask


def student_view(x: torch.Tensor, target: torch.Tensor, gen: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's augmented view of target images ``x`` (B, 1, H, W) and of their pseudo-labels ``target``
    (B, H, W; ``IGNORE`` where masked): one :func:`~.segmenter.augment_batch` call, so the image and the label map
    (mask included) are translated by the same (dy, dx); the intensity change touches the image only."""
    return augment_batch(x, target, gen)


class SelfTrain(FrozenSourceMixin, IterationState, Method):
    name = "selftrain"
    Options = SelfTrainOptions
    needs_source_model = True
    needs_target_images = True
    site_statistics = True  # with adabn (the default); see reestimate_statistics

    def __init__(self, ctx: Context, options: SelfTrainOptions | None = None):
        if ctx.kind != "segmentation":
            raise ValueError(f"selftrain learns from per-pixel pseudo-labels and supports segmentation tasks only, "
                             f"not a {ctx.kind!r} task")
        super().__init__(ctx, options)
        o = self.opts
        self.student = SegmenterNet(ctx)
        self.teacher = SegmenterNet(ctx)
        freeze(self.teacher)
        self.teacher.eval()
        self.matcher: HistMatch | None = HistMatch(ctx) if o.input == "histmatch" else None
        self.seg_loss = task_loss(ctx, o.class_weights, o.dice_weight)
        self.source_model = None
        self.iteration = 0

    # ---- set-up and wrap-up ---------------------------------------------------------------------------------------
    def prepare(self, source, target, source_model: Method | None = None) -> None:
        src = self.attach_source(source_model, "selftrain")
        self.student.load_state_dict(source_net(src, self.ctx, "selftrain").state_dict())
        if self.matcher is not None:
            if source is None:
                raise ValueError("selftrain with input: histmatch needs the source training images (their quantiles)")
            q = np.linspace(0, 1, self.matcher.opts.n_quantiles)  # HistMatch's reference: pooled source quantiles
            self.matcher.source_quantiles.copy_(torch.from_numpy(np.quantile(source.images, q).astype(np.float32)))
        if self.opts.adabn:
            reestimate_bn(self.student, self.target_images(target))
        self.teacher.load_state_dict(self.student.state_dict())
        self.iteration = 0

    def finish(self, source, target) -> None:
        if self.opts.adabn:
            reestimate_bn(self.predictor, self.target_images(target))

    def reestimate_statistics(self, images: torch.Tensor) -> bool:
        """With ``adabn``: the predicting network's statistics re-estimated on ``images`` (matched as one pool with
        ``input: histmatch``); without it the model carries the source segmenter's statistics: nothing to do."""
        if not self.opts.adabn:
            return False
        reestimate_bn(self.predictor, self._input(images))
        return True

    def target_images(self, target) -> torch.Tensor:
        """The target training images (N, 1, H, W) as the networks see them: matched subject by subject when
        ``input`` is ``histmatch``."""
        if target is None:
            raise ValueError("selftrain with adabn needs the target training images")
        x = torch.from_numpy(np.ascontiguousarray(target.images, dtype=np.float32)).unsqueeze(1)
        if self.matcher is None:
            return x
        out = torch.empty_like(x)
        subject = np.asarray(target.subject)
        for s in np.unique(subject):
            idx = torch.from_numpy(np.flatnonzero(subject == s))
            out[idx] = self.matcher.match(x[idx])
        return out

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher always normalises with its stored (target) statistics
        return self

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"student": adam(self.student.parameters(), self.opts.lr, beta1=0.9,
                                weight_decay=self.opts.weight_decay)}

    # ---- training -------------------------------------------------------------------------------------------------
    def _input(self, images: torch.Tensor) -> torch.Tensor:
        return self.matcher.match(images) if self.matcher is not None else images

    @torch.no_grad()
    def ema_update(self) -> None:
        """θ' <- α θ' + (1 - α) θ for every teacher parameter (buffers are left alone)."""
        a = self.opts.ema
        for t, s in zip(self.teacher.parameters(), self.student.parameters(), strict=True):
            t.mul_(a).add_(s.detach(), alpha=1 - a)

    def train_step(self, batch: Batch) -> dict[str, float]:
        o = self.opts
        self.iteration += 1
        zero = batch.src_x.new_zeros((), dtype=torch.float32)
        loss_s, loss_t, kept = zero, zero, zero
        total: torch.Tensor | None = None
        if o.lambda_source > 0:
            with self.autocast():
                logits_s = self.student(batch.src_x)
            loss_s = self.seg_loss(logits_s, batch.src_y)
            total = o.lambda_source * loss_s
        if o.lambda_target > 0:
            if batch.tgt_x is None:
                raise ValueError("selftrain needs target images in every batch")
            x_t = self._input(batch.tgt_x)
            with torch.no_grad(), self.autocast():
                probs = probabilities(self.teacher(x_t))
            labels, mask = pseudo_labels(probs, o.portion, o.min_confidence)
            kept = mask.float().mean()
            if bool(mask.any()):
                x_aug, target = student_view(x_t, torch.where(mask, labels, torch.full_like(labels, IGNORE)))
                with self.autocast():
                    logits_t = self.student(x_aug)
                loss_t = F.cross_entropy(logits_t.float(), target, ignore_index=IGNORE)
                total = o.lambda_target * loss_t if total is None else total + o.lambda_target * loss_t
        if total is not None:  # otherwise nothing to learn: no Adam step (it would move on zero gradients), no EMA
            self.update(total, "student")
            self.ema_update()
        return scalars({"seg_s": loss_s, "pl_t": loss_t, "kept": kept})

    # ---- prediction -----------------------------------------------------------------------------------------------
    @property
    def predictor(self) -> SegmenterNet:
        return self.teacher if self.opts.predict_with == "teacher" else self.student

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.predictor(self._input(images))

    @torch.no_grad()
    def predict_subject(self, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """All slices of one subject; with ``input: histmatch`` the subject is matched as a whole first."""
        x = self._input(images)
        net = self.predictor
        return torch.cat([net(x[i:i + batch_size]).float() for i in range(0, len(x), batch_size)])
