"""Helpers shared by adapters built on Hugging Face transformers: loading, casting, a real offline tokenizer."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from toolkit.sdk import fields
from toolkit.sdk.errors import ToolkitError


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


@functools.lru_cache(maxsize=1)
def llama_tokenizer():
    """The real Llama-style SentencePiece tokenizer that mistral-common ships (offline): the tokenizer of the
    embedded random models."""
    import importlib.resources
    import shutil
    import tempfile

    from transformers import LlamaTokenizer

    src = importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"
    with tempfile.TemporaryDirectory() as d:
        with importlib.resources.as_file(src) as f:
            shutil.copy(f, Path(d) / "tokenizer.model")
        # LlamaTokenizer(vocab_file=...) silently builds an empty tokenizer in transformers 5.x
        return LlamaTokenizer.from_pretrained(d)


def cast_model(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move/cast the model, keeping computed float constants (rotary/sinusoid frequencies) in float32."""
    keep = [(m, n, b) for m in model.modules() for n, b in m._buffers.items()
            if b is not None and n in m._non_persistent_buffers_set and b.dtype == torch.float32]
    model.to(device=device, dtype=dtype)
    for m, n, b in keep:
        m._buffers[n] = b.to(device)


def from_cache_or_hub(load, source: str, **kw):
    """``load(source)`` from a local dir or the HF cache, then from the hub unless HF_HUB_OFFLINE is set.

    Trying the cache first avoids the hub client's retry loop (~50 s) when there is no network.
    """
    if Path(source).expanduser().exists():
        return load(source, **kw)
    try:
        return load(source, local_files_only=True, **kw)
    except Exception:  # noqa: BLE001
        import huggingface_hub

        if huggingface_hub.constants.HF_HUB_OFFLINE:
            raise
    return load(source, **kw)


def image_tensor(img, size: tuple[int, int], model: str) -> torch.Tensor:
    """A camera image ((H, W, 3) uint8, or float in [0, 1]; grey or RGBA accepted) as (3, *size) float32 in
    [0, 1], bicubic-resized with antialiasing.  Each adapter applies its own normalisation after this."""
    a = np.asarray(img)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise ToolkitError(f"{model} expects camera images shaped (H, W, 3), got {a.shape}")
    fields.finite_image(a, model)
    x = torch.from_numpy(np.ascontiguousarray(a[..., :3])).permute(2, 0, 1)[None].float()
    if not np.issubdtype(a.dtype, np.floating):
        x = x / 255.0
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bicubic", align_corners=False, antialias=True).clamp(0.0, 1.0)
    return x[0]
