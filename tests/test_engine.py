"""Training engine: resume equality, method contract, the simple methods, and the train/adapt/predict steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from siteadapt.methods import available, get_method
from siteadapt.train.engine import TrainConfig, fit

from helpers.engine import CTX, slices, state_copy


def test_registry_lists_methods():
    names = available()
    for n in ("source", "supervised", "noadapt", "histmatch"):
        assert n in names
    with pytest.raises(Exception, match="unknown method"):
        get_method("nope")


def test_unknown_method_option_names_key():
    cls = get_method("supervised")
    with pytest.raises(Exception, match="methods.supervised.lrr: unknown key"):
        cls.parse_options({"lrr": 1}, "methods.supervised")


@pytest.mark.parametrize("augment", [None, (20.0, 0.1, 5.0)])
def test_kill_and_resume_equals_uninterrupted(tmp_path, augment):
    """A run killed after a checkpoint and restarted ends bit-identical (CPU) to an uninterrupted run (with and
    without the engine's augmentation, whose draws come from the checkpointed sampler generator)."""
    src = slices()
    cfg = TrainConfig(iterations=6, batch_size=2, seed=3, checkpoint_every=2, log_every=100, device="cpu",
                      augment=augment)
    cls = get_method("source")
    torch.manual_seed(0)
    a = cls(CTX)
    fit(a, src, None, cfg, tmp_path / "a")
    torch.manual_seed(0)
    b = cls(CTX)
    fit(b, src, None, cfg, tmp_path / "b", stop_after=4)  # "killed" after iteration 4 (checkpoint at 4)
    torch.manual_seed(123)  # a fresh process would start from other RNG states
    c = cls(CTX)
    summary = fit(c, src, None, cfg, tmp_path / "b")
    assert summary["iterations"] == 6
    sa, sc = state_copy(a), state_copy(c)
    assert sa.keys() == sc.keys()
    for k in sa:
        assert torch.equal(sa[k], sc[k]), k  # tolerance: exact on CPU


def test_checkpoint_from_other_data_is_not_resumed(tmp_path):
    """A site preprocessed again (other slices) must not silently reuse the finished model of the old slices."""
    cfg = TrainConfig(iterations=4, batch_size=2, seed=3, checkpoint_every=2, log_every=100, device="cpu")
    cls = get_method("source")
    torch.manual_seed(0)
    fit(cls(CTX), slices(seed=0), None, cfg, tmp_path / "run")  # finished run on the old data
    new_data = slices(seed=1)
    torch.manual_seed(0)
    again = cls(CTX)
    fit(again, new_data, None, cfg, tmp_path / "run")
    torch.manual_seed(0)
    fresh = cls(CTX)
    fit(fresh, new_data, None, cfg, tmp_path / "fresh")
    sa, sf = state_copy(again), state_copy(fresh)
    assert all(torch.equal(sa[k], sf[k]) for k in sa)  # trained afresh on the new data, not resumed
    assert slices(seed=0).fingerprint() != new_data.fingerprint()
    assert slices(seed=1, labels=False).fingerprint() != new_data.fingerprint()  # labels are part of it


def test_supervised_learns_and_gradients_reach_network(tmp_path):
    src = slices(16)
    m = get_method("source")(CTX)
    before = state_copy(m)
    out = fit(m, src, None, TrainConfig(iterations=30, batch_size=4, checkpoint_every=100, log_every=10, device="cpu"),
              tmp_path)
    assert np.isfinite(out["losses"]["seg"])
    changed = [k for k, v in state_copy(m).items() if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    assert any(k.startswith("net.encoder") for k in changed) and any(k.startswith("net.classifier") for k in changed)


def test_histmatch_maps_target_histogram_to_source():
    src, tgt = slices(8, seed=1), slices(8, seed=2, shift=0.5, labels=False)
    hm = get_method("histmatch")(CTX)
    source_model = get_method("source")(CTX).eval()
    hm.prepare(src, tgt, source_model=source_model)
    x = torch.from_numpy(tgt.images).unsqueeze(1)
    matched = hm.match(x).numpy()
    q = np.linspace(0.05, 0.95, 10)
    assert np.allclose(np.quantile(matched, q), np.quantile(src.images, q), atol=0.03)
    assert hm.predict_subject(x).shape == (8, 3, 32, 32)


def test_loss_curve_keeps_a_column_per_term_when_phases_log_different_terms(tmp_path):
    """TUNA-Net with F_P trained offline logs other terms in its last phase: every row must stay parseable under one
    header (a row used to be written under the first phase's header and broke the report's curves)."""
    import csv

    from siteadapt.train.engine import _append_curve, _truncate_curve

    p = tmp_path / "losses.csv"
    _append_curve(p, 20, 5.0, {"b": 0.5, "a": 1.0})
    _append_curve(p, 40, 5.0, {"a": 0.9, "b": 0.4})
    _append_curve(p, 60, 9.0, {"c": 0.25})
    rows = list(csv.DictReader(p.open()))
    assert list(rows[0]) == ["iteration", "it_per_s", "a", "b", "c"]
    assert [r["iteration"] for r in rows] == ["20", "40", "60"]
    assert (rows[0]["a"], rows[0]["c"], rows[2]["a"], rows[2]["c"]) == ("1", "", "", "0.25")
    assert all(None not in r and None not in r.values() for r in rows)  # no short or overlong rows
    _truncate_curve(p, 40)  # resume from iteration 40: later rows go, the header stays
    assert [r["iteration"] for r in csv.DictReader(p.open())] == ["20", "40"]


def test_initial_weights_come_from_the_seed_not_the_process():
    """PyTorch seeds its default generator differently in every process: the networks' initial weights must be
    drawn from the run's seed, or one stage run twice with one seed trains from other weights."""
    from pathlib import Path

    from siteadapt.config import load_settings
    from siteadapt.methods.build import build_method

    s = load_settings(Path(__file__).resolve().parents[1] / "params.yaml")

    def weights(seed, global_seed):
        torch.manual_seed(global_seed)  # whatever state the process is in
        return build_method(s, "cyclegan", "cxr_b", seed).state_dict()

    a, b, c = weights(None, 1), weights(None, 2), weights(7, 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    state = torch.get_rng_state()
    build_method(s, "source", "cxr_b")
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG stream is left as it was


def test_random_affine_moves_labels_with_images_and_is_seeded():
    from siteadapt.train.engine import random_affine

    x = torch.full((6, 1, 32, 32), -1.0)
    y = torch.zeros(6, 32, 32, dtype=torch.long)
    x[:, :, 8:24, 12:20], y[:, 8:24, 12:20] = 1.0, 2  # a bright labelled bar
    same = random_affine(x, y, torch.Generator().manual_seed(0), 0, 0, 0)
    assert torch.allclose(same[0], x, atol=1e-5) and torch.equal(same[1], y)  # all zero: the identity
    a = random_affine(x, y, torch.Generator().manual_seed(1), 30, 0.2, 10)
    b = random_affine(x, y, torch.Generator().manual_seed(1), 30, 0.2, 10)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # the sampler's generator decides
    xa, ya = a
    assert not torch.equal(ya, y) and ya.dtype == y.dtype and set(ya.unique().tolist()) <= {0, 2}
    assert len({tuple(xa[i].flatten().tolist()) for i in range(6)}) == 6  # each slice its own transform
    area = (ya == 2).sum((1, 2)).float() / 128
    assert ((area > 0.6) & (area < 1.6)).all()  # scaled by at most 1.2 per axis, sheared: area within bounds
    assert (xa[:, 0][ya == 2] > 0.0).float().mean() > 0.9  # the label stays on its (bright) structure
    assert xa.min() >= -1 and xa.max() <= 1
    cls_y = torch.tensor([0, 1, 0, 1, 1, 0])
    assert torch.equal(random_affine(x, cls_y, torch.Generator().manual_seed(1), 30, 0.2, 10)[1], cls_y)


def test_augmentation_comes_from_the_profile_and_is_part_of_the_checkpoint(tmp_path, caplog):
    """tasks.<t>.profiles.<p>.augment reaches the engine for that task only; a checkpoint made without augmentation
    is not resumed with it; off, training is what it was without the option."""
    import yaml

    from siteadapt.config import load_settings
    from siteadapt.steps.train import _train_config

    p = yaml.safe_load(open("params.yaml"))
    p["tasks"]["chestxray"].setdefault("profiles", {})["quick"] = {"augment": {"rotate_deg": 10, "scale": 0.1}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    s = load_settings(tmp_path / "params.yaml")
    method = get_method("source")(CTX)
    assert _train_config(s, "cxr_b", method).augment == (10.0, 0.1, 0.0)
    assert _train_config(s, "cardiac_ct", method).augment is None
    with pytest.raises(Exception, match="rotate_deg"):
        p["tasks"]["chestxray"]["profiles"]["quick"]["augment"]["rotate_deg"] = -1
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
        load_settings(tmp_path / "params.yaml")

    src = slices()
    plain = TrainConfig(iterations=4, batch_size=2, seed=3, checkpoint_every=2, log_every=100, device="cpu")
    aug = TrainConfig(**{**plain.__dict__, "augment": (20.0, 0.1, 5.0)})
    states = []
    for i, cfg in enumerate((plain, aug, plain)):
        torch.manual_seed(0)
        m = get_method("source")(CTX)
        fit(m, src, None, cfg, tmp_path / f"run{i}")
        states.append(state_copy(m))
    key = next(iter(states[0]))
    assert not torch.equal(states[0][key], states[1][key]) and torch.equal(states[0][key], states[2][key])
    with caplog.at_level("WARNING", logger="siteadapt.train"):
        summary = fit(get_method("source")(CTX), src, None, TrainConfig(**{**aug.__dict__, "iterations": 6}),
                      tmp_path / "run0")  # run0's checkpoint (iteration 4) was made without augmentation
    assert "other settings" in caplog.text and summary["iterations"] == 6
