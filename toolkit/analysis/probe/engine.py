"""The probe sweep: nested episode-grouped cross-validation, pooled out-of-fold scores, controls and baselines.

Every episode sits in one of K outer folds and is scored once, by the probe trained on the other K−1
folds; that probe's λ (or l2, or epochs) is chosen by leave-one-fold-out inside those K−1 folds.
Ridge reads each layer twice: once to accumulate per-fold statistics for every cell (denoising step ×
rollout-step bucket) and every target column (real targets and their controls side by side), and once
to score each row with its own fold's probe.  Logistic and cosine-loss solvers hold one layer's rows in
memory instead (meant for the few sites whose final numbers you report); each solver fits only the
targets it supports, and a target it does not support is an error up front.

The "best" layer is chosen without looking at test rows: within each outer fold, the cell with the best
inner-CV score wins, and the selected probe's score is the pooled out-of-fold score of those per-fold
choices (``Results.best``).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace

import numpy as np

from toolkit.sdk.errors import ToolkitError
from toolkit.analysis.probe import metrics as M
from toolkit.analysis.probe.intervals import CORRECTIONS, Z, linear_var, proportion_interval, proportion_p, r2_p
from toolkit.analysis.probe.control import control_targets, input_type
from toolkit.analysis.probe.mdl import NO_CODE, online_code
from toolkit.analysis.probe.results import Results
from toolkit.analysis.probe.select import Resolved, Selection, plain, resolve
from toolkit.analysis.probe.solvers import LAMBDAS, CosineOptions, Fitted, NestedRidge, cosine_probe, logistic_probe, \
    predict_many
from toolkit.analysis.probe.splits import Folds, make_folds
from toolkit.analysis.probe.stats import LayerInputs, cell_shifts, iter_blocks, layer_statistics
from toolkit.analysis.probe.target import StoreLabels
from toolkit.sdk.targets import KINDS, Labels, TargetData
from toolkit.store.reader import open_store, Store

SOLVERS = ("ridge", "logistic", "cosine")
SUPPORTED = {"ridge": KINDS, "logistic": ("classification",), "cosine": ("embedding",)}
MIN_TEST_EPISODES = 10


@dataclass
class ProbeConfig:
    """How to fit and score; the defaults are the honest ones (nested episode CV, learnable control)."""

    solver: str = "ridge"
    splits: tuple[str, ...] = ("auto",)  # auto = episodes, plus held-out tasks for embedding targets
    n_folds: int = 5
    lambdas: tuple[float, ...] = LAMBDAS
    seed: int = 0
    save_weights: str = "best"  # best | all | none
    cosine: CosineOptions = field(default_factory=CosineOptions)
    target_options: dict = field(default_factory=dict)  # e.g. encoder, encoder_path
    baseline: str | None = None  # a store of the same samples from a random-weights model of the same architecture
    mdl: bool = True  # online code length for classification targets (ridge)
    success: bool = True  # per-episode probe confidence vs episode success, where both outcomes occur
    progress: bool = False
    device: str | None = None  # torch device for the ridge statistics and factorisations (None: numpy + CPU torch)
    scheduler: str | None = None  # Dask scheduler for the ridge statistics: threads | processes | sync | tcp://...
    n_controls: int = 5  # control draws averaged (ridge: extra columns of one regression; others: extra fits)
    correction: str = "holm"  # multiplicity correction of the run's "above chance" tests: holm | bh | none
    alpha: float = 0.05  # level of the corrected decisions (the ``significant`` column)


@dataclass
class Target:
    """One encoded target and its control draws in one split, as columns of the shared regression matrix."""

    spec: str
    data: TargetData
    control: TargetData  # draw 0
    cols: np.ndarray
    ccols: np.ndarray
    more: list = field(default_factory=list)  # draws 1.. as (TargetData, columns)

    def controls(self):
        """(name, data, columns) of every control draw: ``spec#control``, ``spec#control1``, ..."""
        return ((self.spec + "#control", self.control, self.ccols),
                *((f"{self.spec}#control{i}", d, c) for i, (d, c) in enumerate(self.more, 1)))

    def variants(self):
        return ((self.spec, self.data, self.cols), *self.controls())


@dataclass(frozen=True)
class Cell:
    """One probe's rows and features: a layer, a denoising step (position j) and a rollout-step bucket."""

    layer: int
    j: int
    bucket: int


class Outcomes:
    """Per-row out-of-fold outcomes of one cell for one target (or its control), indexed like the bucket rows."""

    KEYS = {"classification": ("pred", "conf"), "embedding": ("hit", "cos", "cos_c", "cos_base", "sse", "ss0"),
            "regression": ("sse", "ss0")}

    def __init__(self, kind: str, n: int):
        self.kind = kind
        self.a = {k: (np.full(n, -1, dtype=np.int64) if k == "pred" else np.zeros(n)) for k in self.KEYS[kind]}
        self.sums: np.ndarray | None = None  # embedding: summed predictions per candidate (similarity figure)

    def add(self, loc: np.ndarray, P: np.ndarray, data: TargetData, gpos: np.ndarray, train_mean, allowed) -> None:
        if self.kind == "classification":
            self.a["pred"][loc] = P.argmax(1)
            self.a["conf"][loc] = P[np.arange(len(P)), data.classes[gpos]]  # the score of the true class
        elif self.kind == "embedding":
            for k, v in M.embedding_rows(P, data.y[gpos], data.index[gpos], data.candidates, allowed,
                                         train_mean).items():
                self.a[k][loc] = v
            if self.sums is None:
                self.sums = np.zeros((len(data.candidates), P.shape[1]))
            np.add.at(self.sums, data.index[gpos], P)
        else:
            y = data.y[gpos]
            self.a["sse"][loc] = ((y - P) ** 2).sum(1)
            self.a["ss0"][loc] = ((y - train_mean) ** 2).sum(1)

    def pick(self, choice: np.ndarray, others: list["Outcomes"]) -> "Outcomes":
        """A new Outcomes whose row i comes from ``others[choice[i]]``."""
        out = Outcomes(self.kind, len(choice))
        for k in out.a:
            out.a[k] = np.stack([o.a[k] for o in others])[choice, np.arange(len(choice))]
        return out


