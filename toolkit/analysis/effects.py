"""What an intervention changed: paired stores (intervened vs unmodified, matched by episode and step) turned
into the tidy effects table, its figures and its report (``toolkit.run.intervene`` makes the stores).

Per condition the tidy table (``effects.csv``) holds, with the episode as the unit:

* ``action_l2`` (mean over the chunk of the per-step L2 distance between paired actions), ``action_cosine``
  (cosine between paired action chunks), ``action_shift`` per action dimension (intervened − unmodified)
  and ``action_shift_norm`` (norm of the mean shift vector): episode-bootstrap intervals (studentized); the
  shift rows carry a paired bootstrap-t test (H0: the intervention moves actions in no consistent direction;
  the unmodified run is exactly reproducible, so l2 > 0 alone would prove nothing about direction);
* closed loop: ``success_rate`` (cluster-robust Agresti–Coull interval, exact McNemar test on the paired
  episodes) and ``episode_length`` (bootstrap-t interval and test on the paired differences);
* with a probe's direction: ``probe_accuracy`` of the same probe on the intervened vs unmodified
  activations (with its chance level) and ``probe_score_shift`` (mean change of the probe's score for the
  steered class, next to the predicted alpha·|w|²);
* after a removal (``ablate``, ``erase``) with a classification probe, the amnesic check (Elazar et al. 2021):
  ``probe_accuracy_retrained``, a probe *retrained* on the intervened activations with the original probe's
  solver, fold count, seed and λ grid, on the same episode folds as one retrained on the unmodified run (its
  ``baseline``), with chance and a plain verdict in ``note``: the same probe at chance shows only that its own
  direction is gone; the retrained one says whether the information is.

Figures (``dose_response.png``, ``success_vs_alpha.png``, ``probe_check.png``) and ``report.md`` go beside it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as sps

from toolkit.analysis.directions import (
    TOLERANCE,
    Eraser,
    ablation_eraser,
    ProbeDirection,
    Refit,
    decodability,
    fit_eraser,
    load_eraser,
    load_vector,
    probe_activations,
    probe_direction,
    probe_labels,
    retrain,
    text_values,
)
from toolkit.analysis.probe.intervals import proportion_interval
from toolkit.analysis.probe.solvers import LAMBDAS
from toolkit.analysis.probe.target import StoreLabels
from toolkit.sdk.errors import ToolkitError
from toolkit.store.reader import Store

N_BOOT = 2000


LEVEL = 0.95


@dataclass(frozen=True)
class BootstrapT:
    """The studentized episode bootstrap of per-episode values (rows: episodes; columns: metrics)."""

    mean: np.ndarray  # (k,)
    low: np.ndarray  # (k,) symmetric bootstrap-t interval of each column's mean
    high: np.ndarray
    p: np.ndarray  # (k,) two-sided p of "column mean = 0": the interval excludes 0 exactly when p <= 1 - level
    p_joint: float  # "every column mean = 0": max |t| over the columns (a max-t test, family-wise across columns)


def bootstrap_t(values: np.ndarray, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> BootstrapT:
    """Symmetric studentized (bootstrap-t) interval and test of the mean of per-episode values.

    Episodes are resampled whole; each resample's ``t* = (mean* - mean) / se*`` gives the null distribution of
    ``|t|``, so the interval is ``mean ± q·se`` with ``q`` the ``level`` quantile of ``|t*|``, and the p-value of
    mean 0 is the share of ``|t*|`` at least the observed ``|t|`` (counting the observed one: never 0).  Unlike a
    percentile interval or a sign-flip test, which assume the per-episode values symmetric, this is second-order
    accurate on skewed values (Hall 1988): ``benchmarks/calibration_effects.py`` measures 7.1 % false positives at
    α = 0.05 on skewed shifts at 8 episodes, 6.1 % at 20 (sign flips: 9.1 %, 8.7 %) and 93.6-94.1 % coverage of a
    skewed metric at 10-30 episodes (percentile: 86.4-91.5 %).  A resample whose values are all equal (se* = 0) counts as extreme
    (conservative).  Fewer than 2 episodes: NaN."""
    v = np.asarray(values, dtype=np.float64)
    v = v.reshape(len(v), -1)
    n, k = v.shape
    if n < 2:
        nan = np.full(k, np.nan)
        return BootstrapT(v.mean(0) if n else nan, nan, nan, nan, float("nan"))
    mean = v.mean(0)
    se = v.std(0, ddof=1) / math.sqrt(n)
    rows = np.random.default_rng(seed).integers(0, n, (n_boot, n))
    t_star = np.empty((n_boot, k))
    for start in range(0, n_boot, 256):  # bounded memory: 256 resamples of (n, k) at a time
        r = v[rows[start:start + 256]]
        with np.errstate(divide="ignore", invalid="ignore"):
            t_star[start:start + 256] = np.abs((r.mean(1) - mean) / (r.std(1, ddof=1) / math.sqrt(n)))
    t_star[~np.isfinite(t_star)] = np.inf
    with np.errstate(divide="ignore", invalid="ignore"):
        t_obs = np.where(se > 0, np.abs(mean) / se, np.where(mean == 0, 0.0, np.inf))
    # q: the rank-th largest |t*| with rank = floor((1 - level)(n_boot + 1)), so that the interval excludes 0 exactly
    # when p <= 1 - level (p counts the observed |t| among n_boot + 1)
    rank = math.floor((1 - level) * (n_boot + 1) + 1e-9)
    q = -np.partition(-t_star, rank - 1, axis=0)[rank - 1] if rank >= 1 else np.full(k, np.inf)
    p = (1 + (t_star >= t_obs).sum(0)) / (n_boot + 1)
    p_joint = (1 + (t_star.max(1) >= t_obs.max()).sum()) / (n_boot + 1)
    half = np.where(np.isfinite(q), q * se, np.inf)
    # every episode alike (se = 0): no spread to resample; the mean is exact, and a non-zero one is no accident
    flat = se == 0
    half[flat] = 0.0
    p[flat] = np.where(mean[flat] == 0, 1.0, 1 / (n_boot + 1))
    if (flat & (mean != 0)).any():
        p_joint = 1 / (n_boot + 1)
    return BootstrapT(mean, mean - half, mean + half, p, float(p_joint))


def bootstrap_mean(values: np.ndarray, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The bootstrap-t interval (``bootstrap_t``) of the mean of per-episode values (rows: episodes; columns:
    several metrics at once).  One episode gives no interval (NaN, NaN)."""
    b = bootstrap_t(values, n_boot, seed, level)
    return b.low, b.high


