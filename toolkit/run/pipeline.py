"""The extraction pipeline: dataset adapter -> model adapter -> capture -> background store writer.

``extract`` runs a policy over a dataset and stores the chosen hidden states; ``import_latents``
stores activations a dataset already carries (no model).  Both share the sample loop, the store
schema, the resume logic and the progress bar.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolkit import __version__

from toolkit.sdk import fields
from toolkit.sdk.adapters import Episode, Expert, ModelAdapter, Step
from toolkit.capture.hooks import (
    Capture,
    SiteCapture,
    build_plan,
    plan_spec,
    select_tokens,
    stored_token_positions,
    to_numpy,
)
from toolkit.sdk.errors import ToolkitError
from toolkit.store.location import location, store_target
from toolkit.capture.intervention import Intervention, Steering
from toolkit.sdk.plugins import get_dataset, get_model
from toolkit.capture.tokens import check_dtype, parse_tokens
from toolkit.store.core import ArraySpec, StoreWriter, jsonable

log = logging.getLogger("toolkit")

COORDINATES = ["episode", "step", "task", "task_id", "success"]


@dataclass
class Sample:
    index: int  # position along the store's sample axis
    episode_index: int  # ordinal of the episode in this run
    episode: Episode
    step: Step
    capture: bool = True  # closed loop: False for a policy call that drives the simulator but is not stored
    call: int = 0  # closed loop: the policy call's ordinal within its episode


@dataclass
class EpisodeEnd:
    """Closed loop: the episode's steps are exhausted, so its metadata and step fields are final."""

    episode_index: int
    episode: Episode


def iter_samples(dataset, max_episodes: int | None, max_steps: int | None, stride: int) -> Iterator[Sample]:
    """Every ``stride``-th step of each episode, in the dataset's deterministic order."""
    if stride < 1:
        raise ToolkitError(f"--stride must be at least 1, got {stride}")
    index = 0
    for e, ep in enumerate(itertools.islice(dataset.episodes(), max_episodes)):
        steps = ep.steps()
        if max_steps is not None:
            steps = itertools.islice(steps, max_steps)
        for k, step in enumerate(steps):
            if k % stride:
                continue
            yield Sample(index, e, ep, step)
            index += 1


def iter_closed_loop(dataset, max_episodes: int | None, stride: int, done: list[str] | None = None,
                     start: int = 0, only: int | None = None) -> Iterator[Sample | EpisodeEnd]:
    """Every step (= policy call) of a closed-loop dataset, every ``stride``-th one marked for capture,
    and an ``EpisodeEnd`` after each episode.  A resumed run passes the keys of the episodes the store
    holds (``done``, in order) and its sample count (``start``): those episodes are checked and skipped
    without running them.  ``only``: run just that episode (one Ray actor's share, ``toolkit.run.ray``)."""
    if stride < 1:
        raise ToolkitError(f"--stride must be at least 1, got {stride}")
    done = list(done or [])
    index, seen = start, 0
    for e, ep in enumerate(itertools.islice(dataset.episodes(), max_episodes)):
        seen = e + 1
        if e < len(done):
            if ep.key != done[e]:
                raise ToolkitError(f"cannot resume: episode {e} of the store is {done[e]}, but the dataset gives "
                                   f"{ep.key}; the store was made from other options (use --overwrite)")
            continue
        if only is not None and e != only:
            continue
        for k, step in enumerate(ep.steps()):
            capture = k % stride == 0
            yield Sample(index, e, ep, step, capture, k)
            index += capture
        yield EpisodeEnd(e, ep)
    if seen < len(done):
        raise ToolkitError(f"cannot resume: the store holds {len(done)} episodes, the dataset gives {seen} "
                           "(use --overwrite)")


def closed_loop_options(dataset: str, batch_size: int, seed: int, max_steps: int | None,
                        dataset_options: dict[str, Any] | None) -> dict[str, Any]:
    """A closed-loop dataset's options: the run's seed and --max-steps go to the simulator, which needs each
    call's actions before it can give the next step (so batches of one)."""
    if batch_size != 1:
        raise ToolkitError(f"dataset {dataset!r} runs closed-loop (a simulator): --batch-size must be 1, "
                           f"got {batch_size}")
    return {"seed": seed, **({} if max_steps is None else {"max_steps": max_steps}), **(dataset_options or {})}


