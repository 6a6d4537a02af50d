"""Where a store lives: a local directory or an object-store prefix named by an fsspec URL.

``location(target)`` gives one object with the few operations the store needs beyond zarr's own (key reads and
atomic writes of metadata, listing, deletion, sizes, the one-writer lock), so ``toolkit.store.core`` has one code path
for both.  Local paths keep the guarantees of a file system (temp-name-then-rename, ``flock``); object stores
(``s3://``, ``gs://``, ``az://``, any fsspec protocol with its package installed) get them another way:

* a single PUT replaces an object whole, so the root ``zarr.json`` (the commit point) is still atomic: readers
  see the old committed prefix or the new one;
* a new store is built in a local temporary folder and uploaded with its root ``zarr.json`` last, so until the
  upload finishes no store is visible at the URL (an interrupted upload leaves objects but no store, which the
  next ``--overwrite`` removes);
* one writer at a time by a lease (``LeaseLock``): a lock object beside the store, created only if absent and
  renewed by a heartbeat, that another writer may take over only after it expired.

Credentials and endpoints come only from the standard chain of the fsspec backend (for S3: ``AWS_*`` variables,
``~/.aws``, instance roles; ``AWS_ENDPOINT_URL_S3`` for a non-AWS endpoint).  They are never printed or stored:
the store records the URL only.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import click

from toolkit.sdk.errors import ToolkitError

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


class StoreParam(click.ParamType):
    """A click argument type for STORE: a local path or an fsspec URL (``click.Path`` would mangle ``s3://``)."""

    name = "store"

    def convert(self, value, param, ctx):
        return value if isinstance(value, Path) else store_target(value)


STORE = StoreParam()


def location(target: str | Path) -> LocalLocation | ObjectLocation:
    target = store_target(target)
    return ObjectLocation(target) if isinstance(target, str) else LocalLocation(target)


class LocalLocation:
    """A store directory on a local (or network) file system."""

    remote = False

    def __init__(self, path: Path):
        self.path = Path(path)
        self.url = str(self.path)

    def zarr_target(self) -> str:
        return str(self.path)

    def get(self, key: str) -> bytes | None:
        try:
            return (self.path / key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def put(self, key: str, data: bytes) -> None:
        """Replace one file atomically (a temporary name, then a rename)."""
        target = self.path / key
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.partial")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def exists(self, key: str = "") -> bool:
        return (self.path / key).exists() if key else self.path.exists()

    def children(self, prefix: str = "") -> list[str]:
        """Names of the sub-folders of ``prefix`` (sorted)."""
        folder = self.path / prefix
        return sorted(c.name for c in folder.iterdir() if c.is_dir()) if folder.is_dir() else []

    def is_empty(self) -> bool:
        return self.path.is_dir() and not any(self.path.iterdir())

    def partial_upload(self) -> bool:
        return False  # local stores are built beside the target and renamed into place

    def size(self, prefix: str = "") -> int:
        folder = self.path / prefix
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.exists() else 0

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def lock(self):
        from toolkit.store.core import StoreLock

        return StoreLock(self.path)


class ObjectLocation:
    """A store under an object-store prefix, through fsspec (the backend's own credential chain)."""

    remote = True

    def __init__(self, url: str):
        import fsspec

        self.url = url.rstrip("/")
        try:
            self.fs, self.root = fsspec.url_to_fs(self.url)
        except (ImportError, ValueError) as e:
            scheme = self.url.split("://")[0]
            raise ToolkitError(f"cannot open {self.url}: {_first_line(e)} (object stores need their fsspec "
                               f"backend: pip install 'toolkit[scale]' for s3://, gcsfs for gs://, adlfs for "
                               f"az://; scheme {scheme!r})") from None
        self.root = self.root.rstrip("/")
        if "/" not in self.root:  # the lease object lives beside the store, so the store needs a parent
            raise ToolkitError(f"{self.url} names a whole bucket: give the store a path inside it, e.g. "
                               f"{self.url}/run.zarr")
        self.path = self.url  # what messages and the store's attributes show

    def zarr_target(self) -> str:
        return self.url

    def _key(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def get(self, key: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._key(key))
        except FileNotFoundError:
            return None
        except OSError as e:
            raise _remote_error(self.url, "read", e) from None

    def put(self, key: str, data: bytes) -> None:
        """One PUT: object stores replace an object whole, so readers see the old value or the new one."""
        try:
            self.fs.pipe_file(self._key(key), data)
        except OSError as e:
            raise _remote_error(self.url, "write", e) from None

    def exists(self, key: str = "") -> bool:
        try:
            self.fs.invalidate_cache(self._key(key))
            return bool(self.fs.exists(self._key(key)))
        except OSError as e:
            raise _remote_error(self.url, "read", e) from None

    def children(self, prefix: str = "") -> list[str]:
        base = self._key(prefix)
        self.fs.invalidate_cache(base)
        try:
            entries = self.fs.ls(base, detail=True)
        except FileNotFoundError:
            return []
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory")

    def is_empty(self) -> bool:
        self.fs.invalidate_cache(self.root)
        try:
            return not self.fs.ls(self.root)
        except FileNotFoundError:
            return True

    def partial_upload(self) -> bool:
        """Zarr nodes without the root ``zarr.json``: an upload (``upload``) that was interrupted."""
        return not self.exists("zarr.json") and bool(self.fs.glob(f"{self.root}/*/zarr.json"))

    def size(self, prefix: str = "") -> int:
        try:
            return int(sum(self.fs.du(self._key(prefix), total=False).values()))
        except FileNotFoundError:
            return 0

    def remove(self) -> None:
        """Delete the store: its root ``zarr.json`` first, so it stops being a store before its parts go."""
        try:
            if self.exists("zarr.json"):
                self.fs.rm_file(self._key("zarr.json"))
            if self.exists():
                self.fs.rm(self.root, recursive=True)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(self.root)

    def upload(self, folder: Path) -> None:
        """Copy a store built locally into place, its root ``zarr.json`` last (the moment it becomes a store)."""
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p != folder / "zarr.json")
        try:
            if files:
                self.fs.put([str(p) for p in files], [self._key(p.relative_to(folder).as_posix()) for p in files])
            self.fs.put_file(str(folder / "zarr.json"), self._key("zarr.json"))
        except OSError as e:
            raise _remote_error(self.url, "write", e) from None
        self.fs.invalidate_cache(self.root)

    def build_folder(self) -> Path:
        """A local temporary folder to build a new store in before ``upload``."""
        return Path(tempfile.mkdtemp(prefix="toolkit-store-"))

    def lock(self) -> LeaseLock:
        return LeaseLock(self)


LEASE_SECONDS = float(os.environ.get("TOOLKIT_LEASE_SECONDS", 60))


class LeaseLock:
    """One writer per object-store store: a lease object ``.NAME.lock`` beside it.

    Acquired by creating the object only if it does not exist (S3's conditional ``If-None-Match: *``); the
    holder rewrites it every third of the lease (``If-Match`` its last ETag), so a live run keeps it however
    long it runs.  A lease that has not been renewed for ``LEASE_SECONDS`` (its holder died) may be taken over,
    again conditionally, so of two runs taking over one stale lease exactly one wins.  A holder that fails to
    renew (it stalled past its lease and another run took over) stops writing: ``check`` raises before the next
    commit.  Backends without conditional writes fall back to write-then-read-back, which narrows but does not
    close the race; the docs say so.
    """

    def __init__(self, loc: ObjectLocation, seconds: float | None = None):
        self.loc = loc
        parent, _, name = loc.root.rpartition("/")
        self.key = f"{parent}/.{name}.lock" if parent else f".{name}.lock"
        self.seconds = LEASE_SECONDS if seconds is None else seconds
        self.token = uuid.uuid4().hex
        self.etag: str | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        protocols = loc.fs.protocol if isinstance(loc.fs.protocol, (tuple, list)) else (loc.fs.protocol,)
        self.conditional = "s3" in protocols  # S3 (and moto) honour If-None-Match / If-Match on PUT

    def _body(self) -> bytes:
        return json.dumps({"token": self.token, "holder": f"pid {os.getpid()} on host {socket.gethostname()}",
                           "expires": time.time() + self.seconds}).encode()

    def _read(self) -> tuple[dict | None, str | None]:
        fs = self.loc.fs
        fs.invalidate_cache(self.key)
        try:
            etag = fs.info(self.key).get("ETag")
            return json.loads(fs.cat_file(self.key)), etag
        except FileNotFoundError:
            return None, None
        except ValueError:  # unreadable lease: treat as expired
            return {"expires": 0, "holder": "an unreadable lease"}, etag

    def _write(self, condition: dict[str, str]) -> bool:
        """Write our lease under ``condition``; False when the condition failed (someone else holds it)."""
        fs = self.loc.fs
        try:
            if self.conditional:
                fs.pipe_file(self.key, self._body(), **condition)
            else:
                fs.pipe_file(self.key, self._body())
        except (FileExistsError, PermissionError):
            return False
        except OSError as e:
            if "PreconditionFailed" in str(e) or "pre-condition" in str(e).lower():
                return False
            raise _remote_error(self.loc.url, "lock", e) from None
        lease, etag = self._read()
        if not lease or lease.get("token") != self.token:
            return False
        self.etag = etag
        return True

    def acquire(self) -> None:
        for _ in range(5):
            lease, etag = self._read()
            if lease is None:
                if self._write({"IfNoneMatch": "*"}):
                    break
                continue
            left = float(lease.get("expires", 0)) - time.time()
            if left > 0:
                raise ToolkitError(f"{self.loc.url} is being written by {lease.get('holder', 'another run')} "
                                   f"(its lease runs {left:.0f} s more unless renewed); wait for that run to "
                                   "finish (or stop it) and use --resume")
            if self._write({"IfMatch": etag} if etag else {}):  # a dead holder's lease: take it over
                break
        else:
            raise ToolkitError(f"could not take the lease of {self.loc.url}: other runs keep taking it; retry")
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew, name="toolkit-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                ok = self._write({"IfMatch": self.etag} if self.etag else {})
            except ToolkitError as e:
                ok, why = False, str(e)
            else:
                why = "another run took it over"
            if not ok:
                self.lost = why
                return

    def check(self) -> None:
        """Raise if the lease was lost (this run must not commit any more)."""
        if self.lost:
            raise ToolkitError(f"lost the lease of {self.loc.url} ({self.lost}): stopped writing; the other run "
                               "owns the store now")

    def release(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        lease, _ = self._read()
        if lease and lease.get("token") == self.token:
            try:
                self.loc.fs.rm_file(self.key)
            except FileNotFoundError:
                pass


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def _remote_error(url: str, what: str, e: BaseException) -> ToolkitError:
    return ToolkitError(f"cannot {what} {url}: {type(e).__name__}: {_first_line(e)} (credentials and endpoint come "
                        "from the backend's standard configuration, e.g. AWS_* variables or ~/.aws for s3://)")

