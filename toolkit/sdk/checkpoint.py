"""Loading real checkpoints exactly: every model weight comes from the file or is named as missing.

A checkpoint whose keys do not match the model (another layout, a renamed module) must never run
with silently random weights.  Adapters read the file's tensors (``load_state_dict_files``), rename
them to the model's names (``remap_keys``), assign them (``load_into``) and get a ``LoadReport``
that ``check_complete`` has verified: a missing weight is a one-line ``CheckpointError`` unless the
user passed ``--allow-missing``, and the report goes into the store's ``model`` attributes.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: the module loads without torch
    import torch

from toolkit.sdk.errors import ToolkitError

log = logging.getLogger("toolkit.sdk.checkpoint")

SHOW_MISSING = 5  # names in the one-line error
SHOW_UNEXPECTED = 50  # names stored in the attributes (the count is always stored)
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_FILE = "model.safetensors"


class CheckpointError(ToolkitError):
    """A checkpoint that does not fill the model it is loaded into (or cannot be read)."""


@dataclass
class LoadReport:
    """What a checkpoint filled: stored in the store so a reader can tell real weights from random ones."""

    source: str  # the checkpoint path/id as the user gave it
    layout: str  # recognised layout, e.g. "lerobot pi0 (current)"
    n_params: int  # model parameters + persistent buffers considered (names, tied aliases included)
    loaded: list[str] = field(default_factory=list)  # model names filled from the file
    derived: list[str] = field(default_factory=list)  # tied/derived names, not in the file on purpose
    missing: list[str] = field(default_factory=list)  # model names NOT filled
    unexpected: list[str] = field(default_factory=list)  # file keys the model does not use
    # file keys upstream's own policy also leaves unused (e.g. an untied lm_head): recorded, not warned about
    ignored: list[str] = field(default_factory=list)

    def to_attrs(self) -> dict[str, Any]:
        """JSON-able summary for the store's ``model.load_report`` attribute."""
        return {
            "source": self.source, "layout": self.layout, "n_params": self.n_params,
            "n_loaded": len(self.loaded), "n_derived": len(self.derived), "n_missing": len(self.missing),
            "n_unexpected": len(self.unexpected), "missing": list(self.missing),
            "unexpected": list(self.unexpected[:SHOW_UNEXPECTED]), "derived": list(self.derived),
            "n_ignored": len(self.ignored), "ignored": list(self.ignored[:SHOW_UNEXPECTED]),
        }


def model_weight_names(model: torch.nn.Module) -> list[str]:
    """Every parameter and persistent buffer name of ``model`` (tied aliases included), in state-dict order."""
    return list(model.state_dict(keep_vars=True).keys())


def _tied_aliases(model: torch.nn.Module) -> dict[str, set[str]]:
    """name -> the other names sharing the same Parameter/buffer object (weight tying)."""
    groups: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(name)
    return {n: set(g) - {n} for g in groups.values() if len(g) > 1 for n in g}