@dataclass
class CellFit:
    """What one cell's probes produced: per target (and control) K outer fits, the final fit, outcomes."""

    cell: Cell
    fits: dict[str, list[Fitted]]
    final: dict[str, Fitted]
    outcomes: dict[str, Outcomes]
    mdl: dict[str, dict] = field(default_factory=dict)  # target -> online code length (classification, ridge)
    online: dict[str, tuple] = field(default_factory=dict)  # target -> (prefix probes, held-out scores)


@dataclass
class Sweep:
    """One split of one site selection: the rows, their folds and labels, and what every cell produced."""

    res: Resolved
    folds: Folds
    targets: list[Target]
    episode: np.ndarray
    task: np.ndarray
    success: np.ndarray
    cells: dict[Cell, CellFit] = field(default_factory=dict)

    def bucket_pos(self, b: int) -> np.ndarray:
        return np.flatnonzero(self.res.bucket == b)


def build_target(spec: str, labels: Labels, options: dict) -> TargetData:
    """Instantiate a registered target (``name`` or ``name:arg``) and encode the selected rows."""
    from toolkit.sdk.plugins import get_target

    name, _, arg = spec.partition(":")
    data = get_target(name)(arg or None, **options).encode(labels)
    if data.kind not in KINDS:
        raise ToolkitError(f"target {spec!r} returned unknown kind {data.kind!r}")
    return data


def _subset(d: TargetData, m: np.ndarray) -> TargetData:
    return replace(d, y=None if d.y is None else d.y[m], classes=None if d.classes is None else d.classes[m],
                   index=None if d.index is None else d.index[m], valid=None, info=dict(d.info))


def probe(store: Store | str, selection: Selection | None = None, targets: tuple[str, ...] | list[str] = ("task",),
          config: ProbeConfig | None = None) -> Results:
    """Fit and score probes for one site selection; returns a tidy Results table (see ``Results.table``)."""
    store = open_store(store) if not isinstance(store, Store) else store
    cfg = config or ProbeConfig()
    if cfg.solver not in SOLVERS:
        raise ToolkitError(f"unknown solver {cfg.solver!r}: use one of {', '.join(SOLVERS)}")
    _check_execution(cfg)
    _check_tests(cfg)
    selection = selection or Selection()
    res = resolve(store, selection)
    labels = StoreLabels(store, res.rows)
    encoded = [(spec, build_target(spec, labels, cfg.target_options)) for spec in targets]
    for spec, d in encoded:
        if d.kind not in SUPPORTED[cfg.solver]:
            ok = [s for s, kinds in SUPPORTED.items() if d.kind in kinds]
            raise ToolkitError(f"--solver {cfg.solver} cannot fit {spec!r} (a {d.kind} target): use --solver "
                               f"{' or '.join(ok)}")
    baseline = _baseline_store(store, cfg.baseline, selection, res) if cfg.baseline else None
    embedding = _embedding_source(store, res)
    out = Results(meta={"store": str(store.path), "model": store.attrs.get("model"),
                        "dataset": store.attrs.get("dataset"), "config": _config_dict(cfg), "targets": list(targets),
                        "selection": {k: v for k, v in vars(selection).items() if v is not None},
                        "baseline_store": cfg.baseline, "embedding_baseline": embedding is not None})
    groups: dict[bytes, list] = defaultdict(list)  # targets with the same labelled rows share one pass
    for spec, d in encoded:
        valid = np.ones(len(res.rows), dtype=bool) if d.valid is None else np.asarray(d.valid, dtype=bool)
        groups[np.packbits(valid).tobytes()].append((spec, d, valid))
    plans = []
    for members in groups.values():
        valid = members[0][2]
        if not valid.any():
            raise ToolkitError(f"target {members[0][0]!r} labels no row of the selection")
        sub = replace(res, rows=res.rows[valid], bucket=res.bucket[valid], extra=res.extra)
        sub_labels = StoreLabels(store, sub.rows)
        for kind in _split_kinds(cfg, members, sub_labels):
            usable = [(s, _subset(d, valid)) for s, d, _ in members if not (kind == "tasks" and
                                                                          d.kind == "classification")]
            if not usable:
                raise ToolkitError("holding out tasks needs an embedding or regression target (e.g. --target "
                                   "instruction): a classifier cannot name a task it never saw")
            plans.append((sub, sub_labels, usable, kind, valid))
    passes = 1 + (baseline is not None)
    n_steps = sum(len(p[0].layers) * passes + (embedding is not None) for p in plans)
    with _bar(cfg.progress, n_steps, res.site) as bar:
        for sub, sub_labels, usable, kind, valid in plans:
            sweep = _prepare(sub, sub_labels, usable, kind, cfg)
            _record_folds(sweep, sub_labels, [s for s, _ in usable], out)
            _run(store, sweep, cfg, bar)
            extra = {}
            if baseline is not None:
                b_store, b_res = baseline
                bsweep = replace(sweep, res=replace(b_res, rows=b_res.rows[valid], bucket=b_res.bucket[valid],
                                                    extra={}), cells={}, targets=_one_control(sweep.targets))
                _run(b_store, bsweep, replace(cfg, save_weights="none", mdl=False), bar)
                extra["random"] = bsweep
            if embedding is not None:
                esweep = replace(sweep, res=replace(embedding, rows=sub.rows, bucket=sub.bucket, extra={}), cells={},
                                 targets=_one_control(sweep.targets))
                _run(store, esweep, replace(cfg, save_weights="none", mdl=False), bar)
                extra["embedding"] = esweep
            _emit(sweep, extra, cfg, out)
    if not out.rows:
        raise ToolkitError("the selection is empty: no cell had rows in every training fold")
    out.correct()  # every cell's "above chance" test, corrected over the run (Results.extend redoes it)
    return out


