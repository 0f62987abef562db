"""Work products (a corpus, a recipe, an adapter, an evaluation, ...) in the object store, written once under
their CID.

A file is the object ``products/<cid>``. A directory is its files, each stored as a file product, plus its index
(relative path → file CID, canonical JSON) stored under the directory's CID, which is the CID of that index: so
any changed byte of any file changes the directory's CID, and every object proves its own content when fetched.
Nothing is ever written twice under one key, so two runs, on any host, never overwrite each other's products; a
run reads its inputs by CID into its own KOLM_HOME, checking every byte on the way.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

from kolm_pipeline.provenance.atomic import write_atomic
from kolm_pipeline.provenance.cid import cid_for_bytes, cid_for_file, sha256_of_cid
from kolm_pipeline.provenance.errors import RegistryError
from kolm_pipeline.provenance.objectstore import ObjectStore, fetch_verified

PRODUCT_PREFIX = "products"


def directory_index(path: Path) -> dict[str, str]:
    """Each file under ``path`` (relative path) and its CID."""
    return {str(file.relative_to(path)): cid_for_file(file) for file in sorted(path.rglob("*")) if file.is_file()}


def index_bytes(index: dict[str, str]) -> bytes:
    return json.dumps(index, sort_keys=True).encode()


def directory_cid(path: Path) -> str:
    """CID of a directory: of the canonical index of its files' CIDs, so any changed byte changes it."""
    return cid_for_bytes(index_bytes(directory_index(path)))


def product_key(cid: str) -> str:
    sha256_of_cid(cid)  # a malformed CID never becomes a key
    return f"{PRODUCT_PREFIX}/{cid}"


def _scratch(dest: Path, suffix: str) -> Path:
    """A name of its own beside ``dest``: two processes fetching the same product never share a half-written one."""
    return dest.with_name(f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.{suffix}")


class Products:
    """Put and fetch work products by CID in one object store."""

    def __init__(self, objects: ObjectStore) -> None:
        self.objects = objects

    def url(self, cid: str) -> str:
        return self.objects.url(product_key(cid))

    def put_file(self, path: Path) -> str:
        """Store the file (unless an object with its CID exists: same CID, same bytes); returns its CID."""
        cid = cid_for_file(path)
        key = product_key(cid)
        if not self.objects.exists(key):
            self.objects.put(key, path)
        return cid

    def put_dir(self, path: Path) -> str:
        """Store every file of the directory, then its index; returns the directory's CID."""
        index = {name: self.put_file(path / name) for name in directory_index(path)}
        data = index_bytes(index)
        cid = cid_for_bytes(data)
        key = product_key(cid)
        if not self.objects.exists(key):
            staging = _scratch(path, "index")
            write_atomic(staging, data)
            try:
                self.objects.put(key, staging)
            finally:
                staging.unlink(missing_ok=True)
        return cid

    def fetch_file(self, cid: str, dest: Path) -> Path:
        """The product ``cid`` at ``dest`` (replaced whole), refused unless its bytes hash to ``cid``."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        return fetch_verified(self.objects, product_key(cid), dest, cid)

    def index(self, cid: str, scratch: Path) -> dict[str, str]:
        """The file index of the directory product ``cid``."""
        staging = _scratch(scratch, "index")
        try:
            fetch_verified(self.objects, product_key(cid), staging, cid)
            index = json.loads(staging.read_bytes())
        except ValueError as exc:
            raise RegistryError(f"{self.url(cid)} is not a directory index: {exc}") from None
        finally:
            staging.unlink(missing_ok=True)
        if not isinstance(index, dict) or not all(isinstance(v, str) for v in index.values()):
            raise RegistryError(f"{self.url(cid)} is not a directory index")
        for name in index:
            parts = Path(name).parts
            if Path(name).is_absolute() or ".." in parts or not parts:
                raise RegistryError(f"{self.url(cid)} names a file outside its directory: {name!r}")
        return index

    def fetch_dir(self, cid: str, dest: Path) -> Path:
        """The directory product ``cid`` at ``dest``, assembled beside it and swapped in whole."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        index = self.index(cid, dest)
        staging = _scratch(dest, "fetch")
        try:
            for name, file_cid in index.items():
                self.fetch_file(file_cid, staging / name)
            old = _scratch(dest, "old")
            if dest.exists():
                os.replace(dest, old)
            os.replace(staging, dest)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return dest

    def fetch(self, cid: str, dest: Path, directory: bool) -> Path:
        return self.fetch_dir(cid, dest) if directory else self.fetch_file(cid, dest)

    def delete(self, cid: str, directory: bool, scratch: Path) -> None:
        """Remove the product's objects (retention): a directory's files, then its index. A file another product
        shares goes too: it holds the same bytes, so the same expired text."""
        key = product_key(cid)
        if directory and self.objects.exists(key):
            for file_cid in self.index(cid, scratch).values():
                self.objects.delete(product_key(file_cid))
        self.objects.delete(key)