def check_complete(model: torch.nn.Module, loaded: Iterable[str], *, source: str, layout: str,
                   derived: Iterable[str] = (), unexpected: Iterable[str] = (),
                   allow_missing: bool = False, strict: bool = False, ignored: Iterable[str] = ()) -> LoadReport:
    """Every parameter and persistent buffer of ``model`` must be in ``loaded`` or ``derived``.

    A name tied to a loaded one (the same Parameter object, e.g. ``lm_head.weight`` and the input
    embedding) counts as derived.  Otherwise raise ``CheckpointError`` with one line naming the first
    missing weights and the recognised layout; with ``allow_missing`` log one warning and return the report.
    Checkpoint tensors the model does not use (``unexpected``: unmerged LoRA factors, a head this model lacks)
    are one warning with their count and first names, or, with ``strict`` (``--strict``), a ``CheckpointError``.
    ``ignored``: file tensors the upstream policy does not use either (recorded in the report, no warning).
    """
    names = model_weight_names(model)
    loaded_set, derived_set = set(loaded), set(derived)
    for name, others in _tied_aliases(model).items():
        if name not in loaded_set and others & loaded_set:
            derived_set.add(name)
    report = LoadReport(
        source=source, layout=layout, n_params=len(names),
        loaded=[n for n in names if n in loaded_set],
        derived=[n for n in names if n in derived_set and n not in loaded_set],
        missing=[n for n in names if n not in loaded_set and n not in derived_set],
        unexpected=sorted(set(unexpected)), ignored=sorted(set(ignored)),
    )
    if report.missing:
        first = ", ".join(report.missing[:SHOW_MISSING])
        what = (f"{source}: {len(report.missing)} of {len(names)} weights are not in the checkpoint "
                f"(recognised layout: {layout}); first missing: {first}")
        if not allow_missing:
            raise CheckpointError(f"{what}; pass --allow-missing to run anyway (the missing names are recorded "
                                  "in the store)")
        log.warning("%s; running anyway (--allow-missing): they keep their random initial values", what)
    if report.unexpected:
        what = (f"{source}: {len(report.unexpected)} checkpoint tensors are not used by the model (recognised "
                f"layout: {layout}); first: {', '.join(report.unexpected[:SHOW_MISSING])}")
        lora = sum(".lora_" in n for n in report.unexpected)
        if lora:  # a fine-tune saved without merging its adapters: the base weights alone are not the fine-tune
            what += (f" ({lora} are unmerged LoRA factors: merge them into the base weights, e.g. peft's "
                     "merge_and_unload, and save again)")
        if strict:
            raise CheckpointError(f"{what}; refused (--strict): check that --model names this checkpoint's family")
        log.warning("%s; they are ignored (listed in the store's model.load_report; --strict refuses them)", what)
    return report