def bootstrap_norm(values: np.ndarray, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL
                   ) -> tuple[float, float]:
    """Percentile interval of the norm of the mean vector of per-episode rows (``scipy.stats.bootstrap``, resampling
    whole episodes: the statistic reads the rows a resample of episode indices picks).  A norm is biased upwards
    near 0, so this interval describes the size of the shift; the test of "no shift" is the max-t test
    (``bootstrap_t(...).p_joint``)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return float("nan"), float("nan")
    ci = sps.bootstrap((np.arange(len(v)),), lambda rows, axis: np.linalg.norm(v[rows].mean(axis=-2), axis=-1),
                       n_resamples=n_boot, confidence_level=level, method="percentile", vectorized=True,
                       rng=np.random.default_rng(seed)).confidence_interval
    return float(ci.low), float(ci.high)


def shift_test(diffs: np.ndarray, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray | float:
    """Paired test of "no consistent shift": the bootstrap-t test of mean 0 (``bootstrap_t``) on per-episode
    differences.  ``diffs`` (episodes,): one p; (episodes, k): (joint max-t p, per-column p)."""
    d = np.asarray(diffs, dtype=np.float64)
    b = bootstrap_t(d, n_boot, seed)
    return float(b.p[0]) if d.ndim == 1 else (b.p_joint, b.p)


def mcnemar_exact(intervened: np.ndarray, unmodified: np.ndarray) -> float:
    """Exact two-sided McNemar test on paired binary outcomes (episodes): ``scipy.stats.binomtest`` on the
    discordant pairs."""
    a, b = np.asarray(intervened, bool), np.asarray(unmodified, bool)
    gained, lost = int((a & ~b).sum()), int((~a & b).sum())
    if gained + lost == 0:
        return 1.0
    return float(sps.binomtest(gained, gained + lost, 0.5).pvalue)


@dataclass
class Paired:
    """Samples of an intervened store matched to the unmodified store's by (episode key, step)."""

    episode: np.ndarray  # per pair: episode ordinal (0..E-1)
    keys: list[str]  # episode keys, by ordinal
    a: np.ndarray  # intervened actions (pairs, horizon, dim)
    b: np.ndarray  # unmodified actions
    rows_a: np.ndarray  # sample indices in the intervened store
    rows_b: np.ndarray


