"""The declared types of the fields a dataset adapter hands to the pipeline, checked before they are stored.

A store keeps one fixed-shape array per field, so a value that is not of the field's type must stop the
run with one line naming where it came from (file, episode, step) before anything of that batch is
written, never be coerced silently (``bool("no")`` is True):

    action   numeric, finite, 1-D (a leading batch of 1 is squeezed), at most ``MAX_VECTOR`` values,
             the same size at every step of a run (the size first seen)
    state    the same rules as action
    success  boolean-like: True/False, 1/0 (ints or integral floats), or one of the words
             true/false, yes/no, y/n, t/f, 1/0, success/failure, succeeded/failed (any case);
             None means unknown (stored as -1).  Anything else (2, "maybe", a list) is refused.
    task_id  a non-negative integer that fits the store's int32 coordinate; integral floats and
             digit strings are read as that integer, 1.7 or 10**30 are refused
    images   (H, W, 3) uint8 after an adapter's conversion, sides of 1..``MAX_IMAGE_SIDE`` pixels; the
             raw shape is checked before any conversion copies it, and a float image must be finite
             (``finite_image``: NaN is never turned into black)
    instruction, task
             a ``str`` (not bytes, not a list: adapters decode), valid Unicode (no lone surrogate such as
             ``"\\udc80"``, which no store can encode), at most ``MAX_TEXT`` characters; checked before any
             model adapter's ``prepare`` (and its tokenizer) sees the text

Adapters call these with ``where`` naming the file and key path of the value; the extraction pipeline
checks every sample again with ``check_samples`` (naming the episode and step), so a third-party
adapter gets the same guarantees.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from toolkit.sdk.errors import ToolkitError

MAX_VECTOR = 4096  # values in one step's action or state
MAX_IMAGE_SIDE = 8192  # pixels along an image side
MAX_TASK_ID = 2**31 - 1  # the store's task_id coordinate is int32
MAX_TEXT = 10_000  # characters in one instruction (or task name): longer is a broken dataset, not a prompt

TRUE_WORDS = ("true", "yes", "y", "t", "1", "success", "succeeded")
FALSE_WORDS = ("false", "no", "n", "f", "0", "failure", "failed")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def vector(value: Any, name: str, where: str) -> np.ndarray | None:
    """``value`` as a 1-D float32 vector (``None`` stays ``None``), or a one-line error at ``where``."""
    if value is None:
        return None
    if isinstance(value, (str, bytes, dict)) or (hasattr(value, "keys") and not isinstance(value, np.ndarray)):
        raise ToolkitError(f"{where}: {name} is a {type(value).__name__} ({_show(value)}), expected a numeric "
                           "vector")
    try:
        a = np.asarray(value)
    except (ValueError, TypeError) as e:  # ragged nested lists
        raise ToolkitError(f"{where}: {name} is not a numeric vector ({type(e).__name__}: {e})") from None
    if a.dtype.kind not in "biuf":
        raise ToolkitError(f"{where}: {name} is not numeric ({_show(value)}, dtype {a.dtype}), expected a numeric "
                           "vector")
    if a.size > MAX_VECTOR:
        raise ToolkitError(f"{where}: {name} has {a.size:,} values (shape {a.shape}); at most {MAX_VECTOR} are "
                           "expected per step")
    squeezed = a.reshape([d for d in a.shape if d != 1] or [a.size]) if a.ndim != 1 else a
    if squeezed.ndim != 1:
        raise ToolkitError(f"{where}: {name} has shape {a.shape}, expected a 1-D vector (one step's values)")
    out = squeezed.astype(np.float32)
    if not np.isfinite(out).all():
        raise ToolkitError(f"{where}: {name} holds NaN or infinite values ({_show(a.tolist())})")
    return out


def success(value: Any, where: str) -> int:
    """A boolean-like success flag -> 1, 0, or -1 for unknown (``None``); see the module doc for the words."""
    if value is None:
        return -1
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(-1)[0]
    if isinstance(value, (bool, np.bool_)):
        return int(bool(value))
    if isinstance(value, (bytes, np.bytes_)):
        value = bytes(value).decode("utf-8", "replace")
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return 1
        if word in FALSE_WORDS:
            return 0
    elif isinstance(value, (int, float, np.integer, np.floating)) and value in (0, 1):
        return int(value)
    raise ToolkitError(f"{where}: success is {_show(value)}, which is not boolean-like (use True/False, 1/0 or "
                       f"one of {'/'.join(TRUE_WORDS[:2])}/{'/'.join(FALSE_WORDS[:2])}; None for unknown)")


def task_id(value: Any, where: str) -> int:
    """A task id as a small non-negative int (integral floats and digit strings accepted)."""
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(-1)[0]
    n: int | None = None
    if isinstance(value, (bool, np.bool_)):
        n = None
    elif isinstance(value, (int, np.integer)):
        n = int(value)
    elif isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        n = int(value)
    elif isinstance(value, (str, bytes)) and str(value if isinstance(value, str) else value.decode()).strip().isdigit():
        n = int(value)
    if n is None or not 0 <= n <= MAX_TASK_ID:
        raise ToolkitError(f"{where}: task_id is {_show(value)}; expected an integer from 0 to {MAX_TASK_ID}")
    return n


def text(value: Any, name: str, where: str) -> str:
    """An instruction (or task name) as checked text: a ``str`` of valid Unicode, at most ``MAX_TEXT``
    characters (the length is checked first, before the text is scanned or tokenised)."""
    if not isinstance(value, str):
        hint = " (decode it in the dataset adapter, e.g. value.decode('utf-8'))" if isinstance(
            value, (bytes, bytearray, np.bytes_)) else ""
        cut = 60 if isinstance(value, (bytes, bytearray)) else 4 if isinstance(value, (list, tuple)) else None
        shown = _show(value if cut is None else value[:cut]) + ("..." if cut and len(value) > cut else "")
        raise ToolkitError(f"{where}: {name} is a {type(value).__name__} ({shown}), expected a str{hint}")
    if len(value) > MAX_TEXT:
        raise ToolkitError(f"{where}: {name} is {len(value):,} characters long ({_show(value[:40])}...), over the "
                           f"limit of {MAX_TEXT:,} (toolkit.sdk.fields.MAX_TEXT); fix the dataset's {name} field")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ToolkitError(f"{where}: {name} holds a lone surrogate {value[e.start]!r} at character {e.start} "
                           f"({_show(value[max(0, e.start - 20):e.start + 20])}), which is not valid Unicode; decode "
                           "the dataset's text with errors='replace' or fix it") from None
    return value


def finite_image(a: np.ndarray, where: str) -> None:
    """Refuse a float image holding NaN or infinite values (uint8 ones cannot); cheap: one ``isfinite`` pass."""
    if a.dtype.kind in "fc" and not np.isfinite(a).all():
        bad = int(a.size - np.count_nonzero(np.isfinite(a)))
        raise ToolkitError(f"{where}: image holds {bad:,} NaN or infinite values (of {a.size:,}); fix the "
                           "dataset's images (they would become black pixels)")


def image_shape(shape: tuple[int, ...], where: str) -> None:
    """Refuse an image whose raw shape has a side beyond ``MAX_IMAGE_SIDE`` (checked before it is copied)."""
    sides = [d for d in shape if d not in (1, 3, 4)] or list(shape)
    if len(shape) > 4 or any(d > MAX_IMAGE_SIDE for d in shape[-3:]) or any(d < 1 for d in sides):
        raise ToolkitError(f"{where}: an image of shape {tuple(shape)} is out of bounds (expected (H, W, 3) with "
                           f"sides of 1 to {MAX_IMAGE_SIDE} pixels)")


def image(a: Any, where: str) -> None:
    """Check an adapter's converted image: (H, W, 3) uint8 within bounds."""
    if not isinstance(a, np.ndarray) or a.dtype != np.uint8 or a.ndim != 3 or a.shape[-1] != 3:
        what = f"shape {a.shape}, dtype {a.dtype}" if isinstance(a, np.ndarray) else type(a).__name__
        raise ToolkitError(f"{where}: image is {what}; expected (H, W, 3) uint8")
    image_shape(a.shape, where)