# --------------------------------------------------------------------------- reading files


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors file(s) holding a checkpoint: a ``.safetensors`` file, or a directory with
    ``model.safetensors`` or a sharded ``model.safetensors.index.json`` (its shards, in index order)."""
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix != ".safetensors":
            raise CheckpointError(f"{path}: not a .safetensors file")
        return [p]
    if not p.is_dir():
        raise CheckpointError(f"{path}: no such file or directory")
    index = p / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        shards = [p / s for s in dict.fromkeys(weight_map.values())]
        absent = [s.name for s in shards if not s.is_file()]
        if absent:
            raise CheckpointError(f"{path}: shard {absent[0]} named in {SAFETENSORS_INDEX} is missing "
                                  f"({len(absent)} of {len(shards)} shards absent); download all shards")
        return shards
    if (p / SAFETENSORS_FILE).is_file():
        return [p / SAFETENSORS_FILE]
    found = sorted(p.glob("*.safetensors"))
    if len(found) == 1:
        return found
    raise CheckpointError(f"{path}: no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} in this directory")


def load_state_dict_files(path: str | Path | Sequence[Path], *, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint (file, directory or shard list) by key, in file dtypes."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = list(path) if isinstance(path, (list, tuple)) else weight_files(path)
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            out.update(load_file(str(f), device=device))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: cannot read safetensors ({type(e).__name__}: {e})") from None
    return out


def safetensors_keys(path: str | Path) -> list[str]:
    """The tensor names of a safetensors checkpoint without reading the tensors (to recognise its layout)."""
    return list(safetensors_shapes(path))


def safetensors_shapes(path: str | Path | Sequence[Path]) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape without reading the data: enough to recognise a layout and size an architecture."""
    from safetensors import SafetensorError, safe_open

    files = list(path) if isinstance(path, (list, tuple)) else weight_files(path)
    out: dict[str, tuple[int, ...]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                out.update({k: tuple(h.get_slice(k).get_shape()) for k in h.keys()})
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: cannot read safetensors ({type(e).__name__}: {e})") from None
    return out


def read_tensors(path: str | Path | Sequence[Path], keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """Only the named tensors of a safetensors checkpoint (e.g. statistics stored beside the weights)."""
    from safetensors import SafetensorError, safe_open

    files = list(path) if isinstance(path, (list, tuple)) else weight_files(path)
    want, out = set(keys), {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                out.update({k: h.get_tensor(k) for k in h.keys() if k in want})
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: cannot read safetensors ({type(e).__name__}: {e})") from None
    return out


def assign_from_safetensors(model: torch.nn.Module, files: Sequence[Path], *, device: torch.device,
                            dtype: torch.dtype, source: str, layout: str) -> tuple[list[str], list[str]]:
    """Fill a model built on the meta device from safetensors files, one file (shard) at a time, with
    ``load_state_dict(assign=True)``: each parameter *is* the tensor read from the file (read straight onto
    ``device``; floating-point ones cast to ``dtype`` only where the file differs), so no weight is held twice
    and the host holds at most one shard.  Keys must already be the model's names.  Returns
    ``(loaded, unexpected)`` for ``check_complete``; a shape mismatch is one line naming the weight."""
    from safetensors import SafetensorError, safe_open

    own = model.state_dict(keep_vars=True)
    where = "cpu" if device.type == "cpu" else f"{device.type}:{device.index or 0}"
    loaded: list[str] = []
    unexpected: list[str] = []
    for f in files:
        part: dict[str, torch.Tensor] = {}
        try:
            with safe_open(str(f), framework="pt", device=where) as h:
                for key in h.keys():
                    if key not in own:
                        unexpected.append(key)
                        continue
                    shape = tuple(h.get_slice(key).get_shape())
                    if shape != tuple(own[key].shape):
                        raise CheckpointError(f"{source}: weight {key} has shape {shape} in {Path(f).name} but "
                                              f"{tuple(own[key].shape)} in the model built from its config "
                                              f"(recognised layout: {layout})")
                    t = h.get_tensor(key)
                    part[key] = t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: cannot read safetensors ({type(e).__name__}: {e})") from None
        model.load_state_dict(part, strict=False, assign=True)
        loaded.extend(part)
    return loaded, unexpected


def remap_keys(state_dict: Mapping[str, Any], rules: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """Rename checkpoint keys with a table of ``(regex, replacement)`` rules; the first matching rule wins
    (applied once, anchored at the start), a key matching none keeps its name."""
    compiled = [(re.compile(p if p.startswith("^") else "^" + p), r) for p, r in rules]
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        new = key
        for pattern, repl in compiled:
            if pattern.match(key):
                new = pattern.sub(repl, key, count=1)
                break
        if new in out:
            raise CheckpointError(f"checkpoint keys {key!r} and another one both map to {new!r}")
        out[new] = value
    return out


def strip_prefix(state_dict: Mapping[str, Any], prefixes: Sequence[str]) -> dict[str, Any]:
    """Drop the first matching prefix (e.g. ``"module."``, ``"model."``) from each key."""
    return remap_keys(state_dict, [(re.escape(p), "") for p in prefixes])


def load_into(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str, layout: str,
              derived: Iterable[str] = (), allow_missing: bool = False, assign: bool = False,
              strict: bool = False, ignored: Iterable[str] = (), file_names: Mapping[str, str] | None = None,
              also_unexpected: Iterable[str] = ()) -> LoadReport:
    """Copy ``state_dict`` (already in the model's names) into ``model`` and verify completeness.

    Shapes must match exactly (a mismatch is one line naming the weight); keys the model does not have
    are reported as unexpected, under their names in the file when ``file_names`` (model name -> file key) is
    given, together with ``also_unexpected`` (file keys the caller set aside, e.g. outside the model's prefix);
    the model's own dtypes are kept unless ``assign`` (meta-device models).
    """
    own = model.state_dict(keep_vars=True)
    usable = {k: v for k, v in state_dict.items() if k in own}
    for k, v in usable.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(f"{source}: weight {k} has shape {tuple(v.shape)} in the checkpoint but "
                                  f"{tuple(own[k].shape)} in the model built from its config "
                                  f"(recognised layout: {layout})")
    if assign:
        usable = {k: v.to(own[k].dtype) if v.is_floating_point() else v for k, v in usable.items()}
    model.load_state_dict(usable, strict=False, assign=assign)
    names = file_names or {}
    return check_complete(model, usable, source=source, layout=layout, derived=derived,
                          unexpected=[names.get(k, k) for k in state_dict if k not in own] + list(also_unexpected),
                          allow_missing=allow_missing, strict=strict, ignored=ignored)
