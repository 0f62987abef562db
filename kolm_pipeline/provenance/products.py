"""Work products (a corpus, a recipe, an adapter, an evaluation, ...) in the object store, written once under
their CID.

A file is the object ``products/<cid>``. A directory is its index (relative path → file CID, canonical JSON) stored
under the directory's CID, which is the CID of that index, and its files under
``products/<directory cid>.files/<file cid>``: any changed byte of any file changes the directory's CID, every
object proves its own content when fetched, and removing a directory removes only its own objects (a file with
the same bytes in another product is that product's object).
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


def product_key(cid: str, directory: str | None = None) -> str:
    """The object of product `cid`, or of the file `cid` of the directory product `directory`."""
    sha256_of_cid(cid)  # a malformed CID never becomes a key
    if directory is not None:
        sha256_of_cid(directory)
        return f"{PRODUCT_PREFIX}/{directory}.files/{cid}"  # beside the index, never under it (a directory store)
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
        """Store every file of the directory, then its index (last: a directory whose index exists is whole);
        returns the directory's CID."""
        index = directory_index(path)
        data = index_bytes(index)
        cid = cid_for_bytes(data)
        for name, file_cid in index.items():
            file_key = product_key(file_cid, cid)
            if not self.objects.exists(file_key):
                self.objects.put(file_key, path / name)
        key = product_key(cid)
        if not self.objects.exists(key):
            staging = _scratch(path, "index")
            write_atomic(staging, data)
            try:
                self.objects.put(key, staging)
            finally:
                staging.unlink(missing_ok=True)
        return cid

    def fetch_file(self, cid: str, dest: Path, directory: str | None = None) -> Path:
        """The product ``cid`` (a file of the directory product ``directory``) at ``dest`` (replaced whole),
        refused unless its bytes hash to ``cid``."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        return fetch_verified(self.objects, product_key(cid, directory), dest, cid)

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
                self.fetch_file(file_cid, staging / name, directory=cid)
            old = _scratch(dest, "old")
            if dest.exists():
                os.replace(dest, old)
            try:
                os.replace(staging, dest)
            except OSError:  # another process put the same product there meanwhile
                if not (dest.is_dir() and directory_cid(dest) == cid):
                    raise
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return dest

    def fetch(self, cid: str, dest: Path, directory: bool) -> Path:
        return self.fetch_dir(cid, dest) if directory else self.fetch_file(cid, dest)

    def delete(self, cid: str, directory: bool, scratch: Path) -> None:
        """Remove the product's objects (retention): a directory's files, then its index, so that a sweep stopped
        half way finds the index again next time and finishes."""
        key = product_key(cid)
        if directory and self.objects.exists(key):
            for file_cid in self.index(cid, scratch).values():
                self.objects.delete(product_key(file_cid, cid))
        self.objects.delete(key)
