"""The extraction pipeline: dataset adapter -> model adapter -> capture -> background store writer.

A ``Run`` is one ``RunSpec`` made ready in this process: the dataset opened, the model loaded (or handed in),
the capture planned and checked before any weight loads.  Executors drive it: ``Run.write`` is the sample loop
of a one-process run (``toolkit.run.api.extract``); ``toolkit.run.ray`` hands units of samples or whole episodes
to actors that each hold a ``Run``.  ``ExtractRun`` runs a policy; ``ImportRun`` stores activations a dataset
already carries (``toolkit import``, no model).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolkit import __version__
from toolkit.capture.hooks import Capture, select_tokens, to_numpy
from toolkit.capture.intervention import Intervention, Steering
from toolkit.capture.plan import SiteCapture, build_plan, plan_spec
from toolkit.capture.tokens import check_dtype, parse_tokens
from toolkit.run.frames import FrameKeeper
from toolkit.run.layout import StoreLayout, store_layout
from toolkit.run.progress import Progress
from toolkit.run.samples import (
    EpisodeEnd,
    Sample,
    batches,
    call_generator,
    check_resume_prefix,
    closed_loop_options,
    expected_samples,
    iter_closed_loop,
    iter_samples,
    sample_fields,
    sample_generator,
    stored_episodes,
)
from toolkit.run.signals import Signals, interrupted
from toolkit.run.spec import IMPORT, RunSpec
from toolkit.sdk import fields
from toolkit.sdk.adapters import ModelAdapter
from toolkit.sdk.errors import ToolkitError
from toolkit.sdk.plugins import get_dataset, get_model
from toolkit.store.location import location
from toolkit.store.writer import StoreWriter


def check_target(path: Path | str, resume: bool, overwrite: bool) -> None:
    """Fail on the store path (or object-store URL) before any model or data is loaded."""
    if resume and overwrite:
        raise ToolkitError("--resume and --overwrite exclude each other: pick one")
    if location(path).exists() and not (resume or overwrite):
        raise ToolkitError(f"{path} already exists: pass --resume to continue it or --overwrite to replace it")


def open_writer(path: Path | str, spec: RunSpec, stored: dict[str, Any], resume: bool, overwrite: bool,
                writer_class: type[StoreWriter] = StoreWriter) -> StoreWriter:
    """The store's writer for this run: it takes the store's lock, and a resumed store must record the same run."""
    return writer_class(path, mode="resume" if resume else "overwrite" if overwrite else "create", codec=spec.codec,
                        spec=stored, differ=RunSpec.resume_difference)


class Run:
    """One run of a ``RunSpec`` in this process (see the module docstring)."""

    def __init__(self, spec: RunSpec):
        self.spec = spec
        self.dataset_cls = get_dataset(spec.dataset)
        self.closed = bool(getattr(self.dataset_cls, "closed_loop", False))
        self.dataset_options = closed_loop_options(spec) if self.closed else dict(spec.dataset_options)
        self.plan: list[SiteCapture] = []
        self.check = fields.FieldCheck()
        self.frames = FrameKeeper(spec.frames) if spec.frames else None  # --frames: camera images, downscaled

    def open_dataset(self):
        self.dataset = self.dataset_cls(self.spec.data, **self.dataset_options)
        return self.dataset

    # what the executors ask ------------------------------------------------------------------------
    def stored_spec(self) -> dict[str, Any]:
        """The store's ``run_spec`` attribute for this run (the selection resolved against the model)."""
        return self.spec.stored({p["site"]: {k: v for k, v in p.items() if k != "site"} for p in plan_spec(self.plan)},
                                **self._stored_extra())

    def _stored_extra(self) -> dict[str, Any]:
        return {}

    def samples(self, writer: Any = None, only: int | None = None) -> Iterator[Sample | EpisodeEnd]:
        """The run's samples in order; closed loop: past the episodes ``writer``'s store holds, or only episode
        ``only`` (one Ray actor's share)."""
        if self.closed:
            done = stored_episodes(writer) if writer is not None else []
            return iter_closed_loop(self.dataset, self.spec, done, writer.committed if writer is not None else 0,
                                    only)
        return iter_samples(self.dataset, self.spec)

    def total(self) -> int | None:
        """The number of samples an open-loop run stores, where the dataset knows it (None: unknown).  Closed loop:
        an upper bound (a simulator's episodes may end early), only ever the progress bar's total and ETA."""
        return expected_samples(self.dataset, self.spec)

    def process(self, batch: list[Sample]) -> tuple[dict[str, np.ndarray] | None, dict[str, Any]]:
        """One batch through the model (or the data's own activations): arrays keyed ``site/stream`` and by
        field name, or None for a closed-loop call that is run but not stored."""
        raise NotImplementedError

    def layout(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> StoreLayout:
        """The store's layout from the first processed batch."""
        raise NotImplementedError

    def context(self):
        """What must be active while batches are processed (inference mode; hooks)."""
        return torch.inference_mode()

    def first_layout(self) -> StoreLayout:
        """The layout of this run's store, from its first batch, writing nothing (the Ray driver creates the store
        with it)."""
        with self.context():
            for batch in batches(self.samples(), self.spec.batch_size):
                if isinstance(batch[0], EpisodeEnd):
                    continue
                arrays, meta = self.process(batch)
                if arrays is not None:
                    if self.closed:
                        arrays.update(sample_fields(batch))
                    return self.layout(arrays, meta)
        raise ToolkitError("the dataset selection is empty: no episode has a step to process "
                           "(check --data, --max-episodes, --max-steps and --stride)")

    # the sample loop ---------------------------------------------------------------------------------
    def write(self, writer: Any, samples: Iterator[Sample | EpisodeEnd], progress: bool = False,
              total: int | None = None) -> int:
        """Skip committed samples (checking the data still gives them: ``check_resume_prefix``), then process and
        append batches; on any failure commit what is whole and release the lock (a store nothing was committed to
        is removed).  Returns the number of samples this call added (0: a resumed store that was complete).

        Closed loop: ``process`` returns None for an uncaptured call; captured ones are held until their
        ``EpisodeEnd``, then get their per-sample fields (final success etc.) and are appended and committed
        together."""
        committed = writer.committed
        was_complete = bool(committed and writer.root is not None and writer.root.attrs.get("complete"))
        if committed and not self.closed:  # closed loop: iter_closed_loop skipped the committed episodes
            check_resume_prefix(writer, samples, committed)
        bar = Progress(progress, writer, committed, total)
        first = not committed
        held: list[tuple[list[Sample], dict[str, np.ndarray], dict]] = []

        def emit(arrays, meta):
            nonlocal first
            with signals.critical():
                if not writer.started:  # first batch of this run: create (or re-open) the arrays
                    self.layout(arrays, meta).create(writer, self.spec.chunk_samples, self.spec.batch_size, total)
                    writer.defer_commits = self.closed
                first = False
                writer.append(arrays)

        with Signals() as signals:  # handlers restored after the cleanup below
            try:
                with self.context():
                    for batch in batches(samples, self.spec.batch_size):
                        if isinstance(batch[0], EpisodeEnd):
                            for b, arrays, meta in held:
                                arrays.update(sample_fields(b))
                                emit(arrays, meta)
                            held.clear()
                            with signals.critical():
                                writer.flush()
                            continue
                        arrays, meta = self.process(batch)
                        if arrays is None:
                            continue
                        if self.closed:
                            held.append((batch, arrays, meta))
                        else:
                            emit(arrays, meta)
                        bar.update(batch)
                if first and not committed:
                    raise ToolkitError("the dataset selection is empty: no episode has a step to process "
                                       "(check --data, --max-episodes, --max-steps and --stride)")
                signals.hold()
                if not writer.started:  # resumed a store whose samples were all committed already
                    if not was_complete:
                        writer.mark_complete()
                else:
                    writer.close(complete=True)
            except BaseException as e:
                signals.hold()
                writer.abort(release=False)
                writer.discard()  # nothing useful was written (and the store is still ours): leave nothing behind
                if isinstance(e, KeyboardInterrupt):
                    raise interrupted(e, writer.committed, writer.path) from None
                raise
            finally:
                writer.release()
                bar.close()
        if writer.path is not None:  # a writer of its own store (a Ray actor's stand-in has none)
            signals.finished_despite(writer.committed, writer.path)  # outside: nothing it raises can undo the store
        return writer.committed - committed

    def attrs(self) -> dict[str, Any]:
        """The store attributes every run records."""
        return {"toolkit_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "dataset": self.dataset.describe()}


class ExtractRun(Run):
    """A policy run over a dataset: what ``toolkit extract`` stores."""

    def __init__(self, spec: RunSpec, adapter: ModelAdapter | None = None,
                 interventions: Sequence[Intervention] = ()):
        super().__init__(spec)
        model_cls = get_model(spec.model)
        arch = None if adapter is not None else model_cls.architecture(spec.checkpoint, **spec.model_options)
        if arch is not None:  # a bad selection fails here, before any weight loads
            build_plan(model_cls.name, *arch, **spec.selection())
        self.open_dataset()
        self.adapter = adapter or model_cls(checkpoint=spec.checkpoint, device=spec.device, dtype=spec.model_dtype,
                                            seed=spec.seed, trust_remote_code=spec.trust_remote_code,
                                            allow_missing=spec.allow_missing, random_weights=spec.random_weights,
                                            strict=spec.strict,
                                            **spec.model_options)
        a = self.adapter
        self.plan = build_plan(a.name, a.experts, a.sites, **spec.selection())
        self.interventions = list(interventions)
        self.steering = Steering(a, self.interventions)  # checks the intervention names before any data is read
        self.capture: Capture | None = None

    def _stored_extra(self) -> dict[str, Any]:
        return {"interventions": [iv.describe() for iv in self.interventions]}

    @contextlib.contextmanager
    def context(self):
        # interventions hook in first, so capture records what they made
        with torch.inference_mode(), self.steering, Capture(self.adapter, self.plan) as cap:
            self.capture = cap
            try:
                yield
            finally:
                self.capture = None

    def process(self, batch: list[Sample]):
        s, cap, adapter = self.spec, self.capture, self.adapter
        sampled = None if self.closed else sample_fields(batch, self.check)  # bad fields stop the run first
        if self.closed:  # its fields are stored at the episode's end, but the model must not see bad ones either
            fields.check_samples([(x.episode, x.step) for x in batch], fields.FieldCheck())
        inputs = adapter.prepare([(x.episode, x.step) for x in batch])
        if self.closed:
            x = batch[0]
            cap.begin(inputs if x.capture else None)  # None: the hooks record nothing
            self.steering.begin(inputs)
            out = adapter.run(inputs, [call_generator(s.seed, x.episode_index, x.call)])
            self.dataset.feedback(x.episode, x.step, np.asarray(out.actions)[0])
            if not x.capture:
                return None, {}
        else:
            cap.begin(inputs)
            self.steering.begin(inputs)
            out = adapter.run(inputs, [sample_generator(s.seed, x.index) for x in batch])
        arrays = cap.collect()
        if not self.closed:  # closed loop: added when the episode has ended (Run.write)
            arrays.update(sampled)
        if self.frames is not None:
            arrays.update(self.frames(batch))
        arrays["policy_action"] = np.asarray(out.actions, dtype=np.float32)
        return arrays, {"inputs": inputs, "out": out}

    def layout(self, arrays, meta) -> StoreLayout:
        s, a = self.spec, self.adapter
        inputs, out = meta["inputs"], meta["out"]
        denoise_t = {e: out.denoise_t for e, ex in a.experts.items() if ex.denoise_steps}
        model_attrs = a.describe()
        # random weights are never recorded as loaded, whatever a subclass's describe() says
        model_attrs["random_init"] = bool(model_attrs.get("random_init")) or a.random_init
        attrs = {**self.attrs(), "model": model_attrs,
                 "capture": {"sites": plan_spec(self.plan), "seed": s.seed, "batch_size": s.batch_size,
                             "stride": s.stride, "max_episodes": s.max_episodes, "max_steps": s.max_steps}}
        if self.interventions:
            attrs["intervention"] = [iv.describe() for iv in self.interventions]
        return store_layout(arrays, self.plan, a.experts, inputs.spans, inputs.seq_len, denoise_t, attrs)


class ImportRun(Run):
    """Activations a dataset already carries (e.g. LIBERO latent pickles), stored without running a model."""

    def __init__(self, spec: RunSpec):
        super().__init__(spec)
        ds = self.open_dataset()
        layout = ds.activation_layout()
        if layout is None:
            raise ToolkitError(f"dataset {spec.dataset!r} carries no activations to import; use `toolkit extract` "
                               "instead")
        self.activations = layout
        self.plan = build_plan(layout.model, layout.experts, layout.sites, **spec.selection())
        self.seq_len: dict[str, int] = {}

    def process(self, batch: list[Sample]):
        layout = self.activations
        sampled = sample_fields(batch, self.check)
        arrays: dict[str, np.ndarray] = {}
        for sc in self.plan:
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
                    self.seq_len[sc.expert] = acts[key].shape[-2]
                arrays[f"{sc.site}/{stream}"] = np.stack(per_sample)
        arrays.update(sampled)
        if self.frames is not None:
            arrays.update(self.frames(batch))
        return arrays, {}

    def layout(self, arrays, meta) -> StoreLayout:
        s, layout = self.spec, self.activations
        attrs = {**self.attrs(), "model": {"name": layout.model, "checkpoint": None, "imported": True},
                 "capture": {"sites": plan_spec(self.plan), "imported": True, "stride": s.stride,
                             "max_episodes": s.max_episodes, "max_steps": s.max_steps}}
        return store_layout(arrays, self.plan, layout.experts, layout.spans, self.seq_len, dict(layout.denoise_t),
                            attrs)


def make_run(spec: RunSpec, adapter: ModelAdapter | None = None,
             interventions: Sequence[Intervention] = ()) -> Run:
    """The ``Run`` of a spec: an import of the data's activations, or a policy run."""
    if spec.command == IMPORT:
        return ImportRun(spec)
    return ExtractRun(spec, adapter, interventions)


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