def _check_tests(cfg: ProbeConfig) -> None:
    """The control draws, the multiplicity correction and its level."""
    if isinstance(cfg.n_controls, bool) or not isinstance(cfg.n_controls, (int, np.integer)) or cfg.n_controls < 1:
        raise ToolkitError(f"n_controls {cfg.n_controls!r}: give a whole number of control draws, at least 1")
    if cfg.correction not in CORRECTIONS:
        raise ToolkitError(f"unknown --correction {cfg.correction!r}: use one of {', '.join(CORRECTIONS)}")
    if not 0 < cfg.alpha < 1:
        raise ToolkitError(f"alpha {cfg.alpha!r}: the level of the corrected tests lies between 0 and 1")


def _check_execution(cfg: ProbeConfig) -> None:
    """--device and --scheduler: known values, a device that exists, and a solver they apply to."""
    if (cfg.device is not None or cfg.scheduler is not None) and cfg.solver != "ridge":
        raise ToolkitError(f"--device/--scheduler apply to the ridge solver's statistics; --solver {cfg.solver} "
                           "runs in this process (drop them, or use --solver ridge)")
    if cfg.scheduler is not None:
        from toolkit.analysis.parallel import check_scheduler

        check_scheduler(cfg.scheduler)
    if cfg.device is not None:
        import torch

        try:
            dev = torch.device(cfg.device)
        except RuntimeError:
            raise ToolkitError(f"unknown --device {cfg.device!r}: use cpu, cuda or cuda:N") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ToolkitError(f"--device {cfg.device}: torch sees no CUDA GPU here (use --device cpu, or omit it)")


def _bar(enabled: bool, total: int, site: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="layer", desc=f"probe {site}", dynamic_ncols=True, disable=not enabled)


def _split_kinds(cfg: ProbeConfig, members, labels: Labels) -> list[str]:
    kinds: list[str] = []
    for k in cfg.splits:
        if k == "auto":
            kinds.append("episodes")
            if any(d.kind == "embedding" for _, d, _ in members) and len(np.unique(labels["task"])) >= 6:
                kinds.append("tasks")
        else:
            kinds.append(k)
    return list(dict.fromkeys(kinds))


def _config_dict(cfg: ProbeConfig) -> dict:
    return {"solver": cfg.solver, "splits": list(cfg.splits), "n_folds": cfg.n_folds, "lambdas": list(cfg.lambdas),
            "seed": cfg.seed, "save_weights": cfg.save_weights, "cosine": vars(cfg.cosine), "mdl": cfg.mdl,
            "success": cfg.success, "target_options": dict(cfg.target_options), "baseline": cfg.baseline,
            "n_controls": cfg.n_controls, "correction": cfg.correction, "alpha": cfg.alpha}


def _baseline_store(store: Store, path: str, selection: Selection, res: Resolved) -> tuple[Store, Resolved]:
    """The random-weights store, checked to hold the same samples and selection as the probed one."""
    other = open_store(path)
    if not other.weights.random:
        raise ToolkitError(f"--baseline {path} was not made from random weights (its model attribute has no "
                           "random_init: true): make it with `toolkit extract --random-weights` on the same dataset")
    b_res = resolve(other, selection)
    same = (len(b_res.rows) == len(res.rows) and np.array_equal(b_res.rows, res.rows)
            and all(np.array_equal(plain(other.coord(f)[b_res.rows]).astype(str),
                                   plain(store.coord(f)[res.rows]).astype(str)) for f in ("episode_key", "step")))
    if not same:
        raise ToolkitError(f"--baseline {path} does not hold the same samples as {store.path} (episode keys and steps "
                           "differ): extract both with the same dataset options")
    if b_res.n_features != res.n_features:
        raise ToolkitError(f"--baseline {path} has {b_res.n_features} features per row, the probed store "
                           f"{res.n_features}: use a store of the same architecture and token selection")
    return other, b_res


def _embedding_source(store: Store, res: Resolved) -> Resolved | None:
    """The input embeddings (layer 0's input, stream resid_pre) of the same site and tokens, if stored."""
    if res.stream == "resid_pre" and res.layers == [0]:
        return None
    if "resid_pre" not in store.streams(res.site) or 0 not in store.layers(res.site):
        return None
    return replace(res, stream="resid_pre", layers=[0], layer_pos=[store.layers(res.site).index(0)], extra={})


