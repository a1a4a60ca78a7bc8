from pathlib import Path

import pytest

from siteadapt.config import load_settings
from siteadapt.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_project_params_load():
    s = load_settings(ROOT / "params.yaml")
    assert s.active.adapt_iterations and s.active.adapt_iterations >= s.active.iterations
    assert {"sifa", "dsan_shared_decoders"} <= set(s.methods)


def test_duplicate_key_is_refused_with_its_name(tmp_path):
    text = (ROOT / "params.yaml").read_text() + "\nmethods:\n  sifa: {}\n"
    p = tmp_path / "params.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match="duplicate key 'methods'"):
        load_settings(p)


def _project_raw() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_a_tasks_own_training_sizes_apply_to_its_sites_only():
    from siteadapt.config import parse_settings
    from siteadapt.methods import get_method
    from siteadapt.methods.build import context_for
    from siteadapt.steps.train import _train_config

    raw = _project_raw()
    raw["tasks"]["pneumonia"]["profiles"] = {"quick": {"width": 0.5, "adapt_iterations": 7}}
    raw["tasks"]["cardiac"]["profiles"] = {"quick": {"adapt_iterations": 11}}
    raw["tasks"]["chestxray"].pop("profiles", None)  # a task without its own sizes
    s = parse_settings(raw)
    assert context_for(s, "pediatric").width == 0.5 and context_for(s, "adult").width == 0.5
    assert context_for(s, "cardiac_ct").width == s.active.width == raw["profiles"]["quick"]["width"]
    gan = get_method("tunanet")(context_for(s, "pediatric"))
    assert _train_config(s, "pediatric", gan).iterations == 7
    assert _train_config(s, "cardiac_ct", get_method("cyclegan")(context_for(s, "cardiac_ct"))).iterations == 11
    assert _train_config(s, "cxr_b", get_method("cyclegan")(context_for(s, "cxr_b"))).iterations == \
        s.active.adapt_iterations
    paper = parse_settings(raw, profile="paper")  # another profile: the task's quick sizes do not apply
    assert context_for(paper, "pediatric").width == paper.active.width
    raw["tasks"]["pneumonia"]["profiles"] = {"fast": {"width": 0.5}}
    with pytest.raises(ConfigError, match="tasks.pneumonia.profiles.fast: unknown profile"):
        parse_settings(raw)


def test_dvc_stages_of_a_task_with_own_sizes_list_them():
    from siteadapt.config import parse_settings
    from siteadapt.dvcgen import build

    raw = _project_raw()
    raw["pipeline"]["tasks"] = ["cardiac", "pneumonia"]
    raw["tasks"]["pneumonia"]["profiles"] = {"quick": {"width": 0.5}}
    stages = build(parse_settings(raw), raw, ROOT)["stages"]
    for group in ("train_source", "adapt"):
        params = stages[group]["do"]["params"]
        fields = [p[len("${item."):-1] for p in params if str(p).startswith("${item.p")]
        items = stages[group]["foreach"]
        own = {k for k, it in items.items() if "tasks.pneumonia.profiles" in [it[f] for f in fields]}
        assert own == {k for k, it in items.items() if it["task"] == "pneumonia"} and own, group
