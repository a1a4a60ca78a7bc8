"""The CycleGAN pair that CycleGAN, CyCADA, SeUDA/CyUDA, TUNA-Net and SIFA share (methods/_cyclegan_pair.py): one
class for the pair's networks, losses, pools and optimisers, the papers' loss weights and LSGAN targets, and the
pair built in the declared order under each method's own attribute names (which keeps old checkpoints loadable).

Tiny shapes (32x32, width 0.125, one residual block) on one thread keep the file to a few seconds.
"""

from __future__ import annotations

import pytest
import torch

from siteadapt.methods import get_method
from siteadapt.methods._cyclegan_pair import CycleGANPair, CycleGANPairOptions, generator_blocks
from siteadapt.methods.base import Context
from siteadapt.nn.losses import CycleConsistencyLoss, LSGANDiscriminatorLoss, LSGANGeneratorLoss
from siteadapt.nn.networks import PatchDiscriminator, ResnetGenerator

pytestmark = pytest.mark.usefixtures("one_thread")

SEG = Context(n_classes=3, image_size=32, width=0.125)
CLS = Context(n_classes=2, image_size=32, width=0.125, kind="classification")
# method -> (context, its attribute names for (G_ab, G_ba, D_b, D_a), the option holding the cycle weight)
FULL_PAIRS = {
    "cyclegan": (SEG, ("G_st", "G_ts", "D_t", "D_s"), "lambda_cyc"),
    "cycada": (SEG, ("G_st", "G_ts", "D_t", "D_s"), "lambda_cyc"),
    "seuda": (SEG, ("G_ts", "G_st", "D_s", "D_t"), "beta"),
    "cyuda": (SEG, ("G_ts", "G_st", "D_s", "D_t"), "beta"),
    "tunanet": (CLS, ("G_AP", "G_PA", "D_P", "D_A"), "lambda_cyc"),
}
FIVE = ["cyclegan", "cycada", "seuda", "tunanet", "sifa"]


def build(name: str, **opts):
    cls = get_method(name)
    ctx = FULL_PAIRS[name][0] if name in FULL_PAIRS else SEG
    torch.manual_seed(0)
    return cls(ctx, cls.Options(generator_blocks=1, **opts))


@pytest.mark.parametrize("name", FIVE + ["cyuda"])
def test_every_method_composes_the_one_pair(name):
    cls = get_method(name)
    assert issubclass(cls, CycleGANPair) and issubclass(cls.Options, CycleGANPairOptions)
    o = cls.Options()
    # the pair's settings: CycleGAN's Adam beta1 and 50-image pools, 32 base channels, 70x70 PatchGANs, CycleGAN's
    # block rule; lr 2e-4 (CycleGAN) except SeUDA's text, 2e-3
    assert (o.beta1, o.pool_size, o.generator_channels, o.generator_blocks, o.disc_layers) == (0.5, 50, 32, None, None)
    assert o.lr == (2e-3 if name in ("seuda", "cyuda") else 2e-4)


@pytest.mark.parametrize("name", list(FULL_PAIRS))
def test_full_pair_networks_losses_and_optimizers(name):
    ctx, names, cyc_option = FULL_PAIRS[name]
    m = build(name)
    assert type(m).pair == names
    g_ab, g_ba, d_b, d_a = (getattr(m, n) for n in names)
    assert type(g_ab) is type(g_ba) is ResnetGenerator and type(d_b) is type(d_a) is PatchDiscriminator
    # the pair comes first in the state_dict, in the declared order (creation order = initialisation order)
    children = [n for n, c in m.named_children() if any(True for _ in c.parameters())]
    assert children[:4] == list(names)
    # cycle weight 10 (CycleGAN's lambda; SeUDA's beta), no identity loss (CycleGAN's is off by default here)
    assert getattr(m.opts, cyc_option) == 10.0
    assert getattr(m.opts, "lambda_identity", 0.0) == 0.0
    # one optimizer over both generators, G_ab's parameters first, then one per discriminator, named as it
    opt = m.attach_optimizers()
    assert [id(p) for p in opt["G"].param_groups[0]["params"]] == [id(p) for p in [*g_ab.parameters(),
                                                                                     *g_ba.parameters()]]
    for d in names[2:]:
        assert [id(p) for p in opt[d].param_groups[0]["params"]] == [id(p) for p in getattr(m, d).parameters()]
        assert opt[d].defaults["lr"] == m.opts.lr and opt[d].defaults["betas"] == (0.5, 0.999)
    assert list(opt)[0] == "G"


@pytest.mark.parametrize("name", FIVE)
def test_lsgan_targets_and_l1_cycle(name):
    m = build(name)
    assert isinstance(m.gen_loss, LSGANGeneratorLoss) and isinstance(m.disc_loss, LSGANDiscriminatorLoss)
    assert isinstance(m.cyc_loss, CycleConsistencyLoss)
    # LSGAN (Mao et al.; CycleGAN): generator target 1, discriminator real 1 / fake 0, the D objective halved
    assert m.gen_loss.lsgan.real_label == 1.0
    assert (m.disc_loss.lsgan.real_label, m.disc_loss.lsgan.fake_label, m.disc_loss.scale) == (1.0, 0.0, 0.5)
    pred = torch.full((2, 1, 4, 4), 0.25)
    assert m.gen_loss(pred).item() == pytest.approx(0.75 ** 2)
    assert m.disc_loss(pred, pred).item() == pytest.approx(0.5 * (0.75 ** 2 + 0.25 ** 2))
    assert m.cyc_loss(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)).item() == 1.0  # mean absolute error


def test_sifa_builds_half_the_pair_from_the_same_parts():
    m = build("sifa")
    assert not hasattr(type(m), "pair")  # its other generator is E∘U
    assert type(m.G_t) is ResnetGenerator and type(m.D_t) is type(m.D_s) is PatchDiscriminator
    assert m.D_s.aux_head and m.opts.lambda_cyc == 10.0 and m.opts.lambda_adv_t == 1.0
    opt = m.attach_optimizers()
    assert all(opt[n].defaults["lr"] == 2e-4 and opt[n].defaults["betas"] == (0.5, 0.999)
               for n in ("G_t", "D_t", "U", "D_s", "D_p"))


def test_generator_block_rule():
    assert [generator_blocks(s, None) for s in (64, 128, 255, 256, 512)] == [6, 6, 6, 9, 9]
    assert generator_blocks(256, 3) == 3


@pytest.mark.parametrize("name", ["cyclegan", "seuda", "tunanet"])
def test_pools_are_seeded_once_from_the_global_rng_in_pools_order(name):
    m = build(name)
    torch.manual_seed(5)
    m.seed_pools()
    states = [getattr(m, p).generator.get_state() for p in m.pools]
    torch.manual_seed(5)
    seeds = [int(torch.randint(0, 2**62, ())) for _ in m.pools]
    assert all(torch.equal(s, torch.Generator().manual_seed(k).get_state()) for s, k in zip(states, seeds))
    m.iteration = 1
    rng = torch.get_rng_state()
    m.seed_pools()  # later iterations (and resumed runs) draw nothing
    assert torch.equal(rng, torch.get_rng_state())
