"""BigAug: the deep stacked transformations of Zhang et al., "Generalizing Deep Learning for Medical Image
Segmentation to Unseen Domains via Deep Stacked Transformation", IEEE TMI 2020, for 2-D slices.

The paper trains the source model on images passed through nine transformations in a fixed order, each applied
independently with probability ``p`` (0.5 in the paper), so that the shifts an unseen scanner or site would bring
(image quality, appearance, geometry) are seen in training. :func:`bigaug` applies them to a batch (B, 1, H, W) of
images in [-1, 1], each image with its own draws, in the paper's order:

===============  ======================================================================================  ==============
transformation   what it does here                                                                       default range
===============  ======================================================================================  ==============
``sharpen``      unsharp masking, ``b1 + alpha (b1 - b2)``, ``b1 = G(x, sigma1)``,                       sigma1
                 ``b2 = G(b1, sigma1 / 3)``                                                              [0.25, 1.5] px,
                                                                                                         alpha [10, 30]
``blur``         Gaussian filter                                                                         sigma
                                                                                                         [0.25, 1.5] px
``noise``        additive Gaussian noise; std = factor x the image's own std (unit-free)                 [0.1, 1.0]
``brightness``   additive shift, as a fraction of the intensity range (the range [-1, 1] is 2 wide)      [-0.1, 0.1]
``contrast``     ``(x - mean) c + mean`` around the image's mean (the std scales by c)                   c [0.65, 1.5]
``intensity``    random linear map ``(x + 1) s - 1 + 2 t``: scale s about the black level, shift t as    s [0.9, 1.1],
                 a fraction of the range                                                                 t [-0.1, 0.1]
``rotate``       rotation about the centre (positive: clockwise as displayed, rows downward)             [-20, 20] deg
``scale``        zoom by s about the centre (s > 1 magnifies); ``scale_range`` since chest radiographs  [0.4, 1.6]
                 may want less
``elastic``      smooth random displacement field, per axis std ``elastic_px`` pixels, Gaussian         std [0, 3] px,
                 correlation ``elastic_sigma`` pixels                                                    sigma [10, 13]
===============  ======================================================================================  ==============

Ranges and formulas. The paper works on 3-D volumes; this is its 2-D counterpart. Its text could not be consulted
while this was written, so the ranges below are recalled, and every one is a keyword argument of :func:`bigaug`. From
the paper (as recalled): the nine transformations, their order, p = 0.5, sharpening's sigma1 [0.25, 1.5] and alpha
[10, 30], the blur range, the noise range, brightness [-0.1, 0.1], the contrast factor [0.65, 1.5], rotation
[-20, 20] degrees and scaling [0.4, 1.6]. Our readings and choices:

- Units. Assuming the paper's intensities lie in [0, 1] (ours lie in [-1, 1]), shifts are fractions of the range (a
  brightness of 0.1 adds 0.2 here) and the intensity map scales about the black level -1 (0 in [0, 1]): the same
  transformation in other units. The noise std is a fraction of the image's own std (population std over the image
  as it stands), so the amount does not depend on the intensity scale. Contrast is a scaling about the image's mean
  (not a gamma curve), so the mean stays and the std scales by the factor.
- Sharpening is read as the unsharp-mask recipe of scipy-lectures ("plot_sharpen": blur, re-blur, add alpha times the
  difference), which MONAI's ``GaussianSharpen`` also implements with alpha in [10, 30]. The plain form
  ``x + alpha (x - G(x))`` with alpha 10-30 would amplify pixel noise ten- to thirty-fold and saturate nearly every
  edge, so it is not used. The second blur's sigma could not be verified: we take sigma1 / 3 (the recipe's 3 and 1),
  a moderate choice that keeps the edge overshoot to a fraction of the edge height at every sigma1.
- The intensity perturbation's ranges (scale [0.9, 1.1], shift [-0.1, 0.1]) and the elastic deformation's parameters
  are ours (moderate). The elastic field is white noise on a grid 4x coarser than the image, smoothed by a Gaussian
  of ``elastic_sigma`` pixels (``elastic_sigma / 4`` coarse pixels), scaled so that each axis has standard deviation
  ``elastic_px`` pixels (normalised analytically, not by the drawn field's own std), and upsampled bilinearly.
- Gaussian kernels are sampled (``exp(-d^2 / 2 sigma^2)``, normalised to sum 1), radius ``ceil(3 sigma_max)`` of the
  range, separable, with replicate padding (at sigma 0.25 a sampled kernel barely changes an image).
- Noise, brightness, contrast and intensity work on the image as it stands after the previous steps; intensities are
  not clipped between steps, only once, to [-1, 1], at the end.
- The three spatial transformations (rotation, then scaling, then deformation) are composed into one sampling grid
  and the image resampled once (bilinear), not three times; the composition is the same map with one interpolation
  instead of three. Images are padded with -1 (black: a letter-boxed look, natural for radiographs and for MR/CT
  slices whose background is dark) rather than continuing the border as the engine's ``random_affine`` does. Label
  maps (B, H, W) follow the same grid with nearest-neighbour sampling (no new label values) and background (0)
  outside; image-level labels (B,) and ``None`` pass through unchanged. Spatial sizes are kept.
- Each transformation draws its selection mask (B,) and then its parameters (B,) — and, for noise and the elastic
  field, its random field — whenever it is enabled in ``ops``, whether or not any image was selected, so the number
  of random numbers drawn depends only on the shapes and ``ops``. Unselected images in [-1, 1] are returned
  bit-identical (``p = 0`` returns the input exactly). The output keeps the input's dtype (and channels_last layout).

Randomness: every draw comes from ``gen`` when given (on ``gen``'s device), otherwise from torch's global RNG on the
images' device (CPU or the current CUDA generator), whose states the training engine checkpoints, so a killed and
resumed run stays bit-identical. Everything is vectorised over the batch (grouped convolutions with per-image kernels,
``F.affine_grid`` / ``F.grid_sample``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["OPS", "bigaug", "gaussian_kernel1d", "gaussian_blur"]

OPS: tuple[str, ...] = ("sharpen", "blur", "noise", "brightness", "contrast", "intensity", "rotate", "scale", "elastic")
_SPATIAL = ("rotate", "scale", "elastic")
_ELASTIC_COARSE = 4  # the elastic field is drawn on a grid this many times coarser than the image


def gaussian_kernel1d(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Sampled, normalised 1-D Gaussian kernels, one per entry of ``sigma`` (N,): (N, 2 radius + 1)."""
    d = torch.arange(-radius, radius + 1, dtype=torch.float32, device=sigma.device)
    s = sigma.float().clamp_min(1e-6)[:, None]
    k = torch.exp(-0.5 * (d[None] / s) ** 2)
    return k / k.sum(dim=1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int, pad: str = "replicate") -> torch.Tensor:
    """Blur each image of ``x`` (B, C, H, W) with its own Gaussian of std ``sigma[b]`` pixels (separable, sampled
    kernel of the given radius; ``pad="replicate"`` continues the border, ``pad="valid"`` returns the interior only).
    """
    b, c, h, w = x.shape
    k = gaussian_kernel1d(sigma.to(x.device), radius).to(x.dtype)  # (B, K)
    k = k.repeat_interleave(c, dim=0)  # (B*C, K): one kernel per channel of each image
    z = x.reshape(1, b * c, h, w)
    if pad != "valid":
        z = F.pad(z, (radius, radius, radius, radius), mode=pad)
    z = F.conv2d(z, k[:, None, None, :], groups=b * c)
    z = F.conv2d(z, k[:, None, :, None], groups=b * c)
    return z.reshape(b, c, z.shape[-2], z.shape[-1])


