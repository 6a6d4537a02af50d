"""Interrupting a run: SIGINT, SIGTERM and SIGHUP end it between store calls (never inside one), with whole
samples committed, one line giving the committed count and the ``--resume`` command, and exit code 128 + the
signal number."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP during a run: whole samples are committed; the CLI exits 128 + the signal number
    with one line giving the committed count and the ``--resume`` command."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class Signals:
    """Turns SIGINT/SIGTERM/SIGHUP into ``Interrupted`` in the main thread, but never inside a store call
    (``critical``): a signal there is held until the call returns, so buffers and commits stay consistent."""

    NAMES = ("SIGINT", "SIGTERM", "SIGHUP")

    def __init__(self):
        self.pending: int | None = None
        self.depth = 0
        self.saved: dict[int, Any] = {}

    def _handler(self, signum, frame):
        self.pending = signum
        if self.depth == 0:
            raise Interrupted(signum)

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for name in self.NAMES:
                num = getattr(signal, name, None)
                if num is not None:
                    self.saved[num] = signal.signal(num, self._handler)
        return self

    def __exit__(self, *exc):
        import signal

        for num, old in self.saved.items():
            signal.signal(num, old)
        self.saved.clear()

    @contextlib.contextmanager
    def critical(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if self.depth == 0 and self.pending is not None:
            raise Interrupted(self.pending)

    def hold(self) -> None:
        """From now on only record signals (the run is being wound up)."""
        self.depth += 1

    def finished_despite(self, committed: int, path: Path | str) -> None:
        """After a wind-up that completed the store: if a signal arrived during it, say so (one warning line), so
        an exit code 0 after Ctrl-C is not a surprise."""
        import signal
        import warnings

        if self.pending is not None:
            warnings.warn(f"{signal.Signals(self.pending).name} arrived while the run was committing its last "
                          f"samples; it finished instead: {path} is complete with {committed} samples", stacklevel=2)


def interrupted(e: KeyboardInterrupt, committed: int, path: Path | str) -> Interrupted:
    """The ``Interrupted`` a run raises after its cleanup, naming what is committed where."""
    import signal

    num = getattr(e, "signum", signal.SIGINT)
    return Interrupted(num, f"interrupted by {signal.Signals(num).name}: {committed} samples are committed in {path}")
