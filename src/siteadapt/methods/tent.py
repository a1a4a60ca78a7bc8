"""Tent: test-time adaptation of the source model by entropy minimisation (Wang et al., "Tent: Fully Test-Time
Adaptation by Entropy Minimization", ICLR 2021).

The source network f_theta is kept; only its batch-norm layers change. Each BN layer normalises with the statistics
of the current target batch and applies its channel-wise affine transformation (Sec. 3)::

    x_bar = (x - mu) / sigma,   mu, sigma = mean and standard deviation of the target batch (per channel)
    x'    = gamma * x_bar + beta

and the objective is the Shannon entropy of the prediction y_hat = softmax(f_theta(x)) (eq. 1)::

    H(y_hat) = - sum_c p(y_hat_c) log p(y_hat_c)

minimised with respect to the affine parameters gamma, beta only (every other parameter is fixed; the statistics
are estimated, not optimised). Here H is in nats, averaged over the pixels of the batch for segmentation and over
the images for classification: the loss ``ent``. Each iteration takes one gradient step on one target batch
(``batch.tgt_x``; target labels are never read, the source batch is unused).

Optimiser: Adam, lr 1e-3, betas (0.9, 0.999) (``lr``): the paper's Adam setting (used for its CIFAR experiments;
for ImageNet it uses SGD with momentum).

Where the paper is silent, or where this setting differs from it:
- Online vs. stored model. The paper adapts online: each test batch is predicted with its own batch statistics in
  the same forward pass that updates gamma, beta. Here the adaptation runs on the target site's *training* images
  (unlabelled) for the engine's iterations (the profile's iteration count times ``iterations_factor``), and the
  saved model predicts the test images in eval mode, so a prediction does not depend on which other slices share
  its batch. For that the stored model carries target *population* statistics: ``prepare`` initialises the running
  statistics with AdaBN (:func:`~._common.reestimate_bn` on the target's training images, batches of
  ``reestimate_batch_size``), and ``finish`` re-estimates them the same way with the final gamma, beta (the running
  averages collected during training lag behind the changing affine parameters of earlier layers).
- During training the whole network is in train mode (BN uses the batch statistics, as in the paper) and the
  gradient flows through the batch statistics, as in the authors' code.
- No episodic reset (the paper's model is updated continually as well).
- The network is a copy of the source model's (``net``); the frozen source model is kept beside it
  (``source_model``, left out of ``model.pt`` as for every method that uses it).
- Without target images (``prepare(..., target=None)``, unit tests) the statistics are not re-estimated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ._common import FrozenSourceMixin, reestimate_bn, source_net, task_net
from .base import Batch, Context, Method, MethodOptions, adam, scalars


class TentOptions(MethodOptions):
    lr: float = Field(1e-3, gt=0, description="Adam learning rate of the BN affine parameters (the paper's 1e-3)")
    reestimate_batch_size: int = Field(32, gt=0, description="target slices per batch of the AdaBN statistics sweeps")


def bn_layers(net: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]


def configure(net: nn.Module) -> list[nn.Parameter]:
    """Only the BN layers' affine parameters (gamma = weight, beta = bias) require gradients; returns them."""
    for p in net.parameters():
        p.requires_grad_(False)
    params = []
    for m in bn_layers(net):
        for p in (m.weight, m.bias):
            if p is not None:
                p.requires_grad_(True)
                params.append(p)
    return params


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of softmax(logits) over dim 1: per pixel for (N, K, H, W), per image for (N, K)."""
    logp = F.log_softmax(logits.float(), dim=1)
    return -(logp.exp() * logp).sum(1).mean()


class Tent(FrozenSourceMixin, Method):
    name = "tent"
    Options = TentOptions
    needs_source_model = True
    needs_target_images = True
    site_statistics = True
    trains = True

    def __init__(self, ctx: Context, options: TentOptions | None = None):
        super().__init__(ctx, options)
        self.net: nn.Module = task_net(ctx)  # receives the source network in prepare (model.pt in load_model)
        configure(self.net)
        self.source_model = None

    def prepare(self, source, target, source_model: Method | None = None) -> None:
        self.attach_source(source_model, self.name)
        # a copy of the source network: its weights and statistics loaded into this method's own network (built
        # from the same context, so a saved model.pt loads into a fresh instance; a mismatch fails here)
        self.net.load_state_dict(source_net(source_model, self.ctx, self.name).state_dict())
        if not configure(self.net):
            raise ValueError("tent: the source network has no batch-norm layer to adapt")
        if target is not None:
            reestimate_bn(self.net, target.images, batch_size=self.opts.reestimate_batch_size)

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"bn": adam(self.net.parameters(), self.opts.lr, beta1=0.9)}

    def train_step(self, batch: Batch) -> dict[str, float]:
        if batch.tgt_x is None:
            raise ValueError("tent adapts on target images: the batch has none")
        self.net.train()
        with self.autocast():
            logits = self.net(batch.tgt_x)
        loss = entropy(logits)
        self.update(loss, "bn")
        return scalars({"ent": loss})

    def finish(self, source, target) -> None:
        if target is not None:
            reestimate_bn(self.net, target.images, batch_size=self.opts.reestimate_batch_size)

    def reestimate_statistics(self, images: torch.Tensor) -> bool:
        reestimate_bn(self.net, images, batch_size=self.opts.reestimate_batch_size)
        return True

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)
