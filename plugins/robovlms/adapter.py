"""RoboVLMs (Kosmos-2 backbone + LSTM action head) model adapter.

Experts and sites:

* ``text``: every Kosmos-2 text layer (``backbone.text_model.model.layers``), over one frame's sequence
  ``[<s>][image latents][text, padded to max_text_tokens][ACT x latent][</s>]`` (prompt
  ``<grounding>An image of a robot {instruction}``); spans ``image``, ``text``, ``action``.  Text padding sits
  inside the sequence, masked out of attention and given no position, so every sample of a batch has the same
  spans and gets the values it would get alone.
* ``context``: the input of ``act_head`` (RoboVLMs' ``action_hs``, (batch, window, latent, hidden)), read by a
  forward pre-hook and stored as (window x latent) tokens: the seed's "context vector".  Span ``current``
  is the current frame's action token(s).

Loading: ``--checkpoint`` is a RoboVLMs ``.pt``/``.ckpt`` (a state dict, optionally under ``state_dict``/``model``,
keys optionally prefixed ``model.``), read with ``torch.load(weights_only=True)``.  If the ``robovlms`` package
is importable and ``--model-option config=CONFIG.json`` names its training config, RoboVLMs builds the model;
otherwise the project's own ``RoboKosmosPolicy`` (same module names) is shaped from the state dict and takes it.
Missing weights are reported by name.  Without a checkpoint a small random Kosmos-2 + LSTM head is built.

Options (``--model-option KEY=VALUE``): ``window`` (frames per policy call, default 1; earlier frames are the
episode's preceding steps, the first frame repeated at the start of an episode), ``max_text_tokens`` (32),
``camera`` (default: the step's first camera in sorted order), ``tokenizer`` (a tokenizer directory for a real
checkpoint), ``config`` (RoboVLMs JSON config), ``text_heads``/``vision_heads`` (attention heads of a checkpoint
that is not Kosmos-2-sized: a state dict does not hold them; default hidden // 64), ``action_position`` (``before_eos`` as above, or ``end``: after
``</s>``, as RoboVLMs' ``merge_multi_modal_input(insert_idx=-1)`` places it).
"""

from __future__ import annotations

import collections
import importlib.util
import json
import logging
import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolkit.adapters import Episode, Expert, ModelAdapter, ModelInputs, PolicyOutput, SiteInfo, Step
from toolkit.errors import ToolkitError
from toolkit.hf import cast_model, from_cache_or_hub, image_tensor, llama_tokenizer, one_line
from toolkit_plugins.robovlms.model import CLIP_MEAN, CLIP_STD, RoboKosmosPolicy

log = logging.getLogger("toolkit.robovlms")

KOSMOS_TOKENIZER = "microsoft/kosmos-2-patch14-224"
PROMPT = "<grounding>An image of a robot {}"
OPTIONS = {"window": 1, "max_text_tokens": 32, "camera": None, "tokenizer": None, "config": None,
           "action_position": "before_eos", "text_heads": None, "vision_heads": None}
ACTION_POSITIONS = ("before_eos", "end")

# Where each stream is read in a Kosmos2TextBlock (pre-LN: self_attn_layer_norm, self_attn, final_layer_norm, ffn).
KOSMOS_STREAMS: dict[str, tuple[str, ...]] = {
    "resid_pre": ("input", ""),
    "resid_mid": ("input", "final_layer_norm"),
    "resid_post": ("output", ""),
    "attn_out": ("output", "self_attn"),
    "mlp_out": ("output", "ffn"),
}
CONTEXT_STREAMS: dict[str, tuple[str, ...]] = {"context": ("input", "", "flatten_tokens")}

TINY_KOSMOS = dict(
    text_config=dict(embed_dim=64, layers=4, attention_heads=4, ffn_dim=128, vocab_size=32000,
                     max_position_embeddings=256),
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       image_size=28, patch_size=14),
    latent_query_num=8,
)
TINY_HEAD = dict(action_dim=7, latent=1, fwd_pred_next_n=2, head_hidden_size=32, head_layers=2)
RANDOM_WARNING = ("robovlms: no --checkpoint given, using a small randomly initialised Kosmos-2 + LSTM policy "
                  "(same structure, random weights) - results are for smoke tests only")

