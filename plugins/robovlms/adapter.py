"""RoboVLMs (Kosmos-2 backbone + LSTM action head) model adapter.

Experts and sites:

* ``text``: every Kosmos-2 text layer (``backbone.text_model.model.layers``), over the current frame's sequence
  ``[<s>][hand image latents][image latents][text, padded to max_text_tokens][ACT x latent][</s>]`` (prompt
  ``<grounding>An image of a robot {instruction}``; hand latents only with a hand camera); spans ``image``,
  ``hand_image`` (with a hand camera), ``text``, ``action``.  Text padding sits inside the sequence, masked out
  of attention and given no position, so every sample of a batch has the same spans and gets the values it
  would get alone.
* ``context``: the input of ``act_head`` (RoboVLMs' ``action_hs``, (batch, window, latent, hidden)), read by a
  forward pre-hook and stored as (window x latent) tokens: the seed's "context vector".  Span ``current``
  is the current frame's action token(s).  Each earlier frame of the window went through the backbone on its
  own (RoboVLMs' "post" history); frames before the episode's start are zeros, masked out, and the LSTM runs
  over the real frames only, as RoboVLMs' evaluation does.

Loading (``toolkit_plugins.robovlms.loading``): ``--checkpoint`` is a RoboVLMs Lightning ``.pt``/``.ckpt``
(``state_dict`` with ``model.``/``module.model.`` prefixes, or ``model_state_dict``, or a bare state dict), read
with ``torch.load(weights_only=True)``.  Every model weight must come from the file (``--allow-missing`` to run
anyway); file tensors the model does not use are reported.  The training configuration (the checkpoint's
``hyper_parameters``, or ``--model-option config=FILE``) sets the window, the hand camera, the tokenizer and the
action unnormalisation, and must agree with the weights' shapes (action chunk, action dims, LSTM sizes).
``describe()`` records each setting and where it came from.  Without a checkpoint a small random Kosmos-2 + LSTM
head is built.

Options (``--model-option KEY=VALUE``; each overrides the training configuration): ``window`` (frames per policy
call; default the config's ``window_size``, else 1), ``hand_camera`` (a camera name, or ``none``; default: with
``use_hand_rgb`` the step's camera named like wrist/hand/gripper), ``camera`` (the static camera; default the
step's first other camera in sorted order), ``tokenizer`` (a local Kosmos-2 processor/tokenizer directory),
``config`` (RoboVLMs' training JSON), ``max_text_tokens`` (32), ``text_heads``/``vision_heads`` (attention heads:
a state dict does not hold them; default hidden // 64, Kosmos-2's), ``action_position`` (``before_eos`` as
above, or ``end``: after ``</s>``).
"""

from __future__ import annotations

import collections
import logging
import re
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from toolkit.sdk.adapters import Episode, Expert, ModelAdapter, ModelInputs, PolicyOutput, SiteInfo, Step
from toolkit.sdk.checkpoint import load_into
from toolkit.sdk.options import AdapterOptions, parse_options
from toolkit.sdk.errors import ToolkitError
from toolkit.sdk.hf import cast_model, from_cache_or_hub, image_tensor, llama_tokenizer, one_line
from toolkit_plugins.robovlms.loading import (
    TEXT,
    RoboVLMsCheckpoint,
    TrainingConfig,
    check_shapes_agree,
    check_supported,
    count_layers,
    read_checkpoint,
    shapes_from_state_dict,
    training_config,
)
from toolkit_plugins.robovlms.model import CLIP_MEAN, CLIP_STD, RoboKosmosPolicy

log = logging.getLogger("toolkit.robovlms")

