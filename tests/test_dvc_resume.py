"""Issue 27 item 7: a ``dvc repro`` killed in the middle of an adapt stage resumes from its last checkpoint.

DVC deletes a stage's outputs before it runs the stage, so a checkpoint in the model folder would be gone; inside a
stage the engine keeps it in ``.siteadapt/checkpoints/<key>/`` (git-ignored, no stage's dependency or output). Two
copies of one tiny DVC project (chest X-ray, 32 px, the data stages reproduced once and copied): in one the adapt
stage runs uninterrupted, in the other its ``dvc repro`` is killed (SIGKILL to the whole process group, DVC and the
stage's command) once a checkpoint past the middle of the schedule exists, then ``dvc repro`` runs again. The second
run resumes from the killed run's checkpoint and ends with the uninterrupted run's weights, loss curve and a clean
``dvc status``; the cache entry is deleted once the model is written.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

import dvc_project as dp
from helpers.engine import CTX, slices, state_copy

METHOD = "dann"  # learns from unlabeled target images: two data digests in the key, several optimizers to resume
STAGE = f"adapt@cxr_b-{METHOD}"
ITERATIONS, EVERY = 240, 20
ENV = {"SITEADAPT_TRACKING": "off", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _params() -> dict:
    p = dp.tiny_params(methods=[METHOD])
    p["methods"].setdefault(METHOD, {})
    p["profiles"]["test"].update(iterations=ITERATIONS, adapt_iterations=ITERATIONS)
    p["train"].update(checkpoint_every=EVERY, log_every=EVERY, device="cpu", threads=1)
    return p


def _repro(root: Path) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    res = dp.dvc("repro", STAGE, cwd=root, extra_env=ENV)
    return res, time.perf_counter() - t0


def _model(root: Path) -> Path:
    return root / "models/chestxray/cxr_b" / METHOD


def _curve_iterations(path: Path) -> list[int]:
    return [int(line.split(",")[0]) for line in path.read_text().splitlines()[1:] if line]


def _last_row(path: Path) -> int:
    try:
        rows = _curve_iterations(path)
    except (OSError, ValueError, IndexError):
        return 0
    return rows[-1] if rows else 0


def _kill_after_half(root: Path, timeout: float = 120) -> tuple[str, float]:
    """``dvc repro`` of the stage in its own process group, killed (SIGKILL) once the cached curve (copied there
    just before each checkpoint) reaches half the schedule. Returns the killed run's output and its seconds."""
    cache = root / ".siteadapt" / "checkpoints"
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(dp.BIN / "dvc"), "repro", STAGE], cwd=root, env=dp.env(ENV, root),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        while time.perf_counter() - t0 < timeout:
            if proc.poll() is not None:
                raise AssertionError("the stage finished before it could be killed:\n" + proc.stdout.read()[-3000:])
            if any(_last_row(c) >= ITERATIONS // 2 for c in cache.glob("*/losses.csv")):
                break
            time.sleep(0.02)
        else:
            raise AssertionError("no checkpoint past the middle of the schedule in time")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate()[0]
    return out, time.perf_counter() - t0


def test_cached_checkpoint_survives_the_run_folder_and_is_released(tmp_path, caplog):
    """The engine with a checkpoint cache: stopped after iteration 4 (checkpoint 4), its run folder deleted (as DVC
    deletes a stage's outputs), run again: resumes at 4 with the curve up to 4 restored, ends with an uninterrupted
    run's weights; releasing the run folder deletes its entry (and a stale one of other settings), not another
    folder's."""
    from siteadapt.methods import get_method
    from siteadapt.train.engine import TrainConfig, cached_checkpoint, fit, release_checkpoints, signature

    cache = tmp_path / "project" / ".siteadapt" / "checkpoints"
    run = tmp_path / "project" / "models" / "run"
    src, cls = slices(), get_method("source")
    cfg = TrainConfig(iterations=6, batch_size=2, seed=3, checkpoint_every=2, log_every=2, device="cpu")
    torch.manual_seed(0)
    whole = cls(CTX)
    fit(whole, src, None, cfg, tmp_path / "whole")
    torch.manual_seed(0)
    fit(cls(CTX), src, None, cfg, run, stop_after=4, checkpoint_cache=cache)
    assert not (run / "checkpoint.pt").exists()
    (entry,) = [p.parent for p in cache.glob("*/checkpoint.pt")]
    assert json.loads((entry / "run.json").read_text())["run"] == "models/run"  # relative to the project
    torch.manual_seed(0)
    assert entry / "checkpoint.pt" == cached_checkpoint(cache, run, signature(cls(CTX), src, None, cfg))
    shutil.rmtree(run)  # what DVC does to a stage's outputs before it runs the stage

    stale = cache / "stale"  # an entry of the same run folder with other settings, never resumed
    stale.mkdir(parents=True)
    (stale / "run.json").write_text(json.dumps({"run": "models/run"}))
    other = cache / "other"
    other.mkdir()
    (other / "run.json").write_text(json.dumps({"run": "models/other"}))

    caplog.set_level("INFO", logger="siteadapt.train")
    torch.manual_seed(123)
    resumed = cls(CTX)
    summary = fit(resumed, src, None, cfg, run, checkpoint_cache=cache)
    assert "resuming source from iteration 4" in caplog.text and summary["iterations"] == 6
    assert [int(r.split(",")[0]) for r in (run / "losses.csv").read_text().splitlines()[1:]] == [2, 4, 6]
    sw, sr = state_copy(whole), state_copy(resumed)
    assert sw.keys() == sr.keys() and all(torch.equal(sw[k], sr[k]) for k in sw)

    assert release_checkpoints(cache, run) == 2  # this settings' entry and the stale one
    assert sorted(p.name for p in cache.iterdir()) == ["other"]
    assert release_checkpoints(tmp_path / "nowhere", run) == 0
    other_seed = TrainConfig(**{**cfg.__dict__, "seed": 4})
    assert cached_checkpoint(cache, run, signature(resumed, src, None, other_seed)) != entry / "checkpoint.pt"
    assert cached_checkpoint(cache, tmp_path / "project/models/b", signature(resumed, src, None, cfg)) != \
        entry / "checkpoint.pt"


def test_checkpoints_go_to_the_cache_only_inside_a_dvc_stage(tmp_path, monkeypatch):
    from siteadapt.steps.train import checkpoint_cache

    monkeypatch.delenv("DVC_STAGE", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert checkpoint_cache() is None  # CLI, Kubeflow: the model folder (Kubeflow restores its checkpoint there)
    monkeypatch.setenv("DVC_STAGE", "adapt@cxr_b-dann")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert checkpoint_cache() == tmp_path / ".siteadapt" / "checkpoints"


@pytest.mark.slow
def test_killed_dvc_repro_resumes_adapt_and_ends_with_the_uninterrupted_weights(tmp_path):
    killed = dp.make_project(tmp_path / "killed", _params())
    dp.dvc("repro", "preprocess", cwd=killed, extra_env=ENV)  # the data stages once, for both projects
    whole = tmp_path / "whole"
    shutil.copytree(killed, whole, symlinks=True)

    res, whole_s = _repro(whole)
    assert dp.ran_stages(res.stdout) == [STAGE]
    assert "resuming" not in res.stderr

    out, killed_s = _kill_after_half(killed)
    (ckpt,) = (killed / ".siteadapt" / "checkpoints").glob("*/checkpoint.pt")
    step = int(torch.load(ckpt, map_location="cpu", weights_only=False)["step"])
    assert ITERATIONS // 2 - EVERY <= step < ITERATIONS and step % EVERY == 0  # killed mid-adapt, after a checkpoint
    assert not (_model(killed) / "model.pt").exists()

    res, resumed_s = _repro(killed)
    assert dp.ran_stages(res.stdout) == [STAGE]
    assert f"resuming {METHOD} from iteration {step}" in res.stderr, res.stderr[-3000:]
    # the resumed run trained only the rest of the schedule
    assert f"[{METHOD}] {step}/{ITERATIONS}" not in res.stderr
    assert f"[{METHOD}] {step + EVERY}/{ITERATIONS}" in res.stderr

    a = torch.load(_model(killed) / "model.pt", map_location="cpu", weights_only=False)
    b = torch.load(_model(whole) / "model.pt", map_location="cpu", weights_only=False)
    assert a["summary"]["iterations"] == b["summary"]["iterations"] == ITERATIONS
    assert a["state_dict"].keys() == b["state_dict"].keys() and len(a["state_dict"]) > 0
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k  # exact on the CPU, one thread
    # the loss curve (a DVC plot) has every point once, up to the checkpoint from the cache, the rest from the run
    want = list(range(EVERY, ITERATIONS + 1, EVERY))
    assert _curve_iterations(_model(killed) / "losses.csv") == _curve_iterations(_model(whole) / "losses.csv") == want

    # the model is written: the cache entry is gone; the cache is neither a stage's dependency nor output, nor in git
    assert list((killed / ".siteadapt" / "checkpoints").iterdir()) == []
    assert dp.dvc("status", STAGE, cwd=killed).stdout.strip().endswith("Data and pipelines are up to date.")
    assert ".siteadapt" not in dp.run(["git", "status", "--porcelain", "--ignored=no"], killed).stdout
    print(f"\nuninterrupted {whole_s:.1f} s; killed at iteration {step} after {killed_s:.1f} s; "
          f"resumed run {resumed_s:.1f} s (saved {whole_s - resumed_s:.1f} s)")