def _prepare(res: Resolved, labels: Labels, encoded, kind: str, cfg: ProbeConfig) -> Sweep:
    episode = labels["episode"].astype(np.int64)
    task = labels["task"].astype(str)
    success = labels["success"].astype(np.int64) if "success" in labels.store.fields() else \
        np.full(len(episode), -1)
    folds = make_folds(kind, episode, task, cfg.n_folds, cfg.seed)
    if folds.n_folds < 3:
        raise ToolkitError(f"nested cross-validation needs at least 3 folds; the selection has "
                           f"{len(np.unique(task if kind == 'tasks' else episode))} "
                           f"{'tasks' if kind == 'tasks' else 'episodes'} (add episodes, or widen the selection)")
    types = input_type(task, labels["progress"])
    targets, start = [], 0
    for spec, d in encoded:
        choices = None
        if kind == "tasks" and d.kind == "embedding":
            choices = {int(t): np.unique(d.index[folds.fold == folds.fold[np.flatnonzero(types == t)[0]]])
                       for t in np.unique(types)}
        draws = control_targets(d, types, cfg.seed, cfg.n_controls, choices)
        w = d.columns().shape[1]
        cols = [np.arange(start + i * w, start + (i + 1) * w) for i in range(1 + len(draws))]
        targets.append(Target(spec, d, draws[0], cols[0], cols[1], list(zip(draws[1:], cols[2:]))))
        start += (1 + len(draws)) * w
    return Sweep(res, folds, targets, episode, task, success)


def _one_control(targets: list[Target]) -> list[Target]:
    """The targets with their first control draw only, columns renumbered: the baselines score the target
    alone, so the further draws would be columns (ridge) or fits (logistic, cosine) for nothing."""
    out, start = [], 0
    for t in targets:
        w = len(t.cols)
        out.append(replace(t, cols=np.arange(start, start + w), ccols=np.arange(start + w, start + 2 * w), more=[]))
        start += 2 * w
    return out


def _record_folds(sw: Sweep, labels: Labels, specs: list[str], out: Results) -> None:
    """The outer fold of every episode in this split (``folds.csv``): per target, episode key, fold and rows
    (under the ``steps`` split an episode's rows span several folds: one line per episode and fold)."""
    keys = labels["episode_key"].astype(str) if "episode_key" in labels.store.fields() else sw.episode.astype(str)
    pairs, first, rows = np.unique(np.stack([sw.episode, sw.folds.fold], 1), axis=0, return_index=True,
                                   return_counts=True)
    for spec in specs:
        out.folds += [{"site": sw.res.site, "split": sw.folds.kind, "target": spec, "episode": int(e),
                       "episode_key": keys[i], "task": sw.task[i], "fold": int(k), "n_folds": sw.folds.n_folds,
                       "rows": int(n), "seed": sw.folds.seed} for (e, k), i, n in zip(pairs, first, rows)]


def _run(store: Store, sw: Sweep, cfg: ProbeConfig, bar) -> None:
    """Fit and score every cell of every layer; fills ``sw.cells``."""
    res = sw.res
    Y = np.concatenate([d.columns() for t in sw.targets for _, d, _ in t.variants()], 1).astype(np.float32)
    nd = len(res.denoise_pos) if res.denoise_pos is not None else 1
    buckets = {b: sw.bucket_pos(b) for b in range(len(res.bucket_labels))}
    loc = np.empty(len(res.rows), dtype=np.int64)
    for b, p in buckets.items():
        loc[p] = np.arange(len(p))
    means: dict = {}
    for li, layer in enumerate(res.layers):
        if cfg.solver == "ridge":
            fitted = _fit_ridge(store, sw, li, layer, Y, nd, buckets, cfg)
            for pos, X in iter_blocks(store, res, li):
                _score_block(sw, fitted, pos, X, loc, means)
        else:
            fitted = _fit_in_memory(store, sw, li, layer, nd, buckets, loc, means, cfg)
        for cf in fitted.values():
            p = buckets[cf.cell.bucket]
            fold = sw.folds.fold[p]
            for spec, (_, held) in cf.online.items():
                d = next(t.data for t in sw.targets if t.spec == spec)
                cf.mdl[spec] = online_code(fold, d.classes[p], len(d.class_names), held, sw.episode[p],
                                           seed=cfg.seed)
            cf.online = {}
        sw.cells.update(fitted)
        bar.update(1)


