"""``siteadapt dvc-gen``: write dvc.yaml from params.yaml (sites, tasks' directions and methods).

Why a generator (and not hand-written ``foreach``/``matrix`` over params): the stage list is *derived* — which sites a
task has, which is a source or a target (and so which crop rule its preprocessing uses), which (target, method)
pairs exist, which methods need the trained source segmenter. DVC's templating can iterate over a list or dict that
is literally in params.yaml, but it cannot join sites with directions with methods, or pick the dependencies of a
stage from what a method needs. So this module resolves the topology in Python and writes DVC's own ``foreach``
stages, one item per site or per (target, method), keyed by name: stage names (``ingest@cardiac_ct``,
``adapt@cardiac_ct-sifa``) are stable when sites or methods are added, and each stage's ``params:`` lists only
the keys that stage reads (the site's entry, ``methods.<method>``, the task's sub-sections, the active profile's
sizes through ``${profile}``), so adding a site runs only that site's stages and the report, and changing one method's
options re-runs only that method's stages. Values that DVC's ``-S`` may change (method options, profile sizes, the
active profile) are read by DVC itself from params.yaml; the topology (sites, directions, methods lists, paths) is
baked in, and ``siteadapt dvc-gen --check`` (run by ``make demo`` and by the tests) says when dvc.yaml is stale.

Every key a stage lists must exist in params.yaml (DVC refuses missing parameters), so methods the pipeline runs need
an entry under ``methods:`` (``noadapt: {}`` for the defaults) and tasks spell out ``kind``, ``dims``,
``preprocess`` and ``postprocess``; the generator names any that is missing.

Which tasks: ``pipeline.tasks`` (default: every task with sites). A task left out has no stage in dvc.yaml; adding it
and regenerating adds only its stages (and changes the report stage), the other tasks' stages stay as they were.

Classification tasks (``kind: classification``) go through the same stage groups: their stages list ``classes``
where segmentation stages list ``structures`` (evaluation: ``kind`` instead of ``postprocess``), ingest lists the
classes (they map the labels CSV or class folders to ids), and train_source/adapt list the task's
``tasks.<task>.method_options.<method>`` entries that the method reads (see :func:`siteadapt.methods.build.
method_options`), so changing one of them re-runs only that method's stages. DVC renders one template per group, so
a params entry that differs between items is an item field (``${item.label_key}``, ``${item.p0}``, ...); an entry
all items share is written literally, which keeps dvc.yaml unchanged for pipelines without classification tasks.
Methods that learn from unlabeled target images (the GANs) also list ``profiles.${profile}.adapt_iterations``, their
schedule, so every profile needs that key once such a method is in the pipeline. A task with its own training sizes
(``tasks.<task>.profiles``) has that entry listed by its train_source and adapt stages.

Code dependencies are derived from imports, so that a change in the code re-runs the stages that run it. A stage lists
the project's files (``src/siteadapt/...``, from the project root) of the modules that :func:`code_closure` finds from
the functions its command calls (:data:`STAGE_ENTRIES`, e.g. :func:`siteadapt.steps.api.evaluate`) and the settings
loader every command calls: a static scan of ``import`` and ``from ... import`` statements (relative ones resolved) in
the module-level code of each module reached, in the bodies of the functions and classes taken from it (and of the
module's own functions they call), and in the ``__init__.py`` of every package above a module, which Python runs
first. An import inside a function counts only where that function is called: :mod:`siteadapt.steps.train` imports
the training loop (``train/engine.py``) inside its training functions, so evaluate and select, which only predict
with it, do not list the loop. Third-party packages are no dependencies, and a project without a copy of the package
(installed elsewhere) gets no code dependencies. :func:`siteadapt.methods.get_method` imports methods by name
(``importlib``, which a scan cannot follow), so each adapt and evaluate stage has its method's class (and the source
segmenter's, when the stage loads the source model) as entries of its own, a target's select stage every competing
method's and the source segmenter's, train_source the source segmenter, and the report every reported method's (its ablation table reads their options). Files all items of a
stage group list are written literally; DVC renders one deps template per group, so the others (a method's module and
what only it imports) are item fields ``${item.code}`` (``code0``, ``code1``, ... when an item has more than one; an
item with fewer repeats one of its files). ``synthesize`` hands the pneumonia task to ``synth_pneumonia`` and writes
the other tasks' sites with ``_write_site``, the entries of their synth stages. So an edit in ``metrics/`` re-runs the
evaluate stages and the select stages (whose classification evidence computes the source AUC with ``metrics.auc``), one
in ``train/engine.py`` the train_source and adapt stages, one in ``config.py`` (imported by every command) all stages.
Not listed: ``cli.py``, which holds every command (listing it would re-run the whole pipeline after an edit of any
command; its commands only parse arguments and call the entries), and files read rather than imported (the pyfunc
wrapper file that registration logs with a model).

Training checkpoints are no stage's output: DVC deletes a stage's outputs before it runs the stage, so inside a stage
the engine keeps its checkpoint in ``.siteadapt/checkpoints/<key>/`` (git-ignored; key: the run folder and the
engine's signature of the settings and data, :func:`siteadapt.train.engine.cached_checkpoint`), and a ``dvc repro``
killed in the middle of ``train_source`` or ``adapt`` resumes from it when run again. Nothing here lists that folder,
so it never makes a stage changed.

Registration: one ``select`` stage per target site (``siteadapt select --site T --register``, :mod:`siteadapt.steps.
select`) ranks every candidate method of the target (not the label-trained references) and registers the winner as the
site's ``candidate``, so the alias does not depend on which stage ran last. Its deps are the candidates' models and
evaluations (``${item.c0}``, ``${item.c1}``, ...: the number of candidates differs between targets), its params the
``registry`` section (gates and selection rule).
"""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from .config import Settings
from .errors import ConfigError
from .io.dicomweb import is_dicomweb

