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
