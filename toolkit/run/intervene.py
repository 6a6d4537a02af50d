"""From probe to cause: run a policy with and without an intervention and measure what changes.

``intervene`` loads the model once, runs the extraction pipeline (``toolkit.run.pipeline``) unmodified and then
once per condition (hook × alpha) with the intervention applied, each run into its own store under
``OUT/stores/``.  Every run uses the same seed, so each sample gets the same noise and, in a simulator
(``libero-sim``), each episode starts from the same init state: an intervened sample or rollout is paired
with its unmodified twin by (episode, step).  ``toolkit.analysis.effects`` turns the pairs into the effects
table, its figures and its report.

``InterveneSpec`` extends the run specification with where and how to intervene; the capture selection of each
run defaults to the intervened hooks (and the probe's own), in float32 so score shifts are exact.

``--op erase`` removes a concept completely: a LEACE or INLP eraser (``toolkit.analysis.directions``) fitted on
the probe's own store (``--erasure-store`` to fit elsewhere), or a saved ``Eraser`` (``.npz``), applied inside the
model like any other edit; the fitted eraser is saved as ``OUT/eraser.npz``.  After ``ablate`` and ``erase`` a
probe is retrained on the intervened activations (the amnesic check, ``--no-retrain`` to skip it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydantic

from toolkit.analysis.directions import Eraser, ProbeDirection, mean_difference, store_mean
from toolkit.analysis.effects import (
    N_BOOT,
    REMOVALS,
    Condition,
    action_effects,
    amnesic_check,
    probe_check,
    resolve_direction,
    resolve_eraser,
    save_table,
    write_figures,
    write_report,
)
from toolkit.capture.intervention import Intervention, Steering, hooks_for
from toolkit.run.api import extract
from toolkit.run.spec import INTERVENE, RunSpec, option
from toolkit.sdk.adapters import DTYPES
from toolkit.sdk.errors import ToolkitError
from toolkit.sdk.names import IndexSpec, parse_hook
from toolkit.sdk.plugins import get_dataset, get_model
from toolkit.store.reader import open_store

COMMANDS = (INTERVENE,)


def _indices(value: Any, what: str) -> list[int] | None:
    """Indices in the toolkit's one selection grammar (``12,40`` or ``0-5``), non-negative and closed (checked
    against what exists once the model is known); None: not given, or ``all``."""
    if value is None or isinstance(value, (list, tuple)) and not value:
        return None
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        return [int(v) for v in value]
    chosen = IndexSpec.parse(value, what).literal()
    return None if chosen is None else sorted(chosen)


class InterveneSpec(RunSpec):
    """A ``toolkit intervene`` run: the run specification, plus where and how to intervene."""

    at: list[str] | None = option(None, "Where: SITE.layers.LAYERS.STREAM, e.g. text_only.layers.3.resid_post; layer "
                                        "lists sweep (vlm.layers.2,4.resid_post). Default: the probe's own hook.",
                                  "--hook", commands=COMMANDS)
    op: Literal["add", "ablate", "erase", "clamp", "zero", "mean"] = option(
        "add", "add alpha·d | ablate (project d out) | erase (remove the probe's concept completely: --erasure) | "
               "clamp units | zero | mean (the unmodified run's mean).", "--op", commands=COMMANDS)
    erasure: Literal["leace", "inlp"] = option(
        "leace", "--op erase: leace (closed-form least-change linear eraser) or inlp (project probe directions out "
                 "until a retrained probe is at chance), fitted on the probe's store.", "--erasure", commands=COMMANDS)
    erasure_store: str | None = option(None, "--op erase: the store to fit the eraser on (default: the store the probe "
                                             "was trained on).", "--erasure-store", commands=COMMANDS)
    retrain: bool = option(True, "After ablate/erase, retrain a probe on the intervened activations (amnesic check: "
                                 "is the information still linearly decodable?).", "--retrain/--no-retrain",
                           commands=COMMANDS)
    direction: str | None = option(None, "A probe results folder (DIR or DIR:ID, from `toolkit probe --out`) or a "
                                         ".npy file.", "--direction", commands=COMMANDS)
    probe_class: str | None = option(None, "The probe class (name or column) to steer towards with --op add.",
                                     "--class", commands=COMMANDS)
    between: tuple[str, str] | None = option(None, "Direction = mean(A) - mean(B) in the unmodified run, e.g. task=3 "
                                                   "task=5.", "--between", commands=COMMANDS, metavar="A B")
    alphas: list[float] = option([1.0], "Strength(s), comma lists allowed; 0 is the unmodified policy "
                                        "(dose-response: 0,1,2,4).", "--alpha", commands=COMMANDS)
    units: list[int] | None = option(None, "clamp: feature indices (e.g. FFN neurons of mlp_act): 12,40 or 0-5.",
                                     "--units", commands=COMMANDS, repeat=False)
    value: float = option(0.0, "clamp: the value the units are clamped to.", "--value", commands=COMMANDS)
    edit_tokens: str | None = option(None, "Tokens to change (span name, positions, last); default: the site's own "
                                           "tokens.", "--tokens", commands=COMMANDS)
    denoise: list[int] | None = option(None, "Action expert: only these denoising steps (indices, e.g. 0 or 0,1; 0 is "
                                             "t=1.0).", "--denoise", commands=COMMANDS, repeat=False)
    bootstrap: int = option(N_BOOT, "Episode-bootstrap resamples (the intervals and the bootstrap-t tests).", "--bootstrap", commands=COMMANDS)
    dtype: Literal[DTYPES] = option("float32", "Storage dtype of the runs' stores.",
                                                              commands=())

    @pydantic.field_validator("at", mode="before")
    @classmethod
    def _at(cls, value: Any) -> list[str] | None:
        items = [value] if isinstance(value, str) else list(value or ())
        return [h for h in items if h] or None

    @pydantic.field_validator("alphas", mode="before")
    @classmethod
    def _alphas(cls, value: Any) -> list[float]:
        items = [value] if isinstance(value, (str, int, float)) else list(value or ())
        try:
            out = [float(v) for item in items for v in str(item).split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"takes numbers (comma lists allowed), got {' '.join(map(str, items))!r}") from None
        if not out:
            raise ValueError("give at least one strength")
        return out

    @pydantic.field_validator("units", "denoise", mode="before")
    @classmethod
    def _index_list(cls, value: Any, info: pydantic.ValidationInfo) -> list[int] | None:
        try:
            return _indices(value, "--" + info.field_name)
        except ToolkitError as e:
            raise ValueError(str(e)) from None

    @pydantic.field_validator("between", mode="before")
    @classmethod
    def _between(cls, value: Any) -> Any:
        return None if value is None or len(value) == 0 else tuple(value)

    @pydantic.field_validator("probe_class", mode="before")
    @classmethod
    def _class(cls, value: Any) -> str | None:
        return None if value is None else str(value)

    @pydantic.model_validator(mode="after")
    def _one_direction(self) -> InterveneSpec:
        if self.direction is not None and self.between is not None:
            raise ValueError("give either --direction or --between, not both")
        return self

    def template(self, hook: str, op: str, alpha: float, vector: np.ndarray | None, source: str,
                 eraser: Eraser | None = None) -> Intervention:
        """One intervention of this spec at ``hook`` (``eraser``: the map of an ``erase``)."""
        if op == "erase" and eraser is not None:
            vector, right, center = eraser.left, eraser.right, eraser.center
        else:
            right = center = None
        return Intervention(hook, op, alpha, vector, tuple(self.units or ()), float(self.value), self.edit_tokens,
                            source, None if self.denoise is None else tuple(self.denoise), right, center)

    def capture_for(self, names: list[str], probe: ProbeDirection | None) -> RunSpec:
        """The run every condition records: the spec's own selection if it names one, else the intervened streams
        (and the probe's) at their layers."""
        run = RunSpec.build(**{k: getattr(self, k) for k in RunSpec.model_fields})
        if any((run.hooks, run.sites, run.layers, run.streams)):
            return run
        layers: dict[str, dict[str, None]] = {}
        streams: dict[str, dict[str, None]] = {}
        for name in names + ([probe.hook] if probe is not None else []):
            site, layer, stream = parse_hook(name)
            layers.setdefault(site, {})[str(layer)] = None
            streams.setdefault(site, {})[stream] = None
        return RunSpec.build(run, sites=list(layers), layers=[f"{s}={','.join(v)}" for s, v in layers.items()],
                             streams=[f"{s}={','.join(v)}" for s, v in streams.items()])


@dataclass
class InterventionRun:
    """What ``intervene`` made: the tidy table and where its files are."""

    out: Path
    rows: list[dict] = field(default_factory=list)
    conditions: list[Condition] = field(default_factory=list)
    baseline: Path | None = None
    figures: list[Path] = field(default_factory=list)
    eraser: Path | None = None  # --op erase: the eraser applied, saved as OUT/eraser.npz

    def table(self):
        import pandas as pd

        return pd.DataFrame(self.rows)


def intervene(spec: InterveneSpec | None = None, /, out: str | Path = "results/intervene", *,
              direction: str | Path | np.ndarray | ProbeDirection | None = None, overwrite: bool = False,
              progress: bool = False, figures: bool = True, **fields: Any) -> InterventionRun:
    """Run the model on the dataset unmodified and under each (hook, alpha) intervention; measure the effects.

    The run is ``spec`` or built from ``fields`` (``InterveneSpec``: ``at`` hook names or patterns, where
    ``text_only.layers.2,4.resid_post`` sweeps two layers, default the probe's own hook; ``op``; ``alphas``;
    ``between`` two groups, e.g. ``("task=3", "task=5")``, whose mean difference in the unmodified run is the
    direction, per hook; ``op="mean"`` takes its mean from the unmodified run).  ``direction``: a ``.npy`` file, a
    probe results folder (``DIR`` or ``DIR:ID``), an array or a ``ProbeDirection`` (the spec's ``direction`` text
    when not given).
    """
    spec = InterveneSpec.build(spec, **fields)
    out = Path(out)
    if (out / "effects.csv").exists() and not overwrite:
        raise ToolkitError(f"{out} already holds an intervention run: pass --overwrite to replace it")
    given = spec.direction if direction is None else direction
    eraser = None
    if spec.op == "erase":
        if spec.between is not None:
            raise ToolkitError("--op erase removes a probe's concept (--direction), not a --between difference")
        eraser, probe, source = resolve_erase(given, spec)
        vector, steered = eraser.left, None
    else:
        vector, probe, steered, source = resolve_direction(given, spec.probe_class, spec.op)
    closed = bool(getattr(get_dataset(spec.dataset), "closed_loop", False))
    adapter = get_model(spec.model)(checkpoint=spec.checkpoint, device=spec.device, dtype=spec.model_dtype,
                                    seed=spec.seed, trust_remote_code=spec.trust_remote_code,
                                    allow_missing=spec.allow_missing, random_weights=spec.random_weights,
                                    strict=spec.strict,
                                    **spec.model_options)
    hooks = spec.at
    if not hooks:
        if probe is None:
            raise ToolkitError("say where to intervene with --hook (e.g. text_only.layers.3.resid_post)")
        hooks = [probe.hook]
    names = hooks_for(adapter, list(hooks))
    from_run = spec.between is not None or spec.op == "mean"  # those vectors come from the unmodified run, per hook
    for name in names:  # check every intervention before running anything: bad names, units or vectors fail here
        # (a vector still to come from the unmodified run: its hook, tokens and steps are checked as a "zero")
        Steering(adapter, [spec.template(name, "zero" if from_run else spec.op, 1.0, None if from_run else vector,
                                         "", eraser)])
    (out / "stores").mkdir(parents=True, exist_ok=True)
    run_spec = spec.capture_for(names, probe)
    started = time.time()
    base_path = extract(run_spec, out / "stores" / "unmodified.zarr", overwrite=True, progress=progress,
                        adapter=adapter)
    unmodified = open_store(base_path)
    run = InterventionRun(out, baseline=base_path)
    if eraser is not None:
        run.eraser = eraser.save(out / "eraser.npz")
    refits: dict = {}  # the unmodified run's retrained probe, shared by every removal condition
    for name, alpha in product(names, spec.alphas):
        vec = vector
        if spec.between is not None:
            vec = mean_difference(unmodified, name, *spec.between)
            source = f"mean difference {spec.between[0]} - {spec.between[1]} in the unmodified run"
        elif spec.op == "mean":
            vec, source = store_mean(unmodified, name), "mean of the unmodified run"
        iv = spec.template(name, spec.op, alpha, vec, source, eraser)
        cond = Condition(name, spec.op, alpha, iv.vector)
        cond.store = extract(run_spec, out / "stores" / f"{_slug(cond.label)}.zarr", overwrite=True,
                             progress=progress, adapter=adapter, interventions=[iv])
        intervened = open_store(cond.store)
        run.rows += action_effects(cond, intervened, unmodified, closed, spec.seed, spec.bootstrap)
        if probe is not None:
            run.rows += probe_check(cond, probe, intervened, unmodified, steered)
            if spec.retrain and spec.op in REMOVALS:
                run.rows += amnesic_check(cond, probe, intervened, unmodified, refits)
        run.conditions.append(cond)
    meta = {"model": spec.model, "checkpoint": spec.checkpoint, "dataset": spec.dataset, "closed_loop": closed,
            "seed": spec.seed, "op": spec.op, "alphas": spec.alphas, "hooks": names, "direction": source,
            "eraser": None if eraser is None else {"method": eraser.method, "rank": eraser.rank, **eraser.info},
            "between": list(spec.between or ()), "random_init": adapter.random_init,
            "seconds": round(time.time() - started, 1),
            "stores": {"unmodified": str(base_path), **{c.label: str(c.store) for c in run.conditions}}}
    save_table(run.rows, meta, out)
    run.figures = write_figures(run.rows, out) if figures else []
    write_report(run.rows, meta, run.figures, out)
    return run


def resolve_erase(direction: Any, spec: InterveneSpec) -> tuple[Eraser, ProbeDirection | None, str]:
    """The eraser of ``--op erase`` (``toolkit.analysis.effects.resolve_eraser``), its probe and source text."""
    return resolve_eraser(direction, spec.erasure, spec.erasure_store)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._=-" else "_" for c in text)
