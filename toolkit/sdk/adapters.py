"""The two adapter contracts every model and dataset plugin implements.

A *dataset adapter* yields episodes and their steps (camera images, robot state, the dataset's action,
or activations that were already captured elsewhere).  A *model adapter* loads a policy, names its
experts (stacks of transformer layers) and capture sites, turns a batch of steps into model inputs,
and runs one policy call.  The capture machinery (``toolkit.capture.hooks``) hooks the modules the adapter
names; the adapter itself never touches the store.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:  # annotations only: the contracts load without torch (a plugin's torch loads with its model)
    import torch

from toolkit.sdk.checkpoint import LoadReport
from toolkit.sdk.options import parse_options
from toolkit.sdk.errors import ToolkitError

DTYPES = ("float32", "float16", "bfloat16")  # names of the torch dtypes a model runs in and a store keeps

# --------------------------------------------------------------------------- datasets


@dataclass
class Step:
    """One timestep of an episode, as a dataset stores it."""

    index: int  # rollout step within the episode
    images: dict[str, np.ndarray] = field(default_factory=dict)  # camera -> (H, W, 3) uint8
    state: np.ndarray | None = None  # proprioceptive state vector
    action: np.ndarray | None = None  # the dataset's own action at this step
    fields: dict[str, Any] = field(default_factory=dict)  # extra per-step scalars, stored as coordinates
    # Activations captured elsewhere (e.g. inside the LIBERO latent pickles), keyed "site/stream",
    # each shaped (layer, token, feature) or (layer, denoise, token, feature).  Used by `toolkit import`.
    activations: dict[str, np.ndarray] | None = None


@dataclass
class Episode:
    """One episode: identity, language, metadata, and a lazy iterator over its steps."""

    key: str  # stable, unique within the dataset, e.g. "task_10/episode_0"
    task: str  # task name
    task_id: int
    instruction: str
    metadata: dict[str, Any] = field(default_factory=dict)  # success, total_steps, ...
    n_steps: int | None = None
    _steps: Any = None  # callable returning an iterator of Step, or a sequence of Step

    def steps(self) -> Iterator[Step]:
        src = self._steps
        return iter(src() if callable(src) else src)


class DatasetAdapter(abc.ABC):
    """Reads a robot dataset.  ``data=None`` means the adapter's embedded sample data."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    # The adapter's ``--dataset-option``s, typed (see ``ModelAdapter.Options``); None: the adapter checks its own.
    Options: ClassVar[type | None] = None

    def __init__(self, data: str | None = None, **options: Any) -> None:
        self.data = data
        self.options = options
        # the declared options, validated and converted, defaults filled in (as given when none are declared)
        self.opts = parse_options(type(self), options, f"dataset {self.name!r}")

    @abc.abstractmethod
    def episodes(self) -> Iterator[Episode]:
        """Yield episodes in a deterministic order."""

    def length_hint(self) -> Sequence[int] | None:
        """Steps of each episode, in order, when known without reading them: progress bars then show a total
        and an ETA.  None (the default): unknown, e.g. a simulator's episodes end on success."""
        return None

    def describe(self) -> dict[str, Any]:
        """Provenance stored in the store's attributes."""
        return {"name": self.name, "data": self.data, "options": self.options}

    # Closed-loop datasets (a simulator): each observation depends on the policy's earlier actions.
    # `toolkit extract` runs them with batch size 1, calls ``feedback`` after every policy call (before
    # asking for the next step), passes its ``seed`` and ``max_steps`` (environment steps per episode)
    # as options of the same names unless given, runs the policy at every step but stores every
    # ``stride``-th call, and writes an episode's samples once the episode has ended (its steps are
    # exhausted: ``Episode.metadata`` and the steps' ``fields`` are final then), committing the store at
    # episode boundaries only, so a resumed run starts at the first unfinished episode.
    closed_loop: ClassVar[bool] = False

    def feedback(self, episode: Episode, step: Step, actions: np.ndarray) -> None:
        """Closed loop only: the policy's action chunk (horizon, action_dim) computed for ``step``."""
        raise NotImplementedError(f"dataset {self.name!r} is not closed-loop")

    # For `toolkit import`: datasets that carry activations describe them here.
    def activation_layout(self) -> "ActivationLayout | None":
        """Layout of the activations stored in the data itself (None if the dataset has none)."""
        return None


