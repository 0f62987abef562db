"""Where published artifacts and work products live: a directory (embedded default) or an S3 bucket (production).

Objects are content-addressed (``<task>/<cid>.kolm``), so a put is idempotent and a get can prove it
received the right bytes by recomputing the CID. Serving never reads the object store directly: the
pointer and the adapter cache stay on local disk, and an artifact is fetched from here only when the
local copy is missing (another node published it, or a rollback needs an old version).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from kolm_pipeline.provenance.atomic import atomic_output, fsync_dir
from kolm_pipeline.provenance.cid import cid_for_file
from kolm_pipeline.provenance.errors import RegistryError

ARTIFACTS_URL_ENV = "KOLM_ARTIFACTS_URL"
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)*$")


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key) or ".." in key.split("/"):
        raise RegistryError(f"invalid object key {key!r}")
    return key


class ObjectStore(Protocol):
    """A flat key → bytes store; keys look like ``tickets/bafkrei….kolm``."""

    def url(self, key: str) -> str:
        """Where the object lives, for people and registry rows."""
        ...

    def exists(self, key: str) -> bool: ...

    def put(self, key: str, source: Path) -> str:
        """Store ``source`` under ``key`` so that readers see all of it or nothing; returns ``url(key)``."""
        ...

    def get(self, key: str, dest: Path) -> Path:
        """Write the object to ``dest`` atomically; RegistryError if it does not exist."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object (retention); nothing happens when it does not exist."""
        ...

    def listing(self, prefix: str) -> dict[str, datetime]:
        """Every object whose key starts with `prefix` and when it was last written (UTC)."""
        ...


class DirectoryStore:
    """Objects as files under a root directory, written through a temp file and ``os.replace``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()

    def path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def url(self, key: str) -> str:
        return self.path(key).as_uri()

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def put(self, key: str, source: Path) -> str:
        dest = self.path(key)
        if Path(source).absolute() != dest:
            with atomic_output(dest) as handle, open(source, "rb") as src:
                shutil.copyfileobj(src, handle)
        return self.url(key)

    def get(self, key: str, dest: Path) -> Path:
        source = self.path(key)
        if not source.is_file():
            raise RegistryError(f"{self.url(key)} does not exist")
        if Path(dest).absolute() != source:
            with atomic_output(Path(dest)) as handle, open(source, "rb") as src:
                shutil.copyfileobj(src, handle)
        return Path(dest)

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def listing(self, prefix: str) -> dict[str, datetime]:
        base = self.root / _check_key(prefix.rstrip("/"))
        if not base.is_dir():
            return {}
        return {str(path.relative_to(self.root)): datetime.fromtimestamp(path.stat().st_mtime, UTC)
                for path in base.rglob("*") if path.is_file() and not path.name.startswith(".")}

    def __repr__(self) -> str:
        return f"DirectoryStore({str(self.root)!r})"


class S3Store:
    """Objects in an S3 bucket under a prefix, through boto3.

    The endpoint and credentials come from boto3's own configuration (``AWS_ENDPOINT_URL_S3`` or
    ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), so any S3-protocol server works. A PUT is atomic
    in S3: the object appears whole or not at all.
    """

    def __init__(self, bucket: str, prefix: str = "", client: Any = None) -> None:
        if not bucket:
            raise RegistryError("an S3 artifact store needs a bucket: s3://BUCKET[/PREFIX]")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if client is None:
            import boto3

            client = boto3.client("s3")
        self.client = client

    def key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.key(key)}"

    def _errors(self) -> tuple[type[Exception], ...]:
        from botocore.exceptions import BotoCoreError, ClientError

        return BotoCoreError, ClientError

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(key))
        except self._errors() as exc:
            status = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404:
                return False
            raise RegistryError(f"cannot reach {self.url(key)}: {exc}") from exc
        return True

    def put(self, key: str, source: Path) -> str:
        try:
            with open(source, "rb") as body:
                self.client.put_object(Bucket=self.bucket, Key=self.key(key), Body=body)
        except self._errors() as exc:
            raise RegistryError(f"cannot upload {source} to {self.url(key)}: {exc}") from exc
        return self.url(key)

    def get(self, key: str, dest: Path) -> Path:
        dest = Path(dest)
        try:
            with atomic_output(dest) as handle:
                self.client.download_fileobj(self.bucket, self.key(key), handle)
        except self._errors() as exc:
            raise RegistryError(f"cannot download {self.url(key)}: {exc}") from exc
        return dest

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key(key))
        except self._errors() as exc:
            raise RegistryError(f"cannot delete {self.url(key)}: {exc}") from exc

    def listing(self, prefix: str) -> dict[str, datetime]:
        full = self.key(prefix.rstrip("/")) + "/"
        found: dict[str, datetime] = {}
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                for item in page.get("Contents", []):
                    key = item["Key"][len(self.prefix) + 1:] if self.prefix else item["Key"]
                    found[key] = item["LastModified"]
        except self._errors() as exc:
            raise RegistryError(f"cannot list {self.url(prefix)}: {exc}") from exc
        return found

    def __repr__(self) -> str:
        return f"S3Store({self.url('x')[:-2]!r})"


def open_store(url: str | None, default_dir: Path) -> ObjectStore:
    """The object store a URL names; no URL means a directory store on ``default_dir``."""
    if not url:
        return DirectoryStore(default_dir)
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        return S3Store(parsed.netloc, parsed.path)
    if parsed.scheme == "file":
        return DirectoryStore(Path(parsed.path))
    if parsed.scheme == "" and url.startswith(("/", ".", "~")):
        return DirectoryStore(Path(url).expanduser())
    raise RegistryError(f"{ARTIFACTS_URL_ENV}={url!r}: expected s3://BUCKET[/PREFIX], file:///DIR or a path")


def artifact_key(task: str, cid: str) -> str:
    return f"{task}/{cid}.kolm"


def fetch_verified(store: ObjectStore, key: str, dest: Path, cid: str) -> Path:
    """Download an artifact and keep it only if its bytes hash to ``cid``. The download goes to a name of its own,
    so replicas sharing a cache may fetch the same artifact at once (the last rename wins, with the same bytes)."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.fetch.tmp")
    store.get(key, tmp)
    try:
        if cid_for_file(tmp) != cid:
            raise RegistryError(f"{store.url(key)} does not hash to {cid}; refusing the download")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(dest.parent)
    return dest
