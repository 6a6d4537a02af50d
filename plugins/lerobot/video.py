"""Frames of an mp4 by timestamp, through PyAV, decoding only what the requested frames need.

A ``VideoReader`` keeps one file open and remembers where its decoder is: a request at or after the current
position decodes forward; one behind it, or further ahead than the gap between the key frames seen so far, seeks
to the key frame before it first.  Frames are matched the way lerobot matches them (``decode_video_frames``): the
decoded frame nearest the requested time, which must be within ``tolerance_s`` (1e-4 s by default) of it.
Only the chosen frame is converted to RGB.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.sdk.errors import ToolkitError

INSTALL = "pip install 'toolkit[lerobot]'"
FIRST_SEEK_GAP = 1.0  # seconds: before two key frames have been seen, seek when the next frame is further ahead


def import_av():
    try:
        import av
    except ImportError as e:
        raise ToolkitError(f"LeRobot videos are decoded with PyAV ({e}); install it with: {INSTALL}") from None
    return av


def _line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


class VideoReader:
    """One video file, read forward by timestamp (seconds from the file's start)."""

    def __init__(self, path: Path, codec_hint: str | None = None):
        self.path = Path(path)
        self.codec_hint = codec_hint  # info.json's video.codec, named when the decoder lacks it
        self._container: Any = None
        self._stream: Any = None
        self._frames: Any = None  # the decode iterator since the last seek
        self._cur: Any = None  # the newest decoded frame
        self._cur_t: float | None = None
        self._cur_rgb: np.ndarray | None = None
        self._last_key: float | None = None
        self._gop: float | None = None  # the largest distance between successive key frames seen
        self.decoded = 0  # frames decoded (the benchmark reports it)

    # opening ---------------------------------------------------------------------------------
    def _open(self) -> None:
        av = import_av()
        if not self.path.is_file():
            raise ToolkitError(f"{self.path}: the video file is missing; download the dataset's videos/ folder "
                               "(or pass the complete dataset folder as --data)")
        try:
            container = av.open(str(self.path))
        except Exception as e:  # noqa: BLE001 - FFmpeg reports damaged files through several error types
            raise ToolkitError(f"{self.path}: cannot open the video ({_line(e)}); the file is damaged or "
                               "not a video") from None
        if not container.streams.video:
            container.close()
            raise ToolkitError(f"{self.path}: the file holds no video stream")
        stream = container.streams.video[0]
        if stream.codec_context is None:
            container.close()
            codec = f" ({self.codec_hint})" if self.codec_hint else ""
            raise ToolkitError(f"{self.path}: the video's codec{codec} has no decoder in this PyAV/FFmpeg build "
                               f"(PyAV {av.__version__}); re-encode the videos (e.g. to H.264) or install a PyAV "
                               "build that decodes it")
        self._container, self._stream = container, stream
        self._restart(None)

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
        self._container = self._stream = self._frames = self._cur = None
        self._cur_t = None

    def _restart(self, t: float | None) -> None:
        """Decode from the start (``t`` None) or from the key frame at or before ``t`` seconds."""
        if t is not None:
            s = self._stream
            self._container.seek(max(0, int(t / s.time_base)), stream=s, backward=True, any_frame=False)
        self._frames = self._container.decode(self._stream)
        self._cur = self._cur_t = self._cur_rgb = None
        self._last_key = None

    def _next(self) -> bool:
        """Decode one more frame; False at the end of the stream."""
        try:
            while True:
                frame = next(self._frames)
                if frame.pts is not None:
                    break
        except StopIteration:
            return False
        except import_av().error.DecoderNotFoundError:
            av = import_av()
            codec = f" ({self.codec_hint})" if self.codec_hint else ""
            raise ToolkitError(f"{self.path}: the video's codec{codec} has no decoder in this PyAV/FFmpeg build "
                               f"(PyAV {av.__version__}); re-encode the videos or install a PyAV build that decodes "
                               "it") from None
        except Exception as e:  # noqa: BLE001
            raise ToolkitError(f"{self.path}: cannot decode the video ({_line(e)}); the file looks damaged") from None
        self.decoded += 1
        t = frame.time  # pts x time_base, in seconds
        if frame.key_frame:
            if self._last_key is not None and t > self._last_key:
                self._gop = max(self._gop or 0.0, t - self._last_key)
            self._last_key = t
        self._cur, self._cur_t, self._cur_rgb = frame, t, None
        return True

    # reading -----------------------------------------------------------------------------------
    def frame(self, t: float, tolerance_s: float, what: str = "") -> np.ndarray:
        """The (H, W, 3) uint8 frame shown at ``t`` seconds (within ``tolerance_s``)."""
        if self._container is None:
            self._open()
        gap = self._gop if self._gop is not None else FIRST_SEEK_GAP
        if self._cur_t is not None and (t < self._cur_t - tolerance_s or t - self._cur_t > gap):
            self._restart(t)
        elif self._cur_t is None and t > gap:
            self._restart(t)
        while self._cur_t is None or self._cur_t < t - tolerance_s:
            if not self._next():
                last = f"its last frame is at {self._cur_t:.4f} s" if self._cur_t is not None else "it has no frames"
                raise ToolkitError(f"{self.path}: no frame at {t:.4f} s{what}: {last}; the video is shorter than "
                                   "the data says (an incomplete download or a broken conversion)")
        if abs(self._cur_t - t) > tolerance_s:
            raise ToolkitError(f"{self.path}: no frame at {t:.4f} s{what} within the tolerance of {tolerance_s:g} s "
                               f"(the nearest decoded frame is at {self._cur_t:.4f} s); the data's timestamps and "
                               "the video disagree (raise --dataset-option tolerance_s=SECONDS to accept it)")
        if self._cur_rgb is None:
            self._cur_rgb = self._cur.to_ndarray(format="rgb24")
        return self._cur_rgb


class VideoCache:
    """The open readers, at most ``size`` of them (v3.0 puts many episodes into one file: reading them in order
    goes on from where the previous episode stopped)."""

    def __init__(self, size: int = 8):
        self.size = size
        self._readers: OrderedDict[Path, VideoReader] = OrderedDict()

    def get(self, path: Path, codec_hint: str | None = None) -> VideoReader:
        r = self._readers.pop(path, None) or VideoReader(path, codec_hint)
        self._readers[path] = r
        while len(self._readers) > self.size:
            self._readers.popitem(last=False)[1].close()
        return r

    def decoded(self) -> int:
        return sum(r.decoded for r in self._readers.values())

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers.clear()
