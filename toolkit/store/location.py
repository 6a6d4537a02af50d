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


# Object-store clients fail within bounded time: an unreachable endpoint is an error in seconds, not minutes.
STORAGE_OPTIONS: dict[str, dict[str, Any]] = {
    # botocore: 5 s to connect, 10 s of silence on a socket, 2 attempts (and s3fs no retries of its own on top:
    # ``bounded``), so an unreachable or silent endpoint is an error within 30 s
    "s3": {"config_kwargs": {"connect_timeout": 5, "read_timeout": 10,
                             "retries": {"total_max_attempts": 2, "mode": "standard"}}},
}


def bounded(fs: Any) -> Any:
    """An object-store file system without retries of its own on top of its client's (s3fs retries 5 times), and
    without exit-time clean-up that fails once fsspec's loop has stopped (adlfs closes its client then, and prints
    a traceback after the command's last line): the process is ending, its connections go with it."""
    import weakref

    if hasattr(type(fs), "retries"):
        fs.retries = 1
    for finalizer, info in list(getattr(weakref.finalize, "_registry", {}).items()):
        if info.weakref() is fs and getattr(info.func, "__name__", "") == "sync":
            finalizer.atexit = False
    return fs


def refuse_credentials(url: str) -> None:
    """Refuse a URL with credentials in it (``s3://KEY:SECRET@bucket/...``): they would end up in messages, logs
    and the store's attributes.  The message shows the URL with them redacted."""
    scheme, _, rest = url.partition("://")
    netloc = rest.split("/", 1)[0]
    if "@" in netloc:
        shown = f"{scheme}://***@{rest.split('@', 1)[1]}"
        raise ToolkitError(f"{shown}: the URL carries credentials; remove them from the URL and give them the "
                           "backend's standard way (for s3://: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or ~/.aws)")


PROCESS_LOCAL = ("memory://",)  # fsspec file systems whose objects live only inside one Python process


def refuse_process_local(target: Any, why: str) -> None:
    """Refuse a store that lives only in this process's memory (``memory://``) where it could not be reached:
    by a command line (the store vanishes when the command ends) or by Ray workers (each has its own memory)."""
    if str(target).startswith(PROCESS_LOCAL):
        raise ToolkitError(f"{target}: a memory:// store lives only inside one Python process, so {why}; use a "
                           "local path or an object store (s3://, gs://, az://)")


class Location:
    """A store's place: ``path`` (a ``Path``, or the URL of an object-store prefix) and the fsspec file system
    every key operation goes through.  Keys are ``/``-separated paths inside the store (``vlm/zarr.json``)."""

    def __init__(self, target: str | Path):
        import fsspec

        self.path = store_target(target)
        self.remote = isinstance(self.path, str)
        self.url = str(self.path)  # what messages and the store's attributes show
        self.fence: Any = None  # the writer's LeaseLock while one holds this store (object stores)
        if not self.remote:
            self.fs, self.root = fsspec.filesystem("file"), os.path.abspath(self.path)
            return
        refuse_credentials(self.url)
        scheme = self.url.split("://")[0]
        self.options = STORAGE_OPTIONS.get(scheme, {})
        try:
            self.fs, root = fsspec.url_to_fs(self.url, **self.options)
            bounded(self.fs)
        except (ImportError, ValueError) as e:
            raise ToolkitError(f"cannot open {self.url}: {first_line(e)} (object stores need their fsspec "
                               f"backend: pip install 'toolkit[scale]' for s3://, gcsfs for gs://, adlfs for "
                               f"az://; scheme {scheme!r})") from None
        self.root = root.rstrip("/")
        if "/" not in self.root:  # the lease object lives beside the store, so the store needs a parent
            raise ToolkitError(f"{self.url} names a whole bucket: give the store a path inside it, e.g. "
                               f"{self.url}/run.zarr")

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    def zarr_store(self, read_only: bool = True) -> Any:
        """What ``zarr.open_group`` takes for this store: the path, or an fsspec store with the bounded timeouts;
        a writer's (``read_only=False``) on an object store writes through its lease's fence."""
        if not self.remote:
            return str(self.path)
        from zarr.storage import FsspecStore

        store = FsspecStore.from_url(self.url, storage_options=self.options or None, read_only=read_only)
        bounded(store.fs)
        if read_only or self.fence is None:
            return store
        from toolkit.store.fenced import FencedStore

        return FencedStore(store, self)

    def zarr_target(self) -> Any:
        """What a reader's ``zarr.open_group`` takes (``zarr_store`` read-only)."""
        return self.zarr_store(read_only=True)

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
        except Exception as e:  # noqa: BLE001 (botocore's errors are not OSErrors)
            raise remote_error(self.url, "read", e) from None

    def put(self, key: str, data: bytes) -> None:
        """Replace one key atomically: locally a temporary name then a rename; on an object store one PUT (an
        object is replaced whole, so readers see the old value or the new one)."""
        if self.remote:
            if self.fence is not None:  # a writer's lease: checked, and conditional on what it last saw
                self.fence.put(self.key(key), data)
                return
            try:
                self.fs.pipe_file(self.key(key), data)
            except Exception as e:  # noqa: BLE001 (botocore's errors are not OSErrors)
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
        except Exception as e:  # noqa: BLE001 (botocore's errors are not OSErrors)
            raise remote_error(self.url, "read", e) from None

    def children(self, prefix: str = "") -> list[str]:
        """Names of the sub-folders (prefixes) under ``prefix``, sorted."""
        self._fresh(prefix)
        try:
            entries = self.fs.ls(self.key(prefix), detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except Exception as e:  # noqa: BLE001
            raise remote_error(self.url, "list", e) from None
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory")

    def is_empty(self) -> bool:
        self._fresh()
        try:
            return not self.fs.ls(self.root)
        except FileNotFoundError:
            return True
        except Exception as e:  # noqa: BLE001
            raise remote_error(self.url, "list", e) from None

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
        """Delete the store: its root ``zarr.json`` first, so it stops being a store before its parts go.  On an
        object store only by the holder of its lease, and only while it holds it."""
        fence = self.fence
        try:
            if self.exists("zarr.json"):
                if fence is not None:
                    fence.delete([self.key("zarr.json")])
                else:
                    self.fs.rm_file(self.key("zarr.json"))
            if self.exists():
                if fence is not None:
                    fence.check()
                self.fs.rm(self.root, recursive=True)
                if fence is not None:
                    fence.forget(self.root)
        except FileNotFoundError:
            pass
        except ToolkitError:
            raise
        except Exception as e:  # noqa: BLE001 (botocore's errors are not OSErrors)
            raise remote_error(self.url, "delete", e) from None
        self._fresh()

    def upload(self, folder: Path) -> None:
        """Copy a store built locally into place, its root ``zarr.json`` last (the moment it becomes a store);
        each object through ``put`` (so through a writer's fence)."""
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p != folder / "zarr.json")
        for p in [*files, folder / "zarr.json"]:
            self.put(p.relative_to(folder).as_posix(), p.read_bytes())
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
