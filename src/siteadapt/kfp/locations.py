"""Site locations: a local folder or an ``s3://bucket/prefix/`` on any S3-compatible store (MinIO in production).

A *site location* holds ``images/`` (DICOM, NIfTI or 2D images, any nesting) and optionally ``labels/``; a *sites
prefix* holds one site location per sub-prefix (``s3://bucket/sites/<site>/``), which is what the watcher polls.

The object store's endpoint and credentials come from the environment only, never from files: ``AWS_ENDPOINT_URL``
(or ``AWS_ENDPOINT_URL_S3``), ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``. On the cluster
these are mapped from the ``siteadapt-object-store`` secret and the ``siteadapt-config`` config map (see ``k8s/``).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    rest = str(uri)[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise InputError(None, f"{uri}: an s3:// location needs a bucket name")
    return bucket, key


def as_prefix(key: str) -> str:
    return key if not key or key.endswith("/") else key + "/"


def s3_client():
    """A boto3 S3 client for the configured endpoint (path-style addressing, which MinIO and test servers need)."""
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    cfg = Config(s3={"addressing_style": "path"}, retries={"max_attempts": 5, "mode": "standard"})
    return boto3.client("s3", endpoint_url=endpoint, config=cfg,
                        region_name=os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")


@dataclass(frozen=True)
class Entry:
    """One file under a location: path relative to it, size, and a change tag (ETag on S3, mtime locally)."""

    rel: str
    size: int
    tag: str


def list_files(uri: str) -> list[Entry]:
    """Every file under a location (recursive), sorted by relative path; hidden files are skipped."""
    out: list[Entry] = []
    if is_s3(uri):
        bucket, key = split_s3(uri)
        prefix = as_prefix(key)
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix):]
                if rel and not rel.endswith("/") and not any(p.startswith(".") for p in rel.split("/")):
                    out.append(Entry(rel, int(obj["Size"]), str(obj.get("ETag", "")).strip('"')))
    else:
        root = Path(uri)
        if not root.is_dir():
            raise InputError(root, "site location is not a folder")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in filenames:
                if fn.startswith("."):
                    continue
                p = Path(dirpath) / fn
                st = p.stat()
                out.append(Entry(p.relative_to(root).as_posix(), st.st_size, str(st.st_mtime_ns)))
    return sorted(out, key=lambda e: e.rel)


def fingerprint(uri: str) -> str:
    """A digest of a location's listing (relative paths, sizes, ETags / modification times).

    It changes when a file is added, removed or rewritten, and is the cache key of the steps that read the location
    (Kubeflow caches a step on its inputs, and a location's *name* says nothing about its content)."""
    entries = list_files(uri)
    if not entries:
        raise InputError(None, f"{uri}: site location is empty")
    h = hashlib.sha256()
    for e in entries:
        h.update(f"{e.rel}\0{e.size}\0{e.tag}\n".encode())
    return h.hexdigest()


def fetch(uri: str, dest: Path) -> Path:
    """A local folder with the location's files: the folder itself when local, else a download into ``dest``."""
    if not is_s3(uri):
        root = Path(uri)
        if not root.is_dir():
            raise InputError(root, "site location is not a folder")
        return root
    bucket, key = split_s3(uri)
    prefix = as_prefix(key)
    client = s3_client()
    entries = list_files(uri)
    if not entries:
        raise InputError(None, f"{uri}: site location is empty")
    dest.mkdir(parents=True, exist_ok=True)
    for e in entries:
        target = dest / e.rel
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, prefix + e.rel, str(target))
    return dest


def list_sites(prefix_uri: str) -> list[str]:
    """Names of the immediate sub-prefixes (sub-folders) of a sites prefix, sorted."""
    if is_s3(prefix_uri):
        bucket, key = split_s3(prefix_uri)
        prefix = as_prefix(key)
        names = set()
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
        for page in pages:
            for cp in page.get("CommonPrefixes", []):
                name = cp["Prefix"][len(prefix):].rstrip("/")
                if name and not name.startswith("."):
                    names.add(name)
        return sorted(names)
    root = Path(prefix_uri)
    if not root.is_dir():
        raise InputError(root, "sites folder does not exist")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def join(prefix_uri: str, name: str) -> str:
    """The location of sub-folder ``name`` (``s3://b/sites/`` + ``x`` -> ``s3://b/sites/x/``)."""
    if is_s3(prefix_uri):
        return as_prefix(prefix_uri) + name + "/"
    return str(Path(prefix_uri) / name)


def child(location: str, name: str) -> str:
    """The URI of file ``name`` in a location."""
    if is_s3(location):
        return as_prefix(location) + name
    return str(Path(location) / name)


def read_text(uri: str) -> str | None:
    """A small file's text, or None when it does not exist."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        client = s3_client()
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read().decode("utf-8")
        except client.exceptions.NoSuchKey:
            return None
    p = Path(uri)
    return p.read_text() if p.is_file() else None


def write_text(uri: str, text: str) -> None:
    """Write a small file: atomically (temporary name, then rename) on a local path; one PUT on S3 (object writes
    are atomic there)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client().put_object(Bucket=bucket, Key=key, Body=text.encode("utf-8"))
        return
    from ..io.atomic import write_text as atomic_write_text

    atomic_write_text(Path(uri), text)
