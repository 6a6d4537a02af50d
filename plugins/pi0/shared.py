"""What pi0 and pi0.5 share: a PaliGemma VLM over the prefix (camera images, instruction) and a flow-matching
action expert that reuses its attention cache, on transformers' ``PI0ForConditionalGeneration`` and
``PI05ForConditionalGeneration``.  ``PaliGemmaFlowAdapter`` finds and reads a checkpoint (a local directory or
a hub id, the PaliGemma tokenizer, the architecture from config.json or the weights' shapes), exposes the two
experts and puts the camera images into the prefix; each model's adapter adds its own prompt, state and actions.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch

from toolkit.sdk.adapters import Episode, Expert, ModelAdapter, SiteInfo, Step
from toolkit.sdk.checkpoint import CheckpointError, load_state_dict_files, safetensors_shapes, weight_files
from toolkit.sdk.errors import ToolkitError
from toolkit.sdk.hf import cast_model, from_cache_or_hub, image_tensor, llama_tokenizer, one_line
from toolkit.sdk.options import parse_options
from toolkit_plugins.pi0 import layouts, normalise, relative

PALIGEMMA_TOKENIZER = "google/paligemma-3b-pt-224"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
TOKENIZER_HELP = ("download the PaliGemma tokenizer (hub repo google/paligemma-3b-pt-224, gated: accept its licence; "
                  "files tokenizer.model, tokenizer.json, tokenizer_config.json, special_tokens_map.json) into a "
                  "directory and pass --model-option tokenizer=DIR, or put the files into the checkpoint directory")
CONVERT_HELP = ("convert it first with openpi's examples/convert_jax_model_to_pytorch.py --checkpoint_dir CKPT "
                "--config_name <its openpi config, e.g. pi0_libero> --output_path OUT, then pass --checkpoint OUT")

# The small random models: the real architecture at toy sizes.  The VLM and the action expert must share the number
# of layers, KV heads and head_dim (the action expert reuses the VLM's cache per layer).
TINY_VOCAB = 32000  # the mistral-common Llama-style SentencePiece model; the image token is appended
TINY_EXPERTS = dict(
    vlm_config=dict(
        model_type="paligemma",
        text_config=dict(model_type="gemma", hidden_size=128, num_hidden_layers=6, intermediate_size=256,
                         num_attention_heads=8, num_key_value_heads=1, head_dim=16, vocab_size=TINY_VOCAB + 1),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, patch_size=14, image_size=56,
                           vision_use_head=False),
        projection_dim=128,
        image_token_id=TINY_VOCAB,
    ),
    dit_config=dict(model_type="gemma", hidden_size=64, num_hidden_layers=6, intermediate_size=128,
                    num_attention_heads=8, num_key_value_heads=1, head_dim=16),
    chunk_size=50, max_action_dim=32, num_inference_steps=10,
)


def cameras_option(opts: dict[str, Any]) -> list[str] | None:
    """The ``cameras`` option as a list (None: the first batch's cameras, sorted)."""
    cams = opts["cameras"]
    return (cams.split(",") if isinstance(cams, str) else list(cams)) if cams else None


def load_tokenizer(model: str, given: str | None, directory: Path | None, trust_remote_code: bool):
    """The ``tokenizer`` option (``given``), else the checkpoint's own tokenizer files, else PaliGemma's from the HF
    cache; ``model`` names the model in messages."""
    from transformers import AutoTokenizer

    if given:
        p = Path(given).expanduser()
        if not p.exists():
            raise ToolkitError(f"{model} tokenizer={given} does not exist; {TOKENIZER_HELP}")
        try:
            if p.is_file():  # a bare SentencePiece model, as openpi downloads paligemma_tokenizer.model
                from transformers import GemmaTokenizer

                with tempfile.TemporaryDirectory() as d:
                    shutil.copy(p, Path(d) / "tokenizer.model")
                    return GemmaTokenizer.from_pretrained(d)
            # never the directory's own code unless --trust-remote-code (and no interactive prompt)
            return AutoTokenizer.from_pretrained(str(p), trust_remote_code=trust_remote_code)
        except Exception as e:  # noqa: BLE001
            raise ToolkitError(f"{model} tokenizer={given} cannot be loaded ({one_line(e)}); "
                               f"{TOKENIZER_HELP}") from None
    sources = [str(directory)] if directory and any((directory / f).is_file() for f in TOKENIZER_FILES) else []
    sources.append(PALIGEMMA_TOKENIZER)
    for src in sources:
        try:
            return from_cache_or_hub(AutoTokenizer.from_pretrained, src, trust_remote_code=trust_remote_code)
        except Exception as e:  # noqa: BLE001
            logging.getLogger(f"toolkit.{model}").debug("%s: tokenizer from %s failed: %s", model, src, one_line(e))
    raise ToolkitError(f"{model}: no tokenizer in {directory} and {PALIGEMMA_TOKENIZER} is not in the HF cache; "
                       f"{TOKENIZER_HELP}")


class PaliGemmaFlowAdapter(ModelAdapter):
    """The loading, the experts and the image prefix of pi0 and pi0.5: a subclass sets the class attributes below
    and gives the hooks (its layouts, its tokenizer call, its weights and statistics)."""

    family = "pi0"  # the architecture as messages name it ("pi0", "pi0.5"); ``name`` is the --model name
    openpi_config = "pi0_libero"  # an openpi config to name in CONVERT_HELP
    LAYOUTS: ModuleType  # the model's layouts module: read_meta, to_model_names, config_from_weights
    TINY_CONFIG: dict[str, Any]  # the small random model's config
    SITES: dict[str, SiteInfo]
    experts_of: Callable[..., dict[str, Expert]]  # (vlm (layers, width), dit (layers, width), cameras, num_steps)
    transformers_model: str  # the transformers class, e.g. "PI0ForConditionalGeneration"
    random_warning: str  # the warning that the small random model is used
    build_tiny_model: Callable[[int], torch.nn.Module]  # (seed) -> the small random model

    def __init__(self, checkpoint: str | None = None, device: str = "cpu", dtype: str = "float32", seed: int = 0,
                 trust_remote_code: bool = False, **options: Any) -> None:
        super().__init__(checkpoint, device, dtype, seed, trust_remote_code, **options)
        self.normalise_enabled = self.opts["normalise"]
        self.norm: normalise.Normalisation | None = None
        self.relative: relative.RelativeActions | None = None
        self.layout: str | None = None
        self.meta: dict[str, Any] = {}  # the checkpoint's config.json
        if checkpoint is None:
            warnings.warn(self.random_warning, stacklevel=2)
            self.model = self.build_tiny_model(seed)
            self.tokenizer = self._load_tokenizer(None) if self.opts["tokenizer"] else llama_tokenizer()
        else:
            directory, files = self._resolve(checkpoint)
            self.meta = self.LAYOUTS.read_meta(directory)
            self.model = self._load(checkpoint, files, directory)
            self.tokenizer = self._load_tokenizer(directory)
            self._find_statistics(checkpoint, directory, files)
        self._adapt_model()
        self._place(device, dtype)
        self._read_sizes()

    # what each model gives ----------------------------------------------------------------
    @classmethod
    def _recognise(cls, checkpoint: str, shapes: dict[str, tuple[int, ...]], meta: dict[str, Any],
                   directory: Path | None) -> str:
        """The checkpoint's layout name, or one line naming what it is instead."""
        raise NotImplementedError

    def _load_tokenizer(self, directory: Path | None):
        """``load_tokenizer`` for this model (each model names itself: the method also runs on a bare namespace)."""
        raise NotImplementedError

    def _fill(self, model: torch.nn.Module, checkpoint: str, tensors: dict[str, torch.Tensor],
              names: set[str]) -> Any:
        """Put the file's tensors into ``model`` (whose state-dict names are ``names``): the load report."""
        raise NotImplementedError

    def _find_statistics(self, checkpoint: str, directory: Path, files: list[Path]) -> None:
        """``self.norm`` and ``self.relative`` from the checkpoint."""
        raise NotImplementedError

    def _adapt_model(self) -> None:
        """What the model needs before it is put on its device (nothing by default)."""

    # loading ------------------------------------------------------------------------------
    @classmethod
    def model_class(cls) -> type:
        """The transformers model class (its ``config_class`` is the config's)."""
        import transformers

        return getattr(transformers, cls.transformers_model)

    @classmethod
    def _resolve(cls, checkpoint: str) -> tuple[Path, list[Path]]:
        """(checkpoint directory, safetensors files): a local directory or file, or a hub id (cache first)."""
        local = Path(checkpoint).expanduser()
        if not local.exists():
            if checkpoint.startswith((".", "/", "~")) or checkpoint.count("/") != 1:
                raise ToolkitError(f"{cls.name} checkpoint {checkpoint!r} does not exist: give a checkpoint directory "
                                   "or a Hugging Face hub id (owner/name)")
            from huggingface_hub import snapshot_download

            try:
                local = Path(from_cache_or_hub(snapshot_download, checkpoint))
            except Exception as e:  # noqa: BLE001 - any download failure is reported as one line
                raise ToolkitError(f"cannot load {cls.name} checkpoint {checkpoint!r} ({one_line(e)}); download it "
                                   "into a directory and pass that directory") from None
        directory = local if local.is_dir() else local.parent
        if ((directory / "params").is_dir() or local.name == "params") and not list(directory.glob("*.safetensors")):
            raise CheckpointError(f"{checkpoint} is a native openpi JAX checkpoint (orbax params/), which the toolkit "
                                  f"does not read: {CONVERT_HELP.replace('pi0_libero', cls.openpi_config)}")
        try:
            return directory, weight_files(local)
        except CheckpointError as e:
            raise CheckpointError(f"cannot load {cls.name} checkpoint {checkpoint!r}: {e}") from None

    @classmethod
    def _config(cls, checkpoint: str, meta: dict[str, Any], shapes: dict[str, tuple[int, ...]]):
        """The checkpoint's transformers config: its own config.json when transformers wrote it, else sized from
        the weights' shapes (the safetensors header: no weight is read)."""
        config_class = cls.model_class().config_class
        try:
            if meta.get("model_type") == cls.name:  # transformers' own config.json
                return config_class.from_dict(meta)
            # lerobot's or openpi's converted config.json, or none: the weights give the sizes
            return cls.LAYOUTS.config_from_weights(cls.LAYOUTS.to_model_names(shapes, set())[0], meta)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{checkpoint}: cannot build the {cls.family} architecture ({one_line(e)})") from None

    def _load(self, checkpoint: str, files: list[Path], directory: Path) -> torch.nn.Module:
        """Build the checkpoint's architecture and fill every weight from the file (or fail naming what is missing)."""
        from transformers.initialization import no_init_weights

        shapes = safetensors_shapes(files)
        self.layout = self._recognise(checkpoint, shapes, self.meta, directory)
        config = self._config(checkpoint, self.meta, shapes)
        # random weights (seeded) only where they are wanted; otherwise every value comes from the file
        init = self.random_weights or self.allow_missing
        torch.manual_seed(self.seed)
        with contextlib.nullcontext() if init else no_init_weights():
            model = self.model_class()._from_config(config, dtype=self.torch_dtype)
        if not self.random_weights:
            self.load_report = self._fill(model, checkpoint, load_state_dict_files(files),
                                          set(model.state_dict().keys()))
        return model.eval()

    @classmethod
    def architecture(cls, checkpoint: str | None = None,
                     **options: Any) -> tuple[dict[str, Expert], dict[str, SiteInfo]] | None:
        """From the small default's config, or a local checkpoint's config.json and safetensors header (no
        weight is read); None for a hub id, which only loading resolves (it may download).  The small default
        is read from its config dict, without importing transformers (seconds on a busy machine)."""
        opts = parse_options(cls, options, cls.name)
        if checkpoint is None:
            text, dit = cls.TINY_CONFIG["vlm_config"]["text_config"], cls.TINY_CONFIG["dit_config"]
            sizes = [(c["num_hidden_layers"], c["hidden_size"]) for c in (text, dit)]
            steps = cls.TINY_CONFIG["num_inference_steps"]
        elif Path(checkpoint).expanduser().exists():
            directory, files = cls._resolve(checkpoint)
            meta = cls.LAYOUTS.read_meta(directory)
            shapes = safetensors_shapes(files)
            cls._recognise(checkpoint, shapes, meta, directory)  # not this model's layout: as loading says it
            config = cls._config(checkpoint, meta, shapes)
            sizes = [(c.num_hidden_layers, c.hidden_size) for c in (config.vlm_config.text_config, config.dit_config)]
            steps = config.num_inference_steps
        else:
            return None
        return cls.experts_of(*sizes, cameras_option(opts), int(opts["num_steps"] or steps)), dict(cls.SITES)

    def _relative_actions(self, checkpoint: str, directory: Path, meta: dict[str, Any]
                          ) -> relative.RelativeActions | None:
        """The checkpoint's relative actions, to make absolute (in the dataset's units, so only when normalising);
        with --no-normalise a warning that they are stored as the policy outputs them."""
        found = relative.find(directory, meta)
        if found is not None and not self.normalise_enabled:
            self.warn_once(f"{self.name}: {checkpoint} predicts relative actions ({found.source}); with --no-normalise "
                           "they are stored as the policy outputs them, normalised and relative to the state")
            return None
        return found

    def _place(self, device: str, dtype: str) -> None:
        try:
            cast_model(self.model, self.device, self.torch_dtype)
        except (RuntimeError, AssertionError) as e:
            raise ToolkitError(f"cannot put {self.name} on device {device!r} as {dtype} ({one_line(e)})") from None

    def _read_sizes(self) -> None:
        """The sizes the inputs and outputs follow, from the model's config, the options and config.json."""
        meta = self.meta
        opts, cfg = self.opts, self.model.config
        vision = cfg.vlm_config.vision_config
        self.image_size = vision.image_size
        self.tokens_per_image = (vision.image_size // vision.patch_size) ** 2
        self.image_token_id = cfg.vlm_config.image_token_id
        self.chunk_size, self.max_action_dim = cfg.chunk_size, cfg.max_action_dim
        self.num_steps = int(opts["num_steps"] or cfg.num_inference_steps)
        self.action_dim = min(int(opts["action_dim"] or layouts.action_size(meta) or 7), self.max_action_dim)
        self.cameras: list[str] | None = cameras_option(opts)

    # what the adapter exposes ----------------------------------------------------------------
    @property
    def module(self) -> torch.nn.Module:
        return self.model

    @property
    def experts(self) -> dict[str, Expert]:
        cfg = self.model.config
        text = cfg.vlm_config.text_config
        return self.experts_of((text.num_hidden_layers, text.hidden_size),
                               (cfg.dit_config.num_hidden_layers, cfg.dit_config.hidden_size), self.cameras,
                               self.num_steps)

    @property
    def sites(self) -> dict[str, SiteInfo]:
        return dict(self.SITES)

    def describe(self, **extra: Any) -> dict[str, Any]:
        return {**super().describe(), "cameras": self.cameras, "num_steps": self.num_steps,
                "action_dim": self.action_dim, **extra, "layout": self.layout, "normalised": self.norm is not None,
                "relative_actions": self.relative.describe(self.action_dim) if self.relative else None,
                "normalisation": self.norm.describe() if self.norm else
                ("disabled (--no-normalise)" if not self.normalise_enabled else None)}

    # inputs ------------------------------------------------------------------------------------
    def _image(self, img: Any) -> torch.Tensor:
        """(H, W, 3) uint8 (or float in [0, 1]) -> (3, S, S) float32 in [-1, 1]."""
        return (image_tensor(img, (self.image_size, self.image_size), self.name) - 0.5) / 0.5

    def _fix_cameras(self, batch: Sequence[tuple[Episode, Step]]) -> None:
        if self.cameras is None:  # fixed by the first batch, so every batch has the same layout
            self.cameras = sorted(batch[0][1].images)
            if not self.cameras:
                raise ToolkitError(f"{self.name} needs at least one camera image per step; the first step has none")

    def _put_images(self, i: int, ep: Episode, step: Step, pixels: torch.Tensor, mask: torch.Tensor) -> None:
        """Step i's camera images into ``pixels[i]`` and their tokens into ``mask[i]``."""
        per = self.tokens_per_image
        for c, cam in enumerate(self.cameras):
            if cam in step.images:
                pixels[i, c] = self._image(step.images[cam])
                mask[i, c * per:(c + 1) * per] = True
            else:  # like openpi: a missing camera is a zero image whose tokens are masked out
                self.warn_once(f"{self.name}: a step of {ep.key} has no {cam!r} camera; its tokens are masked")
        extra = set(step.images) - set(self.cameras)
        if extra:
            self.warn_once(f"{self.name}: cameras {sorted(extra)} are ignored (the model uses {self.cameras})")

    def _prefix(self, n: int, text_tokens: int) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image tokens, token ids, attention mask, pixels) for a batch of ``n``: the ids are the image tokens,
        then ``text_tokens`` pads; the mask and the pixels are all zeros, for ``_put_images`` and the text."""
        n_img = len(self.cameras) * self.tokens_per_image
        ids = torch.full((n, n_img + text_tokens), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        ids[:, :n_img] = self.image_token_id
        mask = torch.zeros(n, n_img + text_tokens, dtype=torch.bool)
        return n_img, ids, mask, torch.zeros(n, len(self.cameras), 3, self.image_size, self.image_size)

    def _prefix_tensors(self, ids: torch.Tensor, mask: torch.Tensor, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The prefix's model inputs on the model's device."""
        dev = self.device
        return {
            "input_ids": ids.to(dev),
            "attention_mask": mask.long().to(dev),
            "pixel_values": pixels.to(dev, self.torch_dtype),
            # every camera slot holds its own camera, so image features map 1:1 onto the image tokens;
            # missing cameras are masked out through attention_mask instead
            "pixel_attention_mask": torch.ones(pixels.shape[:2], dtype=torch.bool, device=dev),
        }

    def _image_spans(self) -> dict[str, list[int]]:
        """The VLM's image spans: every image token, and each camera's."""
        per = self.tokens_per_image
        return {"image": list(range(len(self.cameras) * per)),
                **{f"image.{cam}": list(range(c * per, (c + 1) * per)) for c, cam in enumerate(self.cameras)}}

    # running -----------------------------------------------------------------------------------
    def denoise_t(self) -> list[float]:
        return [round(1.0 - k / self.num_steps, 6) for k in range(self.num_steps)]

    def noise(self, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """Sample i's initial noise, from its own generator."""
        return torch.stack([torch.randn(self.chunk_size, self.max_action_dim, generator=g) for g in generators])

    def _check_generators(self, batch_size: int, generators: Sequence[torch.Generator]) -> None:
        if len(generators) != batch_size:
            raise ToolkitError(f"{self.name}.run got {len(generators)} generators for a batch of {batch_size}")
