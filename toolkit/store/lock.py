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


def _clock() -> float:
    """Seconds on a clock that keeps running while the process is stopped or the machine sleeps (a laptop lid,
    a preempted VM): a lease deadline measured on it is never later than the lease's real end."""
    try:
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    except (AttributeError, OSError):
        return time.monotonic()


def _precondition_failed(e: BaseException) -> bool:
    """S3's 412 (``If-Match``/``If-None-Match`` did not hold), as s3fs raises it."""
    return isinstance(e, FileExistsError) or "pre-condition" in str(e).lower() or "PreconditionFailed" in str(e)


class LeaseLost(ToolkitError):
    """This run's lease ran out or another run took the store over: it must not change the store any more."""


class LeaseLock:
    """One writer per object-store store: a lease object ``.NAME.lock`` beside it, and the fence of every write.

    Acquired by creating the object only if it does not exist (S3's conditional ``If-None-Match: *``); the
    holder rewrites it every third of the lease (``If-Match`` its last ETag), so a live run keeps it however
    long it runs.  A lease that has not been renewed for ``LEASE_SECONDS`` (its holder died or stalled) may be
    taken over, again conditionally, so of two runs taking over one stale lease exactly one wins.

    While held, the lease fences every write of its run to the store (``put``, ``delete``; ``Location`` and the
    writer's zarr store route through them):

    * **deadline**: each write first checks that the lease is still this run's by its own clock: the time its
      last renewal began plus the lease, less a quarter of it as margin for clock skew and the write's own time
      (``_clock`` runs on while the process is stopped).  A writer that was paused past its lease (a GC pause,
      a preempted VM, SIGSTOP) raises ``LeaseLost`` at its next write instead of writing;
    * **compare-and-swap**: each PUT is conditional on the object being as this run last saw it (``If-Match``
      its ETag, or ``If-None-Match: *`` for a key it saw absent; the store is listed when the lease is taken).
      A write that was already under way when the process stopped, and lands after another run wrote the same
      object, fails instead of overwriting it.  The owner itself, when a stale run's write landed first, reads
      the new ETag and writes again (the owner wins).

    Backends without conditional writes (anything but S3 here) keep the deadline check and the
    write-then-read-back lease, which narrow but do not close the races; docs/scaling.md says so.
    """

    def __init__(self, loc: Any, seconds: float | None = None):
        self.loc = loc
        parent, _, name = loc.root.rpartition("/")
        self.key = f"{parent}/.{name}.lock" if parent else f".{name}.lock"
        self.seconds = LEASE_SECONDS if seconds is None else seconds
        self.margin = self.seconds / 4
        self.token = uuid.uuid4().hex
        self.etag: str | None = None
        self.lost: str | None = None
        self.deadline = 0.0
        self.etags: dict[str, str | None] = {}  # every store object as this run last saw it (None: absent)
        self._etags_lock = threading.Lock()
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
        etag = None
        try:
            etag = fs.info(self.key).get("ETag")
            return json.loads(fs.cat_file(self.key)), etag
        except FileNotFoundError:
            return None, None
        except ValueError:  # unreadable lease: treat as expired
            return {"expires": 0, "holder": "an unreadable lease"}, etag
        except Exception as e:  # noqa: BLE001 (botocore's are not OSErrors)
            raise remote_error(self.loc.url, "read the lease of", e) from None

    def _write(self, condition: dict[str, str]) -> bool:
        """Write our lease under ``condition``; False when the condition failed (someone else holds it)."""
        fs = self.loc.fs
        began = _clock()
        try:
            if self.conditional:
                fs.pipe_file(self.key, self._body(), **condition)
            else:
                fs.pipe_file(self.key, self._body())
        except (PermissionError, FileNotFoundError):  # FileNotFound: If-Match on a lease another run removed
            return False
        except Exception as e:  # noqa: BLE001 (botocore's are not OSErrors)
            if _precondition_failed(e):
                return False
            raise remote_error(self.loc.url, "lock", e) from None
        lease, etag = self._read()
        if not lease or lease.get("token") != self.token:
            return False
        self.etag = etag
        self.deadline = began + self.seconds - self.margin
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
        self.lost = None
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew, name="toolkit-lease", daemon=True)
        self._thread.start()
        try:
            self._learn()
        except BaseException:
            self.release()
            raise
        self.loc.fence = self

    def _learn(self) -> None:
        """See every object of the store as it is now (one listing): the base of the conditional writes."""
        fs = self.loc.fs
        fs.invalidate_cache(self.loc.root)
        try:
            found = fs.find(self.loc.root, detail=True)
        except FileNotFoundError:
            found = {}
        except Exception as e:  # noqa: BLE001 (botocore's are not OSErrors)
            raise remote_error(self.loc.url, "list", e) from None
        with self._etags_lock:
            self.etags = {name: info.get("ETag") for name, info in found.items() if info.get("type") != "directory"}

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

    def held(self) -> bool:
        """True while this run's lease is certainly its own (by its own clock, with the margin)."""
        return self._thread is not None and not self.lost and _clock() < self.deadline

    def check(self) -> None:
        """Raise ``LeaseLost`` if the lease was lost or has run out (this run must not write any more)."""
        if self.lost:
            raise LeaseLost(f"lost the lease of {self.loc.url} ({self.lost}): stopped writing; the store belongs "
                            "to that run now (if it stopped before the end, continue with --resume)")
        if self._thread is not None and _clock() >= self.deadline:
            raise LeaseLost(f"the lease of {self.loc.url} ran out before it could be renewed (this run was paused "
                            f"or cut off for more than {self.seconds - self.margin:.0f} s): stopped writing; "
                            "another run may own the store now; continue with --resume")

    # the fence: every write of the lease holder goes through these ---------------------------------------------
    def put(self, path: str, data: bytes) -> None:
        """Write one object if this run still holds the lease, conditional on the object being as last seen."""
        fs = self.loc.fs
        for _ in range(4):
            self.check()
            if not self.conditional:
                try:
                    fs.pipe_file(path, data)
                except Exception as e:  # noqa: BLE001 (botocore's are not OSErrors)
                    raise remote_error(self.loc.url, "write", e) from None
                return
            with self._etags_lock:
                seen = self.etags.get(path)
            condition = {"IfMatch": seen} if seen else {"IfNoneMatch": "*"}
            try:
                out = fs.pipe_file(path, data, **condition)
            except Exception as e:  # noqa: BLE001 (botocore's are not OSErrors)
                if not _precondition_failed(e):
                    raise remote_error(self.loc.url, "write", e) from None
                # Someone else wrote it since: a stale run's write that was under way, or our own retried PUT.
                # We still hold the lease (checked above, again before the next try), so ours wins.
                with self._etags_lock:
                    self.etags[path] = self._head(path)
                continue
            etag = out.get("ETag") if isinstance(out, dict) else None
            with self._etags_lock:
                self.etags[path] = etag or self._head(path)
            return
        raise ToolkitError(f"cannot write {self.loc.url}: another run keeps changing {path.rsplit('/', 1)[-1]} "
                           "while this run holds the lease; stop the other run and continue with --resume")

    def _head(self, path: str) -> str | None:
        self.loc.fs.invalidate_cache(path)
        try:
            return self.loc.fs.info(path).get("ETag")
        except FileNotFoundError:
            return None
        except Exception as e:  # noqa: BLE001 (botocore's are not OSErrors)
            raise remote_error(self.loc.url, "read", e) from None

    def delete(self, paths: list[str]) -> None:
        """Delete objects if this run still holds the lease (S3 deletes are not conditional: the deadline alone
        fences them)."""
        self.check()
        for path in paths:
            try:
                self.loc.fs.rm_file(path)
            except FileNotFoundError:
                pass
            except Exception as e:  # noqa: BLE001 (botocore's are not OSErrors)
                raise remote_error(self.loc.url, "delete", e) from None
            with self._etags_lock:
                self.etags[path] = None

    def forget(self, prefix: str) -> None:
        """Everything under ``prefix`` was removed (by this run, under the lease)."""
        with self._etags_lock:
            for k in [k for k in self.etags if k == prefix or k.startswith(prefix + "/")]:
                self.etags[k] = None

    def release(self) -> None:
        if getattr(self.loc, "fence", None) is self:
            self.loc.fence = None
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=max(5.0, self.seconds))
        self._thread = None
        still_ours = not self.lost and _clock() < self.deadline
        try:
            lease, _ = self._read()
            if still_ours and lease and lease.get("token") == self.token:
                self.loc.fs.rm_file(self.key)
        except (FileNotFoundError, ToolkitError, OSError):
            pass  # a lease we cannot remove runs out by itself


# Where each backend takes its credentials and endpoint from (named in messages; never the values themselves).
CREDENTIALS = {
    "s3": "AWS_* variables, ~/.aws or an instance role; AWS_ENDPOINT_URL_S3 for a non-AWS endpoint",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS or gcloud's login; STORAGE_EMULATOR_HOST for an emulator",
    "az": "AZURE_STORAGE_CONNECTION_STRING or AZURE_STORAGE_ACCOUNT_NAME with a key or azure-identity",
}


def remote_error(url: str, what: str, e: BaseException) -> ToolkitError:
    scheme = url.split("://", 1)[0]
    source = CREDENTIALS.get(scheme, "the fsspec backend's standard configuration")
    return ToolkitError(f"cannot {what} {url}: {type(e).__name__}: {first_line(e)} (credentials and endpoint come "
                        f"from {source})")
