"""The run specification: what one extraction run is, declared once.

``RunSpec`` is a typed (pydantic) model of a run: the model and its checkpoint, the dataset and its data, the
capture selection (hook names and globs, or sites/layers/tokens/pooling/streams), the storage dtype and codec,
the limits, the seed and the workers, and each adapter's own typed options (``model_options`` and
``dataset_options``, validated by the adapter's ``Options`` class, which plugins contribute through
``register_models``/``register_datasets``).  Everything else reads it from here:

* the CLI's flags are generated from its fields (``toolkit.cli.params.spec_options``: names, types, defaults,
  help, choices);
* the Python API takes it, or keyword arguments that build it (``toolkit.extract(model="pi0", layers="-1")``);
* the store's ``run_spec`` attribute is it serialised (``stored``), with the selection as resolved against the
  model; ``--resume`` compares that attribute with the new run's (``resume_difference``);
* ``verify --repair`` rebuilds the run from that attribute (``from_store``); Ray workers receive it;
* ``toolkit intervene`` extends it (``toolkit.run.intervene.InterveneSpec``).

Adding a run option touches this class and the code that uses the value, nothing else.
"""

from __future__ import annotations

from typing import Any, Literal

import pydantic
from pydantic import Field

from toolkit.sdk.adapters import DTYPES
from toolkit.sdk.errors import ToolkitError, first_line
from toolkit.sdk.names import IndexSpec
from toolkit.store.codecs import CODECS
from toolkit.store.layout import first_difference

EXTRACT, IMPORT, INTERVENE = "extract", "import", "intervene"
# How a run is executed, not what it is: the store does not record these, and --resume may change them.
EXECUTION = ("trust_remote_code", "workers", "ray_address", "gpus_per_worker")
BOTH = (EXTRACT, IMPORT)  # what the capture selection is offered to
RUNS = (EXTRACT, INTERVENE)  # commands that run a model
DATA = (EXTRACT, IMPORT, INTERVENE)  # commands that read a dataset


def option(default: Any, help: str, *flags: str, commands: tuple[str, ...] = (EXTRACT,), resume: bool = True,
           metavar: str | None = None, repeat: bool = True) -> Any:
    """A spec field with what the CLI needs: its flags (first = the canonical one; others are aliases), the commands
    that offer it, whether ``--resume`` must find it unchanged (``resume=False``: it does not change the stored
    bytes, or it is compared in another form, e.g. the resolved selection), and, for a list, whether its flag may
    be repeated (``repeat=False``: one text value the spec parses, e.g. ``--units 0-2,7``)."""
    return Field(default, description=help, json_schema_extra={
        "flags": list(flags), "commands": list(commands), "resume": resume, "metavar": metavar, "repeat": repeat})


def _listed(value: Any) -> list[str] | None:
    """None, one value, or repeated values (the CLI gives a tuple) as a list of text; empty means not given."""
    if value is None or isinstance(value, (str, int)):
        return None if value is None or value == "" else [str(value)]
    items = list(value)
    if items and all(isinstance(v, int) and not isinstance(v, bool) for v in items):  # layers=[0, 5]
        return [",".join(map(str, items))]
    return [str(v) for v in items] or None