HEADER = """\
# GENERATED by `siteadapt dvc-gen` from params.yaml: do not edit. Change params.yaml (sites, tasks' directions and
# methods, methods.<name>, paths) and run `siteadapt dvc-gen`; `siteadapt dvc-gen --check` fails when this file is
# stale. Every stage calls the siteadapt CLI (on PATH: the project's .venv/bin, see the Makefile).
"""

PROFILE_TRAIN = ["image_size", "batch_size", "iterations", "width"]


class _Flow(dict):
    """Written in YAML flow style ({a: 1, b: 2})."""


class _FlowList(list):
    pass


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Flow, lambda d, v: d.represent_mapping("tag:yaml.org,2002:map", v.items(), flow_style=True))
_Dumper.add_representer(_FlowList, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def _rel(p: Path | str) -> str:
    s = str(p)
    return s if "://" in s else Path(s).as_posix()


# ---- code dependencies: the project's modules a stage runs -----------------------------------------------------------
# What each stage's command (siteadapt.cli.cmd_<stage>) calls, as "module:name" (a bare "module": importing it). Every
# command also loads the settings (cli._settings). cli.py itself is no dependency: see the module docstring.
SETTINGS_ENTRY = "siteadapt.config:load_settings"
STAGE_ENTRIES = {
    "pull": ("siteadapt.storage:materialize", "siteadapt.storage:is_uri"),
    "ingest": ("siteadapt.steps.api:ingest", "siteadapt.steps.api:ingest_inputs", "siteadapt.steps.api:FROM_PARAMS",
               "siteadapt.steps.ingest:explain"),
    "preprocess": ("siteadapt.steps.api:preprocess",),
    "train_source": ("siteadapt.steps.api:train_source",),
    "adapt": ("siteadapt.steps.api:adapt",),
    "evaluate": ("siteadapt.steps.api:evaluate",),
    "select": ("siteadapt.steps.api:select", "siteadapt.steps.select:MEASURE", "siteadapt.steps.select:selection_path"),
    "report": ("siteadapt.steps.api:report",),
}
# synth: data.synth.synthesize() hands the pneumonia task to data/synth/pneumonia.py and writes the other tasks' sites
# with _write_site (the one branch it takes; its own lines are in data/synth/__init__.py, which every synth stage lists)
SYNTH_ENTRIES = {"pneumonia": ("siteadapt.data.synth.pneumonia:synthesize_pneumonia",)}
SYNTH_DEFAULT = ("siteadapt.data.synth:_write_site",)
_PACKAGE = __name__.partition(".")[0]


def _module_file(module: str, src: Path) -> Path | None:
    p = src.joinpath(*module.split("."))
    for f in (p / "__init__.py", p.with_suffix(".py")):
        if f.is_file():
            return f
    return None


class _Module:
    """A parsed module: the imports its module-level code runs (``top``) and, per module-level function or class,
    the imports its body runs (a class: all its methods); with each, the names it uses (to follow calls of the
    module's own functions). An import is ``(module, name)``: name None = the module's own code (importing it),
    "*" = all of it, else the function, class or other name taken from it."""

    def __init__(self, name: str, file: Path, src: Path):
        self.name, self.src = name, src
        self.package = name if file.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(file.read_text(), str(file))
        defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
        self.defs = {st.name: self._scan([st]) for st in tree.body if isinstance(st, defs)}
        # a module bound to a name at module level is used by the functions too: its attributes in the whole file
        self.top = self._scan([st for st in tree.body if not isinstance(st, defs)], attrs=self._attrs([tree]))

    def _absolute(self, module: str | None, level: int) -> str:
        if not level:
            return module or ""
        parts = self.package.split(".")
        return ".".join(parts[:len(parts) - level + 1] + ([module] if module else []))

    @staticmethod
    def _attrs(nodes: list) -> dict[str, set[str]]:
        """name -> the attributes read on it (``tracking.connect`` -> {"tracking": {"connect"}})."""
        out: dict[str, set[str]] = {}
        for n in (n for root in nodes for n in ast.walk(root)):
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name):
                out.setdefault(n.value.id, set()).add(n.attr)
        return out

    def _scan(self, nodes: list, attrs: dict | None = None) -> tuple[set, set]:
        """(imports, names used) of ``nodes``. A module bound to a name (``from .. import tracking``, ``import a.b as
        c``) is imported as the attributes read on that name (in ``attrs``, default: in ``nodes``), or whole."""
        imports, names, bound = set(), set(), {}
        for n in (n for root in nodes for n in ast.walk(root)):
            if isinstance(n, ast.Name):
                names.add(n.id)
            elif isinstance(n, ast.Import):
                for a in n.names:
                    if a.asname:
                        bound[a.asname] = a.name
                    else:
                        imports.add((a.name, "*"))
            elif isinstance(n, ast.ImportFrom):
                base = self._absolute(n.module, n.level)
                for a in n.names:
                    sub = f"{base}.{a.name}"
                    if base.partition(".")[0] == _PACKAGE and (
                            _module_file(sub, self.src) or self.src.joinpath(*sub.split(".")).is_dir()):
                        bound[a.asname or a.name] = sub
                    else:
                        imports.add((base, a.name))
        if bound:
            attrs = self._attrs(nodes) if attrs is None else attrs
            for alias, module in bound.items():
                used = attrs.get(alias)
                imports |= {(module, a) for a in used} if used else {(module, "*")}
        return imports, names


