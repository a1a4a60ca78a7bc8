"""``siteadapt watch``: one site-adaptation run per new site under a prefix, exactly once.

A hospital uploads a site as ``<prefix>/<site>/images/...`` (and optionally ``labels/`` for evaluation and a
``site.yaml`` with facts the images cannot carry). The watcher polls the prefix; for each sub-prefix it has not handled
it submits one pipeline run through a :class:`~siteadapt.kfp.submit.Submitter` and remembers it in a state file
(a local path or an ``s3://`` object), so that a restarted watcher never submits a site again.

When is a site ready?
    Uploads take time. With ``marker`` set, a site is ready once ``<site>/<marker>`` exists (the uploader writes it
    last). With ``settle_s`` > 0, a site is ready once its listing (names, sizes, ETags) has not changed for that
    long, seen on two polls. With neither, a site is submitted on the poll that first sees it.

Exactly once
    Before submitting, the site is recorded as ``submitting`` with its run name (``siteadapt-<site>-<data digest>``);
    after, as ``submitted`` with the run id. A watcher that died in between finds a ``submitting`` site on restart: it
    asks the submitter whether a run of that name exists (a KFP server can tell) and records it, or submits it if the
    server has none. A submitter that cannot look runs up (the local runner) leaves such a site alone and logs it.
    A local run that fails is recorded as ``failed``. Neither is retried by itself: ``--resubmit SITE`` forgets a
    site deliberately, and a site whose files change after its run is not run again either.

``site.yaml`` (optional, in the site's folder) may set ``task``, ``source_site``, ``source_uri``, ``methods``,
``modality`` and ``pixel_spacing_mm``; anything else is refused (the site is recorded as ``invalid`` with the reason,
and not retried until its files change).

A PACS as the source
    With ``prefix`` a DICOMweb site URI (``dicomweb+http(s)://host/dicom-web?Modality=CT&...``, see
    :mod:`siteadapt.io.dicomweb`) the watcher serves one site, ``site``: each poll asks the PACS (QIDO-RS) for the
    studies matching the query. When the site has none on record and the study set is not empty (and ready: ``settle_s``
    applies to the study set; ``marker`` does not), the matching series are pulled (WADO-RS, exactly once) into
    ``<stage>/<site>/images/`` (``stage`` a folder or ``s3://`` prefix) and one run is submitted for that location, as
    for an uploaded site. The state records the digest of the series set (keyed hashes with each series' instance
    count, no UIDs), so a series still receiving instances restarts ``settle_s``; a pull whose stability window
    defers a series, or that ends incomplete, submits nothing and the next poll resumes it. Studies stored later
    do not trigger another run of the same site (``--resubmit SITE`` does). The run also gets the source URI as its
    ``pacs_uri``: once the run promotes a champion, its segmentations are stored back to that PACS as DICOM SEG.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..errors import ConfigError, SiteadaptError
from . import locations
from .runtime import check_site_name
from .submit import Submitter

log = logging.getLogger("siteadapt.watch")

STATE_VERSION = 1
SITE_YAML_KEYS = {"task": "task", "source_site": "source_site", "source_uri": "source_uri", "methods": "methods",
                  "modality": "target_modality", "pixel_spacing_mm": "target_pixel_spacing_mm"}


def _digest(entries: list[locations.Entry]) -> str:
    h = hashlib.sha256()
    for e in entries:
        h.update(f"{e.rel}\0{e.size}\0{e.tag}\n".encode())
    return h.hexdigest()


@dataclass
class Watcher:
    prefix: str
    state_uri: str
    submitter: Submitter
    defaults: dict[str, Any] = field(default_factory=dict)
    """Pipeline arguments common to every site (task, source_site, source_uri, methods, profile, ...)."""
    marker: str | None = None
    settle_s: float = 0.0
    clock: Any = time.time
    site: str | None = None
    """DICOMweb source only: the name of the site its studies form."""
    stage: str | None = None
    """DICOMweb source only: folder or ``s3://`` prefix that receives ``<site>/images/`` for the run."""

    def __post_init__(self):
        from ..io.dicomweb import is_dicomweb

        self.pacs = is_dicomweb(self.prefix)
        if self.pacs and not (self.site and self.stage):
            raise ConfigError(f"{self.prefix}: a DICOMweb source needs the site name and a stage location (--site, "
                              "--stage)")
        self.prefix = locations.as_prefix(self.prefix) if locations.is_s3(self.prefix) else self.prefix
        self.state = self._load()
        self._warned: set[str] = set()

    # ---- state ---------------------------------------------------------------------------------------------------
    def _load(self) -> dict:
        text = locations.read_text(self.state_uri)
        if text is None:
            return {"version": STATE_VERSION, "prefix": self.prefix, "sites": {}}
        state = json.loads(text)
        if state.get("version") != STATE_VERSION:
            raise ConfigError(f"{self.state_uri}: watcher state version {state.get('version')} is not "
                              f"{STATE_VERSION}")
        if state.get("prefix") != self.prefix:
            raise ConfigError(f"{self.state_uri}: state of prefix {state.get('prefix')!r}, not {self.prefix!r} "
                              "(use one state file per prefix)")
        return state

    def _save(self) -> None:
        locations.write_text(self.state_uri, json.dumps(self.state, indent=2, sort_keys=True) + "\n")

    @property
    def sites(self) -> dict[str, dict]:
        return self.state["sites"]

    # ---- one poll ------------------------------------------------------------------------------------------------
    def arguments_for(self, site: str, location: str) -> dict[str, Any]:
        args = {**self.defaults, "site": site, "target_uri": location}
        text = locations.read_text(locations.child(location, "site.yaml"))
        if text:
            extra = yaml.safe_load(text) or {}
            if not isinstance(extra, dict):
                raise ConfigError(f"{site}/site.yaml: expected a mapping")
            unknown = sorted(set(extra) - set(SITE_YAML_KEYS))
            if unknown:
                raise ConfigError(f"{site}/site.yaml: unknown key(s) {', '.join(unknown)} (allowed: "
                                  f"{', '.join(SITE_YAML_KEYS)})")
            for k, v in extra.items():
                args[SITE_YAML_KEYS[k]] = v
        missing = [k for k in ("task", "source_site", "source_uri") if not args.get(k)]
        if missing:
            raise ConfigError(f"{site}: no {', '.join(missing)} (pass them to the watcher or put them in site.yaml)")
        return args

    def _submit(self, site: str, rec: dict) -> bool:
        rec.update(state="submitting", since=self.clock())
        self._save()  # the intent is on record before the run exists
        try:
            run_id = self.submitter.submit(rec["run_name"], rec["arguments"])
        except Exception as e:  # noqa: BLE001 (one site's failure must not stop the others)
            if self.submitter.can_find:  # maybe created anyway (a timeout after the server accepted it)
                log.error("site %s: submission failed (%s); the next poll checks whether the run exists", site, e)
            else:  # the local runner ran it, and it failed: it is not run again by itself
                rec.update(state="failed", error=str(e)[-2000:], failed_at=self.clock())
                self._save()
                log.error("site %s: run %s failed: %s (use --resubmit %s to run it again)", site, rec["run_name"],
                          e, site)
            return False
        rec.update(state="submitted", run_id=run_id, submitted_at=self.clock())
        self._save()
        log.info("site %s: submitted run %s (%s)", site, run_id, rec["run_name"])
        return True

    def recover(self) -> list[str]:
        """Settle sites left ``submitting`` by a watcher that stopped mid-submission. Returns the sites recorded."""
        done = []
        for site, rec in sorted(self.sites.items()):
            if rec.get("state") != "submitting":
                continue
            if not self.submitter.can_find:
                if site in self._warned:
                    continue
                self._warned.add(site)
                log.warning("site %s: a previous watcher stopped while submitting %s; this submitter cannot check "
                            "whether the run exists, so it is not resubmitted (use --resubmit %s)", site,
                            rec["run_name"], site)
                continue
            run_id = self.submitter.find(rec["run_name"])
            if run_id:
                rec.update(state="submitted", run_id=run_id, submitted_at=self.clock())
                self._save()
                log.info("site %s: found run %s of the interrupted submission", site, run_id)
            else:
                self._submit(site, rec)
            done.append(site)
        return done

    def _stage_pacs_site(self) -> str | None:
        """Pull the PACS site's series into ``<stage>/<site>/images`` (exactly once per series); the location, or
        None while the pull's stability window defers a series still changing (a later poll stages it). A pull that
        ends incomplete raises (exit code 7's error): nothing is uploaded or submitted, the next poll resumes it."""
        from pathlib import Path

        from ..io.dicomweb import pull
        from ..storage import is_uri, upload

        local = Path(".siteadapt") / "watch-stage" / self.site if is_uri(self.stage) else Path(self.stage) / self.site
        res = pull(self.prefix, local / "images")  # git-ignored .siteadapt/ beside the keys for an s3:// stage
        if res.get("deferred_series"):
            log.info("site %s: %d series still changing on the PACS; not submitted yet", self.site,
                     res["deferred_series"])
            return None
        if is_uri(self.stage):
            location = locations.join(self.stage, self.site)
            upload(local, location)
            return location
        return str(local)

    def _poll_pacs(self) -> list[str]:
        from ..io.dicomweb import series_state

        site, rec = self.site, self.sites.get(self.site)
        if rec and rec.get("state") in ("submitting", "submitted", "failed"):
            return []
        entries = series_state(self.prefix)  # study/series hashes with instance counts: growth reads as a change
        studies = sorted({e.split("/", 1)[0] for e in entries})
        if not studies:
            return []
        digest = hashlib.sha256("\n".join(entries).encode()).hexdigest()
        if rec and rec.get("state") == "invalid" and rec.get("digest") == digest:
            return []
        if self.settle_s > 0:
            now = self.clock()
            if not rec or rec.get("state") != "pending" or rec.get("digest") != digest:
                self.sites[site] = {"state": "pending", "digest": digest, "seen": now}
                self._save()
                return []
            if now - rec["seen"] < self.settle_s:
                return []
        try:
            check_site_name(site)
            missing = [k for k in ("task", "source_site", "source_uri") if not self.defaults.get(k)]
            if missing:
                raise ConfigError(f"{site}: no {', '.join(missing)} (pass them to the watcher)")
        except SiteadaptError as e:
            log.error("site %s: not submitted: %s", site, e)
            self.sites[site] = {"state": "invalid", "reason": str(e), "digest": digest}
            self._save()
            return []
        # a PACS or object store failing here propagates: run() logs it and the next poll tries again
        target = self._stage_pacs_site()
        if target is None:
            return []
        args = {**self.defaults, "site": site, "target_uri": target, "pacs_uri": self.prefix}
        rec = self.sites[site] = {"state": "new", "digest": digest, "studies": len(studies), "arguments": args,
                                  "run_name": f"siteadapt-{site}-{digest[:8]}"}
        return [site] if self._submit(site, rec) else []

    def poll(self) -> list[str]:
        """List the prefix once; submit every site that is new and ready. Returns the sites submitted."""
        if self.pacs:
            return self._poll_pacs()
        submitted = []
        for site in locations.list_sites(self.prefix):
            rec = self.sites.get(site)
            if rec and rec.get("state") in ("submitting", "submitted", "failed"):
                continue
            location = locations.join(self.prefix, site)
            entries = locations.list_files(location)
            if not entries:
                continue
            digest = _digest(entries)
            if rec and rec.get("state") == "invalid" and rec.get("digest") == digest:
                continue  # refused before and unchanged since
            if self.marker and not any(e.rel == self.marker for e in entries):
                continue
            if self.settle_s > 0:
                now = self.clock()
                if not rec or rec.get("state") != "pending" or rec.get("digest") != digest:
                    self.sites[site] = {"state": "pending", "digest": digest, "seen": now}
                    self._save()
                    continue
                if now - rec["seen"] < self.settle_s:
                    continue
            try:
                check_site_name(site)
                args = self.arguments_for(site, location)
            except SiteadaptError as e:
                log.error("site %s: not submitted: %s", site, e)
                self.sites[site] = {"state": "invalid", "reason": str(e), "digest": digest}
                self._save()
                continue
            rec = self.sites[site] = {"state": "new", "digest": digest, "arguments": args,
                                      "run_name": f"siteadapt-{site}-{digest[:8]}"}
            if self._submit(site, rec):
                submitted.append(site)
        return submitted

    def resubmit(self, site: str) -> None:
        """Forget a site so that the next poll submits it again (an operator's decision)."""
        if self.sites.pop(site, None) is not None:
            self._save()

    def run(self, interval_s: float = 60.0, once: bool = False) -> None:
        while True:
            try:
                self.recover()
                self.poll()
            except Exception:  # a flaky store or API server must not stop the watcher; the state is saved per site
                if once:
                    raise
                log.exception("poll of %s failed; retrying in %.0f s", self.prefix, interval_s)
            if once:
                return
            time.sleep(interval_s)
