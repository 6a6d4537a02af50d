"""One writer per store: ``StoreLock`` (an ``flock`` beside a local store) and ``LeaseLock`` (a renewed lease object
beside a store on object storage)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from toolkit.sdk.errors import ToolkitError, first_line

LEASE_SECONDS = float(os.environ.get("TOOLKIT_LEASE_SECONDS", 60))


class StoreLock:
    """One writer per store: an exclusive ``flock`` on ``.NAME.lock`` beside the store, held for the whole run.

    Taken before anything is created, truncated or replaced, so a second ``extract`` (create, --resume or
    --overwrite) fails with one line naming the holder instead of interleaving with it.  The lock file holds
    the holder's pid and host and is removed on release; the OS drops the lock if the holder dies.
    """

    def __init__(self, store: Path):
        self.path = store.parent / f".{store.name}.lock"
        self.store = store
        self.fd: int | None = None

    def acquire(self) -> None:
        import fcntl
        import socket

        try:
            self.store.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ToolkitError(f"cannot create {self.store}: {e.strerror} ({self.store.parent})") from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise ToolkitError(f"cannot write {self.store}: {e.strerror} ({self.store.parent}); pick a "
                                   "writable --store") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise ToolkitError(f"{self.store} is being written by {holder}; wait for that run to finish "
                                   "(or stop it) and use --resume") from None
            try:  # the file may have been released and unlinked between open and flock: lock the live one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None


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

    def __init__(self, loc: Any, seconds: float | None = None):
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
            raise remote_error(self.loc.url, "lock", e) from None
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


def remote_error(url: str, what: str, e: BaseException) -> ToolkitError:
    return ToolkitError(f"cannot {what} {url}: {type(e).__name__}: {first_line(e)} (credentials and endpoint come "
                        "from the backend's standard configuration, e.g. AWS_* variables or ~/.aws for s3://)")
