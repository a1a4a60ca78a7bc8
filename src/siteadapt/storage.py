"""Local folders and S3-compatible object stores (MinIO, Ceph RGW, SeaweedFS, AWS S3) behind one small API.

A location is a local path or ``s3://bucket/prefix``. The endpoint comes from ``AWS_ENDPOINT_URL`` (what boto3, DVC
and s3fs read) or ``S3_ENDPOINT_URL``; credentials from the standard AWS chain (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` in the environment, a profile, an instance role) — never from params.yaml or any file in
the project.

Where the pipeline uses it:
- a site's ``images`` / ``labels`` may be ``s3://...``: ``siteadapt ingest`` mirrors the prefix into
  ``<paths.remote>/<site>/{images,labels}`` (only changed objects are fetched) and ingests that copy; in dvc.yaml the
  URI itself is the stage's dependency (DVC checks the objects' ETags);
- ``siteadapt sync SRC DST`` copies a folder to or from the object store (models, reports, metrics, data for a
  Kubeflow run or a colleague), uploading or downloading only what differs;
- the DVC remote (``dvc remote add``) and MLflow's artifact store (``mlflow server --artifacts-destination s3://...``)
  point at the same store through the same environment.

Steps themselves read and write local folders (``paths:`` in params.yaml must be local); object storage is reached by
mirroring, so a killed transfer never leaves a half-written file (downloads land under a temporary name first).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from pathlib import Path

from .errors import SiteadaptError
from .io.atomic import atomic_path

log = logging.getLogger("siteadapt.storage")


class StorageError(SiteadaptError):
    """The object store cannot be reached or refuses (the message names the URI and the endpoint)."""


def is_uri(location) -> bool:
    return isinstance(location, str) and location.startswith("s3://")


def endpoint_url() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("S3_ENDPOINT_URL") or None


def split_uri(uri: str) -> tuple[str, str]:
    from .redact import inline_secret_message

    if not is_uri(uri):
        raise StorageError(f"{uri!r}: not an s3:// URI")
    refused = inline_secret_message("s3 location", uri, "s3")
    if refused:  # a presigned URL's signature or a key in the query: credentials come from the AWS chain only
        raise StorageError(refused)
    rest = uri[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri!r}: no bucket")
    return bucket, prefix.strip("/")


def client():
    import boto3
    from botocore.config import Config

    cfg = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"})
    return boto3.client("s3", endpoint_url=endpoint_url(),
                        region_name=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
                        config=cfg)


def _fail(uri: str, e: Exception, hide: tuple[str, ...] = (), under: Path | None = None) -> StorageError:
    """A :class:`StorageError` for ``e`` at ``uri``; the strings in ``hide`` (an object key, a local file name) and
    any path below the local folder ``under`` are replaced by ``<object>`` in the library's message."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    text = str(e)
    if under is not None:
        text = re.sub(re.escape(str(under)) + r"[^\s'\"]*", "<object>", text)
    for h in sorted({h for h in hide if len(h) >= 4}, key=len, reverse=True):  # not a short stem such as "1"
        text = text.replace(h, "<object>")

    where = f" (endpoint {endpoint_url()})" if endpoint_url() else ""
    if isinstance(e, NoCredentialsError):
        return StorageError(f"{uri}: no credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY{where}")
    if isinstance(e, EndpointConnectionError):
        return StorageError(f"{uri}: cannot reach the object store{where}: {text}")
    if isinstance(e, ClientError):
        code = e.response.get("Error", {}).get("Code", "?")
        return StorageError(f"{uri}: the object store refused ({code}){where}")
    return StorageError(f"{uri}: {type(e).__name__}: {text}{where}")


def list_objects(uri: str) -> dict[str, tuple[int, str]]:
    """``{relative key: (size, etag)}`` of every object under the prefix."""
    bucket, prefix = split_uri(uri)
    base = f"{prefix}/" if prefix else ""
    out = {}
    try:
        pages = client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base)
        for page in pages:
            for o in page.get("Contents", []):
                rel = o["Key"][len(base):]
                if rel and not rel.endswith("/"):
                    out[rel] = (int(o["Size"]), o["ETag"].strip('"'))
    except Exception as e:  # noqa: BLE001
        raise _fail(uri, e) from None
    return out


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _same(path: Path, size: int, etag: str) -> bool:
    """Local file equals the object: same size and, for single-part uploads (ETag = MD5), same MD5."""
    if not path.is_file() or path.stat().st_size != size:
        return False
    return "-" in etag or _md5(path) == etag


