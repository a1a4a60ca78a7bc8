"""SeUDA/CyUDA, DSAN, AdaOutput, DANN, ADDA, CyCADA and STL: finite losses, gradient routing (each optimizer step
changes only its own modules; each loss weight reaches exactly its modules; the frozen source model never changes),
ablation flags that remove their terms and modules, predict shapes, option validation, exact resume, and the
classification variants of ADDA, CyCADA and DANN.

Tiny shapes (32x32, batch 2, width 0.125) and one thread keep the file well under a minute.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from siteadapt.data.shards import SliceSet
from siteadapt.methods import available, get_method
from siteadapt.methods.base import Batch, Context, Method
from siteadapt.nn.networks import ResNetClassifier
from siteadapt.train.engine import TrainConfig, fit

CTX = Context(n_classes=3, image_size=32, width=0.125)
CLS_CTX = Context(n_classes=2, image_size=32, width=0.125, kind="classification")
NEW = ["seuda", "cyuda", "dsan", "adaoutput", "dann", "adda", "cycada", "stl"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: torch on one thread


def source_model(ctx: Context = CTX, seed: int = 7):
    torch.manual_seed(seed)
    return get_method("source")(ctx).eval()


class _ClassifierSource(Method):
    """Stand-in for a trained classification source model (issue 8 builds the real one): ``.net`` is a
    ResNetClassifier."""

    name = "_test_classifier_source"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.net = ResNetClassifier(ctx.in_channels, ctx.n_classes, width=ctx.width)

    def predict(self, images):
        return self.net(images)


def build(name: str, opts: dict | None = None, ctx: Context = CTX, seed: int = 0, src=None):
    cls = get_method(name)
    torch.manual_seed(seed)
    m = cls(ctx, cls.Options(**(opts or {})))
    if m.needs_source_model:
        m.prepare(None, None, source_model=src if src is not None else source_model(ctx))
    m.attach_optimizers()
    m.train()
    return m


def batch(b: int = 2, seed: int = 0, size: int = 32, ctx: Context = CTX) -> Batch:
    g = torch.Generator().manual_seed(seed)
    xs = torch.rand(b, 1, size, size, generator=g) * 2 - 1
    if ctx.kind == "classification":
        ys = torch.randint(0, ctx.n_classes, (b,), generator=g)
    else:
        ys = torch.randint(0, ctx.n_classes, (b, size, size), generator=g)
    xt = torch.rand(b, 1, size, size, generator=g) * 2 - 1
    return Batch(xs, ys, xt)


def module_params(m, depth: int = 1) -> dict[str, dict[str, torch.Tensor]]:
    """Parameters and buffers (BN statistics) of every sub-module at ``depth`` (1: children, 2: grandchildren)."""
    mods = {n: c for n, c in m.named_modules() if n and n.count(".") == depth - 1}
    return {n: {k: v.detach().clone() for k, v in [*c.named_parameters(), *c.named_buffers()]}
            for n, c in mods.items() if any(True for _ in c.parameters())}


def changed_modules(before: dict, after: dict) -> set[str]:
    return {n for n in before if any(not torch.equal(before[n][k], after[n][k]) for k in before[n])}


def step(m, b: Batch | None = None, seed: int = 1) -> dict[str, float]:
    torch.manual_seed(seed)  # the engine seeds the global RNG; the pools draw their seeds from it
    return m.train_step(b if b is not None else batch(ctx=m.ctx))


def test_registered():
    assert set(NEW) <= set(available())
    assert get_method("cyuda") is not get_method("seuda") and issubclass(get_method("cyuda"), get_method("seuda"))
    assert get_method("stl").trains_on_target_labels and get_method("stl").needs_source_model
    assert all(get_method(n).needs_source_model for n in ("seuda", "cyuda", "adda", "cycada"))


# name, options, loss keys, the modules that change in one iteration (everything else, e.g. the frozen source
# model and its batch-norm statistics, must stay bit-identical)
CASES = [
    ("seuda", {}, {"adv_t", "adv_s", "cyc", "sem", "D_s", "D_t", "D_m"}, {"G_ts", "G_st", "D_s", "D_t", "D_m"}),
    ("cyuda", {}, {"adv_t", "adv_s", "cyc", "D_s", "D_t"}, {"G_ts", "G_st", "D_s", "D_t"}),
    ("dsan", {}, {"rec_t", "adv_t", "rec_s", "adv_s", "seg_s", "seg_st", "adv_p", "adv_tp", "D_t", "D_s", "D_p"},
     {"E", "C1", "C2", "U_t", "U_s", "D_t", "D_s", "D_p1", "D_p2"}),
    ("adaoutput", {}, {"seg1", "seg2", "adv1", "adv2", "D1", "D2"}, {"E", "C1", "C2", "D1", "D2"}),
    ("adaoutput", {"multi_level": False}, {"seg1", "adv1", "D1"}, {"E", "C1", "D1"}),
    ("dann", {}, {"seg", "dom", "lambda"}, {"net", "D"}),
    ("adda", {}, {"D", "adv"}, {"net", "D"}),
    ("cycada", {}, {"adv_t", "adv_s", "cyc", "sem", "task", "feat", "D_t", "D_s", "D_f"},
     {"G_st", "G_ts", "D_t", "D_s", "net", "D_f"}),
    ("stl", {}, {"seg"}, {"net"}),
]


@pytest.mark.parametrize("name, opts, keys, learn", CASES, ids=[f"{c[0]}{c[1] or ''}" for c in CASES])
def test_train_step_finite_losses_and_the_right_modules_learn(name, opts, keys, learn):
    m = build(name, opts)
    before = module_params(m)
    losses = step(m)
    assert set(losses) == keys
    assert all(math.isfinite(v) for v in losses.values()), losses
    assert changed_modules(before, module_params(m)) == learn
    if m.needs_source_model and hasattr(m, "source_model") and name != "stl":
        assert "source_model" in before and not any(p.grad is not None for p in m.source_model.parameters())
    m.eval()
    with torch.no_grad():
        assert m.predict(batch().tgt_x).shape == (2, CTX.n_classes, 32, 32)


OPTIMIZER_MODULES = {  # which modules each optimizer may change (depth-1 modules of the method)
    "seuda": {"G": {"G_ts", "G_st"}, "D_s": {"D_s"}, "D_t": {"D_t"}, "D_m": {"D_m"}},
    "dsan": {"E_C": {"E", "C1", "C2"}, "U": {"U_t", "U_s"}, "D_t": {"D_t"}, "D_s": {"D_s"},
             "D_p": {"D_p1", "D_p2"}},
    "adaoutput": {"E_C": {"E", "C1", "C2"}, "D": {"D1", "D2"}},
    "dann": {"net": {"net"}, "D": {"D"}},
    "adda": {"M_t": {"net"}, "D": {"D"}},
    "cycada": {"G": {"G_st", "G_ts"}, "task": {"net"}, "D_t": {"D_t"}, "D_s": {"D_s"}, "D_f": {"D_f"}},
}
ORDER = {"seuda": ["G", "D_s", "D_t", "D_m"], "dsan": ["E_C", "U", "D_t", "D_s", "D_p"],
         "adaoutput": ["E_C", "D"], "dann": ["net", "D"], "adda": ["D", "M_t"],
         "cycada": ["G", "task", "D_t", "D_s", "D_f"]}


@pytest.mark.parametrize("name", list(OPTIMIZER_MODULES))
def test_each_update_changes_only_its_modules(name):
    """Each optimizer step changes its own modules and nothing else (e.g. SeUDA's generator step leaves D_m and the
    frozen segmenter as they were; D_m changes only in its own step), in the papers' order."""
    m = build(name)
    seen = []
    for opt_name, opt in m.optimizers.items():
        def wrapped(*a, _orig=opt.step, _name=opt_name, **kw):
            before = module_params(m)
            out = _orig(*a, **kw)
            seen.append((_name, changed_modules(before, module_params(m))))
            return out
        opt.step = wrapped
    step(m)
    for opt_name, changed in seen:
        assert changed and changed <= OPTIMIZER_MODULES[name][opt_name], (opt_name, changed)
    assert [n for n, _ in seen] == ORDER[name]


