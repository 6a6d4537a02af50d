"""Reading a RoboVLMs checkpoint: its weights, the training configuration it was made with, and the model shape.

RoboVLMs trains ``BaseTrainer`` (a Lightning module holding the policy as ``self.model``) and saves Lightning
checkpoints: ``state_dict`` (keys ``model.backbone.…``, ``model.act_head.…``, ``model.action_token``; ``module.``
in front when saved from a DDP wrapper) beside ``hyper_parameters`` (``save_hyperparameters()`` of
``BaseTrainer(configs)``: ``{"configs": <the training JSON>}``), ``epoch``, ``callbacks`` and so on.  DeepSpeed runs
are converted to the same layout (``zero_to_fp32``).  Its evaluation loaders also accept ``model_state_dict``.
Released checkpoints come with the training JSON as a separate file, which ``--model-option config=FILE`` reads.

The file is read with ``torch.load(weights_only=True)``: tensors and plain data only.  Lightning's
``AttributeDict`` is read as the dict it is and paths as strings; any other pickled Python object (an optimizer,
a callback) becomes an inert stand-in that runs no code, so the weights still load and a configuration value
that was such an object is reported as unreadable instead of used.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from toolkit.sdk.checkpoint import CheckpointError
from toolkit.sdk.hf import one_line

TEXT = "backbone.text_model.model"
VISION = "backbone.vision_model.model"
STATE_DICT_KEYS = ("state_dict", "model_state_dict")  # where RoboVLMs' own loaders look, in their order
# torch's refusal to fill a stand-in as a container (a pickled dict/list subclass: defaultdict, EasyDict, ...)
STOOD_IN = re.compile(r"Unreadable\[([\w.]+)\]")
RESAVE = ("re-save it, on a machine where you trust the file, with the tensors and plain dicts/lists only (e.g. "
          "torch.save({'state_dict': ckpt['state_dict']}, NEW.pt)) and give the training JSON with --model-option "
          "config=FILE")


def _path(*parts: Any) -> str:
    """A pickled ``pathlib`` path, as the string it names."""
    return str(pathlib.PurePath(*[str(p) for p in parts]))


# Globals that are plain data, read as plain data.
PLAIN_GLOBALS = {
    "lightning.fabric.utilities.data.AttributeDict": dict,
    "lightning.pytorch.utilities.parsing.AttributeDict": dict,
    "pytorch_lightning.utilities.parsing.AttributeDict": dict,
    **{f"pathlib.{cls}": _path for cls in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath",
                                            "PureWindowsPath")},
}


class Unreadable:
    """Stands in for a pickled Python object of another library: built without running its code, holds nothing."""

    global_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "Unreadable":
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<unread {self.global_name} object>"


def _stand_ins(names: list[str]) -> list[tuple[Any, str]]:
    out = []
    for name in names:
        target = PLAIN_GLOBALS.get(name) or type(f"Unreadable[{name}]", (Unreadable,), {"global_name": name})
        out.append((target, name))
    return out


def _torch_load(path: Path) -> tuple[Any, list[str]]:
    """``torch.load(weights_only=True)`` (memory-mapped when the file allows), foreign objects stood in for."""
    try:
        foreign = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001 - legacy (non-zip) files: no static listing, plain weights_only load
        foreign = []
    with torch.serialization.safe_globals(_stand_ins(foreign)):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # not a zip-format file: no mmap
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj, [n for n in foreign if n not in PLAIN_GLOBALS]


@dataclass
class RoboVLMsCheckpoint:
    """A RoboVLMs checkpoint file, split into what the policy takes and what else it holds."""

    path: Path
    weights: dict[str, torch.Tensor]  # keyed like ``RoboKosmosPolicy`` (prefix stripped)
    prefix: str  # the stripped prefix, e.g. "model."
    container: str  # "state_dict", "model_state_dict" or "top level"
    outside: list[str] = field(default_factory=list)  # state-dict keys outside the prefix (EMA copies, ...)
    hyper_parameters: Any = None  # Lightning's hyper_parameters, as read
    foreign: list[str] = field(default_factory=list)  # pickled globals stood in for (not read)

    @property
    def layout(self) -> str:
        where = "Lightning checkpoint" if self.container == "state_dict" else f"{self.container} checkpoint"
        return f"RoboVLMs {where}, weights under {self.prefix or '(no prefix)'!r}"


def read_checkpoint(path: Path) -> RoboVLMsCheckpoint:
    """The policy's weights and the training record of a RoboVLMs ``.pt``/``.ckpt``."""
    try:
        obj, foreign = _torch_load(path)
    except Exception as e:  # noqa: BLE001 - a bad file is one line
        stood_in = STOOD_IN.search(str(e))
        if stood_in:
            raise CheckpointError(f"cannot read RoboVLMs checkpoint {path}: it pickles a {stood_in.group(1)} object "
                                  "that is filled like a dict or list, which the toolkit's reader (torch.load with "
                                  "weights_only=True, no code from the file is run) cannot build; "
                                  f"{RESAVE}") from None
        # torch's refusal names the global on a later line of its message
        why = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln), one_line(e))
        raise CheckpointError(f"cannot read RoboVLMs checkpoint {path} ({why}); it must be a .pt/.ckpt "
                              "readable with torch.load(weights_only=True)") from None
    container, sd = "top level", obj
    for key in STATE_DICT_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            container, sd = key, obj[key]
            break
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors (found {type(sd).__name__}; RoboVLMs "
                              f"checkpoints keep it under {' or '.join(STATE_DICT_KEYS)})")
    token_keys = [k for k in sd if k == "action_token" or k.endswith(".action_token")]
    if not token_keys:
        raise CheckpointError(f"{path} is not a RoboVLMs continuous-action checkpoint: it has no 'action_token' "
                              "weight (keys look like " + ", ".join(list(sd)[:3]) + ")")
    # several copies (e.g. an EMA model beside the policy): the shortest prefix is the policy, RoboVLMs' "model."
    prefix = min((k[: -len("action_token")] for k in token_keys), key=lambda p: (len(p), p))
    hyper = obj.get("hyper_parameters") if container == "state_dict" and isinstance(obj, dict) else None
    return RoboVLMsCheckpoint(
        path=path, weights={k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, prefix=prefix,
        container=container, outside=[k for k in sd if not k.startswith(prefix)], hyper_parameters=hyper,
        foreign=foreign)


# --------------------------------------------------------------------------- training configuration


@dataclass
class TrainingConfig:
    """RoboVLMs' training ``configs`` (the JSON under ``configs/``), as far as it could be read."""

    values: dict[str, Any]
    source: str | None  # "checkpoint hyper_parameters", "config file NAME", or None (nothing found)
    problems: list[str] = field(default_factory=list)  # values present but not readable (one line each)

    def get(self, dotted: str, kind: type | tuple[type, ...]) -> Any:
        """``configs["act_head"]["hidden_size"]`` as ``get("act_head.hidden_size", int)``: None if absent;
        a value of another type (an unread object) is noted in ``problems`` and treated as absent."""
        node: Any = self.values
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        if node is None:
            return None
        if kind is float and isinstance(node, int) and not isinstance(node, bool):
            return float(node)
        if not isinstance(node, kind) or (isinstance(node, bool) and kind is int):
            self.problems.append(f"{dotted}={node!r}")
            return None
        return node


def training_config(ckpt: RoboVLMsCheckpoint | None, config_file: str | None) -> TrainingConfig:
    """The training configuration: a JSON file the user names wins over the checkpoint's ``hyper_parameters``."""
    if config_file is not None:
        path = Path(config_file).expanduser()
        try:
            values = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"robovlms config {config_file}: cannot read it as JSON ({one_line(e)}); give "
                                  "the RoboVLMs training config saved with the checkpoint") from None
        if not isinstance(values, dict):
            raise CheckpointError(f"robovlms config {config_file} is not a JSON object")
        return TrainingConfig(values, f"config file {path.name}")
    raw = ckpt.hyper_parameters if ckpt is not None else None
    hyper = raw.get("configs", raw) if isinstance(raw, dict) else raw
    if isinstance(hyper, dict) and ("window_size" in hyper or "act_head" in hyper):
        return TrainingConfig(hyper, "checkpoint hyper_parameters")
    unread = [x.global_name for x in (raw, hyper) if isinstance(x, Unreadable)]
    return TrainingConfig({}, None, [f"hyper_parameters holds a {unread[0]} object"] if unread else [])