def pair_samples(intervened: Store, unmodified: Store) -> Paired:
    ka = [f"{k}\x00{s}" for k, s in zip(intervened.coord("episode_key"), intervened.coord("step"))]
    kb = {f"{k}\x00{s}": i for i, (k, s) in enumerate(zip(unmodified.coord("episode_key"), unmodified.coord("step")))}
    rows_a = np.array([i for i, k in enumerate(ka) if k in kb], dtype=np.int64)
    rows_b = np.array([kb[ka[i]] for i in rows_a], dtype=np.int64)
    if not len(rows_a):
        raise ToolkitError(f"{intervened.path} and {unmodified.path} share no (episode, step): they are not a pair")
    ep_keys = text_values(intervened.coord("episode_key"))[rows_a]
    keys = list(dict.fromkeys(ep_keys.tolist()))
    ordinal = {k: i for i, k in enumerate(keys)}
    act_a, act_b = intervened.coord("policy_action"), unmodified.coord("policy_action")
    return Paired(np.array([ordinal[k] for k in ep_keys]), keys, act_a[rows_a].astype(np.float64),
                  act_b[rows_b].astype(np.float64), rows_a, rows_b)


def _per_episode(episode: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Mean of per-pair values within each episode: (episodes, ...)."""
    n = int(episode.max()) + 1
    flat = values.reshape(len(values), -1)
    sums = np.zeros((n, flat.shape[1]))
    np.add.at(sums, episode, flat)
    return (sums / np.bincount(episode, minlength=n)[:, None]).reshape(n, *values.shape[1:])


def _episode_outcomes(store: Store) -> dict[str, tuple[int, float]]:
    """episode key -> (success, length in environment steps, or stored steps when the data has no length)."""
    keys = text_values(store.coord("episode_key"))
    success = store.coord("success")
    steps = store.coord("step")
    total = store.coord("total_steps") if "total_steps" in store.fields() else None
    out = {}
    for k in dict.fromkeys(keys.tolist()):
        m = keys == k
        length = float(total[m][0]) if total is not None else float(steps[m].max() + 1)
        out[k] = (int(success[m][0]), length)
    return out


@dataclass
class Condition:
    """One intervened run: which hook, which op, which strength, the direction it used (if any), and its store."""

    hook: str
    op: str
    alpha: float
    vector: np.ndarray | None = None
    store: Path | None = None

    @property
    def label(self) -> str:
        return f"{self.hook} {self.op} alpha={self.alpha:g}"


def action_effects(cond: Condition, intervened: Store, unmodified: Store, closed_loop: bool, seed: int = 0,
                   n_boot: int = N_BOOT) -> list[dict]:
    """The tidy rows of one condition: action shift, and in closed loop success and episode length."""
    p = pair_samples(intervened, unmodified)
    base = {"condition": cond.label, "hook": cond.hook, "op": cond.op, "alpha": cond.alpha}
    delta = p.a - p.b  # (pairs, horizon, dim)
    l2 = np.linalg.norm(delta, axis=-1).mean(-1)
    fa, fb = p.a.reshape(len(p.a), -1), p.b.reshape(len(p.b), -1)
    cos = (fa * fb).sum(1) / np.maximum(np.linalg.norm(fa, axis=1) * np.linalg.norm(fb, axis=1), 1e-12)
    shift = delta.mean(1)  # (pairs, dim)
    per_ep = _per_episode(p.episode, np.column_stack([l2, cos, shift]))
    boot = bootstrap_t(per_ep, n_boot, seed)
    lo, hi, mean = boot.low, boot.high, boot.mean
    n_ep, n_pairs = len(per_ep), len(l2)
    joint_p, dim_p = shift_test(per_ep[:, 2:], n_boot, seed)
    shift_ep = per_ep[:, 2:]
    norm_lo, norm_hi = bootstrap_norm(shift_ep, n_boot, seed + 1)
    common = {"n_episodes": n_ep, "n_pairs": n_pairs}
    rows = [
        {**base, "metric": "action_l2", "dim": None, "value": mean[0], "baseline": 0.0, "ci_low": lo[0],
         "ci_high": hi[0], "p_value": None, **common},
        {**base, "metric": "action_cosine", "dim": None, "value": mean[1], "baseline": 1.0, "ci_low": lo[1],
         "ci_high": hi[1], "p_value": None, **common},
        {**base, "metric": "action_shift_norm", "dim": None, "value": float(np.linalg.norm(shift_ep.mean(0))),
         "baseline": 0.0, "ci_low": norm_lo, "ci_high": norm_hi, "p_value": joint_p, **common},
    ]
    for d in range(shift_ep.shape[1]):
        rows.append({**base, "metric": "action_shift", "dim": d, "value": mean[2 + d], "baseline": 0.0,
                     "ci_low": lo[2 + d], "ci_high": hi[2 + d], "p_value": float(dim_p[d]), **common})
    if closed_loop:
        rows += _outcome_rows(base, p.keys, intervened, unmodified, seed, n_boot)
    return rows


def _outcome_rows(base: dict, keys: list[str], intervened: Store, unmodified: Store, seed: int,
                  n_boot: int) -> list[dict]:
    oa, ob = _episode_outcomes(intervened), _episode_outcomes(unmodified)
    keys = [k for k in ob if k in oa]  # every episode both runs finished (not only those with paired samples)
    sa = np.array([oa[k][0] for k in keys])
    sb = np.array([ob[k][0] for k in keys])
    if (sa < 0).any() or (sb < 0).any():
        return []  # the dataset records no success
    la = np.array([oa[k][1] for k in keys])
    lb = np.array([ob[k][1] for k in keys])
    ep = np.arange(len(keys))
    s_lo, s_hi = proportion_interval(ep, sa.astype(np.float64))
    l_lo, l_hi = bootstrap_mean(la[:, None], n_boot, seed)
    common = {"n_episodes": len(keys), "n_pairs": len(keys)}
    return [
        {**base, "metric": "success_rate", "dim": None, "value": float(sa.mean()), "baseline": float(sb.mean()),
         "ci_low": s_lo, "ci_high": s_hi, "p_value": mcnemar_exact(sa, sb), **common},
        {**base, "metric": "episode_length", "dim": None, "value": float(la.mean()), "baseline": float(lb.mean()),
         "ci_low": float(l_lo[0]), "ci_high": float(l_hi[0]), "p_value": shift_test(la - lb, n_boot, seed),
         **common},
    ]


def probe_scores(store: Store, probe: ProbeDirection) -> tuple[np.ndarray, np.ndarray]:
    """The probe's scores (x − shift) @ W + b on a store, read with the probe's own selection, and the sample
    rows they belong to.  Needs the probe's site, stream and layer in the store."""
    rows, x = probe_activations(store, probe)
    return rows, (x - probe.shift) @ probe.W + probe.b


def probe_check(cond: Condition, probe: ProbeDirection, intervened: Store, unmodified: Store,
                steered_class: int | None) -> list[dict]:
    """Probe accuracy on intervened vs unmodified activations (with chance), and the score shift vs alpha·|w|²."""
    rows_a, sa = probe_scores(intervened, probe)
    rows_b, sb = probe_scores(unmodified, probe)
    p = pair_samples(intervened, unmodified)
    keep, ia, ib = _matched(p, rows_a, rows_b)
    if not len(keep):
        return []
    sa, sb = sa[ia], sb[ib]
    ep = p.episode[keep]
    base = {"condition": cond.label, "hook": cond.hook, "op": cond.op, "alpha": cond.alpha,
            "n_episodes": int(len(np.unique(ep))), "n_pairs": len(keep)}
    out = []
    labels = probe_labels(unmodified, probe, p.rows_b[keep])
    if labels is not None:
        hit_a = (sa.argmax(1) == labels).astype(np.float64)
        hit_b = (sb.argmax(1) == labels).astype(np.float64)
        lo, hi = proportion_interval(ep, hit_a)
        counts = np.bincount(labels[labels >= 0], minlength=len(probe.classes))
        out.append({**base, "metric": "probe_accuracy", "dim": None, "value": float(hit_a.mean()),
                    "baseline": float(hit_b.mean()), "ci_low": lo, "ci_high": hi, "p_value": None,
                    "chance": float(counts.max() / max(counts.sum(), 1))})
    c = steered_class if steered_class is not None else (0 if probe.W.shape[1] == 1 else None)
    if c is not None:
        shift = sa[:, c] - sb[:, c]
        lo, hi = bootstrap_mean(_per_episode(ep, shift)[:, None])
        w = probe.W[:, c]
        predicted = cond.alpha * float(w @ w) if cond.op == "add" and _steers_with(cond, w) else None
        out.append({**base, "metric": "probe_score_shift", "dim": c, "value": float(shift.mean()), "baseline": 0.0,
                    "ci_low": float(lo[0]), "ci_high": float(hi[0]), "p_value": None, "predicted": predicted})
    return out


def _steers_with(cond: Condition, w: np.ndarray) -> bool:
    v = cond.vector
    return v is not None and v.shape == w.shape and np.allclose(v, w)


def _matched(p: Paired, rows_a: np.ndarray, rows_b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pairs whose two samples both lie in a probe's selection (``rows_a`` of the intervened store, ``rows_b`` of
    the unmodified one): their indices into ``p``, and each one's position in ``rows_a`` and in ``rows_b``."""
    pos_a = {int(r): i for i, r in enumerate(rows_a)}
    pos_b = {int(r): i for i, r in enumerate(rows_b)}
    keep = np.array([k for k in range(len(p.rows_a)) if int(p.rows_a[k]) in pos_a and int(p.rows_b[k]) in pos_b],
                    dtype=np.int64)
    return (keep, np.array([pos_a[int(p.rows_a[k])] for k in keep], dtype=np.int64),
            np.array([pos_b[int(p.rows_b[k])] for k in keep], dtype=np.int64))


REMOVALS = ("ablate", "erase")  # the ops after which the amnesic check retrains the probe


def _retrain_options(probe: ProbeDirection) -> dict:
    """The original probe run's solver (ridge or logistic; others refit with ridge), fold count, seed and λ grid."""
    cfg = probe.config
    return {"solver": cfg.get("solver") if cfg.get("solver") in ("ridge", "logistic") else "ridge",
            "n_folds": int(cfg.get("n_folds") or 5), "seed": int(cfg.get("seed") or 0),
            "lambdas": tuple(cfg.get("lambdas") or LAMBDAS)}


def amnesic_check(cond: Condition, probe: ProbeDirection, intervened: Store, unmodified: Store,
                  cache: dict | None = None, tolerance: float = TOLERANCE) -> list[dict]:
    """The amnesic check of a removal: a probe retrained on the intervened activations (the probe's own selection,
    the paired samples) against one retrained on the unmodified activations, on the same episode folds and with
    the original probe's solver and settings (``toolkit.analysis.directions.retrain``).  One row,
    ``probe_accuracy_retrained``, whose ``note`` says plainly whether the label is still linearly decodable.
    ``cache`` keeps the unmodified run's refit between conditions.  Classification probes only (else no row)."""
    if probe.row.get("kind") != "classification":
        return []
    cache = {} if cache is None else cache
    rows_a, xa = probe_activations(intervened, probe)
    rows_b, xb = probe_activations(unmodified, probe)
    p = pair_samples(intervened, unmodified)
    keep, ia, ib = _matched(p, rows_a, rows_b)
    base = {"condition": cond.label, "hook": cond.hook, "op": cond.op, "alpha": cond.alpha,
            "metric": "probe_accuracy_retrained", "dim": None, "p_value": None}
    labels = probe_labels(unmodified, probe, p.rows_b[keep]) if len(keep) else None
    if labels is None:
        return []
    ok = labels >= 0
    keep, labels = keep[ok], labels[ok]
    xa, xb = xa[ia[ok]], xb[ib[ok]]
    fields = StoreLabels(unmodified, p.rows_b[keep])
    episode, task = fields["episode"], fields["task"]
    common = {"n_episodes": int(len(np.unique(episode))), "n_pairs": int(len(keep))}
    opts = _retrain_options(probe)
    try:
        if "unmodified" not in cache:
            fold, cache["folds"] = _original_folds(probe, fields)
            cache["unmodified"] = retrain(xb, labels, episode, task, fold=fold, **opts)
        before: Refit = cache["unmodified"]
        after = retrain(xa, labels, episode, task, fold=before.fold, **opts)
    except ToolkitError as e:
        return [{**base, **common, "value": None, "baseline": None, "ci_low": None, "ci_high": None,
                 "note": f"not retrained: {e}"}]
    _, verdict = decodability(after, tolerance)
    return [{**base, **common, "value": after.accuracy, "baseline": before.accuracy,
             "ci_low": float(after.summary["ci_low"]), "ci_high": float(after.summary["ci_high"]),
             "chance": after.floor, "note": f"{verdict}; {cache['folds']}"}]


def _original_folds(probe: ProbeDirection, fields: StoreLabels) -> tuple[np.ndarray | None, str]:
    """The original probe run's outer fold of each sample's episode (its ``folds.csv``) when it covers every
    episode in at least 3 folds, else None (``retrain`` deals them again with the probe's seed); and a note."""
    if probe.folds:
        keys = text_values(fields["episode_key"])
        fold = np.array([probe.folds.get(k, -1) for k in keys], dtype=np.int64)
        if (fold >= 0).all() and len(np.unique(fold)) >= 3:
            return fold, "the original probe's folds"
    return None, "folds dealt again with the original probe's seed"


def resolve_direction(direction: str | Path | np.ndarray | ProbeDirection | None, probe_class: str | int | None,
                      op: str) -> tuple[np.ndarray | None, ProbeDirection | None, int | None, str]:
    """A direction argument -> (vector, the probe it came from, the steered class column, source text).

    ``PATH.npy``; a probe results folder ``DIR`` or ``DIR:ID`` (its class ``probe_class`` for ``add``,
    for ``ablate`` an orthonormal basis of what it reads: ``ProbeDirection.span``, C − 1 directions for C
    classes)."""
    if direction is None:
        return None, None, None, ""
    if isinstance(direction, np.ndarray):
        return np.asarray(direction, dtype=np.float64), None, None, "array"
    probe = direction if isinstance(direction, ProbeDirection) else None
    source = "probe"
    if probe is None:
        text = str(direction)
        if text.endswith(".npy"):
            return load_vector(text), None, None, text
        path, _, rid = text.rpartition(":") if ":" in text and text.rsplit(":", 1)[1].isdigit() else (text, "", "")
        probe = probe_direction(path, int(rid) if rid else None)
        source = f"probe {path} row {probe.row['id']}"
    if op == "ablate" and probe_class is None:
        return probe.span(), probe, None, source
    if probe_class is None and probe.W.shape[1] > 1:
        raise ToolkitError(f"the probe has {probe.W.shape[1]} classes ({', '.join(probe.classes)}): choose the one "
                           "to steer towards with --class NAME (or use --op ablate to remove them all)")
    col = 0 if probe_class is None else probe.column(probe_class)
    return probe.direction(probe_class), probe, col, f"{source} class {probe.classes[col]}"


def resolve_eraser(direction: str | Path | np.ndarray | ProbeDirection | Eraser | None, method: str = "leace",
                   store: str | Path | Store | None = None, tolerance: float = TOLERANCE
                   ) -> tuple[Eraser, ProbeDirection | None, str]:
    """What ``--op erase`` removes -> (eraser, the probe it came from, source text).

    An ``Eraser`` or its ``.npz`` file as is; a probe (results folder ``DIR[:ID]`` or ``ProbeDirection``): a
    ``method`` eraser (``leace`` or ``inlp``) fitted on ``store``, default the store the probe was trained on
    (``fit_eraser``); an array or ``.npy``: the orthogonal projection off its span."""
    if direction is None:
        raise ToolkitError("--op erase needs what to erase: --direction (a probe's results folder, an eraser .npz "
                           "or a .npy of directions)")
    if isinstance(direction, Eraser):
        return direction, None, f"{direction.method} eraser"
    text = None if isinstance(direction, (np.ndarray, ProbeDirection)) else str(direction)
    if text is not None and text.endswith(".npz"):
        e = load_eraser(text)
        return e, None, f"{e.method} eraser {text}"
    if isinstance(direction, np.ndarray) or (text is not None and text.endswith(".npy")):
        v = np.asarray(direction, np.float64) if text is None else load_vector(text)
        return ablation_eraser(v), None, "array" if text is None else text
    _, probe, _, source = resolve_direction(direction, None, "ablate")
    e = fit_eraser(probe, method, store, tolerance=tolerance)
    return e, probe, (f"{method} eraser of {source} fitted on {e.info.get('store')} (rank {e.rank} of "
                      f"{e.n_features} features)")


TABLE_COLUMNS = ["condition", "hook", "op", "alpha", "metric", "dim", "value", "baseline", "ci_low", "ci_high",
                 "p_value", "chance", "predicted", "n_episodes", "n_pairs", "note"]


def save_table(rows: list[dict], meta: dict, out: Path) -> Path:
    """``effects.csv`` (one row per condition × metric × dim) and ``effects.json`` (rows + settings)."""
    import csv

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "effects.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=TABLE_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _cell(r.get(k)) for k in TABLE_COLUMNS})
    (out / "effects.json").write_text(json.dumps({"meta": meta, "rows": [{k: _json(r.get(k)) for k in TABLE_COLUMNS}
                                                                        for r in rows]}, indent=1))
    return out / "effects.csv"


def _cell(v: Any) -> Any:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return float(v) if isinstance(v, np.floating) else v


def _json(v: Any) -> Any:
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _series(rows: list[dict], metric: str, dim: Any = None) -> dict[str, list[dict]]:
    """Rows of one metric grouped by hook, each series sorted by alpha."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        if r["metric"] == metric and (dim is None or r.get("dim") == dim):
            out.setdefault(r["hook"], []).append(r)
    return {h: sorted(v, key=lambda r: r["alpha"]) for h, v in out.items()}


def _band(ax, series: list[dict], label: str, key: str = "value") -> None:
    x = [r["alpha"] for r in series]
    y = [_num(r[key]) for r in series]
    line = ax.plot(x, y, marker="o", label=label)[0]
    lo, hi = [_num(r.get("ci_low")) for r in series], [_num(r.get("ci_high")) for r in series]
    if key == "value" and not all(math.isnan(v) for v in lo):
        ax.fill_between(x, lo, hi, alpha=0.2, color=line.get_color())


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


def write_figures(rows: list[dict], out: Path) -> list[Path]:
    """dose_response.png (action L2 and cosine vs alpha per hook), success_vs_alpha.png (closed loop) and
    probe_check.png (probe accuracy and score shift vs alpha) where the table has those rows."""
    from toolkit.analysis.figures import pyplot, save_figure

    plt = pyplot()
    made = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, ylabel in ((axes[0], "action_l2", "action L2 shift (per step, mean over chunk)"),
                               (axes[1], "action_cosine", "cosine(intervened, unmodified) action chunk")):
        for hook, series in _series(rows, metric).items():
            _band(ax, series, hook)
        ax.set_xlabel("alpha")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("dose-response: intervened vs unmodified actions (95% episode-bootstrap bands)")
    made.append(save_figure(fig, out / "dose_response.png"))
    success = _series(rows, "success_rate")
    if success:
        fig, ax = plt.subplots(figsize=(6, 4))
        for hook, series in success.items():
            _band(ax, series, hook)
        base = next(iter(success.values()))[0]["baseline"]
        ax.axhline(base, color="k", ls="--", lw=1, label="unmodified")
        ax.set(xlabel="alpha", ylabel="success rate", ylim=(-0.05, 1.05), title="task success vs alpha")
        ax.legend(fontsize=7)
        made.append(save_figure(fig, out / "success_vs_alpha.png"))
    acc, shift = _series(rows, "probe_accuracy"), _series(rows, "probe_score_shift")
    retrained = {h: [r for r in v if r.get("value") is not None]
                 for h, v in _series(rows, "probe_accuracy_retrained").items()}
    if acc or shift:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for hook, series in acc.items():
            _band(axes[0], series, f"{hook} same probe")
            axes[0].plot([r["alpha"] for r in series], [r["baseline"] for r in series], ls=":", marker=".",
                         label=f"{hook} unmodified")
            axes[0].axhline(series[0]["chance"], color="k", ls="--", lw=1, label="chance")
        for hook, series in retrained.items():
            if series:
                _band(axes[0], series, f"{hook} retrained probe (amnesic)")
        axes[0].set(xlabel="alpha", ylabel="probe accuracy", ylim=(-0.05, 1.05),
                    title="intervened run: same probe" + (" vs retrained" if any(retrained.values()) else ""))
        for hook, series in shift.items():
            _band(axes[1], series, f"{hook} measured")
            if any(r.get("predicted") is not None for r in series):
                axes[1].plot([r["alpha"] for r in series], [_num(r.get("predicted")) for r in series], ls="--",
                             label="predicted alpha·|w|²")
        axes[1].set(xlabel="alpha", ylabel="probe score shift", title="steered class score")
        for ax in axes:
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        made.append(save_figure(fig, out / "probe_check.png"))
    return made


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _ablation_check(rows: list[dict]) -> list[str]:
    """The report's ablation check: per removal, the same probe next to a retrained one, in plain words."""
    checks = [r for r in rows if r["metric"] == "probe_accuracy_retrained"]
    if not checks:
        return []
    same = {r["condition"]: r for r in rows if r["metric"] == "probe_accuracy"}
    lines = ["### Ablation check: the same probe vs a retrained probe", "",
             "The same probe at chance after a removal shows only that *its own* direction is gone: it is true by "
             "construction. A probe retrained on the intervened activations (the original probe's solver, folds, "
             "seed and λ grid, on the same episode folds as one retrained on the unmodified run) says whether the "
             "information is gone (amnesic probing, Elazar et al. 2021). If it is still decodable, the removal was "
             "not complete: use `--op erase` (LEACE or INLP) to remove it all.", ""]
    for r in checks:
        s = same.get(r["condition"])
        head = (f"the same probe {_fmt(s.get('baseline'))} → {_fmt(s['value'])} (chance {_fmt(s.get('chance'))}); "
                if s else "")
        note = str(r.get("note") or "")
        note = note if note.startswith("not retrained") else f"the label is {note}"
        lines.append(f"* **{r['condition']}**: {head}{note} (retrained on the unmodified run: "
                     f"{_fmt(r.get('baseline'))}).")
    return lines + [""]


def write_report(rows: list[dict], meta: dict, figures: list[Path], out: Path) -> Path:
    """``report.md``: settings, the headline rows per condition, the figures."""
    loop = ("closed loop: every intervened rollout starts from the same init state and seed as its unmodified twin"
            if meta["closed_loop"] else "open loop: the same inputs and noise")
    weights = " (random weights: smoke test only)" if meta.get("random_init") else ""
    lines = ["## From probe to cause: intervention effects", "",
             f"Model **{meta['model']}**{weights}, dataset **{meta['dataset']}** ({loop}), op **{meta['op']}**, "
             f"direction: {meta['direction'] or '–'}.", "",
             "| condition | metric | value | unmodified | 95% CI | p (paired) | n episodes |",
             "|---|---|---|---|---|---|---|"]
    shown = ("action_l2", "action_cosine", "action_shift_norm", "success_rate", "episode_length", "probe_accuracy",
             "probe_accuracy_retrained", "probe_score_shift")
    for r in rows:
        if r["metric"] not in shown:
            continue
        extra = f" (chance {_fmt(r['chance'])})" if r.get("chance") is not None else ""
        extra += f" (predicted {_fmt(r['predicted'])})" if r.get("predicted") is not None else ""
        lines.append(f"| {r['condition']} | {r['metric']} | {_fmt(r['value'])}{extra} | {_fmt(r.get('baseline'))} | "
                     f"[{_fmt(r.get('ci_low'))}, {_fmt(r.get('ci_high'))}] | {_fmt(r.get('p_value'))} | "
                     f"{r.get('n_episodes')} |")
    lines += ["", "Per-dimension shifts with their bootstrap-t tests are in `effects.csv` (metric `action_shift`).", ""]
    lines += _ablation_check(rows)
    lines += [f"![{f.stem}]({f.name})" for f in figures]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