# Each weight's term reaches exactly these modules: one iteration from the same state on the same batch with one
# weight changed; the modules that end up different are those whose gradient contains the term (depth-2 names
# where a module's parts differ, e.g. DANN's reversed gradient reaches the encoder and not the classifier).
@pytest.mark.parametrize("name, option, value, modules", [
    ("seuda", "lambda_adv_t", 0.5, {"G_st"}),
    ("seuda", "alpha", 0.25, {"G_ts"}),
    ("seuda", "beta", 5.0, {"G_ts", "G_st"}),
    ("seuda", "lambda_sem", 0.25, {"G_ts"}),  # L_sem: G_t->s only (not G_s->t, not D_m, not the segmenter)
    ("dsan", "lambda_adv", 0.02, {"E", "U_t", "U_s"}),
    ("dsan", "lambda_rec", 0.5, {"E", "U_t", "U_s"}),
    ("dsan", "lambda_seg", 0.5, {"E", "C1", "C2"}),
    ("dsan", "lambda_sec_adv", 0.05, {"E", "C1", "C2"}),
    ("dsan", "level2_weight", 0.5, {"E", "C2"}),
    ("adaoutput", "lambda_adv1", 0.01, {"E", "C1"}),
    ("adaoutput", "lambda_adv2", 0.01, {"E", "C2"}),
    ("adaoutput", "lambda_seg2", 0.5, {"E", "C2"}),
    ("cycada", "lambda_sem", 0.5, {"G_st", "G_ts"}),
    ("cycada", "lambda_adv", 0.5, {"G_st", "G_ts"}),
    ("cycada", "lambda_feat", 0.5, {"net"}),
])
def test_each_weight_reaches_exactly_its_modules(name, option, value, modules):
    b = batch()
    a, c = build(name), build(name, {option: value})
    step(a, b)
    step(c, b)
    assert changed_modules(module_params(a), module_params(c)) == modules