def check_supported(cfg: TrainingConfig, path: Path) -> None:
    """Refuse, in one line, a RoboVLMs policy this adapter would run differently from how it was trained."""
    where = f"{path} ({cfg.source})"
    model, name = cfg.get("model", str), cfg.get("robovlm_name", str)
    if (model is not None and model != "kosmos") or (name is not None and name != "RoboKosMos"):
        raise CheckpointError(f"{where}: trained with backbone {model or name!r}; the robovlms adapter runs the "
                              "Kosmos-2 RoboVLMs policy (RoboKosMos) only")
    head = {k: cfg.get(f"act_head.{k}", str) for k in ("type", "action_space", "down_sample", "history_type")}
    want = {"type": "LSTMDecoder", "action_space": "continuous", "down_sample": "none", "history_type": "post"}
    for key, value in head.items():
        if value is not None and value != want[key]:
            raise CheckpointError(f"{where}: act_head {key} is {value!r}; the robovlms adapter runs RoboVLMs' "
                                  f"{want['type']} head with {key} {want[key]!r} only")
    tokenizer_type = cfg.get("tokenizer.tokenizer_type", str)
    if tokenizer_type is not None and tokenizer_type != "kosmos":
        raise CheckpointError(f"{where}: tokenizer_type {tokenizer_type!r}; the robovlms adapter builds RoboVLMs' "
                              "'kosmos' prompt only")
    if cfg.get("use_vision_resampler", bool):
        raise CheckpointError(f"{where}: trained with use_vision_resampler (a perceiver resampler after the vision "
                              "tower), which the robovlms adapter does not implement")