def call_generator(seed: int, episode_index: int, call: int) -> torch.Generator:
    """Closed loop: the random stream of policy call ``call`` of episode ``episode_index`` (captured or not)."""
    return sample_generator(seed, episode_index * 1_000_003 + call)


def _batches(samples: Iterator[Sample], size: int) -> Iterator[list[Sample]]:
    while batch := list(itertools.islice(samples, size)):
        yield batch


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The per-sample random stream: the same sample gets the same noise in any run or resume."""
    return torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63))


def sample_fields(batch: list[Sample], check: fields.FieldCheck | None = None) -> dict[str, np.ndarray]:
    """Per-sample coordinates and dataset fields for a batch, checked against their declared types
    (``toolkit.sdk.fields``; ``check`` carries the sizes first seen in the run) before anything is stored."""
    actions = fields.check_samples([(s.episode, s.step) for s in batch], check or fields.FieldCheck())
    out: dict[str, Any] = {
        "episode": np.array([s.episode_index for s in batch], dtype=np.int32),
        "step": np.array([s.step.index for s in batch], dtype=np.int32),
        "task": np.array([s.episode.task for s in batch], dtype=object),
        "task_id": np.array([fields.task_id(s.episode.task_id, "") for s in batch], dtype=np.int32),
        "success": np.array([fields.success(s.episode.metadata.get("success"), "") for s in batch], dtype=np.int8),
        "episode_key": np.array([s.episode.key for s in batch], dtype=object),
        "instruction": np.array([s.episode.instruction for s in batch], dtype=object),
    }
    if actions[0] is not None:
        out["dataset_action"] = np.stack(actions)
    for name in batch[0].step.fields:
        values = [s.step.fields.get(name) for s in batch]
        # strings stay variable-length (a fixed-width array would cut a longer value in a later batch)
        kind = object if any(isinstance(v, str) for v in values) else None
        out[f"field_{name}" if name in out else name] = np.array(values, dtype=kind)
    return out


FIELD_DIMS = {"policy_action": ("policy_horizon", "policy_action_dim"), "dataset_action": ("dataset_action_dim",)}


def _field_spec(name: str, value: np.ndarray) -> ArraySpec:
    dtype = "str" if value.dtype == object else str(value.dtype)
    dims = FIELD_DIMS.get(name) or tuple(f"{name}_dim{i}" if i else f"{name}_dim" for i in range(value.ndim - 1))
    if len(dims) != value.ndim - 1:
        raise ToolkitError(f"per-sample field {name!r} has shape {value.shape[1:]}, expected {len(dims)} dims")
    return ArraySpec(name, tuple(value.shape[1:]), dtype, dims)


def _activation_spec(name: str, value: np.ndarray, sc: SiteCapture, denoising: bool) -> ArraySpec:
    dims = ("layer", "denoise", "token", "feature") if denoising else ("layer", "token", "feature")
    stored = "bfloat16" if sc.dtype == "bfloat16" else None
    inner = (1, *value.shape[2:])
    return ArraySpec(name, tuple(value.shape[1:]), str(value.dtype), dims, stored,
                     attrs={"hook_names": [f"{sc.site}.layers.{layer}.{name.split('/')[1]}" for layer in sc.layers],
                            "pool": sc.pool, "tokens": sc.tokens},
                     chunk_inner=inner)


def _static_coords(plan: list[SiteCapture], experts: dict[str, Expert], spans: dict[str, dict[str, list[int]]],
                   seq_len: dict[str, int], denoise_t: dict[str, Any]) -> dict[str, tuple[tuple[str, ...], Any]]:
    static: dict[str, tuple[tuple[str, ...], Any]] = {}
    for sc in plan:
        static[f"{sc.site}/layer"] = (("layer",), np.array(sc.layers, dtype=np.int32))
        positions = stored_token_positions(sc, spans.get(sc.expert, {}), seq_len[sc.expert])
        static[f"{sc.site}/token"] = (("token",), np.array(positions, dtype=np.int32))
        if experts[sc.expert].denoise_steps:
            t = denoise_t.get(sc.expert)
            n = experts[sc.expert].denoise_steps
            static[f"{sc.site}/denoise"] = (("denoise",), np.arange(n, dtype=np.int32))
            if t is not None:
                static[f"{sc.site}/t"] = (("denoise",), np.asarray(t, dtype=np.float32))
    return static


def _site_attrs(plan: list[SiteCapture], experts: dict[str, Expert], spans) -> dict[str, Any]:
    return {sc.site: {"expert": sc.expert, "spans": {k: [min(v), max(v) + 1] if v else [] for k, v in
                                                      spans.get(sc.expert, {}).items()},
                      "layers_path": experts[sc.expert].layers_path}
            for sc in plan}


def expected_samples(dataset, max_episodes: int | None, max_steps: int | None, stride: int) -> int | None:
    """How many samples an open-loop run will store, from the dataset's ``length_hint()`` (None: unknown)."""
    hint = dataset.length_hint()
    if hint is None:
        return None
    steps = list(hint)[:max_episodes] if max_episodes is not None else list(hint)
    return sum(-(-(n if max_steps is None else min(n, max_steps)) // stride) for n in steps)


class Progress:
    """tqdm bar: samples/s, episodes, steps and MB written; a total and an ETA where the dataset knows its size."""

    def __init__(self, enabled: bool, writer: StoreWriter, initial: int, total: int | None = None):
        self.writer = writer
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm
            self.bar = tqdm(unit="sample", initial=initial, total=total, dynamic_ncols=True, desc="extract")
        self.episodes: set[int] = set()

    def update(self, batch: list[Sample]) -> None:
        if self.bar is None:
            return
        self.episodes.update(s.episode_index for s in batch)
        self.bar.update(len(batch))
        self.bar.set_postfix(episodes=len(self.episodes), step=batch[-1].step.index,
                             MB=f"{self.writer.bytes_added / 1e6:.1f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP during a run: whole samples are committed; the CLI exits 128 + the signal number
    with one line giving the committed count and the ``--resume`` command."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class _Signals:
    """Turns SIGINT/SIGTERM/SIGHUP into ``Interrupted`` in the main thread, but never inside a store call
    (``critical``): a signal there is held until the call returns, so buffers and commits stay consistent."""

    NAMES = ("SIGINT", "SIGTERM", "SIGHUP")

    def __init__(self):
        self.pending: int | None = None
        self.depth = 0
        self.saved: dict[int, Any] = {}

    def _handler(self, signum, frame):
        self.pending = signum
        if self.depth == 0:
            raise Interrupted(signum)

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for name in self.NAMES:
                num = getattr(signal, name, None)
                if num is not None:
                    self.saved[num] = signal.signal(num, self._handler)
        return self

    def __exit__(self, *exc):
        import signal

        for num, old in self.saved.items():
            signal.signal(num, old)
        self.saved.clear()

    @contextlib.contextmanager
    def critical(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if self.depth == 0 and self.pending is not None:
            raise Interrupted(self.pending)

    def hold(self) -> None:
        """From now on only record signals (the run is being wound up)."""
        self.depth += 1


def _run_loop(path: Path, writer: StoreWriter, samples: Iterator[Sample], batch_size: int,
              process: Callable[[list[Sample]], tuple[dict[str, np.ndarray] | None, dict]], initialize: Callable,
              progress: bool, closed_loop: bool = False, total: int | None = None) -> None:
    """Skip committed samples (checking they match), then process and append batches.

    Closed loop (``iter_closed_loop`` samples, batch size 1): ``process`` returns ``None`` arrays for an
    uncaptured call; captured ones are held until their ``EpisodeEnd``, then get their per-sample
    fields (final success etc.), are appended and committed together."""
    committed = writer.committed
    if committed and not closed_loop:  # closed loop: iter_closed_loop skipped the committed episodes
        _check_resume_prefix(writer, samples, committed)
    bar = Progress(progress, writer, committed, total)
    first = not committed
    held: list[tuple[list[Sample], dict[str, np.ndarray], dict]] = []

    def emit(arrays, meta):
        nonlocal first
        with signals.critical():
            if not writer.started:  # first batch of this run: create (or re-open) the arrays
                initialize(arrays, meta)
                writer.defer_commits = closed_loop
            first = False
            writer.append(arrays)

    with _Signals() as signals:  # handlers restored after the cleanup below
        try:
            for batch in _batches(samples, batch_size):
                if isinstance(batch[0], EpisodeEnd):
                    for b, arrays, meta in held:
                        arrays.update(sample_fields(b))
                        emit(arrays, meta)
                    held.clear()
                    with signals.critical():
                        writer.flush()
                    continue
                arrays, meta = process(batch)
                if arrays is None:
                    continue
                if closed_loop:
                    held.append((batch, arrays, meta))
                else:
                    emit(arrays, meta)
                bar.update(batch)
            if first and not committed:
                raise ToolkitError("the dataset selection is empty: no episode has a step to process "
                                   "(check --data, --max-episodes, --max-steps and --stride)")
            signals.hold()
            if not writer.started:  # resumed a store whose samples were all committed already
                writer.mark_complete()
            else:
                writer.close(complete=True)
        except BaseException as e:
            signals.hold()
            writer.abort(release=False)
            if writer.created and writer.committed == 0:
                writer.loc.remove()  # nothing useful was written: leave nothing behind
            if isinstance(e, KeyboardInterrupt):
                import signal

                num = getattr(e, "signum", signal.SIGINT)
                raise Interrupted(num, f"interrupted by {signal.Signals(num).name}: {writer.committed} samples are "
                                       f"committed in {path}") from None
            raise
        finally:
            writer.release()
            bar.close()


def _check_resume_prefix(writer: StoreWriter, samples: Iterator[Sample], committed: int) -> None:
    keys = writer.root["episode_key"][:committed]
    steps = writer.root["step"][:committed]
    for s in itertools.islice(samples, committed):
        if str(keys[s.index]) != s.episode.key or int(steps[s.index]) != s.step.index:
            raise ToolkitError(f"cannot resume: sample {s.index} of the store is {keys[s.index]} step "
                               f"{steps[s.index]}, but the data gives {s.episode.key} step {s.step.index}; "
                               "the store was made from other data or options (use --overwrite)")


def _check_target(path: Path | str, resume: bool, overwrite: bool) -> None:
    """Fail on the store path (or object-store URL) before any model or data is loaded."""
    if resume and overwrite:
        raise ToolkitError("--resume and --overwrite exclude each other: pick one")
    if location(path).exists() and not (resume or overwrite):
        raise ToolkitError(f"{path} already exists: pass --resume to continue it or --overwrite to replace it")


def _writer(store: str | Path, resume: bool, overwrite: bool, codec: str, spec: dict[str, Any]) -> StoreWriter:
    return StoreWriter(store, mode="resume" if resume else "overwrite" if overwrite else "create", codec=codec,
                       spec=spec)


def run_spec(plan: list[SiteCapture], **options: Any) -> dict[str, Any]:
    """Everything about a run that changes the stored bytes, in the order a mismatch is reported: recorded at
    creation (``run_spec`` attribute), and a ``--resume`` with any other value is refused naming the first."""
    spec = {k: v for k, v in options.items()}
    if "device" in spec:  # cuda:0 and cuda:1 compute the same; cpu and cuda do not
        spec["device"] = str(spec["device"]).split(":")[0]
    spec["selection"] = {p["site"]: {k: v for k, v in p.items() if k != "site"} for p in plan_spec(plan)}
    return jsonable(spec)


def extract(
    model: str | ExtractSpec = "pi0",
    dataset: str = "libero",
    store: str | Path = "stores/libero.zarr",
    *,
    checkpoint: str | None = None,
    data: str | None = None,
    device: str = "cpu",
    model_dtype: str = "float32",
    sites: list[str] | None = None,
    layers: Any = None,
    tokens: Any = None,
    pool: Any = None,
    streams: Any = None,
    hooks: list[str] | None = None,
    dtype: str = "float16",
    codec: str = "auto",
    batch_size: int = 1,
    seed: int = 0,
    max_episodes: int | None = None,
    max_steps: int | None = None,
    stride: int = 1,
    chunk_samples: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    trust_remote_code: bool = False,
    allow_missing: bool = False,
    random_weights: bool = False,
    model_options: dict[str, Any] | None = None,
    dataset_options: dict[str, Any] | None = None,
    interventions: Sequence[Intervention] | None = None,
    adapter: ModelAdapter | None = None,
    workers: int = 0,
    ray_address: str | None = None,
    gpus_per_worker: float = 0.0,
    unit: Any = None,
) -> Path:
    """Run ``model`` over ``dataset`` and stream the selected hidden states into ``store``.

    ``allow_missing``: run although the checkpoint lacks weights (their names are stored);
    ``random_weights``: the checkpoint's architecture with seeded random weights (a baseline).
    ``interventions`` (``toolkit.capture.intervention``) change the model while it runs; the store then holds the
    intervened activations and actions and records the interventions in its attributes.  ``adapter``: an
    already loaded model to reuse (a sweep loads it once); ``checkpoint`` and the model options are then its own.
    The whole run may also be given as one object: ``extract(ExtractSpec(model="pi0", layers="-1", ...))``.
    ``workers``: run on that many Ray actors (``toolkit.run.ray``; ``ray_address`` joins a cluster,
    ``gpus_per_worker`` reserves GPUs); the store is identical to a one-process run.  ``unit``: internal, one
    Ray actor's share of such a run.
    """
    if isinstance(model, ExtractSpec):
        return extract(**_spec_fields(model))
    options = dict(locals())
    if workers and unit is None:  # this process becomes the driver: it holds the lock and commits
        from toolkit.run.ray import extract_on_ray

        return extract_on_ray(ExtractSpec(**options))
    path = store_target(store)
    if batch_size < 1:
        raise ToolkitError(f"--batch-size must be at least 1, got {batch_size}")
    check_dtype(dtype)
    model_cls, dataset_cls = get_model(model), get_dataset(dataset)
    _check_target(path, resume, overwrite)
    closed = bool(getattr(dataset_cls, "closed_loop", False))
    if closed:
        dataset_options = closed_loop_options(dataset, batch_size, seed, max_steps, dataset_options)
    arch = None if adapter is not None else model_cls.architecture(checkpoint, **(model_options or {}))
    if arch is not None:  # a bad selection fails here, before any weight loads
        build_plan(model_cls.name, *arch, sites, layers, tokens, pool, streams, dtype, hooks=hooks)
    ds = dataset_cls(data, **(dataset_options or {}))
    adapter = adapter or model_cls(checkpoint=checkpoint, device=device, dtype=model_dtype, seed=seed,
                                   trust_remote_code=trust_remote_code, allow_missing=allow_missing,
                                   random_weights=random_weights, **(model_options or {}))
    plan = build_plan(adapter.name, adapter.experts, adapter.sites, sites, layers, tokens, pool, streams, dtype,
                      hooks=hooks)
    steering = Steering(adapter, interventions or ())  # checks the intervention names before any data is read
    spec = run_spec(plan, command="extract", model=model, checkpoint=checkpoint, random_weights=random_weights,
                    model_dtype=model_dtype, model_options=model_options or {}, device=device, dataset=dataset, data=data,
                    dataset_options=dataset_options or {}, max_episodes=max_episodes, max_steps=max_steps,
                    stride=stride, seed=seed, batch_size=batch_size, dtype=dtype, codec=codec,
                    interventions=[iv.describe() for iv in interventions or ()])
    writer = unit.writer(path, spec) if unit is not None else _writer(path, resume, overwrite, codec, spec)
    if closed:
        samples = iter_closed_loop(ds, max_episodes, stride, _stored_episodes(writer), writer.committed,
                                   getattr(unit, "episode", None))
    else:
        samples = iter_samples(ds, max_episodes, max_steps, stride)
    if unit is not None:
        samples = unit.samples(samples)
    check = fields.FieldCheck()

    def process(batch: list[Sample]):
        sampled = None if closed else sample_fields(batch, check)  # bad fields stop the run before the model
        inputs = adapter.prepare([(s.episode, s.step) for s in batch])
        if closed:
            s = batch[0]
            cap.begin(inputs if s.capture else None)  # None: the hooks record nothing
            steering.begin(inputs)
            out = adapter.run(inputs, [call_generator(seed, s.episode_index, s.call)])
            ds.feedback(s.episode, s.step, np.asarray(out.actions)[0])
            if not s.capture:
                return None, {}
        else:
            cap.begin(inputs)
            steering.begin(inputs)
            out = adapter.run(inputs, [sample_generator(seed, s.index) for s in batch])
        arrays = cap.collect()
        if not closed:  # closed loop: added when the episode has ended (_run_loop)
            arrays.update(sampled)
        arrays["policy_action"] = np.asarray(out.actions, dtype=np.float32)
        return arrays, {"inputs": inputs, "out": out}

    def initialize(arrays, meta):
        inputs, out = meta["inputs"], meta["out"]
        denoise_t = {e: out.denoise_t for e, ex in adapter.experts.items() if ex.denoise_steps}
        model_attrs = adapter.describe()
        # random weights are never recorded as loaded, whatever a subclass's describe() says
        model_attrs["random_init"] = bool(model_attrs.get("random_init")) or adapter.random_init
        attrs = {
            "toolkit_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": model_attrs,
            "dataset": ds.describe(),
            "capture": {"sites": plan_spec(plan), "seed": seed, "batch_size": batch_size,
                        "stride": stride, "max_episodes": max_episodes, "max_steps": max_steps},
            "site_info": _site_attrs(plan, adapter.experts, inputs.spans),
        }
        if interventions:
            attrs["intervention"] = [iv.describe() for iv in interventions]
        _initialize(writer, arrays, plan, adapter.experts, inputs.spans, inputs.seq_len, denoise_t, attrs,
                    chunk_samples, batch_size)

    # interventions hook in first, so capture records what they made
    with torch.inference_mode(), steering, Capture(adapter, plan) as cap:
        _run_loop(path, writer, samples, batch_size, process, initialize, progress, closed_loop=closed,
                  total=None if closed else expected_samples(ds, max_episodes, max_steps, stride))
    return path


def _stored_episodes(writer: StoreWriter) -> list[str]:
    """Keys of the episodes a resumed store holds, in order (closed loop: all of them finished)."""
    if not writer.committed:
        return []
    keys = [str(k) for k in writer.root["episode_key"][:writer.committed]]
    return list(dict.fromkeys(keys))


def _initialize(writer, arrays, plan, experts, spans, seq_len, denoise_t, attrs, chunk_samples, batch_size):
    if writer.root is not None:  # resuming: the run must be the same run
        old = writer.root.attrs
        for key, what in (("model", "name"), ("model", "checkpoint"), ("model", "random_init"), ("dataset", "name"),
                          ("dataset", "data")):
            if (old.get(key) or {}).get(what) != (attrs.get(key) or {}).get(what):
                raise ToolkitError(f"cannot resume {writer.path}: it was made with {key} {what} "
                                   f"{(old.get(key) or {}).get(what)!r}, this run uses "
                                   f"{(attrs.get(key) or {}).get(what)!r} (use --overwrite to start again)")
        if (old.get("capture") or {}).get("sites") != jsonable(attrs["capture"]["sites"]):
            raise ToolkitError(f"cannot resume {writer.path}: it was made with another capture selection "
                               "(sites, layers, tokens, pooling, streams or dtype); use the same options or --overwrite")
    specs = []
    by_name = {f"{sc.site}/{st}": sc for sc in plan for st in sc.streams}
    for name, value in arrays.items():
        if name in by_name:
            sc = by_name[name]
            specs.append(_activation_spec(name, value, sc, bool(experts[sc.expert].denoise_steps)))
        else:
            specs.append(_field_spec(name, value))
    static = _static_coords(plan, experts, spans, seq_len, denoise_t)
    writer.initialize(attrs, specs, static, COORDINATES, chunk_samples=chunk_samples, batch_size=batch_size,
                      group_attrs=attrs.get("site_info", {}))


def import_latents(
    dataset: str | ImportSpec = "libero",
    store: str | Path = "stores/libero_latents.zarr",
    *,
    data: str | None = None,
    sites: list[str] | None = None,
    layers: Any = None,
    tokens: Any = None,
    pool: Any = None,
    streams: Any = None,
    hooks: list[str] | None = None,
    dtype: str = "float16",
    codec: str = "auto",
    max_episodes: int | None = None,
    max_steps: int | None = None,
    stride: int = 1,
    chunk_samples: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    dataset_options: dict[str, Any] | None = None,
) -> Path:
    """Store the activations a dataset already carries (e.g. LIBERO latent pickles), running no model.
    The whole run may also be given as one object: ``import_latents(ImportSpec(dataset="libero", ...))``."""
    if isinstance(dataset, ImportSpec):
        return import_latents(**_spec_fields(dataset))
    path = store_target(store)
    check_dtype(dtype)
    dataset_cls = get_dataset(dataset)
    _check_target(path, resume, overwrite)
    ds = dataset_cls(data, **(dataset_options or {}))
    layout = ds.activation_layout()
    if layout is None:
        raise ToolkitError(f"dataset {dataset!r} carries no activations to import; use `toolkit extract` instead")
    plan = build_plan(layout.model, layout.experts, layout.sites, sites, layers, tokens, pool, streams, dtype,
                      hooks=hooks)
    spec = run_spec(plan, command="import", model=layout.model, dataset=dataset, data=data,
                    dataset_options=dataset_options or {}, max_episodes=max_episodes, max_steps=max_steps, stride=stride, dtype=dtype, codec=codec)
    writer = _writer(path, resume, overwrite, codec, spec)
    samples = iter_samples(ds, max_episodes, max_steps, stride)
    seq_len: dict[str, int] = {}
    check = fields.FieldCheck()

    def process(batch: list[Sample]):
        sampled = sample_fields(batch, check)
        arrays: dict[str, np.ndarray] = {}
        for sc in plan:
            expert = layout.experts[sc.expert]
            for stream in sc.streams:
                key = f"{sc.expert}/{stream}"
                per_sample = []
                for s in batch:
                    acts = s.step.activations or {}
                    if key not in acts:
                        raise ToolkitError(f"episode {s.episode.key} step {s.step.index} has no {key} activations; "
                                           f"it has: {', '.join(sorted(acts)) or 'none'}")
                    per_sample.append(_select_stored(acts[key], sc, layout.spans.get(sc.expert, {}),
                                                     bool(expert.denoise_steps), s))
                    seq_len[sc.expert] = acts[key].shape[-2]
                arrays[f"{sc.site}/{stream}"] = np.stack(per_sample)
        arrays.update(sampled)
        return arrays, {}

    def initialize(arrays, meta):
        attrs = {
            "toolkit_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": {"name": layout.model, "checkpoint": None, "imported": True},
            "dataset": ds.describe(),
            "capture": {"sites": plan_spec(plan), "imported": True, "stride": stride,
                        "max_episodes": max_episodes, "max_steps": max_steps},
            "site_info": _site_attrs(plan, layout.experts, layout.spans),
        }
        _initialize(writer, arrays, plan, layout.experts, layout.spans, seq_len, dict(layout.denoise_t), attrs,
                    chunk_samples, 1)

    with torch.inference_mode():
        _run_loop(path, writer, samples, 1, process, initialize, progress,
                  total=expected_samples(ds, max_episodes, max_steps, stride))
    return path


def _select_stored(values: np.ndarray, sc: SiteCapture, spans: dict[str, list[int]], denoising: bool,
                   s: Sample) -> np.ndarray:
    """Apply a site's layer/token/pool selection to stored (layer, [denoise,] token, feature) values."""
    x = torch.from_numpy(np.ascontiguousarray(values))
    want = 4 if denoising else 3
    if x.ndim != want:
        raise ToolkitError(f"episode {s.episode.key} step {s.step.index}: {sc.expert} activations have shape "
                           f"{tuple(x.shape)}, expected {want} dims (layer, {'denoise, ' if denoising else ''}"
                           "token, feature)")
    if max(sc.layers) >= x.shape[0]:
        raise ToolkitError(f"episode {s.episode.key}: {sc.expert} activations hold {x.shape[0]} layers, "
                           f"but layer {max(sc.layers)} was selected (valid: 0-{x.shape[0] - 1})")
    x = x[list(sc.layers)]
    lead = x.shape[:-2]
    flat = x.reshape(-1, *x.shape[-2:])
    sel = parse_tokens(sc.tokens, spans, flat.shape[1])
    pos = None if sel.positions is None else torch.tensor(sel.positions)
    kept = select_tokens(flat, sel, sc.pool, None, pos).to(check_dtype(sc.dtype))
    return to_numpy(kept.reshape(*lead, *kept.shape[1:]))


def _spec_class(fn: Callable, name: str) -> type:
    """A frozen dataclass whose fields are ``fn``'s parameters (names, types, defaults), so a run's options stay
    declared once, in ``fn``'s signature, and a run can be built, kept, compared and changed
    (``dataclasses.replace``) as one object."""
    import dataclasses
    import inspect

    params = inspect.signature(fn).parameters.values()
    cls = dataclasses.make_dataclass(name, [(p.name, p.annotation, dataclasses.field(default=p.default))
                                            for p in params], frozen=True)
    cls.__module__ = __name__
    cls.__doc__ = f"The parameters of one ``{fn.__name__}`` run as an object: ``{fn.__name__}({name}(...))``."
    return cls


def _spec_fields(spec: Any) -> dict[str, Any]:
    import dataclasses

    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}  # shallow: models stay objects


ExtractSpec = _spec_class(extract, "ExtractSpec")
ImportSpec = _spec_class(import_latents, "ImportSpec")