def code_closure(entries, src: Path, _cache: dict | None = None) -> set[str]:
    """The project's modules (``siteadapt.*``) that running ``entries`` ("module:name" or "module") imports: a
    static scan of ``import`` and ``from ... import`` statements (relative ones resolved) in the module-level code of
    every module reached, in the body of every function or class called (taken by a ``from`` import, or called
    within its module), and in the packages' ``__init__.py`` above each module (Python runs them first). Imports by
    a computed name (``importlib``) are not seen: :func:`siteadapt.methods.get_method` finds methods that way, so a
    stage's method modules are entries of their own."""
    cache = {} if _cache is None else _cache
    todo = [(e.partition(":")[0], e.partition(":")[2] or None) for e in entries]
    seen, out = set(), set()
    while todo:
        node = todo.pop()
        if node in seen or node[0].partition(".")[0] != _PACKAGE:
            continue
        seen.add(node)
        name, what = node
        parts = name.split(".")
        todo += [(".".join(parts[:i]), None) for i in range(1, len(parts))]
        if name not in cache:
            f = _module_file(name, src)
            cache[name] = _Module(name, f, src) if f else None
        m = cache[name]
        if m is None:  # a folder without __init__.py (namespace package)
            continue
        out.add(name)
        if what is None:
            body = [m.top]
        else:  # a function or class runs in its module, after the module-level code
            todo.append((name, None))
            if what not in m.defs and _module_file(f"{name}.{what}", src):  # pkg.sub read as an attribute
                todo.append((f"{name}.{what}", "*"))
            body = list(m.defs.values()) if what == "*" else [m.defs[what]] if what in m.defs else []
        for imports, names in body:
            todo += list(imports) + [(name, d) for d in names if d in m.defs]
    return out