# --------------------------------------------------------------------------- model shape


def count_layers(sd: dict[str, torch.Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in sd if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def _need(sd: dict[str, torch.Tensor], key: str, path: Path) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"RoboVLMs checkpoint {path} has no weight {key!r}, needed to shape the model")
    return sd[key]


def shapes_from_state_dict(sd: dict[str, torch.Tensor], path: Path, text_heads: int | None = None,
                           vision_heads: int | None = None) -> tuple[Any, dict[str, int]]:
    """(Kosmos2Config, head kwargs) that fit the checkpoint's tensors.

    Attention head counts are not in a state dict: they default to hidden // 64 (Kosmos-2: 32 text, 16 vision
    heads) unless given."""
    from transformers import Kosmos2Config

    hidden = int(sd["action_token"].shape[0])
    vocab = int(_need(sd, f"{TEXT}.embed_tokens.weight", path).shape[0])
    ffn = int(_need(sd, f"{TEXT}.layers.0.ffn.fc1.weight", path).shape[0])
    patch_w = _need(sd, f"{VISION}.embeddings.patch_embedding.weight", path)
    v_hidden, patch = int(patch_w.shape[0]), int(patch_w.shape[-1])
    n_pos = int(_need(sd, f"{VISION}.embeddings.position_embedding.weight", path).shape[0])
    v_ffn = int(_need(sd, f"{VISION}.encoder.layers.0.mlp.fc1.weight", path).shape[0])
    queries = int(_need(sd, "backbone.image_to_text_projection.latent_query", path).shape[0])
    cfg = Kosmos2Config(
        text_config=dict(embed_dim=hidden, layers=count_layers(sd, rf"{re.escape(TEXT)}\.layers\.(\d+)\."),
                         attention_heads=text_heads or max(1, hidden // 64), ffn_dim=ffn, vocab_size=vocab),
        vision_config=dict(hidden_size=v_hidden, intermediate_size=v_ffn, patch_size=patch,
                           num_hidden_layers=count_layers(sd, rf"{re.escape(VISION)}\.encoder\.layers\.(\d+)\."),
                           num_attention_heads=vision_heads or max(1, v_hidden // 64),
                           image_size=int(round(math.sqrt(n_pos - 1))) * patch),
        latent_query_num=queries,
    )
    w_ih = _need(sd, "act_head.rnn.weight_ih_l0", path)
    rnn_hidden = int(_need(sd, "act_head.rnn.weight_hh_l0", path).shape[1])
    latent = max(1, int(w_ih.shape[1]) // hidden)
    n = int(_need(sd, "act_head.gripper.mlp.6.weight", path).shape[0])
    arm = int(_need(sd, "act_head.actions.mlp.6.weight", path).shape[0])
    head = dict(action_dim=arm // n + 1, latent=latent, fwd_pred_next_n=n, head_hidden_size=rnn_hidden // latent,
                head_layers=count_layers(sd, r"act_head\.rnn\.weight_ih_l(\d+)$"))
    return cfg, head


# training-config key -> the head size it must equal (RoboVLMs' top-level fwd_pred_next_n overrides act_head's)
HEAD_KEYS = {"fwd_pred_next_n": "fwd_pred_next_n", "act_head.action_dim": "action_dim",
             "act_head.hidden_size": "head_hidden_size", "act_head.latent": "latent",
             "act_head.num_layers": "head_layers"}


def check_shapes_agree(cfg: TrainingConfig, kosmos_config: Any, head: dict[str, int], path: Path) -> None:
    """The training configuration and the weights must describe the same policy (else one of them is not
    this checkpoint's): the action chunk, action dims, LSTM sizes and the image size."""
    pairs = [(key, cfg.get(key, int), head[kw]) for key, kw in HEAD_KEYS.items()]
    pairs.append(("image_size", cfg.get("image_size", int), kosmos_config.vision_config.image_size))
    for key, said, shaped in pairs:
        if said is not None and said != shaped:
            raise CheckpointError(f"{path}: the training config ({cfg.source}) says {key}={said}, but the weights "
                                  f"are shaped for {shaped}; give the config that belongs to this checkpoint "
                                  "(--model-option config=FILE)")