def test_dann_reversed_gradient_reaches_the_encoder_only():
    b = batch()
    a, c = build("dann"), build("dann", {"lambda_adv": 0.5})
    step(a, b)
    step(c, b)
    assert changed_modules(module_params(a, 2), module_params(c, 2)) == {"net.encoder"}  # not C1, not D
    r = build("dann", {"ramp_iterations": 10})
    assert r.coefficient() == 0.0
    r.iteration = 5
    assert r.coefficient() == pytest.approx(0.025)
    r = build("dann")  # DANN's schedule over the run length the train step sets; constant without one
    assert r.coefficient() == pytest.approx(0.05)
    r.total_iterations = 100
    assert r.coefficient() == 0.0
    r.iteration = 50
    assert r.coefficient() == pytest.approx(0.05 * (2 / (1 + math.exp(-5)) - 1))
    r.iteration = 400
    assert r.coefficient() == pytest.approx(0.05 * (2 / (1 + math.exp(-10)) - 1))
    assert build("dann", {"lambda_schedule": "constant"}).coefficient() == pytest.approx(0.05)


def test_seuda_frozen_segmenter_and_prediction():
    src = source_model()
    m = build("seuda", src=src)
    assert m.source_model is src and not any(p.requires_grad for p in src.parameters())
    ref = {k: v.clone() for k, v in src.state_dict().items()}
    for i in range(2):
        step(m, seed=i)
    m.train()  # the engine's train() must leave the frozen segmenter in eval mode (BN statistics kept)
    assert not src.training
    assert all(torch.equal(ref[k], v) for k, v in src.state_dict().items())
    x = batch().tgt_x
    m.eval()
    with torch.no_grad():
        assert torch.equal(m.predict(x), src.predict(m.G_ts(x)))
    assert set(m.translations(x, x)) == {"target -> source-like G_t->s(x_t)", "source -> target-like G_s->t(x_s)"}
    with pytest.raises(ValueError, match="source model"):
        get_method("seuda")(CTX).prepare(None, None)
    # the adapted model's file leaves the source segmenter out (it has its own file)
    from siteadapt.methods.build import save_model

    with tempfile.TemporaryDirectory() as d:
        save_model(m, Path(d) / "model.pt")
        saved = torch.load(Path(d) / "model.pt", weights_only=False)["state_dict"]
    assert saved and not any(k.startswith("source_model.") for k in saved)


