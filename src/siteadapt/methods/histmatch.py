"""Histogram matching (the papers' "T-HistM" / "HistM" row): each target subject's intensities are mapped onto the
source site's intensity distribution, then segmented by the source segmenter.

Choices (the papers only name the baseline): the source reference is the pooled histogram of the source training
slices (values in [-1, 1] after preprocessing), matched per target *subject* (all its slices together, as a volume is
matched in 3D tools), by quantile mapping on ``n_quantiles`` quantiles with linear interpolation. Matching is
monotonic: when tissues swap brightness order between modalities (fat bright in MR, dark in CT) it cannot undo the
shift, which is exactly what this baseline shows.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from .base import Method, MethodOptions


class HistMatchOptions(MethodOptions):
    n_quantiles: int = Field(256, ge=8)


class HistMatch(Method):
    name = "histmatch"
    Options = HistMatchOptions
    needs_source_model = True
    needs_target_images = False
    trains = False

    def __init__(self, ctx, options=None):
        super().__init__(ctx, options)
        self.register_buffer("source_quantiles", torch.zeros(self.opts.n_quantiles))

    def prepare(self, source, target, source_model=None):
        if source_model is None:
            raise ValueError("histmatch needs the trained source segmenter")
        self.source_model = source_model
        q = np.linspace(0, 1, self.opts.n_quantiles)
        self.source_quantiles.copy_(torch.from_numpy(np.quantile(source.images, q).astype(np.float32)))

    def match(self, images: torch.Tensor) -> torch.Tensor:
        q = np.linspace(0, 1, self.opts.n_quantiles)
        x = images.detach().cpu().numpy()
        tq = np.quantile(x, q)
        tq_u, idx = np.unique(tq, return_index=True)  # flat histogram regions: keep the first of equal quantiles
        out = np.interp(x, tq_u, self.source_quantiles.cpu().numpy()[idx])
        return torch.from_numpy(out.astype(np.float32)).to(images.device)

    def predict(self, images):
        return self.source_model.predict(self.match(images))

    @torch.no_grad()
    def predict_subject(self, images, batch_size: int = 16):
        """All slices of one subject: match the subject's histogram as a whole, then segment in batches."""
        return self.source_model.predict_subject(self.match(images), batch_size)