def _fit_ridge(store, sw: Sweep, li, layer, Y, nd, buckets, cfg) -> dict[Cell, CellFit]:
    res, K = sw.res, sw.folds.n_folds
    inputs = LayerInputs(np.arange(len(res.rows)), Y, sw.folds.fold, res.bucket, K, nd,
                         cell_shifts(store, res, li, nd))
    if cfg.scheduler is None:
        acc = layer_statistics(store, res, li, inputs, cfg.device)
    else:
        from toolkit.analysis.probe.stats import probe_layer_statistics

        acc = probe_layer_statistics(store, res, li, inputs, cfg.scheduler, cfg.device)
    groups = {name: cols for t in sw.targets for name, _, cols in t.variants()}
    # Classification intercepts take the whole selection's class proportions (how many rows of each class, not
    # which): intercepts from the training folds alone put a label-blind probe below chance whenever a task has
    # fewer episodes than folds (a held-out fold lacks a task its training folds over-represent): measured by
    # benchmarks/bench_calibration.py, null accuracy 0.085 against 0.25 and coverage 88 % at 4 episodes per task,
    # against 0.245 and 96.7 % with these.  Chance is still the training folds' majority rate (_score).
    prior = np.concatenate([c for t in sw.targets for _, d, c in t.variants() if d.kind == "classification"]
                           + [np.zeros(0, np.int64)])
    online = {t.spec: t.cols for t in sw.targets if cfg.mdl and t.data.kind == "classification"}
    out = {}
    for (j, b), stats in sorted(acc.items()):
        n = sum(s.n for s in stats)
        if min(n - s.n for s in stats) < 2:
            continue
        if not all(np.isfinite(s.G).all() and np.isfinite(s.B).all() for s in stats):
            raise ToolkitError(f"layer {layer} holds non-finite activations (NaN or inf) among the rows this probe "
                               f"selects: no linear probe fits them; `toolkit stats STORE` counts them per layer")
        nr = NestedRidge(stats, groups, inputs.shifts[(j, b)], cfg.lambdas, prior, prefix=online, device=cfg.device)
        outer = nr.outers(final=cfg.save_weights != "none")
        cell = Cell(layer, j, b)
        cf = CellFit(cell, {name: [o[name] for o in outer] for name in groups},
                     nr.final() if cfg.save_weights != "none" else {}, {})
        for spec in online:
            cf.online[spec] = (nr.prefix_probes(spec), np.zeros((len(buckets[b]), len(online[spec])), np.float32))
        _init_outcomes(sw, cf, len(buckets[b]))
        out[cell] = cf
    return out


def _init_outcomes(sw: Sweep, cf: CellFit, n: int) -> None:
    for t in sw.targets:
        for name, d, _ in t.variants():
            cf.outcomes[name] = Outcomes(d.kind, n)


def _train_mean(sw: Sweep, means: dict, name: str, d: TargetData, b: int, k: int) -> np.ndarray | None:
    if d.kind == "classification":
        return None
    key = (name, b, k)
    if key not in means:
        p = sw.bucket_pos(b)
        means[key] = d.y[p[sw.folds.fold[p] != k]].mean(0)
    return means[key]


def _allowed(sw: Sweep, d: TargetData, k: int) -> np.ndarray | None:
    """Held-out tasks: retrieve among fold k's held-out instructions only (training ones would be free hits)."""
    if sw.folds.kind != "tasks" or d.kind != "embedding":
        return None
    allowed = np.zeros(len(d.candidates), dtype=bool)
    allowed[np.unique(d.index[sw.folds.fold == k])] = True
    return allowed


def _score_block(sw: Sweep, fitted: dict[Cell, CellFit], pos, X, loc, means) -> None:
    """Score one chunk's rows, each with the probe of its own outer fold (and the online-code probes)."""
    f, bk = sw.folds.fold[pos], sw.res.bucket[pos]
    for cell, cf in fitted.items():
        m = bk == cell.bucket
        if not m.any():
            continue
        x, gp, fm = X[m, cell.j], pos[m], f[m]
        variants = [(name, d) for t in sw.targets for name, d, _ in t.variants()]
        for k in np.unique(fm):
            mk = fm == k
            preds = predict_many([cf.fits[name][k].model for name, _ in variants], x[mk])
            for (name, d), P in zip(variants, preds):
                cf.outcomes[name].add(loc[gp[mk]], P, d, gp[mk], _train_mean(sw, means, name, d, cell.bucket, k),
                                      _allowed(sw, d, k))
        for probes, held in cf.online.values():
            for k in np.unique(fm):
                mk = fm == k
                if k >= 1 and probes[k] is not None:
                    held[loc[gp[mk]]] = probes[k].predict(x[mk])


def _read_layer(store, res, li) -> np.ndarray:
    out = None
    for pos, X in iter_blocks(store, res, li):
        if out is None:
            out = np.empty((len(res.rows), *X.shape[1:]), dtype=np.float32)
        out[pos] = X
    return out


def _fit_in_memory(store, sw: Sweep, li, layer, nd, buckets, loc, means, cfg) -> dict[Cell, CellFit]:
    """Logistic (classification) or cosine-loss (embedding) probes on one layer's rows held in memory.

    The control is fitted like its target; the logistic control reuses the target's l2 (half the fits).
    The saved (final) probe is refitted on every row: logistic at the median of the outer folds' l2.
    """
    cache = _read_layer(store, sw.res, li)
    K, out = sw.folds.n_folds, {}
    for b, p in buckets.items():
        fold = sw.folds.fold[p]
        if any((fold != k).sum() < 2 for k in range(K)):
            continue
        for j in range(nd):
            x = cache[p, j]
            cell = Cell(layer, j, b)
            cf = CellFit(cell, {}, {}, {})
            _init_outcomes(sw, cf, len(p))
            for t in sw.targets:
                for name, d, _ in t.variants():
                    fits = []
                    for k in range(K):
                        tr, te = fold != k, fold == k
                        fits.append(_fit_one(cfg, x[tr], d, p[tr], fold[tr], _control_l2(cf, t, name, k)))
                        cf.outcomes[name].add(loc[p[te]], fits[-1].model.predict(x[te]), d, p[te],
                                              _train_mean(sw, means, name, d, b, k), _allowed(sw, d, k))
                    cf.fits[name] = fits
                    if cfg.save_weights != "none":
                        l2 = None if fits[0].lam is None else float(np.median([f.lam for f in fits]))
                        cf.final[name] = _fit_one(cfg, x, d, p, fold, l2)
            out[cell] = cf
    return out