def test_cyuda_is_seuda_without_the_semantic_term():
    cy = build("cyuda")
    assert cy.D_m is None and "D_m" not in cy.optimizers and not cy.opts.semantic
    assert build("seuda", {"semantic": False}).D_m is None
    assert "sem" not in step(build("seuda", {"semantic": False}))
    assert build("seuda", {"lambda_sem": 0}).D_m is None
    # the same class and defaults otherwise
    s = get_method("seuda").Options().model_dump()
    c = get_method("cyuda").Options().model_dump()
    assert {k for k in s if s[k] != c[k]} == {"semantic"}
    # same initial weights + same batch: CyUDA's generators differ from SeUDA's only through L_sem (G_t->s)
    b = batch()
    se, cy = build("seuda"), build("cyuda")
    step(se, b), step(cy, b)
    pa, pb = module_params(se), module_params(cy)
    pa.pop("D_m")
    assert changed_modules(pa, pb) == {"G_ts"}


# DSAN Table IV rows and Table V variants: which loss terms and modules exist
DSAN_FLAGS = [
    ({"target_translation": False, "source_translation": False, "semantic_adversarial": False},
     {"seg_s"}, {"E", "C1", "C2"}),
    ({"source_translation": False, "source_segmentation": False, "semantic_adversarial": False},
     {"rec_t", "adv_t", "seg_st", "D_t"}, {"E", "C1", "C2", "U_t", "D_t"}),
    ({"source_segmentation": False, "semantic_adversarial": False},
     {"rec_t", "adv_t", "rec_s", "adv_s", "seg_st", "D_t", "D_s"}, {"E", "C1", "C2", "U_t", "U_s", "D_t", "D_s"}),
    ({"semantic_adversarial": False},
     {"rec_t", "adv_t", "rec_s", "adv_s", "seg_s", "seg_st", "D_t", "D_s"},
     {"E", "C1", "C2", "U_t", "U_s", "D_t", "D_s"}),
    ({"source_translation": False},  # no x^{t->s}: L_adv^sec = L_adv^p alone
     {"rec_t", "adv_t", "seg_s", "seg_st", "adv_p", "D_t", "D_p"}, {"E", "C1", "C2", "U_t", "D_t", "D_p1", "D_p2"}),
    ({"shared_decoders": True},
     {"rec_t", "adv_t", "rec_s", "adv_s", "seg_s", "seg_st", "adv_p", "adv_tp", "D_t", "D_s", "D_p"},
     {"E", "C1", "C2", "U_t", "D_t", "D_s", "D_p1", "D_p2"}),
    ({"shared_encoder": False},
     {"rec_t", "adv_t", "rec_s", "adv_s", "seg_s", "seg_st", "adv_p", "adv_tp", "D_t", "D_s", "D_p"},
     {"E", "E_seg", "C1", "C2", "U_t", "U_s", "D_t", "D_s", "D_p1", "D_p2"}),
    ({"shared_semantic_discriminators": False},
     {"rec_t", "adv_t", "rec_s", "adv_s", "seg_s", "seg_st", "adv_p", "adv_tp", "D_t", "D_s", "D_p"},
     {"E", "C1", "C2", "U_t", "U_s", "D_t", "D_s", "D_p1", "D_p2", "D_tp1", "D_tp2"}),
    ({"lambda_adv": 0},  # no image-space GAN terms: no D_t, D_s
     {"rec_t", "rec_s", "seg_s", "seg_st", "adv_p", "adv_tp", "D_p"},
     {"E", "C1", "C2", "U_t", "U_s", "D_p1", "D_p2"}),
    ({"deep_supervision": False},
     {"rec_t", "adv_t", "rec_s", "adv_s", "seg_s", "seg_st", "adv_p", "adv_tp", "D_t", "D_s", "D_p"},
     {"E", "C1", "U_t", "U_s", "D_t", "D_s", "D_p1"}),
]


