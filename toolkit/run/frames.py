"""``extract --frames SIZE``: each stored step's camera images, downscaled, as per-sample arrays (see
``toolkit.store.frames`` for how a store keeps them).

A camera's frame size is fixed by the first image the run sees: the longer side becomes ``min(SIZE, its own)``
(never upscaled) and the shorter one keeps the aspect ratio; every later image of that camera is resized to the
same shape, with an area filter (Pillow's ``reduce`` then ``box``), so one array holds them all.  A step missing a
camera that the run's first step had is one line, as is a dataset that gives no images at all."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from toolkit.sdk.errors import ToolkitError
from toolkit.store.frames import frame_name


def frame_shape(image: np.ndarray, size: int) -> tuple[int, int]:
    """(height, width) of a camera's stored frames: the longer side ``min(size, longer)``, the aspect kept."""
    h, w = int(image.shape[0]), int(image.shape[1])
    scale = min(1.0, size / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def downscale(image: Any, shape: tuple[int, int], where: str) -> np.ndarray:
    """One (H, W, 3) image as uint8 (H', W', 3) of ``shape`` (area-averaged; unchanged when it has that shape)."""
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ToolkitError(f"{where}: a camera image of shape {a.shape}, expected (height, width, 3)")
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating) and a.size and float(np.nanmax(a)) <= 1.0:
            a = a * 255.0
        a = np.clip(np.nan_to_num(a), 0, 255).astype(np.uint8)
    a = a[..., :3]
    if a.shape[:2] == tuple(shape):
        return np.ascontiguousarray(a)
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(a)).resize((shape[1], shape[0]), Image.Resampling.BOX,
                                                                       reducing_gap=2.0))


class FrameKeeper:
    """Turns a batch of samples' step images into ``frame_<camera>`` arrays (the shapes fixed at the first)."""

    def __init__(self, size: int):
        self.size = int(size)
        self.shapes: dict[str, tuple[int, int]] = {}

    def __call__(self, samples: Sequence[Any]) -> dict[str, np.ndarray]:
        first = samples[0]
        if not self.shapes:
            images = first.step.images or {}
            if not images:
                raise ToolkitError(f"--frames: episode {first.episode.key} step {first.step.index} gives no camera "
                                   "images (this dataset, or its files, carry none); drop --frames")
            self.shapes = {cam: frame_shape(np.asarray(img), self.size) for cam, img in sorted(images.items())}
        out: dict[str, np.ndarray] = {}
        for cam, shape in self.shapes.items():
            frames = []
            for s in samples:
                where = f"episode {s.episode.key} step {s.step.index}"
                img = (s.step.images or {}).get(cam)
                if img is None:
                    raise ToolkitError(f"--frames: {where} has no {cam!r} image, which the run's first step had; "
                                       "drop --frames or fix the data")
                frames.append(downscale(img, shape, f"{where} camera {cam!r}"))
            out[frame_name(cam)] = np.stack(frames)
        return out