# --------------------------------------------------------------------------- models

# Where each stream is read in a Hugging Face style decoder layer (input_layernorm, self_attn,
# post_attention_layernorm, mlp): (direction, sub-module path relative to the layer[, transform]).
DECODER_STREAMS: dict[str, tuple[str, ...]] = {
    "resid_pre": ("input", ""),
    "resid_mid": ("input", "post_attention_layernorm"),
    "resid_post": ("output", ""),
    "attn_out": ("output", "self_attn"),
    "mlp_out": ("output", "mlp"),
    "mlp_act": ("input", "mlp.down_proj"),  # the FFN neurons, act(gate(x)) * up(x): one feature per unit
    "pre_attn_norm_scale": ("input", "input_layernorm", "rms_scale"),
    "pre_mlp_norm_scale": ("input", "post_attention_layernorm", "rms_scale"),
}
# The seeds' names for the same streams.
STREAM_ALIASES = {"hidden_states": "resid_post", "post_attn": "resid_mid", "post_attn_embedding": "resid_mid",
                  "pre_attn_norm_scales": "pre_attn_norm_scale", "pre_mlp_norm_scales": "pre_mlp_norm_scale"}
DEFAULT_STREAMS = ("resid_post",)



@dataclass(frozen=True)
class Expert:
    """A stack of transformer layers inside the policy, addressed by module path.

    ``streams`` maps a public stream name to where it is read, relative to one layer module:
    ``("output", "")`` is the layer's output, ``("input", "post_attention_layernorm")`` the input of
    that sub-module, and an optional third element names a transform (see ``toolkit.capture.hooks``).
    """

    name: str  # public name: "vlm", "action", ...
    layers_path: str  # module path of the ModuleList, e.g. "model.vlm.language_model.layers"
    n_layers: int
    hidden_size: int
    spans: tuple[str, ...] = ()  # named token spans this expert's sequence offers
    denoise_steps: int | None = None  # set when the expert runs several times per policy call
    streams: dict[str, tuple[str, ...]] = field(default_factory=dict)
    description: str = ""
    # False for a single module (e.g. RoboVLMs' act_head): then ``layers_path`` is that module, and
    # ``n_layers`` is 1.
    layered: bool = True
    # For an expert whose modules fire several times per policy call where only one firing is wanted
    # (autoregressive generation: the full-sequence forward, then one firing per generated token): keep
    # firing number ``record_call`` of each hook (0 = the first, -1 = the last) and ignore the others.
    # None: keep every firing, and there must be exactly ``denoise_steps`` (or 1) of them.
    record_call: int | None = None


@dataclass(frozen=True)
class SiteInfo:
    """A capture site: an expert seen through a default token selection and pooling."""

    name: str  # "vlm", "text_only", "action"
    expert: str
    tokens: str = "all"
    pool: str = "mean"
    description: str = ""


@dataclass(frozen=True)
class ActivationLayout:
    """Describes activations a dataset already carries (``Step.activations``), for `toolkit import`.

    ``Step.activations`` is keyed ``"expert/stream"``; each value is (layer, token, feature), or
    (layer, denoise, token, feature) for an expert with ``denoise_steps``.
    """

    model: str  # the model that produced them, e.g. "pi0"
    experts: dict[str, Expert]
    sites: dict[str, SiteInfo]
    spans: dict[str, dict[str, list[int]]]  # expert -> span -> positions
    denoise_t: dict[str, tuple[float, ...]] = field(default_factory=dict)  # expert -> t per denoising step


@dataclass
class ModelInputs:
    """What ``ModelAdapter.prepare`` returns: tensors for ``run`` plus token bookkeeping for capture."""

    tensors: dict[str, Any]
    batch_size: int
    # expert -> span name -> token positions (identical for every sample of the batch)
    spans: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    # expert -> (batch, seq) bool mask of real (non-padding) tokens; absent means all real
    token_mask: dict[str, torch.Tensor] = field(default_factory=dict)
    # expert -> sequence length
    seq_len: dict[str, int] = field(default_factory=dict)


@dataclass
class PolicyOutput:
    """What one policy call produced."""

    actions: np.ndarray  # (batch, horizon, action_dim) in the environment's action space
    denoise_t: Sequence[float] | None = None  # flow-matching time of each denoising step, if any