def _control_l2(cf: CellFit, t: Target, name: str, k: int) -> float | None:
    """The logistic control reuses its target's l2 in the same outer fold."""
    return cf.fits[t.spec][k].lam if name != t.spec and t.spec in cf.fits else None


def _fit_one(cfg, x, d: TargetData, gpos, groups, l2) -> Fitted:
    if cfg.solver == "logistic":
        return logistic_probe(x, d.classes[gpos], groups, len(d.class_names), seed=cfg.seed, l2=l2)
    return cosine_probe(x, d.y[gpos], groups, cfg.cosine, seed=cfg.seed)


# ----------------------------------------------------------------------------- rows


def _score(sw: Sweep, o: Outcomes, d: TargetData, p: np.ndarray) -> dict:
    """Headline metric, interval and the kind's other scores of pooled out-of-fold outcomes on rows ``p``.

    Chance of a classifier is the majority rate of the training folds (``metrics.train_majority``; 1/C is
    ``balanced_chance``); of retrieval among every instruction, 1/candidates or that rate if higher."""
    ep, fold = sw.episode[p], sw.folds.fold[p]
    if d.kind == "classification":
        out = M.classification_summary(o.a["pred"], d.classes[p], ep, fold, len(d.class_names))
        out["chance"] = M.train_majority(d.classes[p], fold)
        return out
    if d.kind == "embedding":
        if sw.folds.kind == "tasks":
            n_allowed = {k: len(np.unique(d.index[sw.folds.fold == k])) for k in np.unique(fold)}
            chance = float(np.mean([1 / n_allowed[k] for k in fold]))
        else:
            chance = max(1.0 / len(d.candidates), M.train_majority(d.index[p], fold))
        majority = sum(np.bincount(d.index[p][fold == k]).max() for k in np.unique(fold)) / len(p)
        return M.embedding_summary(o.a, ep, fold, chance, float(majority))
    return M.regression_summary(o.a["sse"], o.a["ss0"], ep, fold)


def _hits(o: Outcomes, d: TargetData, p: np.ndarray) -> np.ndarray | None:
    if d.kind == "classification":
        return (o.a["pred"] == d.classes[p]).astype(np.float64)
    return o.a["hit"] if d.kind == "embedding" else None


def _floor(row: dict) -> float:
    """What a label-blind probe reaches on the headline metric: chance, or the majority rate if higher."""
    majority = row.get("majority")
    return max(row["chance"], majority) if majority is not None and np.isfinite(majority) else row["chance"]


def _warnings(sw: Sweep, t: Target, p: np.ndarray, fits: list[Fitted], cfg) -> list[str]:
    out = []
    n_ep = len(np.unique(sw.episode[p]))
    if n_ep < MIN_TEST_EPISODES:
        out.append(f"only {n_ep} test episodes (< {MIN_TEST_EPISODES})")
    if t.data.kind == "classification":
        classes = t.data.classes[p]
        eps_per_class = {c: len(np.unique(sw.episode[p][classes == c])) for c in np.unique(classes)}
        thin = [t.data.class_names[c] for c, n in eps_per_class.items() if n < 2]
        if thin:
            out.append(f"fewer than 2 episodes in class {', '.join(thin[:3])}{' ...' if len(thin) > 3 else ''}")
    if cfg.solver == "ridge":
        edge = sum(f.lam in (cfg.lambdas[0], cfg.lambdas[-1]) for f in fits)
        if edge and len(cfg.lambdas) > 1:
            out.append(f"λ at the grid edge in {edge} of {len(fits)} folds")
    return out


def _emit(sw: Sweep, baselines: dict[str, Sweep], cfg: ProbeConfig, out) -> None:
    """Turn every cell's outcomes into result rows; then the per-fold selected ("best") probe per family."""
    for cell, cf in sorted(sw.cells.items(), key=lambda kv: (kv[0].bucket, kv[0].j, kv[0].layer)):
        p = sw.bucket_pos(cell.bucket)
        for t in sw.targets:
            fits = cf.fits[t.spec]
            row = _cell_row(sw, cell, t, fits, cfg)
            row.update(_score(sw, cf.outcomes[t.spec], t.data, p))
            floor = _floor(row)
            row.update(_controls(sw, cf, t, p, row["metric"], floor))
            row["p_value"] = _p_above(sw, cf.outcomes[t.spec], t.data, p, floor)
            for name, bsw in (("random", baselines.get("random")), ("embedding", baselines.get("embedding"))):
                b = _baseline_score(bsw, cell, t, p, name == "embedding")
                row.update({f"baseline_{name}": b[0], f"baseline_{name}_ci_low": b[1],
                            f"baseline_{name}_ci_high": b[2],
                            f"selectivity_{name}": row["metric"] - max(b[0], floor) if np.isfinite(b[0])
                            else float("nan")})
            row.update(cf.mdl.get(t.spec, NO_CODE))
            hits = _hits(cf.outcomes[t.spec], t.data, p)
            for label, v in (("success", 1), ("failure", 0)):
                m = sw.success[p] == v
                row[f"metric_{label}"] = float(hits[m].mean()) if hits is not None and m.any() else float("nan")
            warnings = _warnings(sw, t, p, fits, cfg)
            row["warnings"] = "; ".join(warnings)
            row["has_warnings"] = bool(warnings)  # not a test: the p-value columns say what is above chance
            row["id"] = len(out.rows)
            final = cf.final.get(t.spec)
            out.add(row, _details(cf, t, p), _per_task(hits, sw.task[p]), final)
            if cfg.success:
                _success_row(sw, cf.outcomes[t.spec], p, row, cfg, out)
    _emit_selected(sw, cfg, out)