TEXT = "backbone.text_model.model"
VISION = "backbone.vision_model.model"


def build_tiny_policy(seed: int, window: int = 1) -> RoboKosmosPolicy:
    from transformers import Kosmos2Config

    torch.manual_seed(seed)
    return RoboKosmosPolicy(Kosmos2Config(**TINY_KOSMOS), window_size=window, **TINY_HEAD).eval()


# --------------------------------------------------------------------------- checkpoints


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A RoboVLMs checkpoint as a flat state dict keyed like ``RoboKosmosPolicy`` (``backbone.…``, ``act_head.…``)."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # not a zip-format file: no mmap
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a bad file is one line
        raise ToolkitError(f"cannot read RoboVLMs checkpoint {path} ({one_line(e)}); it must be a .pt/.ckpt "
                           "state dict readable with torch.load(weights_only=True)") from None
    for key in ("state_dict", "model_state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ToolkitError(f"{path} holds no state dict of tensors (found {type(obj).__name__})")
    token_keys = [k for k in obj if k == "action_token" or k.endswith(".action_token")]
    if not token_keys:
        raise ToolkitError(f"{path} is not a RoboVLMs continuous-action checkpoint: it has no 'action_token' "
                           "weight (keys look like " + ", ".join(list(obj)[:3]) + ")")
    prefix = token_keys[0][: -len("action_token")]
    return {k[len(prefix):]: v for k, v in obj.items() if k.startswith(prefix)}


def _count(sd: dict[str, torch.Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in sd if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def _need(sd: dict[str, torch.Tensor], key: str, path: Path) -> torch.Tensor:
    if key not in sd:
        raise ToolkitError(f"RoboVLMs checkpoint {path} has no weight {key!r}, needed to shape the model")
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
        text_config=dict(embed_dim=hidden, layers=_count(sd, rf"{re.escape(TEXT)}\.layers\.(\d+)\."),
                         attention_heads=text_heads or max(1, hidden // 64), ffn_dim=ffn, vocab_size=vocab),
        vision_config=dict(hidden_size=v_hidden, intermediate_size=v_ffn, patch_size=patch,
                           num_hidden_layers=_count(sd, rf"{re.escape(VISION)}\.encoder\.layers\.(\d+)\."),
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
                head_layers=_count(sd, r"act_head\.rnn\.weight_ih_l(\d+)$"))
    return cfg, head


def load_policy(path: Path, window: int, config: str | None, text_heads: int | None = None,
                vision_heads: int | None = None) -> torch.nn.Module:
    sd = read_state_dict(path)
    if config is not None and importlib.util.find_spec("robovlms") is not None:
        return _robovlms_policy(config, sd, path)
    cfg, head = shapes_from_state_dict(sd, path, text_heads, vision_heads)
    policy = RoboKosmosPolicy(cfg, window_size=window, **head)
    _load_into(policy, sd, path)
    return policy.eval()


def _load_into(policy: torch.nn.Module, sd: dict[str, torch.Tensor], path: Path) -> None:
    try:
        result = policy.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise ToolkitError(f"RoboVLMs checkpoint {path} does not fit the model ({one_line(e)})") from None
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ToolkitError(f"RoboVLMs checkpoint {path} lacks {len(missing)} weights the model needs: "
                           f"{', '.join(missing[:5])}{more}")
    if result.unexpected_keys:
        modules = sorted({k.split(".")[0] for k in result.unexpected_keys})
        warnings.warn(f"robovlms: {len(result.unexpected_keys)} checkpoint weights are not used (modules: "
                      f"{', '.join(modules)}); e.g. {result.unexpected_keys[0]}", stacklevel=3)


def _robovlms_policy(config: str, sd: dict[str, torch.Tensor], path: Path) -> torch.nn.Module:
    """Build the policy with RoboVLMs itself from its training config (only when ``robovlms`` is importable)."""
    try:
        cfg = json.loads(Path(config).expanduser().read_text())
        from robovlms.model.backbone.robokosmos import RoboKosMos  # type: ignore[import-not-found]

        policy = RoboKosMos(configs=cfg, train_setup_configs=cfg["train_setup"], act_head_configs=cfg["act_head"],
                            fwd_head_configs=None, window_size=cfg.get("window_size", 1),
                            use_hand_rgb=cfg.get("use_hand_rgb", False),
                            fwd_pred_next_n=cfg.get("fwd_pred_next_n", 1),
                            use_vision_resampler=cfg.get("use_vision_resampler", False),
                            vision_resampler_configs=cfg.get("vision_resampler"), use_state=cfg.get("use_state", False))
    except ToolkitError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ToolkitError(f"robovlms could not build a model from {config} ({one_line(e)})") from None
    _load_into(policy, sd, path)
    return policy.eval()


# --------------------------------------------------------------------------- adapter


class _Cursor:
    """Walks one episode's steps once, remembering the last ``window`` camera frames."""

    def __init__(self, episode: Episode, camera_of, window: int):
        self.steps = episode.steps()
        self.camera_of = camera_of
        self.frames: collections.deque = collections.deque(maxlen=window)
        self.first: tuple[int, Any] | None = None

    def history(self, index: int, n: int) -> list[tuple[int, Any]] | None:
        """The ``n`` frames before step ``index`` (the first frame repeated at the start), None if passed."""
        if any(i == index for i, _ in self.frames):
            kept = list(self.frames)
            pos = [i for i, _ in kept].index(index)
            before = kept[:pos]
        elif self.frames and self.frames[-1][0] > index:
            return None
        else:
            while True:
                step = next(self.steps, None)
                if step is None:
                    return None
                self.frames.append((step.index, self.camera_of(step)))
                if self.first is None:
                    self.first = self.frames[-1]
                if step.index == index:
                    break
            before = list(self.frames)[:-1]
        before = before[-n:] if n else []
        return [self.first] * (n - len(before)) + before


class RoboVLMsAdapter(ModelAdapter):
    """RoboVLMs Kosmos-2 policy: text-layer residuals and the act_head context vector."""

    name = "robovlms"
    description = "RoboVLMs (Kosmos-2 + LSTM action head): text layers and the act_head context vector"
    option_defaults = OPTIONS

    def __init__(self, checkpoint: str | None = None, device: str = "cpu", dtype: str = "float32", seed: int = 0,
                 trust_remote_code: bool = False, **options: Any) -> None:
        super().__init__(checkpoint, device, dtype, seed, trust_remote_code, **options)
        opts = self.opts
        try:
            self.window = int(opts["window"])
            self.max_text_tokens = int(opts["max_text_tokens"])
        except (TypeError, ValueError):
            raise ToolkitError("robovlms options window and max_text_tokens take integers") from None
        if self.window < 1 or self.max_text_tokens < 1:
            raise ToolkitError("robovlms options window and max_text_tokens must be at least 1")
        self.action_position = str(opts["action_position"])
        if self.action_position not in ACTION_POSITIONS:
            raise ToolkitError(f"robovlms action_position {self.action_position!r}: use one of "
                               f"{', '.join(ACTION_POSITIONS)}")
        self.camera: str | None = opts["camera"]
        if checkpoint is None:
            warnings.warn(RANDOM_WARNING, stacklevel=2)
            self.model = build_tiny_policy(seed, self.window)
            self.tokenizer = llama_tokenizer()
        else:
            path = Path(checkpoint).expanduser()
            if not path.is_file():
                raise ToolkitError(f"robovlms checkpoint {checkpoint!r} is not a file: give a RoboVLMs .pt/.ckpt "
                                   "state dict (e.g. kosmos_ph_oxe-pretrain.pt)")
            self.tokenizer = self._load_tokenizer(opts["tokenizer"])
            heads = {k: int(opts[k]) if opts[k] is not None else None for k in ("text_heads", "vision_heads")}
            self.model = load_policy(path, self.window, opts["config"], **heads)
        self.torch_dtype = self.torch_dtype
        try:
            cast_model(self.model, self.device, self.torch_dtype)
        except (RuntimeError, AssertionError) as e:
            raise ToolkitError(f"cannot put robovlms on device {device!r} as {dtype} ({one_line(e)})") from None
        cfg = self.model.backbone.config
        self.hidden = cfg.text_config.embed_dim
        self.n_layers = cfg.text_config.layers
        self.n_image = cfg.latent_query_num
        self.image_size = cfg.vision_config.image_size
        self.pad_idx = cfg.text_config.pad_token_id if cfg.text_config.pad_token_id is not None else 1
        self.latent = int(getattr(self.model, "latent_num", 1))
        self._cursors: collections.OrderedDict[str, _Cursor] = collections.OrderedDict()
        self._context_cache: collections.OrderedDict[tuple[str, int], torch.Tensor] = collections.OrderedDict()
        self._ids_cache: dict[str, list[int]] = {}

    @staticmethod
    def _load_tokenizer(source: str | None):
        from transformers import AutoTokenizer

        sources = [source] if source else [KOSMOS_TOKENIZER]
        for src in sources:
            try:
                return from_cache_or_hub(AutoTokenizer.from_pretrained, src)
            except Exception as e:  # noqa: BLE001
                log.debug("robovlms: tokenizer from %s failed: %s", src, one_line(e))
        raise ToolkitError(f"no Kosmos-2 tokenizer: {sources[0]} cannot be loaded; pass --model-option "
                           f"tokenizer=DIR (a saved Kosmos-2 tokenizer) or put {KOSMOS_TOKENIZER} in the HF cache")

    # what the adapter exposes ----------------------------------------------------------------
    @property
    def module(self) -> torch.nn.Module:
        return self.model

    @property
    def experts(self) -> dict[str, Expert]:
        return {
            "text": Expert("text", f"{TEXT}.layers", self.n_layers, self.hidden, ("image", "text", "action"),
                           streams=dict(KOSMOS_STREAMS),
                           description="Kosmos-2 text layers over [<s>][image latents][text][ACT][</s>]"),
            "context": Expert("context", "act_head", 1, self.hidden, ("current",), streams=dict(CONTEXT_STREAMS),
                              layered=False,
                              description="act_head input (action_hs): window x latent action-token states"),
        }

    @property
    def sites(self) -> dict[str, SiteInfo]:
        return {
            "text": SiteInfo("text", "text", "all", "mean", "Kosmos-2 text layers, every real token"),
            "context": SiteInfo("context", "context", "all", "none", "the act_head context vector (action_hs)"),
        }

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "random_init": self.checkpoint is None, "window": self.window,
                "latent": self.latent, "camera": self.camera, "action_position": self.action_position}

    # inputs ------------------------------------------------------------------------------------
    def layout(self) -> dict[str, list[int]]:
        """Positions in one frame's sequence."""
        q, t, a = self.n_image, self.max_text_tokens, self.latent
        text = list(range(1 + q, 1 + q + t))
        after = 1 + q + t
        if self.action_position == "before_eos":
            action, eos = list(range(after, after + a)), [after + a]
        else:
            eos, action = [after], list(range(after + 1, after + 1 + a))
        return {"bos": [0], "image": list(range(1, 1 + q)), "text": text, "action": action, "eos": eos}

    def _camera(self, step: Step) -> np.ndarray:
        if not step.images:
            raise ToolkitError("robovlms needs a camera image per step; this step has none")
        if self.camera is None:
            self.camera = sorted(step.images)[0]
        if self.camera not in step.images:
            raise ToolkitError(f"robovlms uses camera {self.camera!r}, which a step lacks (it has "
                               f"{', '.join(sorted(step.images))}); choose one with --model-option camera=NAME")
        return step.images[self.camera]

    def _pixels(self, img: Any) -> torch.Tensor:
        """(H, W, 3) uint8 -> (3, S, S) float32, bicubic resize, CLIP mean/std (RoboVLMs' image_processor)."""
        x = image_tensor(img, (self.image_size, self.image_size), "robovlms")
        mean = torch.tensor(CLIP_MEAN)[:, None, None]
        std = torch.tensor(CLIP_STD)[:, None, None]
        return (x - mean) / std

    def _text_ids(self, instruction: str) -> list[int]:
        if instruction not in self._ids_cache:
            text = PROMPT.format(instruction.strip().replace("\n", " "))
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) > self.max_text_tokens:
                self.warn_once(f"robovlms: instruction {instruction[:40]!r}... is {len(ids)} tokens, truncated to "
                                f"{self.max_text_tokens} (raise --model-option max_text_tokens=N)")
                ids = ids[: self.max_text_tokens]
            self._ids_cache[instruction] = list(ids)
        return self._ids_cache[instruction]

    def _frames(self, rows: Sequence[tuple[str, Any]]) -> dict[str, torch.Tensor]:
        """Tensors for one frame per row (instruction, image)."""
        lay = self.layout()
        seq = 1 + self.n_image + self.max_text_tokens + self.latent + 1
        tok = self.tokenizer
        bos = tok.bos_token_id if tok.bos_token_id is not None else 0
        eos = tok.eos_token_id if tok.eos_token_id is not None else bos
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        ids = torch.full((len(rows), seq), pad, dtype=torch.long)
        mask = torch.ones(len(rows), seq, dtype=torch.bool)
        mask[:, lay["text"]] = False
        ids[:, 0], ids[:, lay["eos"]] = bos, eos
        pixels = torch.zeros(len(rows), 3, self.image_size, self.image_size)
        t0 = lay["text"][0]
        for i, (instruction, img) in enumerate(rows):
            text = self._text_ids(instruction)
            ids[i, t0:t0 + len(text)] = torch.tensor(text, dtype=torch.long)
            mask[i, t0:t0 + len(text)] = True
            pixels[i] = self._pixels(img)
        # real tokens get consecutive Kosmos positions (padding_idx + 1, ...); padding repeats its neighbour's
        position_ids = self.pad_idx + mask.long().cumsum(-1).clamp_min(1)
        dev = self.device
        return {"input_ids": ids.to(dev), "attention_mask": mask.long().to(dev), "position_ids": position_ids.to(dev),
                "pixel_values": pixels.to(dev, self.torch_dtype), "mask": mask.to(dev)}

    def _context_rows(self, frames: dict[str, torch.Tensor]) -> torch.Tensor:
        """action_hs rows (N, latent, hidden) for one frame per row: final-norm states at the action tokens."""
        m = self.model
        act = self.layout()["action"]
        word = m.backbone.text_model.model.embed_tokens
        embeds = word(frames["input_ids"]).clone()
        if hasattr(m, "encode_images"):
            img = m.encode_images(frames["pixel_values"])
        else:  # robovlms' own RoboKosMos
            img = m.model_encode_images(frames["pixel_values"])
        embeds[:, 1:1 + self.n_image] = img.to(embeds.dtype)
        embeds[:, act] = m.action_token.to(embeds.dtype)
        hs = m.backbone.text_model.model(inputs_embeds=embeds, attention_mask=frames["attention_mask"],
                                         position_ids=frames["position_ids"], use_cache=False).last_hidden_state
        return hs[:, act]

    def _history(self, batch: Sequence[tuple[Episode, Step]]) -> torch.Tensor | None:
        """(B, window-1, latent, hidden): the context vectors of each sample's preceding frames (not hooked:
        computed here, outside the policy call, and cached per episode step)."""
        n = self.window - 1
        if n == 0:
            return None
        need: list[tuple[str, int, str, Any]] = []
        keys: list[list[tuple[str, int]]] = []
        for ep, step in batch:
            cur = self._cursors.get(ep.key)
            hist = cur.history(step.index, n) if cur is not None else None
            if hist is None:
                cur = _Cursor(ep, self._camera, self.window)
                hist = cur.history(step.index, n)
                if hist is None:
                    raise ToolkitError(f"robovlms window: step {step.index} is not among the steps of {ep.key}")
            self._cursors[ep.key] = cur
            self._cursors.move_to_end(ep.key)
            while len(self._cursors) > 8:
                self._cursors.popitem(last=False)
            row = []
            for idx, img in hist:
                key = (ep.key, idx)
                row.append(key)
                if key not in self._context_cache and all(k[:2] != key for k in need):
                    need.append((ep.key, idx, ep.instruction, img))
            keys.append(row)
        if need:
            with torch.no_grad():
                got = self._context_rows(self._frames([(instr, img) for _, _, instr, img in need]))
            for (k, idx, _, _), v in zip(need, got):
                self._context_cache[(k, idx)] = v
        out = torch.stack([torch.stack([self._context_cache[k] for k in row]) for row in keys])
        while len(self._context_cache) > 4 * self.window * max(8, len(batch)):
            self._context_cache.popitem(last=False)
        return out

    def prepare(self, batch: Sequence[tuple[Episode, Step]]) -> ModelInputs:
        frames = self._frames([(ep.instruction, self._camera(step)) for ep, step in batch])
        history = self._history(batch)
        lay = self.layout()
        frames["history"] = history
        w, a = self.window, self.latent
        return ModelInputs(
            tensors=frames, batch_size=len(batch),
            spans={"text": {"image": lay["image"], "text": lay["text"], "action": lay["action"]},
                   "context": {"current": list(range((w - 1) * a, w * a))}},
            token_mask={"text": frames["mask"]},
            seq_len={"text": frames["mask"].shape[1], "context": w * a},
        )

    # running -----------------------------------------------------------------------------------
    def run(self, inputs: ModelInputs, generators: Sequence[torch.Generator]) -> PolicyOutput:
        if len(generators) != inputs.batch_size:
            raise ToolkitError(f"robovlms.run got {len(generators)} generators for a batch of {inputs.batch_size}")
        t = inputs.tensors
        current = self._context_rows(t)[:, None]  # (B, 1, latent, hidden)
        action_hs = current if t.get("history") is None else torch.cat([t["history"].to(current), current], 1)
        head = self.model.act_head
        if hasattr(head, "reset"):  # robovlms' own LSTMDecoder keeps a history between calls
            head.reset()
        arm, gripper = head(action_hs)  # the hooked call: its pre-hook sees action_hs
        arm, gripper = arm[:, -1].float(), gripper[:, -1].float()  # the last frame's action chunk
        if gripper.ndim == arm.ndim - 1:
            gripper = gripper[..., None]
        gripper = torch.where(torch.sigmoid(gripper) > 0.5, 1.0, -1.0)
        return PolicyOutput(actions=torch.cat([arm, gripper], -1).detach().cpu().numpy())

    def reference_hidden_states(self, inputs: ModelInputs, generators: Sequence[torch.Generator]
                                ) -> dict[str, torch.Tensor]:
        """Each text layer's output from transformers' ``output_hidden_states`` (final norm bypassed)."""
        t = inputs.tensors
        text = self.model.backbone.text_model.model
        act = self.layout()["action"]
        with torch.no_grad():
            embeds = text.embed_tokens(t["input_ids"]).clone()
            embeds[:, 1:1 + self.n_image] = self.model.encode_images(t["pixel_values"]).to(embeds.dtype)
            embeds[:, act] = self.model.action_token.to(embeds.dtype)
            norm, text.layer_norm = text.layer_norm, torch.nn.Identity()
            try:
                out = self.model.backbone.text_model(inputs_embeds=embeds, attention_mask=t["attention_mask"],
                                                     position_ids=t["position_ids"], output_hidden_states=True)
            finally:
                text.layer_norm = norm
        return {"text": torch.stack(out.hidden_states[1:], 1)}