class FieldCheck:
    """The sizes first seen in a run: every later step's action (and state) must match them, as a store
    field has one shape; a run whose first step has an action needs one at every step."""

    def __init__(self) -> None:
        self.first: dict[str, tuple[int | None, str]] = {}

    def same_size(self, name: str, value: np.ndarray | None, where: str, required: bool = False) -> None:
        if value is None and not required:
            return
        size = None if value is None else int(value.size)
        seen, at = self.first.setdefault(name, (size, where))
        if seen != size:
            have = f"has no {name}" if size is None else f"has {size} {name} values"
            had = "had none" if seen is None else f"had {seen}"
            raise ToolkitError(f"{where}: {have}, but {at} {had}; every step of a run needs the same {name} size")


def check_samples(pairs: Iterable[tuple[Any, Any]], check: FieldCheck) -> list[np.ndarray | None]:
    """Check (episode, step) pairs against the declared types, naming the episode (and its file, when the
    adapter records one in ``metadata['file']``) and step of the first bad value; returns the actions as
    validated 1-D float32 vectors."""
    actions = []
    for ep, step in pairs:
        source = ep.metadata.get("file") if isinstance(ep.metadata, dict) else None
        where = f"{source + ': ' if source else ''}episode {ep.key} step {step.index}"
        text(ep.instruction, "instruction", where)
        text(ep.task, "task", where)
        task_id(ep.task_id, where)
        success(ep.metadata.get("success"), where)
        action = vector(step.action, "action", where)
        check.same_size("action", action, where, required=True)
        check.same_size("state", vector(step.state, "state", where), where)
        for camera, img in (step.images or {}).items():
            image(img, f"{where} camera {camera!r}")
        actions.append(action)
    return actions
