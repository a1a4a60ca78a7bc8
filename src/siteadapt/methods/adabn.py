"""AdaBN: the source model with every batch-norm layer's statistics re-estimated on the target domain (Li et al.,
"Revisiting Batch Normalization For Practical Domain Adaptation", 2016). Nothing is trained.

Batch normalisation of a channel's activation x in the source network (Li et al., eq. 1)::

    y = gamma * (x - mu) / sqrt(sigma^2 + eps) + beta

with mu, sigma^2 the channel's mean and variance over the source training data. AdaBN (Algorithm 1) keeps every
weight and every affine parameter (gamma, beta) of the trained source network and replaces, for each neuron j of each
BN layer, the statistics by those of the target domain t::

    mu_j^t = E[x_j^t],   sigma_j^t^2 = Var[x_j^t],   y_j = gamma_j (x_j - mu_j^t) / sqrt(sigma_j^t^2 + eps) + beta_j

computed over the target images as they pass through the network (each layer sees the outputs of the layers before
it, already normalised with the target's statistics: the statistics are estimated in one forward sweep in training
mode). At test time the network runs in eval mode with these target statistics.

Choices where the paper is silent:
- The target sample is the target site's *training* images (unlabelled; no test image is seen), in consecutive
  batches of ``batch_size`` slices. Each layer's statistics are PyTorch's cumulative average over the batches
  (``momentum=None``): the mean of the batch means and the mean of the unbiased batch variances. With one batch
  (``batch_size`` >= the number of images) this is exactly the target's mean and unbiased variance; with several it
  ignores the spread of the batch means, which the paper's population variance would include (in deep layers the
  statistics also depend on the batch, since earlier layers normalise with the current batch's statistics during the
  sweep). See :func:`~._common.reestimate_bn`.
- Only ``BatchNorm2d`` layers are re-estimated (the segmenter E∘C1 and the ResNet classifier of classification tasks
  have no other normalisation); eps is the source layers' (PyTorch's 1e-5).
- The adapted network is a copy (``net``, saved in ``model.pt``); the source model beside it (``source_model``,
  frozen, left out of the file as for every method that uses it) keeps its own statistics.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from ._common import FrozenSourceMixin, reestimate_bn, source_net, task_net
from .base import Context, Method, MethodOptions


class AdaBNOptions(MethodOptions):
    batch_size: int = Field(32, gt=0, description="target slices per batch of the statistics sweep")


class AdaBN(FrozenSourceMixin, Method):
    name = "adabn"
    Options = AdaBNOptions
    needs_source_model = True
    needs_target_images = True
    site_statistics = True
    trains = False

    def __init__(self, ctx: Context, options: AdaBNOptions | None = None):
        super().__init__(ctx, options)
        self.net: nn.Module = task_net(ctx)  # receives the source network in prepare (model.pt in load_model)
        self.source_model = None

    def prepare(self, source, target, source_model: Method | None = None) -> None:
        if target is None:
            raise ValueError("adabn needs the target's training images to re-estimate the batch-norm statistics")
        self.attach_source(source_model, self.name)
        # a copy of the source network: its weights and statistics loaded into this method's own network (built
        # from the same context, so a saved model.pt loads into a fresh instance; a mismatch fails here)
        self.net.load_state_dict(source_net(source_model, self.ctx, self.name).state_dict())
        for p in self.net.parameters():
            p.requires_grad_(False)
        reestimate_bn(self.net, target.images, batch_size=self.opts.batch_size)
        self.net.eval()

    def reestimate_statistics(self, images: torch.Tensor) -> bool:
        reestimate_bn(self.net, images, batch_size=self.opts.batch_size)
        return True

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        self.net.eval()
        return self.net(images)