KOSMOS_TOKENIZER = "microsoft/kosmos-2-patch14-224"
TOKENIZER_FILES = ("sentencepiece.bpe.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "preprocessor_config.json")
PROMPT = "<grounding>An image of a robot {}"  # RoboVLMs' tokenizer_type "kosmos" (data_utils.get_text_function)
HAND_CAMERA = re.compile(r"wrist|hand|gripper", re.IGNORECASE)
NO_CAMERA = "none"

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


class RoboVLMsOptions(AdapterOptions):
    """The ``--model-option`` names of robovlms; each overrides the checkpoint's training configuration."""

    window: int | None = Field(None, ge=1, description="frames per policy call (default: the training config's "
                               "window_size, else 1)")
    hand_camera: str | None = Field(None, description="hand camera name, or none (default: with use_hand_rgb, "
                                    "the step's camera named wrist/hand/gripper)")
    camera: str | None = Field(None, description="static camera (default: the first other camera, sorted)")
    tokenizer: str | None = Field(None, description="local Kosmos-2 processor/tokenizer directory")
    config: str | None = Field(None, description="RoboVLMs training config JSON (default: the checkpoint's "
                               "hyper_parameters)")
    max_text_tokens: int = Field(32, ge=1, description="prompt tokens per frame, padded")
    action_position: Literal["before_eos", "end"] = Field("before_eos", description="action token before </s>, "
                                                          "or after it")
    text_heads: int | None = Field(None, ge=1, description="text attention heads (default: hidden // 64)")
    vision_heads: int | None = Field(None, ge=1, description="vision attention heads (default: hidden // 64)")


SITES = {
    "text": SiteInfo("text", "text", "all", "mean", "Kosmos-2 text layers, every real token"),
    "context": SiteInfo("context", "context", "all", "none", "the act_head context vector (action_hs)"),
}


def robovlms_experts(n_layers: int, hidden: int, hand_camera: str | None) -> dict[str, Expert]:
    """The text layers and the act_head context of a policy this deep and wide (a hand camera adds its span)."""
    images = ("hand_image", "image") if hand_camera else ("image",)
    return {
        "text": Expert("text", f"{TEXT}.layers", n_layers, hidden, (*images, "text", "action"),
                       streams=dict(KOSMOS_STREAMS),
                       description="Kosmos-2 text layers over [<s>][(hand) image latents][text][ACT][</s>]"),
        "context": Expert("context", "act_head", 1, hidden, ("current",), streams=dict(CONTEXT_STREAMS),
                          layered=False,
                          description="act_head input (action_hs): window x latent action-token states"),
    }


def build_tiny_policy(seed: int, window: int = 1) -> RoboKosmosPolicy:
    from transformers import Kosmos2Config

    torch.manual_seed(seed)
    return RoboKosmosPolicy(Kosmos2Config(**TINY_KOSMOS), window_size=window, **TINY_HEAD).eval()


def tokenizer_help(where: str) -> str:
    """What to download for a real checkpoint's tokenizer, and where to point the adapter at it."""
    return (f"download the Kosmos-2 processor files, `hf download {KOSMOS_TOKENIZER} {' '.join(TOKENIZER_FILES)} "
            f"--local-dir {where}`, and pass --model-option tokenizer={where}")


class _Cursor:
    """Walks one episode's steps once, remembering the last ``window`` frames (each: the camera images)."""

    def __init__(self, episode: Episode, frame_of, window: int):
        self.steps = episode.steps()
        self.frame_of = frame_of
        self.frames: collections.deque = collections.deque(maxlen=window)

    def history(self, index: int, n: int) -> list[tuple[int, Any]] | None:
        """Up to ``n`` frames before step ``index`` (fewer at the episode's start), None if already passed."""
        kept = [i for i, _ in self.frames]
        if index in kept:
            before = list(self.frames)[: kept.index(index)]
        elif self.frames and kept[-1] > index:
            return None
        else:
            while True:
                step = next(self.steps, None)
                if step is None:
                    return None
                self.frames.append((step.index, self.frame_of(step)))
                if step.index == index:
                    break
            before = list(self.frames)[:-1]
        return before[len(before) - n:] if n else []


class RoboVLMsAdapter(ModelAdapter):
    """RoboVLMs Kosmos-2 policy: text-layer residuals and the act_head context vector."""

    name = "robovlms"
    description = "RoboVLMs (Kosmos-2 + LSTM action head): text layers and the act_head context vector"
    Options = RoboVLMsOptions

    def __init__(self, checkpoint: str | None = None, device: str = "cpu", dtype: str = "float32", seed: int = 0,
                 trust_remote_code: bool = False, *, allow_missing: bool = False, random_weights: bool = False,
                 **options: Any) -> None:
        super().__init__(checkpoint, device, dtype, seed, trust_remote_code, allow_missing=allow_missing,
                         random_weights=random_weights, **options)
        opts = self.opts
        self.max_text_tokens, self.action_position = opts["max_text_tokens"], opts["action_position"]
        if checkpoint is None and opts["config"] is not None:
            raise ToolkitError("robovlms option config= describes a checkpoint: give it with --checkpoint")
        ckpt = None
        if checkpoint is not None:
            path = Path(checkpoint).expanduser()
            if not path.is_file():
                raise ToolkitError(f"robovlms checkpoint {checkpoint!r} is not a file: give a RoboVLMs .pt/.ckpt "
                                   "(e.g. kosmos_ph_oxe-pretrain.pt)")
            ckpt = read_checkpoint(path)
            if ckpt.foreign:
                log.info("robovlms: %s holds pickled objects of %s, not read (only plain data is)", checkpoint,
                         ", ".join(ckpt.foreign))
        trained = training_config(ckpt, opts["config"])
        if ckpt is not None:
            check_supported(trained, ckpt.path)
        self.settings: dict[str, dict[str, Any]] = {}
        self.window = self._setting("window", opts["window"], trained.get("window_size", int), 1, trained)
        self._resolve_hand_request(opts["hand_camera"], trained)
        self.camera: str | None = opts["camera"]
        self.settings["camera"] = {"value": self.camera, "from": "user option" if self.camera else
                                   "default (the first camera in sorted order, not the hand camera)"}
        # RoboVLMs' evaluation maps the arm actions from [-1, 1] back to [norm_min, norm_max] when trained so
        norm = trained.get("norm_action", bool)
        bounds = (trained.get("norm_min", float), trained.get("norm_max", float))
        self.norm_bounds = bounds if norm and None not in bounds else None
        self.settings["unnormalise_actions"] = {"value": list(self.norm_bounds) if self.norm_bounds else None,
                                                "from": trained.source if norm is not None else "default"}
        self._setting("prompt", None, PROMPT if trained.get("tokenizer.tokenizer_type", str) else None, PROMPT,
                      trained)
        if ckpt is None:
            warnings.warn(RANDOM_WARNING, stacklevel=2)
            self.model = build_tiny_policy(seed, self.window)
            self.tokenizer = llama_tokenizer()
            self.settings["tokenizer"] = {"value": "mistral-common's Llama tokenizer (small random model)",
                                          "from": "default"}
        else:
            self.tokenizer = self._load_tokenizer(opts["tokenizer"], trained, ckpt.path)
            self.model = self._load_policy(ckpt, trained, opts)
            if trained.source is None and not trained.problems:
                self.warn_once(f"robovlms: {checkpoint} holds no RoboVLMs training config (hyper_parameters), so the "
                               f"window ({self.window}) and cameras are defaults or options; pass --model-option "
                               "config=FILE (the training JSON released with the checkpoint) to run it as trained")
        if trained.problems:
            self.warn_once(f"robovlms: training-config values not read (not plain data), defaults used instead: "
                           f"{', '.join(trained.problems)}; to run the policy as trained, pass the training JSON "
                           "released with the checkpoint: --model-option config=FILE")
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
        self.latent = int(self.model.latent_num)
        self.chunk = int(self.model.act_head.fwd_pred_next_n)
        self._cursors: collections.OrderedDict[str, _Cursor] = collections.OrderedDict()
        self._context_cache: collections.OrderedDict[tuple[str, int], torch.Tensor] = collections.OrderedDict()
        self._ids_cache: dict[str, list[int]] = {}

    # configuration ---------------------------------------------------------------------------
    def _setting(self, name: str, user: Any, trained_value: Any, default: Any, trained: TrainingConfig) -> Any:
        """The user's option, else the training configuration's value, else the default; recorded with its
        origin for ``describe()``."""
        if user is not None:
            value, origin = user, "user option"
        elif trained_value is not None:
            value, origin = trained_value, trained.source
        else:
            value, origin = default, "default"
        self.settings[name] = {"value": value, "from": origin}
        return value

    def _resolve_hand_request(self, user: str | None, trained: TrainingConfig) -> None:
        """``self.hand_camera``: a camera name, None (no hand camera), or found at the first step (``_auto_hand``,
        for a policy trained with ``use_hand_rgb``)."""
        use_hand = trained.get("use_hand_rgb", bool)
        self._auto_hand = user is None and bool(use_hand)
        if user is not None:
            self.hand_camera = None if str(user).lower() == NO_CAMERA else str(user)
            origin = "user option"
        elif use_hand is not None:
            self.hand_camera, origin = None, f"{trained.source} (use_hand_rgb={str(use_hand).lower()})"
        else:
            self.hand_camera, origin = None, "default"
        self.settings["hand_camera"] = {"value": "(the step's wrist/hand/gripper camera)" if self._auto_hand
                                        else self.hand_camera, "from": origin}

    def _load_tokenizer(self, user: str | None, trained: TrainingConfig, ckpt_path: Path):
        """The Kosmos-2 tokenizer: the user's directory, else the training config's local path (as RoboVLMs
        resolved it: relative to its working directory, tried here beside the checkpoint and in the current
        directory), else the HF cache."""
        from transformers import AutoTokenizer

        if user is not None:
            if not Path(user).expanduser().exists():
                raise ToolkitError(f"robovlms tokenizer {user!r} does not exist: {tokenizer_help(user)}")
            source, origin = str(Path(user).expanduser()), "user option"
        else:
            source, origin = KOSMOS_TOKENIZER, "default (HF cache)"
            named = trained.get("tokenizer.pretrained_model_name_or_path", str)
            for where in ([ckpt_path.parent / named, Path(named)] if named else []):
                if where.is_dir():
                    source, origin = str(where), trained.source
                    break
        try:
            tok = from_cache_or_hub(AutoTokenizer.from_pretrained, source, trust_remote_code=self.trust_remote_code)
        except Exception as e:  # noqa: BLE001 - any failure is the same advice
            log.debug("robovlms: tokenizer from %s failed: %s", source, one_line(e))
            raise ToolkitError(f"no Kosmos-2 tokenizer ({source} cannot be loaded): "
                               f"{tokenizer_help('kosmos-2-processor')}") from None
        self.settings["tokenizer"] = {"value": source, "from": origin}
        return tok

    def _load_policy(self, ckpt: RoboVLMsCheckpoint, trained: TrainingConfig,
                     opts: dict[str, Any]) -> RoboKosmosPolicy:
        """The policy shaped by the checkpoint's tensors, filled from them (or seeded random: ``random_weights``)."""
        heads = {k: opts[k] for k in ("text_heads", "vision_heads")}
        kosmos_config, head = shapes_from_state_dict(ckpt.weights, ckpt.path, **heads)
        check_shapes_agree(trained, kosmos_config, head, ckpt.path)
        for key, value in head.items():
            self.settings[key] = {"value": value, "from": "checkpoint tensors"}

        def seeded() -> RoboKosmosPolicy:
            torch.manual_seed(self.seed)
            return RoboKosmosPolicy(kosmos_config, window_size=self.window, **head)

        if self.random_weights:
            log.warning("robovlms: --random-weights: the architecture of %s with random weights (seed %d); none of "
                        "its weights are loaded", self.checkpoint, self.seed)
            return seeded().eval()
        from transformers.initialization import no_init_weights

        with no_init_weights():  # every weight is overwritten: skip the random init (minutes at 1.7 B on a CPU)
            policy = RoboKosmosPolicy(kosmos_config, window_size=self.window, **head)
        policy.backbone.tie_weights()  # post_init's tying is skipped with the init
        # unused tensors by their names in the file (those under the prefix the model lacks, and all outside it):
        # one warning, or with --strict a one-line refusal
        report = load_into(policy, ckpt.weights, source=str(self.checkpoint), layout=ckpt.layout,
                           allow_missing=self.allow_missing, strict=self.strict,
                           file_names={k: ckpt.prefix + k for k in ckpt.weights}, also_unexpected=ckpt.outside)
        if report.missing:  # --allow-missing: those keep seeded random values, never uninitialised memory
            fresh, own = seeded().state_dict(), policy.state_dict(keep_vars=True)
            with torch.no_grad():
                for name in report.missing:
                    own[name].copy_(fresh[name])
        self.load_report = report
        return policy.eval()

    # what the adapter exposes ----------------------------------------------------------------
    @property
    def module(self) -> torch.nn.Module:
        return self.model

    @property
    def experts(self) -> dict[str, Expert]:
        return robovlms_experts(self.n_layers, self.hidden, self.hand_camera)

    @property
    def sites(self) -> dict[str, SiteInfo]:
        return dict(SITES)

    @classmethod
    def architecture(cls, checkpoint: str | None = None,
                     **options: Any) -> tuple[dict[str, Expert], dict[str, SiteInfo]] | None:
        """From the small default's config, or a zip-format checkpoint's tensor names and shapes: the file is
        memory-mapped (``torch.load(mmap=True, weights_only=True)``), so no weight is read.  None for an older
        non-zip file (reading its shapes means reading every weight): the selection is checked once it is loaded.
        The hand camera's span is there when the option names one; a camera found at the first step (a policy
        trained with ``use_hand_rgb``) adds it only then, as in the loaded adapter."""
        opts = parse_options(cls, options, cls.name)
        hand = opts["hand_camera"]
        hand = None if hand is None or str(hand).lower() == NO_CAMERA else str(hand)
        if checkpoint is None:
            text = TINY_KOSMOS["text_config"]
            return robovlms_experts(text["layers"], text["embed_dim"], hand), dict(SITES)
        path = Path(checkpoint).expanduser()
        if not path.is_file() or not zipfile.is_zipfile(path):
            return None
        sd = read_checkpoint(path).weights
        layers = count_layers(sd, rf"{re.escape(TEXT)}\.layers\.(\d+)\.")
        return robovlms_experts(layers, int(sd["action_token"].shape[0]), hand), dict(SITES)

    def describe(self) -> dict[str, Any]:
        settings = {**self.settings, "camera": {**self.settings["camera"], "value": self.camera}}
        return {**super().describe(), "window": self.window, "latent": self.latent, "chunk": self.chunk,
                "camera": self.camera, "hand_camera": self.hand_camera, "action_position": self.action_position,
                "settings": settings}

    # inputs ------------------------------------------------------------------------------------
    def layout(self) -> dict[str, list[int]]:
        """Positions in one frame's sequence."""
        q, t, a = self.n_image, self.max_text_tokens, self.latent
        lay: dict[str, list[int]] = {"bos": [0]}
        start = 1
        if self.hand_camera:
            lay["hand_image"], start = list(range(start, start + q)), start + q
        lay["image"], start = list(range(start, start + q)), start + q
        lay["text"], start = list(range(start, start + t)), start + t
        if self.action_position == "before_eos":
            lay["action"], lay["eos"] = list(range(start, start + a)), [start + a]
        else:
            lay["eos"], lay["action"] = [start], list(range(start + 1, start + 1 + a))
        return lay

    def _resolve_cameras(self, step: Step) -> None:
        """Pick the cameras once, from the first step: the hand camera (named, or found by name for a policy
        trained with one), then the static camera (named, or the first other camera in sorted order)."""
        names = sorted(step.images)
        if self._auto_hand:
            self._auto_hand = False
            found = [n for n in names if HAND_CAMERA.search(n)]
            self.hand_camera = found[0] if found else None
            if not found:
                self.warn_once(f"robovlms: the policy was trained with a hand camera (use_hand_rgb) but the steps "
                               f"have none named wrist/hand/gripper (cameras: {', '.join(names)}); running with the "
                               "static camera only, as RoboVLMs does for robots without one "
                               "(--model-option hand_camera=NAME to choose one)")
            self.settings["hand_camera"]["value"] = self.hand_camera
        if self.camera is None:
            rest = [n for n in names if n != self.hand_camera]
            if not rest:
                raise ToolkitError(f"robovlms needs a static camera besides the hand camera {self.hand_camera!r}; "
                                   f"the steps have {', '.join(names)}")
            self.camera = rest[0]

    def _frame(self, step: Step) -> tuple[Any, Any]:
        """(static image, hand image or None) of one step."""
        if not step.images:
            raise ToolkitError("robovlms needs a camera image per step; this step has none")
        if self._auto_hand or self.camera is None:
            self._resolve_cameras(step)
        for role, cam in (("camera", self.camera), ("hand_camera", self.hand_camera)):
            if cam is not None and cam not in step.images:
                raise ToolkitError(f"robovlms uses {role.replace('_', ' ')} {cam!r}, which a step lacks (it has "
                                   f"{', '.join(sorted(step.images))}); choose one with --model-option {role}=NAME")
        return step.images[self.camera], step.images[self.hand_camera] if self.hand_camera else None

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

    def _frames(self, rows: Sequence[tuple[str, tuple[Any, Any]]]) -> dict[str, torch.Tensor]:
        """Tensors for one frame per row (instruction, (static image, hand image or None))."""
        lay = self.layout()
        seq = lay["eos"][0] + 1 if self.action_position == "before_eos" else lay["action"][-1] + 1
        tok = self.tokenizer
        bos = tok.bos_token_id if tok.bos_token_id is not None else 0
        eos = tok.eos_token_id if tok.eos_token_id is not None else bos
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        ids = torch.full((len(rows), seq), pad, dtype=torch.long)
        mask = torch.ones(len(rows), seq, dtype=torch.bool)
        mask[:, lay["text"]] = False
        ids[:, 0], ids[:, lay["eos"]] = bos, eos
        n_cams = 2 if self.hand_camera else 1
        pixels = torch.zeros(len(rows), n_cams, 3, self.image_size, self.image_size)
        t0 = lay["text"][0]
        for i, (instruction, images) in enumerate(rows):
            text = self._text_ids(instruction)
            ids[i, t0:t0 + len(text)] = torch.tensor(text, dtype=torch.long)
            mask[i, t0:t0 + len(text)] = True
            pixels[i, 0] = self._pixels(images[0])
            if self.hand_camera:
                pixels[i, 1] = self._pixels(images[1])
        # real tokens get consecutive Kosmos positions (padding_idx + 1, ...); padding repeats its neighbour's
        position_ids = self.pad_idx + mask.long().cumsum(-1).clamp_min(1)
        dev = self.device
        return {"input_ids": ids.to(dev), "attention_mask": mask.long().to(dev), "position_ids": position_ids.to(dev),
                "pixel_values": pixels.to(dev, self.torch_dtype), "mask": mask.to(dev)}

    def _embeds(self, frames: dict[str, torch.Tensor]) -> torch.Tensor:
        """Input embeddings of each frame's sequence: words, image latents (hand, static), action token(s)."""
        m, lay = self.model, self.layout()
        embeds = m.backbone.text_model.model.embed_tokens(frames["input_ids"]).clone()
        px = frames["pixel_values"]
        latents = m.encode_images(px.flatten(0, 1)).unflatten(0, px.shape[:2]).to(embeds.dtype)
        embeds[:, lay["image"]] = latents[:, 0]
        if self.hand_camera:
            embeds[:, lay["hand_image"]] = latents[:, 1]
        embeds[:, lay["action"]] = m.action_token.to(embeds.dtype)
        return embeds

    def _context_rows(self, frames: dict[str, torch.Tensor]) -> torch.Tensor:
        """action_hs rows (N, latent, hidden) for one frame per row: final-norm states at the action tokens."""
        hs = self.model.backbone.text_model.model(inputs_embeds=self._embeds(frames),
                                                  attention_mask=frames["attention_mask"],
                                                  position_ids=frames["position_ids"], use_cache=False)
        return hs.last_hidden_state[:, self.layout()["action"]]

    def _history(self, batch: Sequence[tuple[Episode, Step]]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(B, window-1, latent, hidden) context vectors of each sample's preceding frames (zeros before the
        episode's start; computed here, outside the policy call, and cached per episode step) and (B,) the
        number of real frames in each sample's window."""
        n = self.window - 1
        if n == 0:
            return None
        need: list[tuple[str, int, str, Any]] = []
        keys: list[list[tuple[str, int]]] = []
        for ep, step in batch:
            cur = self._cursors.get(ep.key)
            hist = cur.history(step.index, n) if cur is not None else None
            if hist is None:
                cur = _Cursor(ep, self._frame, self.window)
                hist = cur.history(step.index, n)
                if hist is None:
                    raise ToolkitError(f"robovlms window: step {step.index} is not among the steps of {ep.key}")
            self._cursors[ep.key] = cur
            self._cursors.move_to_end(ep.key)
            while len(self._cursors) > 8:
                self._cursors.popitem(last=False)
            row = []
            for idx, images in hist:
                key = (ep.key, idx)
                row.append(key)
                if key not in self._context_cache and all(k[:2] != key for k in need):
                    need.append((ep.key, idx, ep.instruction, images))
            keys.append(row)
        if need:
            with torch.no_grad():
                got = self._context_rows(self._frames([(instr, images) for _, _, instr, images in need]))
            for (k, idx, _, _), v in zip(need, got):
                self._context_cache[(k, idx)] = v
        out = torch.zeros(len(batch), n, self.latent, self.hidden, device=self.device, dtype=self.torch_dtype)
        for b, row in enumerate(keys):
            if row:
                out[b, n - len(row):] = torch.stack([self._context_cache[k] for k in row])
        while len(self._context_cache) > 4 * self.window * max(8, len(batch)):
            self._context_cache.popitem(last=False)
        valid = torch.tensor([len(row) + 1 for row in keys], device=self.device)
        return out, valid

    def prepare(self, batch: Sequence[tuple[Episode, Step]]) -> ModelInputs:
        frames = self._frames([(ep.instruction, self._frame(step)) for ep, step in batch])
        history = self._history(batch)
        lay = self.layout()
        w, a = self.window, self.latent
        if history is not None:
            frames["history"], frames["valid"] = history
        token_mask = {"text": frames["mask"]}
        if history is not None:
            real = torch.arange(w, device=self.device)[None] >= (w - frames["valid"])[:, None]
            token_mask["context"] = real.repeat_interleave(a, 1)
        spans = {k: lay[k] for k in ("hand_image", "image", "text", "action") if k in lay}
        return ModelInputs(
            tensors=frames, batch_size=len(batch),
            spans={"text": spans, "context": {"current": list(range((w - 1) * a, w * a))}},
            token_mask=token_mask,
            seq_len={"text": frames["mask"].shape[1], "context": w * a},
        )

    # running -----------------------------------------------------------------------------------
    def run(self, inputs: ModelInputs, generators: Sequence[torch.Generator]) -> PolicyOutput:
        if len(generators) != inputs.batch_size:
            raise ToolkitError(f"robovlms.run got {len(generators)} generators for a batch of {inputs.batch_size}")
        t = inputs.tensors
        current = self._context_rows(t)[:, None]  # (B, 1, latent, hidden)
        if t.get("history") is None:
            arm, gripper = self.model.act_head(current)  # the hooked call: its pre-hook sees action_hs
        else:
            action_hs = torch.cat([t["history"].to(current), current], 1)
            arm, gripper = self.model.act_head(action_hs, valid=t["valid"])
        arm, gripper = arm[:, -1].float(), gripper[:, -1].float()  # the last frame's action chunk
        if self.norm_bounds is not None:  # RoboVLMs' unnoramalize_action, on the arm dims
            lo, hi = self.norm_bounds
            arm = 0.5 * (arm + 1) * (hi - lo) + lo
        gripper = torch.where(torch.sigmoid(gripper) > 0.5, 1.0, -1.0)
        return PolicyOutput(actions=torch.cat([arm, gripper], -1).detach().cpu().numpy())

    def reference_hidden_states(self, inputs: ModelInputs, generators: Sequence[torch.Generator]
                                ) -> dict[str, torch.Tensor]:
        """Each text layer's output from transformers' ``output_hidden_states`` (final norm bypassed)."""
        t = inputs.tensors
        text = self.model.backbone.text_model.model
        with torch.no_grad():
            embeds = self._embeds(t)
            norm, text.layer_norm = text.layer_norm, torch.nn.Identity()
            try:
                out = self.model.backbone.text_model(inputs_embeds=embeds, attention_mask=t["attention_mask"],
                                                     position_ids=t["position_ids"], output_hidden_states=True)
            finally:
                text.layer_norm = norm
        return {"text": torch.stack(out.hidden_states[1:], 1)}