def download(uri: str, dest: str | Path, *, mirror: bool = True) -> dict:
    """Copy every object under ``uri`` into ``dest`` (skipping files that already match). ``mirror`` also removes
    local files that are not in the store, so that ``dest`` is exactly the prefix."""
    dest = Path(dest)
    bucket, prefix = split_uri(uri)
    objs = list_objects(uri)
    if not objs:
        raise StorageError(f"{uri}: no objects under this prefix")
    c = client()
    got = 0
    for i, (rel, (size, etag)) in enumerate(sorted(objs.items()), 1):
        target = dest / rel
        if _same(target, size, etag):
            continue
        key = f"{prefix}/{rel}" if prefix else rel
        try:
            with atomic_path(target, suffix="") as tmp:
                c.download_file(bucket, key, str(tmp))
        except Exception as e:  # noqa: BLE001 - the prefix and a position, never the object's name (often a patient's)
            raise _fail(f"{uri} (object {i} of {len(objs)} in key order)", e,
                        (key, rel, str(target), Path(rel).name, Path(rel).stem), dest) from None
        got += 1
    removed = 0
    if mirror and dest.is_dir():
        for p in sorted(dest.rglob("*"), reverse=True):
            rel = p.relative_to(dest).as_posix()
            if p.is_file() and rel not in objs:
                p.unlink()
                removed += 1
            elif p.is_dir() and not any(p.iterdir()):
                p.rmdir()
    log.info("%s -> %s: %d objects, %d fetched, %d local files removed", uri, dest, len(objs), got, removed)
    return {"objects": len(objs), "fetched": got, "removed": removed}


def upload(src: str | Path, uri: str) -> dict:
    """Copy a local file or folder to ``uri`` (a folder's files keep their relative names), skipping objects that
    already match."""
    src = Path(src)
    if not src.exists():
        raise StorageError(f"{src}: does not exist")
    bucket, prefix = split_uri(uri)
    files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
    have = list_objects(uri) if src.is_dir() else {}
    c = client()
    sent = 0
    for i, p in enumerate(files, 1):
        rel = p.name if src.is_file() else p.relative_to(src).as_posix()
        if src.is_dir() and rel in have and _same(p, *have[rel]):
            continue
        key = (f"{prefix}/{rel}" if prefix else rel) if src.is_dir() else (prefix or p.name)
        try:
            c.upload_file(str(p), bucket, key)
        except Exception as e:  # noqa: BLE001 - the destination and a position, never the file's name
            raise _fail(f"{uri} (file {i} of {len(files)} in path order)", e,
                        (key, rel, str(p), p.name, p.stem), src if src.is_dir() else src.parent) from None
        sent += 1
    log.info("%s -> %s: %d files, %d uploaded", src, uri, len(files), sent)
    return {"files": len(files), "uploaded": sent}


def sync(src: str | Path, dst: str | Path) -> dict:
    """Copy ``src`` to ``dst``; either may be local or ``s3://`` (local to local copies the tree)."""
    if is_uri(str(src)) and is_uri(str(dst)):
        raise StorageError("copying between two object-store locations is not supported; go through a local folder")
    if is_uri(str(src)):
        return download(str(src), dst, mirror=False)
    if is_uri(str(dst)):
        return upload(src, str(dst))
    src, dst = Path(src), Path(dst)
    if not src.exists():
        from .errors import InputError

        raise InputError(None, "sync: the local source does not exist (neither a folder, a file nor an s3:// URI)")
    if src.is_dir():
        shutil.copytree(src, dst, dirs_exist_ok=True)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    return {"copied": str(dst)}


def materialize(location: str | Path, cache: str | Path) -> Path:
    """A local folder holding ``location``: the path itself when local, else a mirror of the prefix in ``cache``.

    A ``dicomweb+http(s)://`` PACS site is pulled into ``cache`` by :func:`siteadapt.io.dicomweb.pull` (only series
    not pulled before; the rest of ``cache`` stays as it is)."""
    from .io import dicomweb

    if dicomweb.is_dicomweb(str(location)):
        dicomweb.pull(str(location), cache)
        return Path(cache)
    if not is_uri(str(location)):
        return Path(location)
    download(str(location), cache, mirror=True)
    return Path(cache)