def _terms(o: Outcomes, d: TargetData, p: np.ndarray, c: float) -> list:
    """c × the headline metric of ``o`` as ``linear_var`` terms: hits / rows, or R² = 1 − Σsse/Σss0 (the
    constant 1 carries no variance)."""
    h = _hits(o, d, p)
    return [(c, h, np.ones(len(h)))] if h is not None else [(-c, o.a["sse"], o.a["ss0"])]


def _controls(sw: Sweep, cf: CellFit, t: Target, p: np.ndarray, metric: float, floor: float) -> dict:
    """The control draws against their own chance line, and selectivity with its interval.

    ``control`` is the mean score of the R draws, ``control_chance`` the mean of the draws' own floors
    (chance or majority rate, which match the target's: the draws keep its label frequencies), and
    ``control_draws`` the draws one by one.  ``selectivity`` = metric − max(control, floor) (Hewitt & Liang's
    real − control, a control below the label-blind floor credited at the floor).  Intervals: the delta
    method on the rows (the target minus the mean of the draws; cluster-robust over episodes plus the
    fold-to-fold variance, ``intervals.linear_var``; Agresti–Coull on the pooled draws for the control's own
    proportion) plus the spread between the draws, var(draws)/R."""
    ep, fold = sw.episode[p], sw.folds.fold[p]
    draws = [(_control_score(sw, cf.outcomes[name], d, p), cf.outcomes[name], d) for name, d, _ in t.controls()]
    R = len(draws)
    vals = np.array([s["metric"] for s, _, _ in draws], dtype=np.float64)
    control = float(vals.mean())
    between = float(vals.var(ddof=1)) / R if R > 1 and np.isfinite(vals).all() else 0.0
    cterms = [term for _, o, d in draws for term in _terms(o, d, p, 1.0 / R)]
    if t.data.kind == "regression":
        half = Z * np.sqrt(linear_var(ep, fold, cterms) + between)
        lo, hi = control - half, min(1.0, control + half)
    else:
        hits = np.concatenate([_hits(o, d, p) for _, o, d in draws])
        lo, hi = proportion_interval(np.tile(ep, R), hits, np.tile(fold, R), extra_var=between)
    above = control >= floor
    sterms = _terms(cf.outcomes[t.spec], t.data, p, 1.0) + ([(-c, n, d) for c, n, d in cterms] if above else [])
    half = Z * np.sqrt(linear_var(ep, fold, sterms) + (between if above else 0.0))
    sel = metric - max(control, floor)
    return {"control": control, "control_ci_low": float(lo), "control_ci_high": float(hi),
            "control_chance": float(np.mean([_floor(s) for s, _, _ in draws])), "n_controls": R,
            "control_draws": ",".join(f"{v:.4f}" for v in vals),
            "selectivity": sel, "selectivity_ci_low": float(sel - half), "selectivity_ci_high": float(sel + half)}


def _control_score(sw: Sweep, o: Outcomes, d: TargetData, p: np.ndarray) -> dict:
    """A control draw's metric, chance and majority rate (a classifier's without the scikit-learn extras of
    ``_score``: R draws per cell)."""
    if d.kind != "classification":
        return _score(sw, o, d, p)
    y = d.classes[p]
    return {"metric": float(np.mean(o.a["pred"] == y)), "chance": M.train_majority(y, sw.folds.fold[p]),
            "majority": float(np.bincount(y).max() / len(y))}


def _p_above(sw: Sweep, o: Outcomes, d: TargetData, p: np.ndarray, floor: float) -> float:
    """One-sided p of "the metric is above the label-blind floor" (chance, or the majority rate if higher;
    R² above 0): the score tests of ``intervals`` (episode-clustered; see ``proportion_p`` for why the
    fold-to-fold variance of the intervals is not part of a test whose null decodes nothing)."""
    ep = sw.episode[p]
    h = _hits(o, d, p)
    return proportion_p(ep, h, floor) if h is not None else r2_p(ep, o.a["sse"], o.a["ss0"])


def _success_row(sw: Sweep, o: Outcomes, p: np.ndarray, row: dict, cfg, out) -> None:
    """Per-episode confidence in the truth vs episode success for one cell, where both outcomes occur;
    compared within task (success.py)."""
    from toolkit.analysis.probe.success import episode_confidence, episode_task, success_correlation

    conf = o.a["conf"] if "conf" in o.a else o.a["cos"] if "cos" in o.a else -o.a["sse"]
    c, s = episode_confidence(sw.episode[p], conf, sw.success[p])
    tasks = episode_task(sw.episode[p], sw.task[p], sw.success[p])
    if min(int(s.sum()), int(len(s) - s.sum())) < 2:
        return
    keys = ("id", "site", "expert", "stream", "layer", "denoise", "t", "step", "target", "kind", "solver", "split")
    out.success.append({**{k: row[k] for k in keys}, "confidence": {"classification": "true-class score",
                                                                     "embedding": "cosine to the true embedding",
                                                                     "regression": "minus squared error"}[o.kind],
                        **success_correlation(c, s, tasks, seed=cfg.seed)})