class ModelAdapter(abc.ABC):
    """Loads and runs one policy family.  Without a checkpoint it builds a small random instance."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    # The adapter's ``--model-option``s, typed: a ``toolkit.sdk.options.AdapterOptions`` (pydantic) model whose
    # fields give names, types, defaults, help and validation; ``self.opts`` then holds the converted values,
    # and `toolkit plugins --verbose` / `toolkit extract --model NAME --help` list them.
    Options: ClassVar[type | None] = None
    # The older, untyped form: names and defaults, values passed through as given (None: accept any name).
    option_defaults: ClassVar[dict[str, Any] | None] = None

    def __init__(
        self,
        checkpoint: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        seed: int = 0,
        trust_remote_code: bool = False,
        *,
        allow_missing: bool = False,
        random_weights: bool = False,
        strict: bool = False,
        **options: Any,
    ) -> None:
        opts = parse_options(type(self), options, self.name)
        if dtype not in DTYPES:
            raise ToolkitError(f"unknown model dtype {dtype!r}: use one of {', '.join(DTYPES)}")
        import torch

        self.checkpoint = checkpoint
        self.device = torch.device(device)
        self.dtype = dtype
        self.torch_dtype = getattr(torch, dtype)
        self.seed = seed
        self.trust_remote_code = trust_remote_code
        # --allow-missing: run although the checkpoint lacks weights (their names go into the store)
        self.allow_missing = allow_missing
        # --strict: checkpoint tensors the model does not use are an error, not a warning
        self.strict = strict
        # --random-weights: the checkpoint's architecture (from its config) with seeded random weights
        self.random_weights = random_weights
        # set by the adapter after loading a checkpoint (toolkit.sdk.checkpoint.check_complete)
        self.load_report: LoadReport | None = None
        self.options = options
        # the adapter's options with their defaults filled in (None given = the default)
        self.opts = opts
        self._warned: set[str] = set()

    def warn_once(self, message: str) -> None:
        """Log a data problem once per run rather than once per step."""
        if message not in self._warned:
            self._warned.add(message)
            logging.getLogger(f"toolkit.{self.name}").warning(message)

    @classmethod
    def architecture(cls, checkpoint: str | None = None,
                     **options: Any) -> tuple[dict[str, Expert], dict[str, SiteInfo]] | None:
        """The experts and sites a model of these options would have, known without building it or loading
        weights (e.g. from a checkpoint's config alone), so `toolkit extract` rejects a bad selection before
        the slow part.  None (the default): known only once loaded; the selection is checked right then."""
        return None

    # What the adapter exposes ----------------------------------------------------------
    @property
    @abc.abstractmethod
    def module(self) -> torch.nn.Module:
        """The root module that expert ``layers_path`` values are relative to."""

    @property
    @abc.abstractmethod
    def experts(self) -> dict[str, Expert]:
        """The model's layer stacks, by public name."""

    @property
    @abc.abstractmethod
    def sites(self) -> dict[str, SiteInfo]:
        """The default capture sites, by public name."""

    # What the adapter does -------------------------------------------------------------
    @abc.abstractmethod
    def prepare(self, batch: Sequence[tuple[Episode, Step]]) -> ModelInputs:
        """Turn dataset steps into model inputs on the adapter's device."""

    @abc.abstractmethod
    def run(self, inputs: ModelInputs, generators: Sequence[torch.Generator]) -> PolicyOutput:
        """One policy call (the hooked forward).

        Random draws for sample ``i`` of the batch must come from ``generators[i]`` (a CPU generator
        seeded from the run seed and the sample's index), so a resumed run reproduces its values.
        """

    @property
    def random_init(self) -> bool:
        """True when the weights are random: no checkpoint, or ``random_weights`` (never loaded from a file)."""
        return self.checkpoint is None or self.random_weights

    def describe(self) -> dict[str, Any]:
        """Provenance stored in the store's attributes (subclasses extend it; keep ``random_init`` from here)."""
        return {"name": self.name, "checkpoint": self.checkpoint, "dtype": self.dtype, "options": self.options,
                "random_init": self.random_init,
                "load_report": self.load_report.to_attrs() if self.load_report is not None else None}