class _Code:
    """The code dependencies of stages, named relative to the project ``root``: the files of the package copy in
    ``root/src`` (the copy the project's commits version), else of the imported package when it lies under ``root``;
    none when neither (the package installed elsewhere: dvc.yaml does not depend on how it was installed)."""

    def __init__(self, root: Path):
        self.root, self.src = root.absolute(), root.absolute() / "src"
        if not (self.src / _PACKAGE / "__init__.py").is_file():
            self.root, self.src = root.resolve(), Path(__file__).resolve().parents[1]
            self.src = self.src if self.src.is_relative_to(self.root) else None
        self._cache: dict = {}

    def name(self, module: str) -> str:
        return _module_file(module, self.src).relative_to(self.root).as_posix()

    def files(self, *entries: str) -> list[str]:
        """The files of :func:`code_closure` of ``entries`` and the settings loader (every command runs it), but
        empty ones (an empty ``__init__.py`` runs nothing; DVC warns about empty dependencies at every run; once it
        gets code, dvc.yaml is stale and ``dvc-gen --check`` says so)."""
        if self.src is None:
            return []
        modules = code_closure((SETTINGS_ENTRY, *entries), self.src, self._cache)
        return sorted(self.name(m) for m in modules if _module_file(m, self.src).stat().st_size)  # empty: no code

    def method(self, cls) -> str:
        return f"{cls.__module__}:{cls.__name__}"


def _code_deps(group: dict[str, dict], files: dict[str, list[str]], first: dict[str, str] | None = None) -> list[str]:
    """The code dependencies of a ``foreach`` group, whose items share one deps template: the files every item has
    are listed literally, the others are item fields, ``${item.code}`` (``code0``, ``code1``, ... when an item has
    several; ``first[item]`` first); an item with fewer repeats one of its files (DVC records a path once)."""
    if not files or not any(files.values()):
        return []
    common = set.intersection(*(set(v) for v in files.values()))
    first = first or {}
    extra = {k: sorted(set(v) - common, key=lambda f, k=k: (f != first.get(k), f)) for k, v in files.items()}
    n = max(len(v) for v in extra.values())
    fields = ["code"] if n == 1 else [f"code{i}" for i in range(n)]
    for k, ex in extra.items():
        fill = ex[0] if ex else first.get(k, min(common))
        for i, field in enumerate(fields):
            group[k][field] = ex[i] if i < len(ex) else fill
    return sorted(common) + [f"${{item.{f}}}" for f in fields]


def _item_paths(group: dict[str, dict], field: str, paths: dict[str, list[str]]) -> list[str]:
    """Dependencies whose number differs between the items of a ``foreach`` group (a target's candidates):
    ``${item.<field>0}``, ``${item.<field>1}``, ...; an item with fewer repeats its first path (DVC records a path
    once)."""
    n = max((len(v) for v in paths.values()), default=0)
    for key in group:
        ps = paths.get(key, [])
        for i in range(n):
            group[key][f"{field}{i}"] = ps[i] if i < len(ps) else ps[0]
    return [f"${{item.{field}{i}}}" for i in range(n)]


def _has_key(raw: dict, dotted: str) -> bool:
    cur = raw
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return False
        cur = cur[part]
    return True


def _choice(group: dict[str, dict], field: str, values: dict[str, str], omit: str | None = None) -> str | None:
    """One params entry of a ``foreach`` template whose value depends on the item. DVC renders the same template for
    every item, so a value that every item shares is written literally (``None`` when it is ``omit``: nothing to
    list), and otherwise each item carries it as ``field`` and the template says ``${item.<field>}``."""
    distinct = set(values.values())
    if len(distinct) <= 1:
        v = next(iter(distinct), omit)
        return None if v == omit else v
    for key, v in values.items():
        group[key][field] = v
    return f"${{item.{field}}}"


