"""Camera frames in a store (``extract --frames SIZE``): one per-sample array per camera, ``frame_<camera>``,
``(sample, <name>_y, <name>_x, rgb)`` uint8, aligned with every other per-sample array (one frame per stored policy
call), always compressed with zstd whatever ``--codec`` says (pixels are not activations: zstd over a chunk of
consecutive frames exploits what changes little between steps, lossless, and any Zarr reader opens them as images).
"""

from __future__ import annotations

from toolkit.store.layout import ArraySpec

PREFIX = "frame_"


CODEC = "zstd"


def frame_name(camera: str) -> str:
    """The store's array name of a camera's frames."""
    return f"{PREFIX}{camera}"


def is_frame(name: str) -> bool:
    return name.startswith(PREFIX) and "/" not in name


def camera_of(name: str) -> str:
    return name[len(PREFIX):]


def frame_spec(name: str, shape: tuple[int, ...]) -> ArraySpec:
    """The array of one camera's frames of per-sample ``shape`` (height, width, 3); its own dimension names per
    camera (two cameras of different sizes never give one dimension two lengths in ``xarray.open_zarr``)."""
    return ArraySpec(name, tuple(int(v) for v in shape), "uint8", (f"{name}_y", f"{name}_x", "rgb"), codec=CODEC,
                     attrs={"camera": camera_of(name), "frames": True})
