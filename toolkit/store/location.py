"""Where a store lives: a local directory or an object-store prefix named by an fsspec URL.

``location(target)`` gives one ``Location``: the target zarr opens, and every key operation the toolkit does
itself (metadata reads and atomic writes, chunk I/O by key on object stores, listing, deletion, sizes, the
one-writer lock), through one fsspec file system for local and remote stores alike.  Local paths keep the
guarantees of a file system (temp-name-then-rename, ``flock``); object stores (``s3://``, ``gs://``, ``az://``,
any fsspec protocol with its package installed) get them another way:

* a single PUT replaces an object whole, so the root ``zarr.json`` (the commit point) is still atomic: readers
  see the old committed prefix or the new one;
* a new store is built in a local temporary folder and uploaded with its root ``zarr.json`` last, so until the
  upload finishes no store is visible at the URL (an interrupted upload leaves objects but no store, which the
  next ``--overwrite`` removes);
* one writer at a time by a lease (``toolkit.store.lock.LeaseLock``): a lock object beside the store, created
  only if absent and renewed by a heartbeat, that another writer may take over only after it expired.

Credentials and endpoints come only from the standard chain of the fsspec backend (for S3: ``AWS_*`` variables,
``~/.aws``, instance roles; ``AWS_ENDPOINT_URL_S3`` for a non-AWS endpoint).  They are never printed or stored:
the store records the URL only.
"""

from __future__ import annotations

import functools
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

from toolkit.sdk.errors import ToolkitError, first_line
from toolkit.store.lock import LeaseLock, StoreLock, remote_error

LOCAL_SCHEMES = ("file://",)


def is_remote(target: Any) -> bool:
    """True for an object-store URL (``s3://bucket/prefix``); local paths and ``file://`` URLs are local."""
    text = str(target)
    return "://" in text and not text.startswith(LOCAL_SCHEMES)


def store_target(target: str | Path) -> str | Path:
    """A store argument as the rest of the toolkit keeps it: a ``Path`` for local stores, the URL (no trailing
    slash) for object stores."""
    text = str(target)
    if is_remote(text):
        return text.rstrip("/")
    return Path(text[len("file://"):] if text.startswith("file://") else text)


def store_name(target: str | Path) -> str:
    """The store's own name without ``.zarr`` (for default output names): ``s3://b/runs/libero.zarr`` -> ``libero``."""
    return str(target).rstrip("/").rsplit("/", 1)[-1].removesuffix(".zarr")


class Location:
    """A store's place: ``path`` (a ``Path``, or the URL of an object-store prefix) and the fsspec file system
    every key operation goes through.  Keys are ``/``-separated paths inside the store (``vlm/zarr.json``)."""

    def __init__(self, target: str | Path):
        import fsspec

        self.path = store_target(target)
        self.remote = isinstance(self.path, str)
        self.url = str(self.path)  # what messages and the store's attributes show
        if not self.remote:
            self.fs, self.root = fsspec.filesystem("file"), os.path.abspath(self.path)
            return
        try:
            self.fs, root = fsspec.url_to_fs(self.url)
        except (ImportError, ValueError) as e:
            scheme = self.url.split("://")[0]
            raise ToolkitError(f"cannot open {self.url}: {first_line(e)} (object stores need their fsspec "
                               f"backend: pip install 'toolkit[scale]' for s3://, gcsfs for gs://, adlfs for "
                               f"az://; scheme {scheme!r})") from None
        self.root = root.rstrip("/")
        if "/" not in self.root:  # the lease object lives beside the store, so the store needs a parent
            raise ToolkitError(f"{self.url} names a whole bucket: give the store a path inside it, e.g. "
                               f"{self.url}/run.zarr")

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    def zarr_target(self) -> str:
        """What ``zarr.open_group`` takes for this store."""
        return self.url

    def key(self, key: str = "") -> str:
        """The file system path of a key (the store's root for ``""``)."""
        return f"{self.root}/{key}" if key else self.root

    def _fresh(self, key: str = "") -> None:
        if self.remote:  # object-store listings are cached by fsspec; another writer may have changed them
            self.fs.invalidate_cache(self.key(key))

    def get(self, key: str) -> bytes | None:
        """The bytes of one key, or None when there is no such key."""
        try:
            return self.fs.cat_file(self.key(key))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        except OSError as e:
            raise remote_error(self.url, "read", e) from None

    def put(self, key: str, data: bytes) -> None:
        """Replace one key atomically: locally a temporary name then a rename; on an object store one PUT (an
        object is replaced whole, so readers see the old value or the new one)."""
        if self.remote:
            try:
                self.fs.pipe_file(self.key(key), data)
            except OSError as e:
                raise remote_error(self.url, "write", e) from None
            return
        target = self.key(key)
        tmp = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.{uuid.uuid4().hex[:8]}.partial")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, key: str = "") -> bool:
        self._fresh(key)
        try:
            return bool(self.fs.exists(self.key(key)))
        except OSError as e:
            raise remote_error(self.url, "read", e) from None

    def children(self, prefix: str = "") -> list[str]:
        """Names of the sub-folders (prefixes) under ``prefix``, sorted."""
        self._fresh(prefix)
        try:
            entries = self.fs.ls(self.key(prefix), detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory")

    def is_empty(self) -> bool:
        self._fresh()
        try:
            return not self.fs.ls(self.root)
        except FileNotFoundError:
            return True

    def partial_upload(self) -> bool:
        """Zarr nodes without the root ``zarr.json``: an upload (``upload``) that was interrupted."""
        return self.remote and not self.exists("zarr.json") and bool(self.fs.glob(f"{self.root}/*/zarr.json"))

    def size(self, prefix: str = "") -> int:
        """Bytes stored under ``prefix``."""
        try:
            return int(sum(self.fs.du(self.key(prefix), total=False).values()))
        except FileNotFoundError:
            return 0

    def remove(self) -> None:
        """Delete the store: its root ``zarr.json`` first, so it stops being a store before its parts go."""
        try:
            if self.exists("zarr.json"):
                self.fs.rm_file(self.key("zarr.json"))
            if self.exists():
                self.fs.rm(self.root, recursive=True)
        except FileNotFoundError:
            pass
        self._fresh()

    def upload(self, folder: Path) -> None:
        """Copy a store built locally into place, its root ``zarr.json`` last (the moment it becomes a store)."""
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p != folder / "zarr.json")
        try:
            if files:
                self.fs.put([str(p) for p in files], [self.key(p.relative_to(folder).as_posix()) for p in files])
            self.fs.put_file(str(folder / "zarr.json"), self.key("zarr.json"))
        except OSError as e:
            raise remote_error(self.url, "write", e) from None
        self._fresh()

    def build_folder(self) -> Path:
        """A local temporary folder to build a new store in before ``upload`` (object stores have no rename)."""
        return Path(tempfile.mkdtemp(prefix="toolkit-store-"))

    def lock(self) -> StoreLock | LeaseLock:
        """The one-writer lock of this store: an ``flock`` locally, a lease on object storage."""
        return LeaseLock(self) if self.remote else StoreLock(Path(self.path))


@functools.lru_cache(maxsize=64)
def _cached(url: str) -> Location:
    return Location(url)


def location(target: str | Path) -> Location:
    """The ``Location`` of a store path or URL (object-store locations are cached: one file system per URL)."""
    target = store_target(target)
    return _cached(target) if isinstance(target, str) else Location(target)
