"""FDA: Fourier Domain Adaptation (Yang & Soatto, "FDA: Fourier Domain Adaptation for Semantic Segmentation",
CVPR 2020), single-band: a segmenter trained on source images restyled with the target's low-frequency amplitude,
plus a robust entropy term on target predictions.

Restyling (paper eq. 1). With A, P the amplitude and phase of the 2D Fourier transform F of an image::

    x_{s->t} = F^{-1}( [ M_beta ∘ A(x_t) + (1 - M_beta) ∘ A(x_s),  P(x_s) ] )

M_beta is 1 on the centred square (after fftshift: zero frequency in the middle) of half-size
``b = floor(min(H, W) * beta)``, i.e. the signed frequencies (k_y, k_x) with ``|k_y| <= b`` and ``|k_x| <= b`` (a
window 2b+1 wide, as in the paper's definition of M_beta and the authors' numpy implementation; their torch utility
swaps four b x b corner blocks instead, frequencies -b..b-1), and 0 elsewhere. So ``beta = 0`` swaps the DC term
only. The window is symmetric under k -> -k, so the new spectrum stays Hermitian and the restyled image is real (the
inverse FFT's imaginary part is rounding noise; it is dropped). :func:`fda_restyle` is that formula, nothing more
(no clamping).

Objective (paper eqs. 2-3; single band, no self-supervised round)::

    L = L_seg(φ(x_{s->t}), y_s) + λ_ent · mean_{images, pixels} ρ( H(φ(x_t)) / log K )
    H(p) = -Σ_k p_k log p_k,   ρ(x) = (x² + 0.001²)^η,   η = 2.0, λ_ent = 0.005 (the paper's values)

Where the paper is silent, or where this setting differs from it (choices):
- Pairing: source image i of a batch is restyled with target image i of the same batch (the engine draws equally
  many of each; with fewer target images they are reused cyclically, i mod B_t). A fresh pairing every iteration,
  as the paper's training draws a new target image for each source image.
- Intensity offset: the paper restyles raw pixel values (0..255, mean subtracted afterwards), whose DC coefficient
  is positive, so the restyled image takes the target's mean intensity. Images here lie in [-1, 1]: the DC
  coefficient's phase is 0 or π, and the formula alone would give the restyled image the target's mean with the
  *source's* sign (``sign(mean x_s) · |mean x_t|``). The method therefore restyles ``x + 1`` (in [0, 2]) and
  subtracts 1 again (:func:`fda_restyle` with ``offset=1``): every non-zero frequency is exactly the formula's,
  and the restyled mean is the target image's mean, as in the paper.
- Clamping (``clamp``, default on): the restyled images are clipped to [-1, 1], the range every network here sees;
  the paper does not clip (its images are not bounded before mean subtraction).
- Entropy: the paper's sum over pixels of ρ(H) is taken here as the mean over pixels and images of ρ(H / log K)
  (the authors' code: entropy divided by the log of the number of classes, so it lies in [0, 1], then averaged).
  With a mean, λ_ent does not depend on the image size. ε = 0.001 as the paper writes (the authors' code adds 1e-8,
  i.e. ε = 1e-4). Computed in float32 on the target batch in training mode (batch statistics, as every method here);
  that forward pass does not change the batch-norm running statistics, so they are those of the restyled source
  batches only. The entropy term is on from the first iteration (the authors' code switches it on after 50k of its
  150k iterations; ``init_from_source`` gives the segmenter its source training beforehand instead). With
  ``lambda_ent: 0`` the term is computed for the log only (no gradient).
- Segmentation loss: the project's class-weighted CE + Dice (``class_weights: batch``, Dice weight 1), as the source
  segmenter; the paper uses plain cross-entropy with DeepLab-v2 / FCN-8s. Keeping the segmenter's loss makes FDA
  differ from the source segmenter only by the restyling and the entropy term.
- Network and optimiser: E∘C1 (:class:`~.segmenter.SegmenterNet`) with Adam lr 2e-4, betas (0.9, 0.999), weight
  decay 1e-4, as the source segmenter (the paper: SGD lr 2.5e-4 with polynomial decay for DeepLab, Adam 1e-5 for
  FCN-8s, from ImageNet weights). ``init_from_source: true`` (default) starts from the trained source segmenter's
  weights, as the other methods here (nothing pretrained can be downloaded); ``false`` starts from random weights.
- ``finish`` does nothing: the batch-norm running statistics are those accumulated on the restyled (target-styled)
  source images during training.
- ``translations`` shows the restyled source images the network is trained on (offset and clamp included).

Not part of this method: the paper's multi-band transfer (MBT: averaging the predictions of segmenters trained with
beta 0.01, 0.05, 0.09) and its self-supervised round (retraining on the MBT pseudo-labels of target images). Both
could be later variants built from several ``fda`` runs. Segmentation only: classification contexts are refused.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ._common import reestimate_bn, source_net
from .base import Batch, Context, Method, MethodOptions, adam, scalars
from .segmenter import SegmenterNet, task_loss

TRANSLATION_KEY = "source -> target style (FDA)"


class FDAOptions(MethodOptions):
    beta: float = Field(0.01, ge=0, le=0.5, description="half-size of the swapped window / min(H, W) (paper: 0.01, "
                                                       "0.05, 0.09)")
    lambda_ent: float = Field(0.005, ge=0, description="weight of the Charbonnier entropy on target predictions")
    eta: float = Field(2.0, gt=0, description="exponent of the Charbonnier penalty (x^2 + 0.001^2)^eta")
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0, description="Adam weight decay, as the source segmenter")
    init_from_source: bool = Field(True, description="start from the trained source segmenter; false: random weights")
    clamp: bool = Field(True, description="clip restyled images to [-1, 1]")


def low_frequency_mask(h: int, w: int, beta: float, device: torch.device | None = None) -> torch.Tensor:
    """M_beta in unshifted FFT layout (H, W), bool: True where the signed frequencies satisfy |k_y| <= b and
    |k_x| <= b, ``b = floor(min(H, W) * beta)`` (after fftshift: the centred (2b+1)-wide square)."""
    b = math.floor(min(h, w) * beta)
    ky = (torch.fft.fftfreq(h, d=1.0 / h, device=device)).round().abs()
    kx = (torch.fft.fftfreq(w, d=1.0 / w, device=device)).round().abs()
    return (ky[:, None] <= b) & (kx[None, :] <= b)


def fda_restyle(src: torch.Tensor, tgt: torch.Tensor, beta: float, *, offset: float = 0.0) -> torch.Tensor:
    """FDA's amplitude swap (paper eq. 1): ``src`` (B, C, H, W) with the amplitude of ``tgt`` (same shape) inside the
    low-frequency window M_beta (:func:`low_frequency_mask`) and its own amplitude outside it, keeping the phase of
    ``src`` everywhere. Computed in float32 and returned in ``src``'s dtype; not clamped.

    ``offset``: restyle ``src + offset`` with ``tgt + offset`` and subtract ``offset`` (changes the DC coefficient
    only; with non-negative shifted images the result's mean is the target's mean, see the module docstring)."""
    if src.shape != tgt.shape:
        raise ValueError(f"fda_restyle needs images of one shape, got {tuple(src.shape)} and {tuple(tgt.shape)}")
    h, w = src.shape[-2:]
    fs = torch.fft.fft2(src.float() + offset)
    ft = torch.fft.fft2(tgt.float() + offset)
    mask = low_frequency_mask(h, w, beta, device=src.device)
    amp = torch.where(mask, ft.abs(), fs.abs())
    out = torch.fft.ifft2(torch.polar(amp, fs.angle())).real - offset
    return out.to(src.dtype)


def charbonnier_entropy(logits: torch.Tensor, eta: float, eps: float = 1e-3) -> torch.Tensor:
    """FDA's robust entropy term: the mean over images and pixels of ρ(H(p) / log K), p = softmax(logits) over the K
    classes of (N, K, H, W) logits, ρ(x) = (x² + eps²)^eta; float32."""
    k = logits.shape[1]
    if k < 2:
        raise ValueError(f"the entropy term needs at least two classes, got logits of shape {tuple(logits.shape)}")
    logp = F.log_softmax(logits.float(), dim=1)
    h = -(logp.exp() * logp).sum(dim=1) / math.log(k)
    return ((h * h + eps * eps) ** eta).mean()


@contextlib.contextmanager
def running_stats_kept(net: nn.Module) -> Iterator[None]:
    """A forward pass of ``net`` in training mode inside this block uses batch statistics as usual but leaves the
    batch-norm running statistics as they were: momentum 0 (running <- 1 · running + 0 · batch, computed inside the
    layer, so autograd's saved tensors stay valid) and the batch counters restored afterwards."""
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m, m.momentum, m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        with torch.no_grad():
            for m, momentum, n in saved:
                m.momentum = momentum
                m.num_batches_tracked.copy_(n)


class FDA(Method):
    name = "fda"
    Options = FDAOptions
    needs_source_model = True  # per instance: only with init_from_source
    needs_target_images = True
    site_statistics = True

    def __init__(self, ctx: Context, options: FDAOptions | None = None):
        super().__init__(ctx, options)
        if ctx.kind != "segmentation":
            raise ValueError(f"fda restyles images for a segmenter and is for segmentation tasks only; this task is "
                             f"{ctx.kind!r}")
        self.net = SegmenterNet(ctx)
        self.seg_loss = task_loss(ctx, "batch", 1.0)
        self.needs_source_model = self.opts.init_from_source

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"seg": adam(self.net.parameters(), self.opts.lr, beta1=0.9, weight_decay=self.opts.weight_decay)}

    def prepare(self, source, target, source_model: Method | None = None) -> None:
        if not self.opts.init_from_source:
            return
        if source_model is None:
            raise ValueError("fda with init_from_source: true needs the trained source segmenter")
        self.net.load_state_dict(source_net(source_model, self.ctx, "fda").state_dict())

    def restyle(self, src_x: torch.Tensor, tgt_x: torch.Tensor) -> torch.Tensor:
        """Source images i with the low-frequency amplitude of target images i (mod the target batch size), on the
        [0, 2]-shifted intensities, clipped to [-1, 1] when ``clamp``; no gradient."""
        if tgt_x is None or len(tgt_x) == 0:
            raise ValueError("fda needs target images in every batch")
        with torch.no_grad():
            idx = torch.arange(len(src_x), device=tgt_x.device) % len(tgt_x)
            out = fda_restyle(src_x, tgt_x[idx].to(src_x.device), self.opts.beta, offset=1.0)
            return out.clamp(-1.0, 1.0) if self.opts.clamp else out

    def train_step(self, batch: Batch) -> dict[str, float]:
        o = self.opts
        x = self.restyle(batch.src_x, batch.tgt_x)
        with self.autocast():
            logits = self.net(x)
        terms = {"seg": self.seg_loss(logits, batch.src_y)}
        if o.lambda_ent > 0:
            with running_stats_kept(self.net), self.autocast():
                terms["ent"] = charbonnier_entropy(self.net(batch.tgt_x), o.eta)
            loss = terms["seg"] + o.lambda_ent * terms["ent"]
        else:  # logged only
            with torch.no_grad(), running_stats_kept(self.net), self.autocast():
                terms["ent"] = charbonnier_entropy(self.net(batch.tgt_x), o.eta)
            loss = terms["seg"]
        self.update(loss, "seg")
        return scalars(terms)

    def reestimate_statistics(self, images: torch.Tensor) -> bool:
        reestimate_bn(self.net, images)
        return True

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def translations(self, src_x: torch.Tensor, tgt_x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {TRANSLATION_KEY: self.restyle(src_x, tgt_x)}