@pytest.mark.parametrize("opts, keys, modules", DSAN_FLAGS, ids=[str(f[0]) for f in DSAN_FLAGS])
def test_dsan_ablations_and_variants(opts, keys, modules):
    m = build("dsan", opts)
    present = {n for n, c in m.named_children() if any(True for _ in c.parameters())}
    assert present == modules
    before = module_params(m)
    losses = step(m)
    assert set(losses) == keys and all(math.isfinite(v) for v in losses.values()), losses
    assert changed_modules(before, module_params(m)) == modules  # every built module learns


def test_dsan_unshared_encoder_routes_segmentation_to_its_own_encoder():
    b = batch()
    a, c = build("dsan", {"shared_encoder": False}), build("dsan", {"shared_encoder": False, "lambda_seg": 0.5})
    step(a, b), step(c, b)
    assert changed_modules(module_params(a), module_params(c)) == {"E_seg", "C1", "C2"}
    a, c = build("dsan", {"shared_encoder": False}), build("dsan", {"shared_encoder": False, "lambda_adv": 0.02})
    step(a, b), step(c, b)
    assert changed_modules(module_params(a), module_params(c)) == {"E", "U_t", "U_s"}


def test_dsan_learning_rates_and_translations():
    m = build("dsan")
    lr = {n: o.param_groups[0]["lr"] for n, o in m.optimizers.items()}
    assert lr == pytest.approx({"E_C": 2e-4, "U": 1e-3, "D_t": 1e-4, "D_s": 1e-4, "D_p": 5e-5})
    x = batch().src_x
    tr = m.translations(x, x)
    assert len(tr) == 2 and all(v.shape == x.shape for v in tr.values())
    assert m.D_t.trunk[-1][0].stride == (1, 1) and sum(isinstance(l, torch.nn.Conv2d) for l in m.D_t.modules()) == 4


def test_adda_starts_from_the_source_and_keeps_its_classifier():
    src = source_model()
    m = build("adda", src=src)
    x = batch().tgt_x
    m.eval()
    with torch.no_grad():
        assert torch.equal(m.predict(x), src.predict(x))  # M_t = M_s at the start
    m.train()
    before = module_params(m, 2)
    step(m)
    assert changed_modules(before, module_params(m, 2)) == {"net.encoder", "D.body"}  # classifier and source fixed


def test_stl_fine_tunes_the_source_segmenter():
    src = source_model()
    m = build("stl", src=src)
    x = batch().tgt_x
    m.eval()
    with torch.no_grad():
        assert torch.equal(m.predict(x), src.predict(x))
    with pytest.raises(ValueError, match="source segmenter"):
        get_method("stl")(CTX).prepare(None, None)
    frozen = build("stl", {"freeze_encoder": True})
    before = module_params(frozen, 2)
    step(frozen)
    assert changed_modules(before, module_params(frozen, 2)) == {"net.classifier"}


def test_adaoutput_init_from_source():
    src = source_model()
    m = build("adaoutput", src=src)  # the default: a warm start from the source segmenter
    assert m.needs_source_model and not build("adaoutput", {"init_from_source": False}).needs_source_model
    x = batch().tgt_x
    m.eval()
    with torch.no_grad():
        assert torch.equal(m.predict(x), src.predict(x))


@pytest.mark.parametrize("name, keys", [
    ("adda", {"D", "adv"}),
    ("cycada", {"adv_t", "adv_s", "cyc", "sem", "task", "feat", "D_t", "D_s", "D_f"}),
    ("dann", {"seg", "dom", "lambda"}),
])
def test_classification_variants(name, keys):
    src = _ClassifierSource(CLS_CTX).eval()
    m = build(name, ctx=CLS_CTX, src=src)
    assert isinstance(m.net, ResNetClassifier)
    losses = step(m)
    assert set(losses) == keys and all(math.isfinite(v) for v in losses.values()), losses
    m.eval()
    with torch.no_grad():
        assert m.predict(batch(ctx=CLS_CTX).tgt_x).shape == (2, CLS_CTX.n_classes)
    with pytest.raises(ValueError, match="ResNetClassifier"):
        get_method(name)(CLS_CTX, get_method(name).Options(init_from_source=True) if name == "dann"
                         else None).prepare(None, None, source_model=source_model())