def _key_values(value: Any, what: str) -> dict[str, Any]:
    """``{"k": v}``, or ``KEY=VALUE`` texts (``--model-option``; dashes in keys become underscores)."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    out: dict[str, Any] = {}
    for item in [value] if isinstance(value, str) else value:
        if "=" not in str(item):
            raise ValueError(f"{what} takes KEY=VALUE, got {item!r}")
        k, v = str(item).split("=", 1)
        out[k.strip().replace("-", "_")] = v
    return out


class RunSpec(pydantic.BaseModel):
    """One extraction run (``toolkit extract``), or one import of activations a dataset carries
    (``toolkit import``: ``command="import"``, no model runs)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, protected_namespaces=(),
                                       arbitrary_types_allowed=False)

    command: Literal["extract", "import"] = Field("extract", description="extract: run a model; import: store the "
                                                  "activations a dataset already carries.")
    # what runs -------------------------------------------------------------------------------------
    model: str = option("pi0", "Model adapter (see `toolkit plugins --verbose`).", "--model", commands=RUNS)
    checkpoint: str | None = option(None, "Checkpoint path or hub id (default: a small random model, for smoke "
                                          "tests).", "--checkpoint", commands=RUNS)
    random_weights: bool = option(False, "Use the checkpoint's architecture with seeded random weights (a baseline; "
                                         "the store says random_init).", "--random-weights", commands=RUNS)
    allow_missing: bool = option(False, "Run although the checkpoint lacks model weights (they stay random; their "
                                        "names are stored).", "--allow-missing", commands=RUNS)
    strict: bool = option(False, "Refuse a checkpoint holding tensors the model does not use (default: one warning "
                                 "naming them; they are stored in the model's load report).", "--strict",
                          commands=RUNS)
    model_dtype: Literal[DTYPES] = option("float32", "dtype the model runs in.",
                                                                     "--model-dtype", commands=RUNS)
    model_options: dict[str, Any] = option({}, "Adapter-specific KEY=VALUE option (`toolkit extract --model NAME "
                                               "--help` lists them).", "--model-option", commands=RUNS,
                                     metavar="KEY=VALUE")
    device: str = option("cpu", "torch device, e.g. cuda, cuda:1.", "--device", commands=RUNS)
    # over what -------------------------------------------------------------------------------------
    dataset: str = option("libero", "Dataset adapter (see `toolkit plugins`).", "--dataset", commands=DATA)
    data: str | None = option(None, "Dataset path (default: the dataset adapter's embedded sample).", "--data",
                              commands=DATA)
    dataset_options: dict[str, Any] = option({}, "Dataset-specific KEY=VALUE option.", "--dataset-option",
                                             commands=DATA, metavar="KEY=VALUE")
    episodes: str | None = option(None, "Episodes to process, by position in the dataset's order: 0-9 | 0,4,7 "
                                        "(non-negative indices and closed ranges).", "--episodes", commands=DATA)
    max_episodes: int | None = option(None, "Process at most this many episodes.", "--max-episodes", commands=DATA)
    max_steps: int | None = option(None, "Process at most this many steps per episode.", "--max-steps",
                                   commands=DATA)
    stride: int = option(1, "Keep every N-th step of each episode.", "--stride", commands=DATA)
    # what is kept ----------------------------------------------------------------------------------
    hooks: list[str] | None = option(None, "Hook names such as vlm.layers.*.resid_post or action.layers.0-5.resid_mid "
                                           "(globs allowed; TransformerLens' blocks.5.hook_resid_post for a one-site "
                                           "model); instead of --site/--layer/--stream; repeat for more.", "--hook",
                                     commands=BOTH, resume=False)
    sites: list[str] | None = option(None, "Capture sites, comma-separated (default: all of the model's sites).",
                                     "--site", "--sites", commands=BOTH, resume=False)
    layers: list[str] | None = option(None, "Layers: all | 0,5,17 | 0-5 | 3- | -1 (the last); SITE=SPEC for one "
                                            "site.", "--layer", "--layers", commands=BOTH, resume=False)
    tokens: list[str] | None = option(None, "Tokens: all | last | span (image, text, state, actions, ...) | 0,5,-1; "
                                            "SITE=SPEC.", "--tokens", commands=BOTH, resume=False)
    pool: list[str] | None = option(None, "Pooling over the kept tokens: none | mean | last; SITE=SPEC.", "--pool",
                                    commands=BOTH, resume=False)
    streams: list[str] | None = option(None, "Streams: resid_post (hidden_states), resid_mid (post_attn), resid_pre, "
                                             "attn_out, mlp_out, pre_attn_norm_scale, pre_mlp_norm_scale, all; "
                                             "SITE=SPEC.", "--stream", "--streams", commands=BOTH, resume=False)
    dtype: Literal[DTYPES] = option("float16", "Storage dtype.", "--dtype", commands=BOTH)
    frames: int | None = option(None, "Keep each step's camera images, downscaled so the longer side is at most SIZE "
                                      "px (uint8, zstd), as per-sample arrays frame_<camera> (for `toolkit view`).",
                                "--frames", commands=DATA, metavar="SIZE")
    codec: Literal[CODECS] = option(
        "auto", "Chunk compression. auto: blosc-lz4 + bitshuffle for bfloat16/float32, none for float16 (measured "
        "fastest at no larger size), zstd for small fields; on --resume, the store's own.", "--codec",
        commands=BOTH, resume=False)
    chunk_samples: int | None = option(None, "Samples per chunk (default: ~4 MiB per layer chunk, at most the run's "
                                             "sample count; on --resume, the store's own).", "--chunk-samples", commands=BOTH, resume=False)
    # how -------------------------------------------------------------------------------------------
    batch_size: int = option(1, "Policy calls batched together.", "--batch-size", commands=RUNS)
    seed: int = option(0, "Seed for random weights and sampling noise.", "--seed", commands=RUNS)
    trust_remote_code: bool = option(False, "Allow a checkpoint's own Python code to run.", "--trust-remote-code",
                                     resume=False, commands=RUNS)
    workers: int = option(0, "Run on this many Ray actors, one model each (0: in this process); the same store as "
                             "one process.", "--workers", resume=False)
    ray_address: str | None = option(None, "Join a Ray cluster (auto, ray://host:port); default: a local one.",
                                     "--ray-address", resume=False)
    gpus_per_worker: float = option(0.0, "GPUs Ray reserves for each worker.", "--gpus-per-worker", resume=False)

    # ---------------------------------------------------------------------------------------------- parsing
    @pydantic.field_validator("sites", mode="before")
    @classmethod
    def _sites(cls, value: Any) -> list[str] | None:
        items = _listed(value)
        out = [s.strip() for item in items or () for s in item.split(",") if s.strip()]
        return out or None

    @pydantic.field_validator("hooks", "layers", "tokens", "pool", "streams", mode="before")
    @classmethod
    def _per_site(cls, value: Any) -> list[str] | None:
        return _listed(value)

    @pydantic.field_validator("episodes", mode="before")
    @classmethod
    def _episodes(cls, value: Any) -> str | None:
        spec = IndexSpec.parse(value, "episode")
        spec.literal()  # no negative index or open range: the dataset's length is not known yet
        return None if spec.is_all else spec.text

    @pydantic.field_validator("model_options", "dataset_options", mode="before")
    @classmethod
    def _options(cls, value: Any, info: pydantic.ValidationInfo) -> dict[str, Any]:
        return _key_values(value, "--" + info.field_name.replace("_options", "-option"))

    @pydantic.model_validator(mode="after")
    def _limits(self) -> RunSpec:
        for name, low in (("stride", 1), ("batch_size", 1), ("max_episodes", 0), ("max_steps", 0), ("workers", 0),
                          ("chunk_samples", 1), ("gpus_per_worker", 0), ("frames", 8)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise ValueError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
        if self.hooks and (self.sites or self.layers or self.streams):
            raise ValueError("give either --hook or --site/--layer/--stream, not both")
        return self

    @classmethod
    def build(cls, spec: RunSpec | None = None, **fields: Any) -> RunSpec:
        """``spec`` with ``fields`` changed, or a new spec from ``fields``; a bad value is one ToolkitError line."""
        try:
            if spec is None:
                return cls(**fields)
            return cls.model_validate({**spec.model_dump(), **fields}) if fields else spec
        except pydantic.ValidationError as e:
            raise ToolkitError(validation_message(e)) from None

    def picked_episodes(self) -> frozenset[int] | None:
        """The dataset positions ``episodes`` picks (None: every episode)."""
        return None if self.episodes is None else IndexSpec.parse(self.episodes, "episode").literal()

    # ---------------------------------------------------------------------------------------------- the store
    def selection(self) -> dict[str, Any]:
        """The capture selection as ``build_plan`` takes it."""
        return {"sites": self.sites, "layers": self.layers, "tokens": self.tokens, "pool": self.pool,
                "streams": self.streams, "dtype": self.dtype, "hooks": self.hooks}

    def stored(self, selection: dict[str, Any], **extra: Any) -> dict[str, Any]:
        """The store's ``run_spec`` attribute: what the run is (every field but ``EXECUTION``'s; the device without
        its index: cuda:0 and cuda:1 compute the same), the selection as resolved against the model, and ``extra``
        (e.g. the interventions).  A Ray run's store and a one-process run's record the same spec."""
        out = self.model_dump(mode="json", exclude=set(EXECUTION))
        out["device"] = str(out["device"]).split(":")[0]
        out["selection"] = selection
        out.update(extra)
        return out

    @classmethod
    def resume_difference(cls, stored: dict[str, Any], new: dict[str, Any]) -> tuple[str, Any, Any] | None:
        """The first difference between a store's ``run_spec`` and a new run's that forbids resuming the store:
        every field that changes the stored bytes, in field order, then the selection as resolved (and any extras,
        e.g. interventions).  ``codec`` counts only where the new run names one: the default (``auto``) continues
        the store's own."""
        skip = {name for name, f in cls.model_fields.items() if not (f.json_schema_extra or {}).get("resume", True)}
        a = {k: v for k, v in stored.items() if k not in skip}
        b = {k: v for k, v in new.items() if k not in skip}
        if new.get("codec", "auto") != "auto":
            a["codec"], b["codec"] = stored.get("codec", "auto"), new["codec"]
        return first_difference(a, b)

    @classmethod
    def from_store(cls, stored: dict[str, Any]) -> RunSpec:
        """The run a store's ``run_spec`` attribute records (``verify --repair`` reruns it).  Stores made before the
        selection was part of the spec carry it only resolved (``selection``): it is spelled per site then."""
        fields = {k: v for k, v in stored.items() if k in cls.model_fields}
        sel = stored.get("selection") or {}
        if sel and not any(k in stored for k in ("sites", "layers", "hooks")):
            fields.update(sites=list(sel),
                          layers=[f"{s}={','.join(map(str, c['layers']))}" for s, c in sel.items()],
                          tokens=[f"{s}={c['tokens']}" for s, c in sel.items()],
                          pool=[f"{s}={c['pool']}" for s, c in sel.items()],
                          streams=[f"{s}={','.join(c['streams'])}" for s, c in sel.items()])
        return cls.build(**fields)

    # ---------------------------------------------------------------------------------------------- display
    def __repr__(self) -> str:
        changed = {k: v for k, v in self.model_dump().items() if v != self.model_fields[k].get_default(
            call_default_factory=True) or k in ("model", "dataset")}
        if self.command == IMPORT:
            changed.pop("model", None)
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in changed.items())})"

    __str__ = __repr__


def validation_message(e: pydantic.ValidationError) -> str:
    """One line for the first problem pydantic found: the option's flag, the value given and what is wrong."""
    err = e.errors()[0]
    loc = [str(p) for p in err.get("loc", ())]
    msg = str(err.get("msg", "")).removeprefix("Value error, ")
    if not loc:
        return first_line(Exception(msg))
    flag = "--" + loc[0].replace("_", "-")
    given = err.get("input")
    shown = "" if isinstance(given, dict) or given is None else f" {given!r}"
    return first_line(Exception(f"{flag}{shown}: {msg}"))
