"""dvc.yaml's code dependencies: each stage lists the project's files of the modules it imports (a static scan from
the functions its command calls, :func:`siteadapt.dvcgen.code_closure`), so a code change re-runs the stages that run
that code and no others. Fast: no DVC run (test_pipeline_dvc.py has the DVC side)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from siteadapt import dvcgen
from siteadapt.config import parse_settings

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
_PARSED: dict = {}  # the scan's parsed modules, shared by this file's tests


def _raw(tasks=("cardiac", "chestxray", "pneumonia")) -> dict:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["pipeline"]["tasks"] = list(tasks)  # default: every task, so that per-item fields are in use
    raw["tasks"]["cardiac"]["methods"] = ["supervised", "noadapt", "sifa"]
    return raw


@pytest.fixture(scope="module")
def stages() -> dict:
    raw = _raw()
    return dvcgen.build(parse_settings(raw), raw, REPO)["stages"]


def code_of(stage: dict, key: str | None = None) -> set[str]:
    """The code files one item of a generated stage depends on, as DVC renders them (item fields substituted)."""
    do = stage.get("do", stage)
    out = set()
    for d in do.get("deps", []):
        if key is not None:
            d = d.replace("${key}", key)
            for field, v in stage["foreach"][key].items():
                d = d.replace(f"${{item.{field}}}", str(v))
        if d.startswith("src/"):
            out.add(d)
    return out


def _files(modules) -> set[str]:
    """The files of ``modules`` but empty ones (an empty __init__.py runs no code: no dependency)."""
    files = (dvcgen._module_file(m, SRC) for m in modules)
    return {f.relative_to(REPO).as_posix() for f in files if f.stat().st_size}


def _method_entries(settings, item: dict) -> list[str]:
    """The method's class, and the source segmenter's when the stage loads the source model (the adapt item's
    ``source_model`` is then the model, not the target's prepared data)."""
    from siteadapt.methods import get_method
    from siteadapt.methods.build import method_options

    cls = [method_options(settings, item["method"], item["target"])[0]]
    if item["source_model"].startswith("models/"):
        cls.append(get_method("source"))
    return [f"{c.__module__}:{c.__name__}" for c in cls]


def test_every_stage_lists_the_import_closure_of_what_its_command_runs(stages):
    """Each item's code dependencies (literal ones and item fields together) are the closure of its entries."""
    closure = lambda *e: _files(dvcgen.code_closure((dvcgen.SETTINGS_ENTRY, *e), SRC, _PARSED))  # noqa: E731
    settings = parse_settings(_raw())
    for group in ("ingest", "preprocess"):
        for key in stages[group]["foreach"]:
            assert code_of(stages[group], key) == closure(*dvcgen.STAGE_ENTRIES[group]), (group, key)
    for key in stages["train_source"]["foreach"]:
        assert code_of(stages["train_source"], key) == closure(*dvcgen.STAGE_ENTRIES["train_source"],
                                                               "siteadapt.methods.segmenter:Supervised")
    for task in stages["synth"]["foreach"]:
        entries = dvcgen.SYNTH_ENTRIES.get(task, dvcgen.SYNTH_DEFAULT)
        assert code_of(stages["synth"], task) == closure(*entries), task
    for group in ("adapt", "evaluate"):
        for key, item in stages[group]["foreach"].items():
            want = closure(*dvcgen.STAGE_ENTRIES[group], *_method_entries(settings, stages["adapt"]["foreach"][key]))
            assert code_of(stages[group], key) == want, (group, key)
    from siteadapt.methods import get_method
    from siteadapt.methods.build import method_options

    for target in stages["select"]["foreach"]:  # every competing method's class and the source segmenter's
        items = [it for it in stages["adapt"]["foreach"].values() if it["target"] == target]
        classes = [method_options(settings, it["method"], target)[0] for it in items]
        classes = [c for c in classes if not c.trains_on_target_labels] + [get_method("source")]
        want = closure(*dvcgen.STAGE_ENTRIES["select"], *(f"{c.__module__}:{c.__name__}" for c in classes))
        assert code_of(stages["select"], target) == want, target


def test_stage_code_deps_spot_checks(stages):
    """What the issue named, and what a stage must not list (the point: precision)."""
    sifa = code_of(stages["adapt"], "cardiac_ct-sifa")
    assert {"src/siteadapt/train/engine.py", "src/siteadapt/nn/networks.py", "src/siteadapt/methods/sifa.py",
            "src/siteadapt/methods/_cyclegan_pair.py"} <= sifa
    assert "src/siteadapt/methods/sifa.py" not in code_of(stages["adapt"], "cardiac_ct-noadapt")
    assert "src/siteadapt/methods/segmenter.py" in code_of(stages["adapt"], "cardiac_ct-noadapt")  # loads the source
    ev = code_of(stages["evaluate"], "cardiac_ct-sifa")
    assert {"src/siteadapt/metrics/segmentation.py", "src/siteadapt/postprocess.py",
            "src/siteadapt/methods/sifa.py"} <= ev
    assert "src/siteadapt/train/engine.py" not in ev  # prediction does not import the training loop
    ingest = code_of(stages["ingest"], "cardiac_ct")
    assert "src/siteadapt/io/dicom/assemble.py" in ingest  # imported inside steps.ingest's functions
    for group in ("train_source", "adapt"):
        for key in stages[group]["foreach"]:
            assert not any("/metrics/" in f for f in code_of(stages[group], key)), (group, key)
    for group in ("synth", "ingest", "preprocess"):
        for key in stages[group]["foreach"]:
            files = code_of(stages[group], key)
            assert not any(f.startswith(("src/siteadapt/nn/", "src/siteadapt/methods/", "src/siteadapt/metrics/"))
                           for f in files) and "src/siteadapt/train/engine.py" not in files, (group, key)
    assert "src/siteadapt/data/synth/pneumonia.py" in code_of(stages["synth"], "pneumonia")
    assert "src/siteadapt/data/synth/pneumonia.py" not in code_of(stages["synth"], "cardiac")
    report = code_of(stages["report"])
    assert "src/siteadapt/steps/report.py" in report and "src/siteadapt/methods/tunanet.py" in report
    assert not any("/metrics/" in f or f.endswith("train/engine.py") for f in report)
    every = set().union(*(code_of(st, k) for st in stages.values() for k in (st.get("foreach") or [None])))
    assert "src/siteadapt/cli.py" not in every and all((REPO / f).is_file() for f in every)
    for st in stages.values():  # every stage runs the settings loader
        assert "src/siteadapt/config.py" in st.get("do", st)["deps"]


def test_code_deps_cover_what_python_imports(stages):
    """An independent check of the scan: importing each stage's entry modules in a fresh interpreter loads no
    project module that the stage does not list (module-level imports; the functions' own are checked above)."""
    from siteadapt.methods import get_method

    sifa = get_method("sifa")
    groups = {g: [e.partition(":")[0] for e in (dvcgen.SETTINGS_ENTRY, *dvcgen.STAGE_ENTRIES[g])]
              for g in dvcgen.STAGE_ENTRIES}
    groups["adapt"].append(sifa.__module__)
    groups["synth"] = ["siteadapt.config", "siteadapt.data.synth", "siteadapt.data.synth.pneumonia"]
    script = """if 1:
        import importlib, json, sys
        out = {}
        for group, modules in json.loads(sys.argv[1]).items():
            for m in [m for m in sys.modules if m.split(".")[0] == "siteadapt"]:
                del sys.modules[m]
            for m in modules:
                importlib.import_module(m)
            out[group] = sorted(m.__file__ for n, m in list(sys.modules.items())
                                if n.split(".")[0] == "siteadapt" and getattr(m, "__file__", None))
        print(json.dumps(out))
    """
    res = subprocess.run([sys.executable, "-c", script, json.dumps(groups)], capture_output=True, text=True,
                         env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    loaded = {g: {Path(f).resolve().relative_to(REPO).as_posix() for f in files if Path(f).stat().st_size}
              for g, files in json.loads(res.stdout).items()}
    listed = {g: code_of(st, next(iter(st["foreach"]), None) if "foreach" in st else None)
              for g, st in stages.items()}
    listed["adapt"] = code_of(stages["adapt"], "cardiac_ct-sifa")
    listed["synth"] = code_of(stages["synth"], "pneumonia") | code_of(stages["synth"], "cardiac")
    for g, files in loaded.items():
        if g == "pull" and g not in listed:  # only a project with a PACS site has pull stages
            continue
        assert files <= listed[g], (g, files - listed[g])
        assert "src/siteadapt/train/engine.py" not in loaded["evaluate"]


def test_stage_entries_are_what_the_cli_commands_call():
    """STAGE_ENTRIES names the functions each stage's command imports (and so calls), so a command that starts
    calling something else makes this test fail instead of leaving that code out of dvc.yaml."""
    cli = dvcgen._Module("siteadapt.cli", SRC / "siteadapt/cli.py", SRC)
    for group, entries in dvcgen.STAGE_ENTRIES.items():
        imports, names = cli.defs[f"cmd_{group}"]
        calls = {f"{m}:{n}" for m, n in imports}
        if group == "report":  # `siteadapt report --experiments` (never in the stage) also reads DVC's experiments
            calls -= {"siteadapt.steps.ablation:dvc_experiments", "siteadapt.steps.ablation:write_experiment_tables"}
        assert calls == set(entries), group
        assert "_settings" in names  # -> SETTINGS_ENTRY
    assert "siteadapt.config:load_settings" in {f"{m}:{n}" for m, n in cli.defs["_settings"][0]}
    synth = {f"{m}:{n}" for m, n in cli.defs["cmd_synth"][0]}
    assert synth == {"siteadapt.data.synth:TASKS", "siteadapt.data.synth:synthesize"}
    body = ast.get_source_segment((SRC / "siteadapt/data/synth/__init__.py").read_text(), next(
        n for n in ast.parse((SRC / "siteadapt/data/synth/__init__.py").read_text()).body
        if isinstance(n, ast.FunctionDef) and n.name == "synthesize"))
    assert "synthesize_pneumonia(" in body and "_write_site(" in body  # the two branches SYNTH_* name


def test_scan_follows_called_functions_packages_and_relative_imports(tmp_path):
    src = tmp_path / "src"
    pkg = src / "siteadapt"
    files = {
        "__init__.py": "",
        "a.py": "import numpy\nfrom .pkg.c import f\n\n\ndef g():\n    from . import b\n    return b.h()\n\n\n"
                "def g2():\n    return g()\n\n\ndef unused():\n    from .pkg import d\n    return d\n",
        "b.py": "def h():\n    from .ns.e import x\n    return x\n\n\ndef other():\n    from . import z\n",
        "z.py": "",
        "pkg/__init__.py": "from ..y import Y\n",
        "pkg/c.py": "def f():\n    pass\n",
        "pkg/d.py": "",
        "y.py": "class Y:\n    def m(self):\n        from .z import q\n",
        "ns/e.py": "x = 1\n",  # a folder without __init__.py
    }
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    S = "siteadapt"
    assert dvcgen.code_closure([f"{S}.a"], src) == {S, f"{S}.a", f"{S}.pkg", f"{S}.pkg.c", f"{S}.y", f"{S}.z"}
    assert dvcgen.code_closure([f"{S}.a:g2"], src) == {S, f"{S}.a", f"{S}.pkg", f"{S}.pkg.c", f"{S}.y", f"{S}.z",
                                                        f"{S}.b", f"{S}.ns.e"}
    assert f"{S}.pkg.d" in dvcgen.code_closure([f"{S}.a:*"], src)
    assert dvcgen.code_closure([f"{S}.pkg.c:f"], src) == {S, f"{S}.pkg", f"{S}.pkg.c", f"{S}.y", f"{S}.z"}


def test_a_project_without_its_own_copy_of_the_code_gets_no_code_deps(tmp_path, stages):
    """dvc.yaml must not depend on where the package is imported from (editable install, wheel, PYTHONPATH): code
    dependencies name the project's src/ copy, and a folder without one gets none."""
    raw = _raw(["chestxray"])
    raw["tasks"]["chestxray"]["methods"] = ["noadapt", "sifa"]
    s = parse_settings(raw)
    bare = dvcgen.build(s, raw, tmp_path)["stages"]
    assert not any(d.startswith("src/") or "item.code" in d
                   for st in bare.values() for d in st.get("do", st).get("deps", []))
    assert "deps" not in bare["synth"]["do"]
    (tmp_path / "src").symlink_to(SRC, target_is_directory=True)  # a project with a copy (here: a link to it)
    linked = dvcgen.build(s, raw, tmp_path)["stages"]
    assert code_of(linked["adapt"], "cxr_b-sifa") == code_of(stages["adapt"], "cardiac_ct-sifa") != set()


def test_synth_stages_depend_on_the_generator_they_run(stages, tmp_path):
    """A new generator version (synthetic sites drawn differently) must re-make the sites in an existing workspace;
    the pneumonia generator is a dependency of the pneumonia synth stage only, and absent from dvc.yaml while that
    task is off (the default pipeline does not mention it)."""
    for task in ("cardiac", "chestxray", "pneumonia"):
        assert "src/siteadapt/data/synth/__init__.py" in code_of(stages["synth"], task)
    raw = _raw(["cardiac", "chestxray"])
    st = dvcgen.build(parse_settings(raw), raw, REPO)["stages"]
    assert "pneumonia" not in json.dumps(st)
    assert code_of(st["synth"], "cardiac") == code_of(stages["synth"], "cardiac")