def _extras(group: dict[str, dict], field: str, extras: dict[str, list[str]], filler: dict[str, str]) -> list[str]:
    """Params keys that only some items of a ``foreach`` group read (e.g. a classification task's per-task method
    options): ``${item.<field>0}``, ``${item.<field>1}``, ... in the template; an item with fewer keys repeats
    ``filler[item]``, a key its stage lists anyway (DVC records a repeated key once). Nothing when no item has any."""
    n = max((len(v) for v in extras.values()), default=0)
    out = []
    for i in range(n):
        for key in group:
            ks = extras.get(key, [])
            group[key][f"{field}{i}"] = ks[i] if i < len(ks) else filler[key]
        out.append(f"${{item.{field}{i}}}")
    return out


def build(settings: Settings, raw: dict, root: str | Path = ".") -> dict:
    """The dvc.yaml content as a dict (``stages`` and ``plots``), for the tasks of ``pipeline.tasks``."""
    from .methods import get_method
    from .methods.build import build_method, method_options

    s, root = settings, Path(root)
    P = s.paths
    code = _Code(root)
    code_files: dict[str, dict[str, list[str]]] = {g: {} for g in ("synth", "adapt", "evaluate", "select")}
    method_file: dict[str, str] = {}  # (target, method) -> the method's own module, its items' first code field
    report_methods: list[str] = []
    missing: list[str] = []

    def need(*keys: str) -> None:
        for k in keys:
            if not _has_key(raw, k) and k not in missing:
                missing.append(k)

    def need_profiles(key: str) -> None:  # a profile key listed as profiles.${profile}.<key>: every profile needs it
        for name in (raw.get("profiles") or {}):
            need(f"profiles.{name}.{key}")

    need("seed", "profile", "train", "methods")
    prof = ["profile"] + [f"profiles.${{profile}}.{k}" for k in PROFILE_TRAIN]
    tasks = s.pipeline_tasks()
    kind = {t: s.tasks[t].kind for t in tasks}
    # what a task's stages read about its labels: segmentation structures (and post-processing), or classes
    labels_key = {t: "classes" if kind[t] == "classification" else "structures" for t in tasks}
    evaluation_key = {t: "kind" if kind[t] == "classification" else "postprocess" for t in tasks}

    # ---- synth: one stage per task that has synthetic sites ------------------------------------------------------
    synth = {}
    for name, site in s.sites.items():
        if site.synthetic and site.task in tasks:
            t = site.synthetic.split("/")[0]
            count = "synth_subjects" if t == "cardiac" else (
                "synth_images_classification" if t in s.tasks and s.tasks[t].kind == "classification"
                else "synth_images")
            synth[t] = _Flow(count=count)
            code_files["synth"][t] = code.files(*SYNTH_ENTRIES.get(t, SYNTH_DEFAULT))
            need_profiles(count)
    # ---- ingest / preprocess: one stage per site ---------------------------------------------------------------------
    ingest, prep, pull = {}, {}, {}
    ingest_extra: dict[str, list[str]] = {}
    for name, site in s.sites.items():
        if site.task not in tasks:
            continue
        images = _rel(site.images)
        if is_dicomweb(str(site.images)):  # a PACS: the pull stage mirrors it, ingest reads the mirror
            images = _rel(P.remote / name / "images")
            pull[name] = _Flow(mirror=_rel(P.remote / name))
        ingest[name] = _Flow(images=images, labels=_rel(site.labels) if site.labels else images,
                             patients=_rel(site.patients) if site.patients else images)
        # the label values a site may hold: class names (labels CSV / class folders) or the structures' ids
        ingest_extra[name] = [f"tasks.{site.task}." + ("classes" if kind[site.task] == "classification"
                                                        else "structures")]
        prep[name] = _Flow(task=site.task, roi_rule=s.roi_rule(name))
        need(f"sites.{name}")
    for t in tasks:
        need(f"tasks.{t}.kind", f"tasks.{t}.dims", f"tasks.{t}.{labels_key[t]}", f"tasks.{t}.preprocess",
             f"tasks.{t}.{evaluation_key[t]}")
    # ---- train_source: one per source site; adapt / evaluate: one per (target, method); select: one per target ------
    train_src, adapt, evaluate, select = {}, {}, {}, {}
    select_paths: dict[str, list[str]] = {}  # per target: its candidates' models and metrics files
    select_runs: dict[str, list[str]] = {}  # per target: the method classes select loads (and the source's)
    src_extra: dict[str, list[str]] = {}
    adapt_extra: dict[str, list[str]] = {}
    schedule: dict[str, str] = {}
    seen_targets: dict[str, str] = {}
    plots: list = []
    src_cls = get_method("source")
    for t in tasks:
        task = s.tasks[t]
        own_sizes = [f"tasks.{t}.profiles"] if task.profiles else []  # the task's own training sizes
        for d in task.directions:
            if d.target in seen_targets and seen_targets[d.target] != d.source:
                raise ConfigError(f"tasks.{t}.directions: two directions end at {d.target!r} (from "
                                  f"{seen_targets[d.target]!r} and {d.source!r}); a pipeline keeps one model per "
                                  "(target, method): add the target site twice under different names")
            seen_targets[d.target] = d.source
            src_model = _rel(P.models / t / d.source / "source")
            if d.source not in train_src:
                train_src[d.source] = _Flow(task=t)
                src_extra[d.source] = method_options(s, "source", d.source)[2][1:]  # the task's method_options
                src_extra[d.source] += own_sizes
                need("methods.source", *src_extra[d.source])
                plots.append({f"{src_model}/losses.csv": {"x": "iteration"}})
            for m in task.methods:
                method = build_method(s, m, d.target)  # validates the options; tells what the method needs
                key = f"{d.target}-{m}"
                uses_source = bool(method.needs_source_model)
                prepared_t = _rel(P.prepared / d.target)
                adapt[key] = _Flow(task=t, target=d.target, source=d.source, method=m,
                                   source_model=src_model if uses_source else prepared_t)
                # the method's module (and the source segmenter's, when the stage loads it): found by name at run
                # time (get_method), so entries of their own
                runs = [code.method(type(method))] + ([code.method(src_cls)] if uses_source else [])
                report_methods.append(code.method(type(method)))
                if code.src is not None:
                    method_file[key] = code.name(type(method).__module__)
                for g in ("adapt", "evaluate"):
                    code_files[g][key] = code.files(*STAGE_ENTRIES[g], *runs)
                adapt_extra[key] = method_options(s, m, d.target)[2][1:] + own_sizes
                # methods that learn from unlabeled target images train on the profile's adaptation schedule
                schedule[key] = ("adapt_iterations" if method.trains and method.needs_target_images
                                 and not method.trains_on_target_labels else "iterations")
                if schedule[key] == "adapt_iterations":
                    need_profiles("adapt_iterations")
                evaluate[key] = _Flow(task=t, target=d.target, method=m,
                                      source_model=src_model if uses_source else prepared_t)
                if not method.trains_on_target_labels:  # upper-bound references are never candidates
                    select.setdefault(d.target, _Flow(task=t, source=d.source))
                    select_paths.setdefault(d.target, []).extend(
                        [_rel(P.models / t / d.target / m), _rel(P.metrics / t / d.target / f"{m}.json")])
                    select_runs.setdefault(d.target, [code.method(src_cls)]).append(code.method(type(method)))
                need(f"methods.{m}", *adapt_extra[key])
                if method.trains:
                    plots.append({_rel(P.models / t / d.target / m / "losses.csv"): {"x": "iteration"}})
    if missing:
        raise ConfigError("params.yaml: dvc.yaml needs these keys to exist (DVC refuses missing parameters): "
                          + ", ".join(missing) + ". Add them (e.g. `methods: {noadapt: {}}` for a method's defaults).")

    def labels(group: dict) -> str:
        return "tasks.${item.task}." + _choice(group, "label_key",
                                               {k: labels_key[it["task"]] for k, it in group.items()})

    stages: dict = {}
    if synth:
        gen = _code_deps(synth, code_files["synth"])  # a new generator version re-makes the sites
        stages["synth"] = {"foreach": synth, "do": {
            "cmd": "siteadapt synth --task ${key}",
            **({"deps": gen} if gen else {}),
            "params": _FlowList(["seed", "profile", "profiles.${profile}.synth_scale",
                                 "profiles.${profile}.${item.count}"]),
            "outs": [_rel(P.raw) + "/${key}"]}}
    if pull:  # a PACS is asked for new series at every `dvc repro`; the mirror changes only when some arrived
        stages["pull"] = {"foreach": pull, "do": {
            "cmd": "siteadapt pull --site ${key}",
            "deps": code.files(*STAGE_ENTRIES["pull"]),
            "params": ["sites.${key}"],
            "outs": [{"${item.mirror}": {"cache": False, "persist": True}}],
            "always_changed": True}}
    stages["ingest"] = {"foreach": ingest, "do": {
        "cmd": "siteadapt ingest --site ${key}",
        "deps": ["${item.images}", "${item.labels}", "${item.patients}", *code.files(*STAGE_ENTRIES["ingest"])],
        "params": _FlowList(["sites.${key}", *_extras(ingest, "p", ingest_extra,
                                                      {n: f"sites.{n}" for n in ingest})]),
        "outs": [_rel(P.ingested) + "/${key}"]}}
    stages["preprocess"] = {"foreach": prep, "do": {
        "cmd": "siteadapt preprocess --site ${key} --roi-rule ${item.roi_rule}",
        "deps": [_rel(P.ingested) + "/${key}", *code.files(*STAGE_ENTRIES["preprocess"])],
        "params": _FlowList(["seed", "sites.${key}", "tasks.${item.task}.dims", labels(prep),
                             "tasks.${item.task}.preprocess", "profile", "profiles.${profile}.image_size",
                             "profiles.${profile}.slice_spacing_mm"]),
        "outs": [_rel(P.prepared) + "/${key}"]}}
    if train_src:
        extra = _extras(train_src, "p", src_extra, {n: "methods.source" for n in train_src})
        stages["train_source"] = {"foreach": train_src, "do": {
            "cmd": "siteadapt train-source --site ${key}",
            "deps": [_rel(P.prepared) + "/${key}",
                     *code.files(*STAGE_ENTRIES["train_source"], code.method(src_cls))],
            "params": _FlowList(["seed", "train", "methods.source", *extra, "tasks.${item.task}.kind",
                                 labels(train_src), *prof]),
            "outs": [_rel(P.models) + "/${item.task}/${key}/source"]}}
    if adapt:
        extra = _extras(adapt, "p", adapt_extra, {k: f"methods.{it['method']}" for k, it in adapt.items()})
        sched = _choice(adapt, "schedule", schedule, omit="iterations")
        stages["adapt"] = {"foreach": adapt, "do": {
            "cmd": "siteadapt adapt --site ${item.target} --method ${item.method} --source ${item.source}",
            "deps": [_rel(P.prepared) + "/${item.source}", _rel(P.prepared) + "/${item.target}",
                     "${item.source_model}", *_code_deps(adapt, code_files["adapt"], method_file)],
            "params": _FlowList(["seed", "train", "methods.${item.method}", *extra, "tasks.${item.task}.kind",
                                 labels(adapt), *prof] + ([f"profiles.${{profile}}.{sched}"] if sched else [])),
            "outs": [_rel(P.models) + "/${item.task}/${item.target}/${item.method}"]}}
        # evaluate writes predictions (label maps, or class scores), overlays (segmentation: image | reference |
        # prediction per subject; classification: examples.png, test images with their scores) and the metrics file
        ev_key = _choice(evaluate, "evaluation", {k: evaluation_key[it["task"]] for k, it in evaluate.items()})
        stages["evaluate"] = {"foreach": evaluate, "do": {
            "cmd": "siteadapt evaluate --site ${item.target} --method ${item.method} --predict",
            "deps": [_rel(P.models) + "/${item.task}/${item.target}/${item.method}",
                     _rel(P.prepared) + "/${item.target}", _rel(P.ingested) + "/${item.target}",
                     "${item.source_model}", *_code_deps(evaluate, code_files["evaluate"], method_file)],
            "params": _FlowList(["seed", labels(evaluate), "tasks.${item.task}." + ev_key]),
            "outs": [_rel(P.predictions) + "/${item.target}/${item.method}",
                     _rel(P.reports) + "/${item.task}/overlays/${item.target}/${item.method}"],
            "metrics": [{_rel(P.metrics) + "/${item.task}/${item.target}/${item.method}.json": {"cache": False}}]}}
    if select:
        # one candidate choice per target (steps/select.py): every adapted model and its evaluation compete; the
        # winner is registered (alias candidate) with the evidence as tags
        for target in select:
            code_files["select"][target] = code.files(*STAGE_ENTRIES["select"], *dict.fromkeys(select_runs[target]))
        stages["select"] = {"foreach": select, "do": {
            "cmd": "siteadapt select --site ${key} --register",
            "deps": [_rel(P.prepared) + "/${item.source}", _rel(P.prepared) + "/${key}",
                     _rel(P.models) + "/${item.task}/${item.source}/source",
                     *_item_paths(select, "c", select_paths), *_code_deps(select, code_files["select"])],
            "params": _FlowList(["seed", "registry"]),
            "outs": [{_rel(P.registry) + "/${item.task}/${key}/selection.json": {"cache": False}}]}}
    report_tasks = [t for t in tasks if s.tasks[t].directions and s.tasks[t].methods]
    if report_tasks:
        deps = []
        for key, it in evaluate.items():
            deps.append(_rel(P.metrics / it["task"] / it["target"] / f"{it['method']}.json"))
            deps.append(_rel(P.models / it["task"] / it["target"] / it["method"]))
            deps.append(_rel(P.reports / it["task"] / "overlays" / it["target"] / it["method"]))
        for src, it in train_src.items():
            deps.append(_rel(P.models / it["task"] / src / "source"))
        # the ablation table reads each reported method's options and defaults (get_method: its module by name)
        deps += code.files(*STAGE_ENTRIES["report"], *dict.fromkeys(report_methods))
        outs = []
        for t in report_tasks:
            base = _rel(P.reports / t)
            outs += [f"{base}/table.md", f"{base}/table.csv", f"{base}/table.tex", f"{base}/ablation.md",
                     f"{base}/figures"]
        # the ablation table lists each variant's options as they ran (with the task's method_options)
        need_keys = [f"tasks.{t}.dims" for t in report_tasks] + ["methods"] + [
            f"tasks.{t}.method_options" for t in report_tasks if _has_key(raw, f"tasks.{t}.method_options")]
        stages["report"] = {"cmd": "siteadapt report", "deps": deps, "params": _FlowList(need_keys), "outs": outs}
        plots += [_rel(P.reports / t / "figures") for t in report_tasks]
    return {"stages": stages, "plots": plots}


def render(settings: Settings, raw: dict, root: str | Path = ".") -> str:
    return HEADER + yaml.dump(build(settings, raw, root), Dumper=_Dumper, sort_keys=False, width=118,
                              default_flow_style=False)


def load_raw(params: str | Path) -> dict:
    return yaml.safe_load(Path(params).read_text()) or {}


def write(settings: Settings, params: str | Path, out: str | Path = "dvc.yaml") -> bool:
    """Write dvc.yaml; returns True when its content changed."""
    from .io.atomic import write_text

    root = Path(out).resolve().parent
    text = render(settings, load_raw(params), root)
    out = Path(out)
    if out.is_file() and out.read_text() == text:
        return False
    write_text(out, text)
    return True


def check(settings: Settings, params: str | Path, out: str | Path = "dvc.yaml") -> str | None:
    """None when dvc.yaml is what params.yaml gives; otherwise a message saying what to run."""
    out = Path(out)
    text = render(settings, load_raw(params), out.resolve().parent)
    if not out.is_file():
        return f"{out} is missing: run `siteadapt dvc-gen`"
    if out.read_text() != text:
        return f"{out} is out of date with {params}: run `siteadapt dvc-gen` (and commit dvc.yaml)"
    return None

