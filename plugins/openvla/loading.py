"""Loading OpenVLA/Prismatic checkpoints: the real ``openvla/openvla-7b`` layout natively, other variants
through their own remote code (``--trust-remote-code``).

The native path reads ``config.json`` (never executing its ``auto_map`` code), builds the model on the meta
device, then assigns the safetensors shards' tensors one shard at a time (``load_state_dict(assign=True)``):
every parameter *is* the tensor read from the file (cast to the requested dtype where it differs, read
straight onto the GPU with ``--device cuda``), so no weight is ever held twice and the host holds at most one
shard's worth.  ``check_complete`` then proves every weight came from the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from toolkit.sdk.checkpoint import (
    CheckpointError,
    LoadReport,
    assign_from_safetensors,
    check_complete,
    weight_files,
)
from toolkit.sdk.errors import ToolkitError
from toolkit.sdk.hf import from_cache_or_hub, one_line
from toolkit_plugins.openvla.model import PrismaticConfig, PrismaticForActionPrediction

# what a hub snapshot needs: config, weights, tokenizer, and the remote code of variants run with it
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.py"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
OPENVLA_TOKENIZER = ("tokenizer.model, tokenizer.json, tokenizer_config.json, special_tokens_map.json and "
                     "added_tokens.json of openvla/openvla-7b")


def local_checkpoint(checkpoint: str, patterns: list[str] | None = None) -> Path:
    """The checkpoint directory: as given, or a hub id's snapshot from the cache (downloaded unless offline; the
    files matching ``patterns``, default ``HUB_FILES``)."""
    local = Path(checkpoint).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ToolkitError(f"openvla checkpoint {checkpoint!r} has no config.json: it is not a saved model")
        return local
    if checkpoint.startswith((".", "/", "~")) or checkpoint.count("/") != 1:
        raise ToolkitError(f"openvla checkpoint {checkpoint!r} does not exist: give a checkpoint directory "
                           "or a Hugging Face hub id (owner/name, e.g. openvla/openvla-7b)")
    from huggingface_hub import snapshot_download

    try:
        return Path(from_cache_or_hub(snapshot_download, checkpoint,
                                      allow_patterns=patterns or HUB_FILES))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, network: one line
        raise ToolkitError(f"openvla checkpoint {checkpoint!r} is not in the Hugging Face cache and could not be "
                           f"downloaded ({one_line(e)}); download it (huggingface-cli download {checkpoint} "
                           "--local-dir DIR) and pass --checkpoint DIR") from None


def read_config(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's ``config.json`` as a dict."""
    try:
        raw = json.loads((ckpt / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ToolkitError(f"cannot read {ckpt / 'config.json'}: {one_line(e)}") from None
    if not isinstance(raw, dict):
        raise ToolkitError(f"{ckpt / 'config.json'} is not a JSON object")
    return raw


@torch.no_grad()
def materialise_rest(model: PrismaticForActionPrediction, device: torch.device, dtype: torch.dtype,
                     seed: int) -> None:
    """After assignment: compute the LLM's rotary frequencies on the device (never stored in checkpoints), and
    give weights still on the meta device (only with --allow-missing) seeded values: zeros for biases, ones for
    other vectors (norm scales), normal(0, 0.02) otherwise."""
    for name, m in list(model.named_modules()):
        if any(b is not None and b.is_meta for b in m._buffers.values()):
            config = getattr(m, "config", None)
            if config is None or "Rotary" not in type(m).__name__:
                raise CheckpointError(f"cannot compute the buffers of {name} ({type(m).__name__}) after loading")
            parent, _, leaf = name.rpartition(".")
            with torch.device(device):
                model.get_submodule(parent).register_module(leaf, type(m)(config))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in list(model.named_parameters()):
        if not p.is_meta:
            continue
        t = torch.empty(p.shape, dtype=dtype)
        if name.endswith("bias"):
            t.zero_()
        elif t.ndim == 1:
            t.fill_(1.0)
        else:
            t.normal_(0.0, 0.02, generator=gen)
        module, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(module), leaf, torch.nn.Parameter(t.to(device), requires_grad=False))


def load_native(ckpt: Path, config: PrismaticConfig, *, source: str, device: torch.device, dtype: torch.dtype,
                seed: int, allow_missing: bool, strict: bool = False
                ) -> tuple[PrismaticForActionPrediction, LoadReport]:
    """Build on the meta device, assign the shards, verify completeness, compute the rest."""
    files = weight_files(ckpt)
    layout = f"{config.layout} safetensors, {len(files)} file{'s' * (len(files) != 1)}"
    with torch.device("meta"):
        model = PrismaticForActionPrediction(config)
    loaded, unexpected = assign_from_safetensors(model, files, device=device, dtype=dtype, source=source,
                                                 layout=layout)
    report = check_complete(model, loaded, source=source, layout=layout, unexpected=unexpected,
                            allow_missing=allow_missing, strict=strict)
    materialise_rest(model, device, dtype, seed)
    return model.eval(), report


def load_remote(ckpt: Path, *, source: str, dtype: torch.dtype, allow_missing: bool, strict: bool = False
                ) -> tuple[torch.nn.Module, LoadReport]:
    """A Prismatic variant the project does not implement, through the checkpoint's own code (the user passed
    --trust-remote-code); transformers' loading info feeds the same completeness check."""
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    try:
        config = AutoConfig.from_pretrained(str(ckpt), trust_remote_code=True)
        auto_map = getattr(config, "auto_map", None) or {}
        ref = auto_map.get("AutoModelForVision2Seq") or auto_map.get("AutoModelForImageTextToText")
        if not ref:
            raise ToolkitError(f"openvla checkpoint {source!r} names no AutoModelForVision2Seq class in its "
                               "config's auto_map: it is not an OpenVLA checkpoint")
        cls = get_class_from_dynamic_module(ref, str(ckpt))
        model, info = cls.from_pretrained(str(ckpt), config=config, trust_remote_code=True, dtype=dtype,
                                          output_loading_info=True)
    except ToolkitError:
        raise
    except Exception as e:  # noqa: BLE001 - the remote code's failures are one line
        raise ToolkitError(f"cannot load openvla checkpoint {source!r} with its own code ({one_line(e)}); it "
                           "was written for transformers 4.40 and timm 0.9") from None
    missing = set(info.get("missing_keys") or ())
    names = model.state_dict().keys()
    report = check_complete(model, [n for n in names if n not in missing], source=source,
                            layout=f"{getattr(config, 'model_type', '?')} (remote code)",
                            unexpected=info.get("unexpected_keys") or (), allow_missing=allow_missing,
                            strict=strict)
    return model.eval(), report


def load_tokenizer(ckpt: Path, path: str | None, trust_remote_code: bool = False):
    """The tokenizer from ``--model-option tokenizer=PATH`` (a directory, or a file in one) or the checkpoint."""
    import transformers

    where = Path(path).expanduser() if path else ckpt
    if path and not where.exists():
        raise ToolkitError(f"openvla option tokenizer={path!r}: no such file or directory")
    if where.is_file():
        where = where.parent
    if not any((where / f).is_file() for f in TOKENIZER_FILES):
        raise ToolkitError(f"openvla: no tokenizer in {where} (no {' or '.join(TOKENIZER_FILES)}); put the "
                           f"{OPENVLA_TOKENIZER} there, or pass --model-option tokenizer=DIR")
    # The class tokenizer_config.json names, not AutoTokenizer: that reads the directory's config.json, whose
    # auto_map (OpenVLA's remote code) makes it ask whether to run custom code.
    try:
        name = json.loads((where / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        name = None
    cls = getattr(transformers, name, None) if isinstance(name, str) and name.endswith("Tokenizer") else None
    try:
        if cls is not None:
            return cls.from_pretrained(str(where))
        return transformers.AutoTokenizer.from_pretrained(str(where), trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise ToolkitError(f"cannot load the openvla tokenizer in {where} ({one_line(e)})") from None
