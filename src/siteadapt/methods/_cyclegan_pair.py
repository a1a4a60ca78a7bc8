"""The CycleGAN pair (Zhu et al., ICCV 2017) that the image-alignment methods build on, written once: CycleGAN,
CyCADA, SeUDA/CyUDA and TUNA-Net train a full pair, SIFA trains its G_t/D_t half (its other generator is E∘U), and
DSAN reuses the GAN training parts. Not a method: the registry skips modules whose name starts with ``_``, and the
mixins below are no :class:`~.base.Method` subclasses.

What the pair is (CycleGAN's paper and code; every method here keeps these):
- Generators: CycleGAN's ResNet generator (:class:`~siteadapt.nn.networks.ResnetGenerator`) with the number of
  residual blocks from CycleGAN's rule (:func:`generator_blocks`), ``generator_channels`` base channels (32 here, as
  SIFA's code, so that a table compares methods and not generator sizes).
- Discriminators: 70x70 PatchGANs (three stride-2 layers unless ``disc_layers`` says otherwise).
- Losses: least-squares GAN (Mao et al. 2017; CycleGAN's choice), generator target 1; discriminator targets 1 (real)
  and 0 (fake) with the objective halved; cycle consistency as the L1 distance.
- Discriminators learn from a 50-image history pool each (Shrivastava et al. 2017), seeded from the global RNG at the
  first iteration so that a seeded run and its resume are exact.
- Adam with ``lr`` and ``beta1`` (CycleGAN: 2e-4, 0.5) for the generators (one optimizer ``"G"`` over both) and
  for each discriminator (one optimizer each, named as the discriminator).

Naming convention (the methods keep their papers' attribute names): a pair is declared as the class attribute
``pair = (G_ab, G_ba, D_b, D_a)`` (generator a -> b, generator b -> a, discriminator on domain b, on domain a);
the image pool of discriminator ``D_x`` is ``pool_x`` and its generator-side loss term is ``adv_x``. Networks are
created in the declared order, which fixes both the parameter initialisation (global RNG order) and the
``state_dict`` keys.

:class:`CycleGANPairOptions` holds the pair's settings; a method's options class derives from it and adds (or, for a
paper that says otherwise, re-declares with its own default) what the method's paper sets.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from ..nn.losses import CycleConsistencyLoss, LSGANDiscriminatorLoss, LSGANGeneratorLoss
from ..nn.networks import PatchDiscriminator, ResnetGenerator
from ..nn.pool import ImagePool
from .base import MethodOptions, adam


class CycleGANPairOptions(MethodOptions):
    """The pair's settings, CycleGAN's values but for the generator width (SIFA code's 32 base channels)."""

    lr: float = Field(2e-4, gt=0, description="Adam learning rate of the generators and discriminators")
    beta1: float = Field(0.5, ge=0, lt=1, description="Adam beta1 of the generators and discriminators")
    pool_size: int = Field(50, ge=0, description="fake images kept per discriminator; 0 = no pool")
    generator_channels: int = Field(32, ge=1, description="base channels of a ResNet generator (CycleGAN: 64)")
    generator_blocks: int | None = Field(None, ge=1, description="None: 9 at >= 256 px, else 6 (CycleGAN)")
    disc_layers: int | None = Field(None, ge=1, description="PatchGAN stride-2 layers; None: 3 (70x70 patches)")


def generator_blocks(image_size: int, blocks: int | None) -> int:
    """Residual blocks of a ResNet generator: ``blocks`` if given, else CycleGAN's rule (9 for images of 256 px and
    more, 6 below)."""
    if blocks is not None:
        return blocks
    return 9 if image_size >= 256 else 6


class GANTraining:
    """For :class:`~.base.Method` subclasses with PatchGAN discriminators trained by LSGAN on image pools (the pair's
    methods and DSAN). Reads ``self.opts.pool_size`` and ``self.opts.disc_layers``; the pools are the attributes
    named in the method's ``pools``."""

    pools: ClassVar[tuple[str, ...]]

    def patch_discriminator(self, in_channels: int | None = None, *, aux_head: bool = False) -> PatchDiscriminator:
        """A PatchGAN on ``in_channels`` channels (default: the images'; the number of classes for a discriminator
        on predictions) with ``disc_layers`` stride-2 layers (None: 3, CycleGAN's 70x70 patches)."""
        ctx = self.ctx
        return PatchDiscriminator(ctx.in_channels if in_channels is None else in_channels, width=ctx.width,
                                  n_layers=self.opts.disc_layers or 3, aux_head=aux_head)

    def init_gan_training(self) -> None:
        """The LSGAN losses (generator target 1; discriminator 1 / 0, halved), an empty image pool of
        ``pool_size`` per name in ``pools``, and the iteration counter the pools' seeding reads."""
        self.gen_loss = LSGANGeneratorLoss()
        self.disc_loss = LSGANDiscriminatorLoss()
        for name in self.pools:
            setattr(self, name, ImagePool(self.opts.pool_size))
        self.iteration = 0

    def seed_pools(self) -> None:
        """At the first iteration only: each pool's own generator gets a seed drawn from the global RNG (which the
        engine seeds), in the order of ``pools``. Later iterations (and resumed runs, whose pools come from the
        checkpoint) draw nothing."""
        if self.iteration == 0:
            for name in self.pools:
                getattr(self, name).generator.manual_seed(int(torch.randint(0, 2**62, ())))


class CycleGANPair(GANTraining):
    """For :class:`~.base.Method` subclasses that train a CycleGAN pair declared in ``pair`` (module docstring).
    Its options derive from :class:`CycleGANPairOptions`."""

    pair: ClassVar[tuple[str, str, str, str]]  # (G_ab, G_ba, D_b, D_a)

    # ---- networks and losses ------------------------------------------------------------------------------------
    def cyclegan_generator(self, *, skip: bool = False, padding_mode: str = "reflect") -> ResnetGenerator:
        """CycleGAN's ResNet generator (image channels in and out); ``skip``: ``tanh(G(x) + x)``; ``padding_mode``:
        CycleGAN's reflection padding, or SIFA code's zeros."""
        o, ctx = self.opts, self.ctx
        return ResnetGenerator(ctx.in_channels, ctx.in_channels, width=ctx.width, base_channels=o.generator_channels,
                               n_blocks=generator_blocks(ctx.image_size, o.generator_blocks), skip=skip,
                               padding_mode=padding_mode)

    def build_pair(self, *, skip: bool = False) -> None:
        """Create the two generators and the two discriminators as the attributes named in ``pair``, in that order,
        then the cycle loss and :meth:`init_gan_training`'s losses, pools and counter."""
        g_ab, g_ba, d_b, d_a = self.pair
        setattr(self, g_ab, self.cyclegan_generator(skip=skip))
        setattr(self, g_ba, self.cyclegan_generator(skip=skip))
        setattr(self, d_b, self.patch_discriminator())
        setattr(self, d_a, self.patch_discriminator())
        self.init_cycle_training()

    def init_cycle_training(self) -> None:
        """The L1 cycle-consistency loss and the GAN training parts (for SIFA, which builds half a pair itself)."""
        self.cyc_loss = CycleConsistencyLoss()
        self.init_gan_training()

    # ---- optimisers ---------------------------------------------------------------------------------------------
    def gan_adam(self, *modules) -> torch.optim.Optimizer:
        """Adam at the pair's ``lr`` and ``beta1`` over the parameters of ``modules``, in order."""
        return adam([p for m in modules for p in m.parameters()], self.opts.lr, self.opts.beta1)

    def generator_optimizer(self) -> dict[str, torch.optim.Optimizer]:
        """``{"G": Adam over G_ab's then G_ba's parameters}`` (CycleGAN steps both generators together)."""
        g_ab, g_ba, _, _ = self.pair
        return {"G": self.gan_adam(getattr(self, g_ab), getattr(self, g_ba))}

    def discriminator_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """One Adam per discriminator, named as it: D_b's, then D_a's."""
        return {d: self.gan_adam(getattr(self, d)) for d in self.pair[2:]}

    # ---- training -----------------------------------------------------------------------------------------------
    def pair_objective(self, x_a: torch.Tensor, x_b: torch.Tensor, lambda_adv: float, lambda_cyc: float,
                       terms: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | float]:
        """CycleGAN's generator objective with both adversarial terms at one weight:
        ``lambda_adv (adv_b + adv_a) + lambda_cyc cyc``, where fake_b = G_ab(x_a), fake_a = G_ba(x_b),
        adv_x = LSGAN(D_x(fake_x) -> real) and cyc = |G_ba(fake_b) - x_a|_1 + |G_ab(fake_a) - x_b|_1. A term with
        weight 0 is not computed. Fills ``terms``; returns (fake_b, fake_a, loss), loss 0.0 when both weights are 0.
        Run it with the discriminators frozen."""
        g_ab, g_ba, d_b, d_a = (getattr(self, n) for n in self.pair)
        adv_b, adv_a = ("adv_" + n.split("_", 1)[1] for n in self.pair[2:])
        fake_b = g_ab(x_a)
        fake_a = g_ba(x_b)
        loss = 0.0
        if lambda_adv > 0:
            terms[adv_b] = self.gen_loss(d_b(fake_b))
            terms[adv_a] = self.gen_loss(d_a(fake_a))
            loss = loss + lambda_adv * (terms[adv_b] + terms[adv_a])
        if lambda_cyc > 0:
            terms["cyc"] = self.cyc_loss(g_ba(fake_b), x_a) + self.cyc_loss(g_ab(fake_a), x_b)
            loss = loss + lambda_cyc * terms["cyc"]
        return fake_b, fake_a, loss

    def update_pair_discriminators(self, real_b: torch.Tensor, fake_b: torch.Tensor, real_a: torch.Tensor,
                                   fake_a: torch.Tensor, terms: dict) -> None:
        """One LSGAN step of D_b (real_b vs fake_b through pool_b), then of D_a likewise; their losses go into
        ``terms`` under the discriminators' names."""
        for d, real, fake in zip(self.pair[2:], (real_b, real_a), (fake_b, fake_a)):
            pool = getattr(self, "pool" + d[1:])
            terms[d] = self._d_update(d, getattr(self, d), real, pool.query(fake.detach()))


__all__ = ["CycleGANPair", "CycleGANPairOptions", "GANTraining", "generator_blocks"]