def _radius(sigma_max: float) -> int:
    return max(1, int(math.ceil(3.0 * sigma_max)))


def _check_range(name: str, r: Sequence[float]) -> tuple[float, float]:
    lo, hi = (float(v) for v in r)
    if not lo <= hi:
        raise ValueError(f"bigaug: {name} needs (low, high) with low <= high, got {tuple(r)}")
    return lo, hi


def bigaug(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    gen: torch.Generator | None = None,
    p: float = 0.5,
    *,
    ops: Sequence[str] = OPS,
    sharpen_sigma: Sequence[float] = (0.25, 1.5),
    sharpen_alpha: Sequence[float] = (10.0, 30.0),
    sharpen_ratio: float = 1.0 / 3.0,
    blur_sigma: Sequence[float] = (0.25, 1.5),
    noise_std: Sequence[float] = (0.1, 1.0),
    brightness: Sequence[float] = (-0.1, 0.1),
    contrast: Sequence[float] = (0.65, 1.5),
    intensity_scale: Sequence[float] = (0.9, 1.1),
    intensity_shift: Sequence[float] = (-0.1, 0.1),
    rotate_deg: Sequence[float] = (-20.0, 20.0),
    scale_range: Sequence[float] = (0.4, 1.6),
    elastic_sigma: Sequence[float] = (10.0, 13.0),
    elastic_px: Sequence[float] = (0.0, 3.0),
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """BigAug's stacked transformations on a batch: images ``x`` (B, C, H, W) in [-1, 1] and labels ``y`` (label maps
    (B, H, W), image labels (B,), or None). Each transformation named in ``ops`` (kept in the paper's order whatever
    the order given) is applied to each image independently with probability ``p``, with amounts drawn uniformly from
    its (low, high) range (equal ends force an amount). Returns the new images (clipped to [-1, 1], same shape and
    dtype) and labels (label maps moved with their images). See the module docstring for units and choices.
    """
    if x.dim() != 4:
        raise ValueError(f"bigaug needs images (B, C, H, W), got {tuple(x.shape)}")
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        raise ValueError(f"bigaug: unknown transformations {unknown}; known: {list(OPS)}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"bigaug: p must lie in [0, 1], got {p}")
    b, c, h, w = x.shape
    if y is not None and not (y.shape == (b, h, w) or y.shape == (b,)):
        raise ValueError(f"bigaug: labels must be (B, H, W) or (B,) for images {tuple(x.shape)}, got {tuple(y.shape)}")
    enabled = set(ops)
    dev = x.device
    draw_dev = gen.device if gen is not None else dev

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen, device=draw_dev).to(dev)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=draw_dev).to(dev)

    def draw(name: str, *ranges: tuple[str, Sequence[float]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Selection mask (B,) then one uniform amount (B,) per range, all from the same stream."""
        sel = rand(b) < p
        vals = []
        for rname, r in ranges:
            lo, hi = _check_range(rname, r)
            vals.append(lo + (hi - lo) * rand(b))
        return sel, vals

    def pick(sel: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        return torch.where(sel.view(-1, *([1] * (old.dim() - 1))), new, old)

    def per_image(v: torch.Tensor) -> torch.Tensor:
        return v.view(b, 1, 1, 1)

    out = x.float()
    # ---- image quality ---------------------------------------------------------------------------------------------
    if "sharpen" in enabled:
        sel, (s1, alpha) = draw("sharpen", ("sharpen_sigma", sharpen_sigma), ("sharpen_alpha", sharpen_alpha))
        s1_max = _check_range("sharpen_sigma", sharpen_sigma)[1]
        b1 = gaussian_blur(out, s1, _radius(s1_max))
        b2 = gaussian_blur(b1, s1 * sharpen_ratio, _radius(s1_max * sharpen_ratio))
        out = pick(sel, b1 + per_image(alpha) * (b1 - b2), out)
    if "blur" in enabled:
        sel, (sig,) = draw("blur", ("blur_sigma", blur_sigma))
        out = pick(sel, gaussian_blur(out, sig, _radius(_check_range("blur_sigma", blur_sigma)[1])), out)
    if "noise" in enabled:
        sel, (rel,) = draw("noise", ("noise_std", noise_std))
        n = randn(b, c, h, w)
        std = out.std(dim=(1, 2, 3), correction=0)
        out = pick(sel, out + per_image(rel * std) * n, out)
    # ---- image appearance ------------------------------------------------------------------------------------------
    if "brightness" in enabled:
        sel, (shift,) = draw("brightness", ("brightness", brightness))
        out = pick(sel, out + per_image(2.0 * shift), out)
    if "contrast" in enabled:
        sel, (fac,) = draw("contrast", ("contrast", contrast))
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = pick(sel, (out - mean) * per_image(fac) + mean, out)
    if "intensity" in enabled:
        sel, (sc, sh) = draw("intensity", ("intensity_scale", intensity_scale), ("intensity_shift", intensity_shift))
        out = pick(sel, (out + 1.0) * per_image(sc) - 1.0 + per_image(2.0 * sh), out)
    # ---- spatial -----------------------------------------------------------------------------------------------------
    spatial_sel = torch.zeros(b, dtype=torch.bool, device=dev)
    ang = torch.zeros(b, device=dev)
    zoom = torch.ones(b, device=dev)
    field = None
    if "rotate" in enabled:
        sel, (a,) = draw("rotate", ("rotate_deg", rotate_deg))
        ang, spatial_sel = torch.where(sel, a, ang), spatial_sel | sel
    if "scale" in enabled:
        sel, (s,) = draw("scale", ("scale_range", scale_range))
        if _check_range("scale_range", scale_range)[0] <= 0:
            raise ValueError(f"bigaug: scale_range must be positive, got {tuple(scale_range)}")
        zoom, spatial_sel = torch.where(sel, s, zoom), spatial_sel | sel
    if "elastic" in enabled:
        sel, (esig, emag) = draw("elastic", ("elastic_sigma", elastic_sigma), ("elastic_px", elastic_px))
        field = _smooth_field(b, h, w, esig, torch.where(sel, emag, torch.zeros_like(emag)),
                              _check_range("elastic_sigma", elastic_sigma)[1], randn)
        spatial_sel = spatial_sel | sel
    y_out = y
    if any(o in enabled for o in _SPATIAL):
        grid = _sampling_grid(b, h, w, ang, zoom, field, dev)
        warped = F.grid_sample(out + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0
        out = pick(spatial_sel, warped, out)
        if y is not None and y.dim() == 3:
            yw = F.grid_sample(y[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                               align_corners=False)[:, 0].to(y.dtype)
            y_out = pick(spatial_sel, yw, y)
    out = out.clamp(-1.0, 1.0).to(x.dtype)
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out, y_out


def _smooth_field(b: int, h: int, w: int, sigma: torch.Tensor, magnitude: torch.Tensor, sigma_max: float,
                  randn) -> torch.Tensor:
    """Displacement field (B, 2, H, W) in pixels: white noise on a coarse grid (with a margin, so that the valid
    smoothing leaves a stationary field), Gaussian-smoothed, scaled to per-axis std ``magnitude`` and upsampled."""
    f = _ELASTIC_COARSE
    hc, wc = max(2, math.ceil(h / f)), max(2, math.ceil(w / f))
    r = _radius(sigma_max / f)
    noise = randn(b, 2, hc + 2 * r, wc + 2 * r)
    sig_c = sigma / f
    smooth = gaussian_blur(noise, sig_c, r, pad="valid")  # (B, 2, hc, wc)
    # std of unit white noise after the separable normalised kernel k (x) k is sum(k^2)
    k = gaussian_kernel1d(sig_c, r)
    std = (k ** 2).sum(dim=1)
    smooth = smooth * (magnitude / std).view(b, 1, 1, 1)
    return F.interpolate(smooth, size=(h, w), mode="bilinear", align_corners=False)


def _sampling_grid(b: int, h: int, w: int, angle_deg: torch.Tensor, zoom: torch.Tensor, field: torch.Tensor | None,
                   dev: torch.device) -> torch.Tensor:
    """Grid (B, H, W, 2) for ``F.grid_sample``: output pixel p reads the input at A (p + d(p)), A the inverse of
    "rotate by the angle, then zoom", d the displacement field; in pixel units about the centre, so that rotations stay
    rotations on non-square images."""
    a = torch.deg2rad(angle_deg.double())
    cos, sin, s = torch.cos(a), torch.sin(a), zoom.double()
    # inverse map in pixel coordinates (x right, y down): rotate by -angle, divide by the zoom
    m = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2) / s.view(b, 1, 1)
    # to normalised coordinates: n = D p with D = diag(2 / W, 2 / H)
    dvec = torch.tensor([2.0 / w, 2.0 / h], dtype=torch.float64, device=m.device)
    m = m * dvec.view(1, 2, 1) / dvec.view(1, 1, 2)
    m = m.to(device=dev, dtype=torch.float32).view(b, 2, 2, 1, 1)
    px = ((torch.arange(w, device=dev, dtype=torch.float32) * 2 + 1) / w - 1).view(1, 1, w)  # pixel centres
    py = ((torch.arange(h, device=dev, dtype=torch.float32) * 2 + 1) / h - 1).view(1, h, 1)
    if field is not None:  # p + d(p), d in normalised units
        px, py = px + field[:, 0] * (2.0 / w), py + field[:, 1] * (2.0 / h)
    # two contiguous planes, handed to grid_sample as a (B, H, W, 2) view without an interleaving copy
    g = torch.cat([m[:, 0, 0] * px + m[:, 0, 1] * py, m[:, 1, 0] * px + m[:, 1, 1] * py]).view(2, b, h, w)
    return g.permute(1, 2, 3, 0)