@pytest.mark.parametrize("name", NEW)
def test_unknown_option_names_its_key(name):
    with pytest.raises(Exception, match=f"methods.{name}.lambda_typo: unknown key"):
        get_method(name).parse_options({"lambda_typo": 1}, f"methods.{name}")


def test_bad_option_value_names_its_key():
    with pytest.raises(Exception, match="methods.dsan.lambda_adv"):
        get_method("dsan").parse_options({"lambda_adv": -1}, "methods.dsan")
    with pytest.raises(Exception, match="methods.seuda.semantic"):
        get_method("seuda").parse_options({"semantic": "maybe"}, "methods.seuda")


def _slices(n: int, seed: int, labels: bool) -> SliceSet:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, (n, 32, 32)).astype(np.uint8)
    x = (0.5 * y - 0.5 + rng.normal(0, 0.1, y.shape)).clip(-1, 1).astype(np.float32)
    return SliceSet("s", "train", x, y if labels else None, np.arange(n), np.zeros(n, int), [])


@pytest.mark.parametrize("name", ["seuda", "dsan"])
def test_kill_and_resume_equals_uninterrupted(tmp_path, name):
    """Killed after a checkpoint and restarted, a run ends bit-identical (CPU) to an uninterrupted one, image pools
    included (SeUDA: three pools and the frozen segmenter beside it)."""
    src, tgt = _slices(8, 1, True), _slices(8, 2, False)
    cfg = TrainConfig(iterations=4, batch_size=2, seed=3, checkpoint_every=2, log_every=100, device="cpu")

    def run(folder, stop_after=None, init_seed=0):
        torch.manual_seed(init_seed)
        m = get_method(name)(CTX)
        m.prepare(src, tgt, source_model=source_model())
        fit(m, src, tgt, cfg, tmp_path / folder, stop_after=stop_after)
        return m

    a = run("a")
    run("b", stop_after=2)
    c = run("b", init_seed=123)
    sa, sc = a.state_dict(), c.state_dict()
    assert sa.keys() == sc.keys()
    for k in sa:
        assert torch.equal(sa[k], sc[k]), k
    ea, ec = a.extra_state(), c.extra_state()
    assert ea["iteration"] == ec["iteration"] == 4
    for pool in [k for k in ea if k.startswith("pool_")]:
        assert len(ea[pool]["images"]) == len(ec[pool]["images"]) == 8
        assert all(torch.equal(x, y) for x, y in zip(ea[pool]["images"], ec[pool]["images"]))


def test_params_variants_build():
    """Every named variant in params.yaml's ``methods:`` names a method and options it accepts; one is built through
    ``steps.train.build_method`` (building all at the quick profile's width would cost seconds)."""
    from siteadapt.config import load_settings
    from siteadapt.methods.build import build_method

    settings = load_settings(Path(__file__).resolve().parents[1] / "params.yaml")
    assert {"dsan_shared_decoders", "dsan_unshared_encoders", "dsan_unshared_discriminators"} <= set(settings.methods)
    for name, raw in settings.methods.items():
        raw = dict(raw)
        get_method(raw.pop("method", name)).parse_options(raw, f"methods.{name}")
    site = next(d.target for t in settings.tasks.values() for d in t.directions if t.kind == "segmentation")
    m = build_method(settings, "dsan_shared_decoders", site)
    assert m.variant == "dsan_shared_decoders" and m.U_s is None and m.U_t is not None


def test_seuda_generator_skip_starts_near_the_identity():
    x = batch().tgt_x
    on, off = build("seuda", {"generator_skip": True}), build("seuda")
    assert on.G_ts.skip and on.G_st.skip and not off.G_ts.skip
    with torch.no_grad():
        near = (on.G_ts(x) - torch.tanh(x)).abs().mean().item()
        far = (off.G_ts(x) - torch.tanh(x)).abs().mean().item()
    assert near < 0.5 * far, (near, far)  # the residual path's initial output is small (init std 0.02)
    assert "sem" in step(on)  # trains like the default