def _cell_row(sw: Sweep, cell: Cell, t: Target, fits: list[Fitted], cfg) -> dict:
    res, p = sw.res, sw.bucket_pos(cell.bucket)
    lams = [f.lam for f in fits]
    train_eps = [len(np.unique(sw.episode[p][sw.folds.fold[p] != k])) for k in range(sw.folds.n_folds)]
    row = {"site": res.site, "expert": res.expert, "stream": res.stream, "layer": cell.layer,
           "denoise": None if res.denoise_pos is None else int(res.denoise_pos[cell.j]), "t": res.t_values[cell.j],
           "step": res.bucket_labels[cell.bucket], "tokens": res.tokens_label, "pool": res.pool, "target": t.spec,
           "kind": t.data.kind, "solver": cfg.solver, "split": sw.folds.kind, "n_folds": sw.folds.n_folds,
           "lambda": None if lams[0] is None else float(np.median(lams)),
           "lambda_folds": None if lams[0] is None else ",".join(f"{v:g}" for v in lams),
           "epochs": None if fits[0].epochs is None else int(np.median([f.epochs for f in fits])),
           "selection_score": float(np.mean([f.inner_score for f in fits])),
           "n_train_episodes": int(min(train_eps)), "n_test_episodes": int(len(np.unique(sw.episode[p]))),
           "n_test": int(len(p)), "n_features": res.n_features, "seed": cfg.seed}
    if t.data.kind == "classification":
        classes = t.data.classes[p]
        row["min_episodes_per_class"] = int(min(len(np.unique(sw.episode[p][classes == c])) for c in np.unique(classes)))
        row["n_classes"] = int(len(np.unique(classes)))
        row["min_steps_per_class"] = int(np.bincount(classes)[np.unique(classes)].min())
    return row


def _baseline_score(bsw: Sweep | None, cell: Cell, t: Target, p: np.ndarray, any_layer: bool):
    if bsw is None:
        return float("nan"), float("nan"), float("nan")
    key = next((c for c in bsw.cells if c.j == cell.j and c.bucket == cell.bucket
                and (any_layer or c.layer == cell.layer)), None)
    if key is None:
        return float("nan"), float("nan"), float("nan")
    s = _score(bsw, bsw.cells[key].outcomes[t.spec], t.data, p)
    return s["metric"], s["ci_low"], s["ci_high"]


def _details(cf: CellFit, t: Target, p: np.ndarray) -> dict:
    d, o = t.data, cf.outcomes[t.spec]
    if d.kind == "classification":
        return {"confusion": M.confusion(o.a["pred"], d.classes[p], len(d.class_names)).tolist(),
                "labels": d.class_names}
    if d.kind == "embedding" and o.sums is not None:
        present = np.unique(d.index[p])
        mean_pred = o.sums[present] / np.bincount(d.index[p])[present][:, None]
        return {"similarity": (M._unit(mean_pred) @ M._unit(d.candidates).T).tolist(),
                "similarity_rows": [d.candidate_names[i] for i in present], "labels": d.candidate_names}
    return {}


def _per_task(hits, task) -> list[dict]:
    if hits is None:
        return []
    return [{"task": str(name), "n": int((task == name).sum()), "metric": float(hits[task == name].mean())}
            for name in np.unique(task)]


def _emit_selected(sw: Sweep, cfg, out) -> None:
    """Per (target, rollout-step bucket): in each outer fold pick the cell (layer × denoising step) with the
    best inner-CV score, and score the pooled out-of-fold predictions of those picks (no winner's curse)."""
    K = sw.folds.n_folds
    for b in range(len(sw.res.bucket_labels)):
        family = [c for c in sw.cells if c.bucket == b]
        if len(family) < 1:
            continue
        p = sw.bucket_pos(b)
        fold = sw.folds.fold[p]
        for t in sw.targets:
            scores = np.array([[sw.cells[c].fits[t.spec][k].inner_score for k in range(K)] for c in family])
            scores = np.where(np.isfinite(scores), scores, -np.inf)
            pick = scores.argmax(0)  # per outer fold
            chosen = [family[i] for i in pick]
            o = sw.cells[family[0]].outcomes[t.spec].pick(pick[fold], [sw.cells[c].outcomes[t.spec] for c in family])
            row = {"site": sw.res.site, "expert": sw.res.expert, "stream": sw.res.stream, "target": t.spec,
                   "kind": t.data.kind, "solver": cfg.solver, "split": sw.folds.kind,
                   "step": sw.res.bucket_labels[b], "family_size": len(family),
                   "layer": Counter(c.layer for c in chosen).most_common(1)[0][0],
                   "t": sw.res.t_values[Counter(c.j for c in chosen).most_common(1)[0][0]],
                   "layers_per_fold": ",".join(str(c.layer) for c in chosen),
                   "t_per_fold": ",".join("" if sw.res.t_values[c.j] is None else f"{sw.res.t_values[c.j]:g}"
                                          for c in chosen),
                   "selected_by": "inner-CV " + ("squared error (R²)" if cfg.solver == "ridge" else
                                                 "accuracy" if cfg.solver == "logistic" else "cosine"),
                   "n_test_episodes": int(len(np.unique(sw.episode[p])))}
            row.update(_score(sw, o, t.data, p))
            out.best.append(row)
