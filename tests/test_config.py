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


def test_dvc_gen_names_the_projects_copy_of_a_method_file(tmp_path):
    """dvc.yaml must not depend on where the package is imported from (editable install, wheel, PYTHONPATH): a
    method's code dependency is the project's src/ copy when the project has one."""
    from siteadapt.dvcgen import _code_file
    from siteadapt.methods import get_method

    sifa = get_method("sifa")
    assert _code_file(sifa, tmp_path) is None  # the imported file is not under this folder, nor a copy of it
    (tmp_path / "src/siteadapt/methods").mkdir(parents=True)
    (tmp_path / "src/siteadapt/methods/sifa.py").write_text("# the project's copy\n")
    assert _code_file(sifa, tmp_path) == "src/siteadapt/methods/sifa.py"
