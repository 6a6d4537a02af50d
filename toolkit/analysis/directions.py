"""Directions to intervene along, read from what the analysis left: a probe's saved weights
(``probe_direction``), the mean difference between two groups of a store's samples (``mean_difference``,
e.g. ``task=3`` vs ``task=5``), a stream's mean (``store_mean``), or a ``.npy`` file (``load_vector``).
They are plain arrays; ``toolkit.capture.intervention`` applies them.

Removing what a probe found, and measuring whether it is gone:

* ``direction_basis``: an orthonormal basis of direction(s), with a rank tolerance at float32 rounding (saved
  probes are float32), so a two-class probe's columns w and ≈−w span exactly one direction;
  ``ProbeDirection.span`` is the basis of what a probe reads (a classifier's column contrasts).
* ``Eraser``: x ↦ x − (x − c) R Lᵀ, a rank-k affine map the live ``erase`` intervention applies as is.
  ``ablation_eraser`` (orthogonal: the probe's span), ``leace`` (Belrose et al. 2023: the least-change
  eraser after which no linear probe beats a constant one on the fitting data) and ``inlp`` (Ravfogel et al.
  2020: train a probe, project its directions out, repeat until the probe is at chance); ``fit_eraser`` fits
  one on a probe's own store.
* ``retrain`` refits a probe the way ``toolkit probe`` does (episode folds, nested CV, the same solvers) on
  arrays, and ``amnesic`` (Elazar et al. 2021) compares the same probe with a *retrained* one after removal:
  the same probe at chance proves only that its own direction is gone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.analysis.probe import metrics as M
from toolkit.analysis.probe.results import Results, load_direction
from toolkit.analysis.probe.select import Selection, resolve
from toolkit.analysis.probe.solvers import LAMBDAS, Linear, NestedRidge, logistic_probe
from toolkit.analysis.probe.splits import make_folds
from toolkit.analysis.probe.stats import Stats, iter_blocks
from toolkit.analysis.stats import iter_sample_vectors
from toolkit.sdk.errors import ToolkitError
from toolkit.sdk.names import hook_name, parse_hook
from toolkit.store.reader import open_store, Store


def load_vector(path: str | Path) -> np.ndarray:
    """A direction saved as ``.npy`` (never unpickled)."""
    p = Path(path)
    if not p.is_file():
        raise ToolkitError(f"direction file {p} does not exist")
    try:
        return np.asarray(np.load(p, allow_pickle=False), dtype=np.float64)
    except ValueError as e:
        raise ToolkitError(f"{p} is not a plain .npy array ({e})") from None


@dataclass(frozen=True)
class ProbeDirection:
    """A probe's weights and where it was trained: predict with (x - shift) @ W + b."""

    W: np.ndarray  # (F, C)
    b: np.ndarray  # (C,)
    shift: np.ndarray  # (F,)
    row: dict  # the results row: site, layer, stream, t, target, classes ...
    classes: list[str]
    selection: dict  # the probe run's selection (tokens, pool, ...)
    config: dict = field(default_factory=dict)  # the probe run's fitting choices (solver, n_folds, seed, lambdas)
    store: str | None = None  # the store the probe was trained on
    folds: dict | None = None  # episode key -> the outer fold the probe run dealt it (folds.csv), if saved

    @property
    def hook(self) -> str:
        return hook_name(self.row["site"], int(self.row["layer"]), self.row.get("stream") or "resid_post")

    @property
    def kind(self) -> str:
        return str(self.row.get("kind") or ("classification" if self.classes and self.W.shape[1] > 1 else ""))

    def span(self) -> np.ndarray:
        """An orthonormal basis (F, k) of what the probe reads.  A classifier's decision depends only on the
        differences between its class columns (adding one vector to every column changes no argmax), so its span
        is that of the centred columns: C − 1 directions for C classes, one for two; a regression's is its
        columns.  Ablating it sends the same probe to a constant prediction."""
        W = self.W - self.W.mean(1, keepdims=True) if self.kind == "classification" and self.W.shape[1] > 1 \
            else self.W
        return direction_basis(W)

    def column(self, cls: str | int) -> int:
        """The output column of a class: its name first (class names may be digits), else a column index."""
        if str(cls) in self.classes:
            return self.classes.index(str(cls))
        if isinstance(cls, str) and not cls.lstrip("-").isdigit():
            raise ToolkitError(f"the probe has no class {cls!r}; classes: {', '.join(self.classes)}")
        c = int(cls)
        if not -self.W.shape[1] <= c < self.W.shape[1]:
            raise ToolkitError(f"the probe has {self.W.shape[1]} output columns, not {c}")
        return c % self.W.shape[1]

    def direction(self, cls: str | int | None = None) -> np.ndarray:
        """One class's column (name or index), a regression's only column, or the whole (F, C) span."""
        if cls is None:
            return self.W[:, 0] if self.W.shape[1] == 1 else self.W
        return self.W[:, self.column(cls)]


def probe_direction(results: str | Path, row_id: int | None = None) -> ProbeDirection:
    """A probe's saved weights (``toolkit probe --out DIR``) and the row they belong to, read through
    ``toolkit.analysis.probe.results.load_direction``.  ``row_id`` None: the only saved probe, else an error listing them."""
    out = Path(results)
    res = Results.load(out)
    if not (out / "weights.npz").is_file():
        raise ToolkitError(f"{out} holds no weights.npz: run `toolkit probe` with --save-weights best or all")
    with np.load(out / "weights.npz", allow_pickle=False) as z:
        ids = sorted(int(k[2:]) for k in z.files if k.startswith("W_"))
    if row_id is None and len(ids) != 1:
        raise ToolkitError(f"{out} holds the weights of {len(ids)} probes (ids {', '.join(map(str, ids))}); pick one "
                           f"with DIR:ID, e.g. {out}:{ids[0] if ids else 0}")
    row_id = ids[0] if row_id is None else row_id
    row = next((r for r in res.rows if int(r["id"]) == row_id), None)
    if row is None or row_id not in ids:
        raise ToolkitError(f"{out} has no saved weights for probe {row_id}; saved: {', '.join(map(str, ids))}")
    t = row.get("t")
    d = load_direction(out, row["site"], int(row["layer"]), row["target"], t=None if t is None else float(t),
                       step=row.get("step"), split=row["split"], solver=row["solver"])
    W = np.asarray(d.W, dtype=np.float64)
    W = W.reshape(W.shape[0], -1)
    classes = [str(c) for c in (d.labels or range(W.shape[1]))]
    folds = None
    if callable(getattr(res, "fold_of", None)):  # results that save their folds (folds.csv)
        try:
            folds = res.fold_of(row["site"], row["target"], row["split"])
        except ToolkitError:
            folds = None
    return ProbeDirection(W, np.atleast_1d(np.asarray(d.b, dtype=np.float64)),
                          np.asarray(d.shift, dtype=np.float64).reshape(-1), d.row, classes,
                          dict(res.meta.get("selection") or {}), dict(res.meta.get("config") or {}),
                          res.meta.get("store"), folds)


def store_hook(store: Store, hook: str) -> tuple[str, int, str]:
    site, layer, stream = parse_hook(hook)
    if site not in store.sites:
        raise ToolkitError(f"{store.path} has no site {site!r}; sites: {', '.join(store.sites)}")
    if stream not in store.streams(site):
        raise ToolkitError(f"{store.path} holds no stream {stream!r} at site {site!r}")
    if layer not in store.layers(site):
        raise ToolkitError(f"{store.path} holds layers {store.layers(site)} of {site!r}, not {layer}")
    return site, layer, stream


def text_values(values: np.ndarray) -> np.ndarray:
    """A coordinate as an object array of str (stores keep strings variable-length), for matching by value."""
    return np.array([str(v) for v in np.asarray(values).tolist()], dtype=object)


def group_mask(store: Store, condition: str) -> np.ndarray:
    """Samples matching ``FIELD=VALUE`` (any coordinate or per-sample field; ``task=3`` also matches task id 3)."""
    name, sep, value = condition.partition("=")
    name, value = name.strip(), value.strip()
    if not sep or not name:
        raise ToolkitError(f"group {condition!r} must be FIELD=VALUE, e.g. task=3 or success=1")
    fields = store.fields()
    if name not in fields:
        raise ToolkitError(f"{store.path} has no field {name!r}; fields: {', '.join(fields)}")
    values = text_values(store.coord(name))
    mask = values == value
    if not mask.any() and name == "task" and value.lstrip("-").isdigit():
        mask = np.asarray(store.coord("task_id")) == int(value)
    if not mask.any():
        shown = ", ".join(sorted(set(values.tolist()))[:10])
        raise ToolkitError(f"no sample of {store.path} has {name}={value}; values: {shown}")
    return mask


def mean_difference(store: str | Path | Store, hook: str, group_a: str, group_b: str) -> np.ndarray:
    """mean(group a) - mean(group b) of a stored stream at one layer, streamed chunk by chunk."""
    s = store if isinstance(store, Store) else open_store(store)
    site, layer, stream = store_hook(s, hook)
    ma, mb = group_mask(s, group_a), group_mask(s, group_b)
    if (ma & mb).any():
        raise ToolkitError(f"groups {group_a!r} and {group_b!r} share samples: pick disjoint groups")
    sums = {}
    for rows, x in iter_sample_vectors(s, site, stream, layer):
        for key, m in (("a", ma), ("b", mb)):
            sums[key] = sums.get(key, 0) + x[m[rows]].sum(0)
    return sums["a"] / ma.sum() - sums["b"] / mb.sum()


def store_mean(store: str | Path | Store, hook: str) -> np.ndarray:
    """The stream's mean vector over every sample (and token, denoising step) of a store: for ``mean``."""
    s = store if isinstance(store, Store) else open_store(store)
    site, layer, stream = store_hook(s, hook)
    total, count = 0.0, 0
    for _, x in iter_sample_vectors(s, site, stream, layer):
        total, count = total + x.sum(0), count + len(x)
    return total / count


# ----------------------------------------------------------------------------- removing what a probe found

F32_EPS = float(np.finfo(np.float32).eps)
TOLERANCE = 0.05  # a retrained probe within this of chance (or of the majority rate, if higher) reads "at chance"


def direction_basis(v: np.ndarray, rtol: float | None = None) -> np.ndarray:
    """An orthonormal basis (F, k) of the span of direction(s) ``v`` (F,) or (F, m), by SVD.

    Singular values at or below ``rtol``·σ_max are rank noise; the default ``rtol`` is max(F, m)·eps(float32),
    the rounding of the float32 weights probes are saved in: a two-class probe's columns w and −w agree only to
    that, so a cut at 1e-10·σ_max (the earlier QR rule) kept a second direction made of rounding noise."""
    m = np.asarray(v, dtype=np.float64)
    m = m.reshape(m.shape[0], -1) if m.ndim else m.reshape(1, 1)
    if not np.isfinite(m).all():
        raise ToolkitError(f"directions of shape {m.shape} hold non-finite values: they span no subspace")
    if m.size == 0:
        return np.zeros((m.shape[0], 0))
    u, s, _ = np.linalg.svd(m, full_matrices=False)
    if not s[0] > 0:
        return np.zeros((m.shape[0], 0))
    tol = (max(m.shape) * F32_EPS if rtol is None else float(rtol)) * s[0]
    return np.ascontiguousarray(u[:, s > tol])


@dataclass(frozen=True)
class Eraser:
    """x ↦ x − α·((x − center) @ right) @ leftᵀ on row vectors (α = 1: the whole erasure).

    ``left`` and ``right`` (F, k) hold what is removed: one orthonormal basis twice for an orthogonal projection
    (``ablation_eraser``, ``inlp``), LEACE's oblique projection W⁺Q and WQ otherwise (``leace``).  ``center``
    (F,) stays where it is: the fitting data's mean for LEACE and INLP (the edit keeps the mean), zeros for
    ablation (the projection through the origin that ``--op ablate`` applies).  ``toolkit intervene --op erase``
    applies the same map inside the model (``toolkit.capture.intervention``, op ``erase``)."""

    left: np.ndarray
    right: np.ndarray
    center: np.ndarray
    method: str = "ablate"
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        L, R, c = (np.asarray(a, dtype=np.float64) for a in (self.left, self.right, self.center))
        L = L.reshape(L.shape[0], -1) if L.ndim else L
        R = R.reshape(R.shape[0], -1) if R.ndim else R
        if L.ndim != 2 or L.shape != R.shape or c.shape != (L.shape[0],) or not all(
                np.isfinite(a).all() for a in (L, R, c)):
            raise ToolkitError(f"an eraser needs finite left and right (features, k) of one shape and a center "
                               f"(features,); got {L.shape}, {R.shape} and {c.shape}")
        for name, a in (("left", L), ("right", R), ("center", c)):
            object.__setattr__(self, name, np.ascontiguousarray(a))

    @property
    def rank(self) -> int:
        """How many dimensions it removes."""
        return int(self.left.shape[1])

    @property
    def n_features(self) -> int:
        return int(self.left.shape[0])

    def __call__(self, x: np.ndarray, alpha: float = 1.0) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.shape[-1] != self.n_features:
            raise ToolkitError(f"the eraser was fitted on {self.n_features} features, the data has {x.shape[-1]}")
        return x - alpha * (((x - self.center) @ self.right) @ self.left.T)

    def save(self, path: str | Path) -> Path:
        """An ``.npz`` of plain arrays (``toolkit intervene --op erase --direction FILE.npz`` reads it)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as f:
            np.savez(f, left=self.left, right=self.right, center=self.center, method=np.array(self.method),
                     info=np.array(json.dumps(self.info, default=str)))
        return p


def load_eraser(path: str | Path) -> Eraser:
    """An eraser saved by ``Eraser.save`` (never unpickled)."""
    p = Path(path)
    if not p.is_file():
        raise ToolkitError(f"eraser file {p} does not exist")
    try:
        with np.load(p, allow_pickle=False) as z:
            missing = {"left", "right", "center"} - set(z.files)
            if missing:
                raise ToolkitError(f"{p} is not an eraser: it lacks {', '.join(sorted(missing))} (save one with "
                                   "Eraser.save)")
            method = str(z["method"]) if "method" in z.files else "eraser"
            info = json.loads(str(z["info"])) if "info" in z.files else {}
            return Eraser(z["left"], z["right"], z["center"], method, info)
    except (ValueError, OSError) as e:
        raise ToolkitError(f"{p} is not a plain .npz eraser ({e})") from None


def ablation_eraser(directions: np.ndarray, center: np.ndarray | None = None) -> Eraser:
    """The orthogonal projection off the span of ``directions`` (``direction_basis``), through ``center``
    (default the origin: what ``--op ablate`` does)."""
    q = direction_basis(directions)
    return Eraser(q, q, np.zeros(q.shape[0]) if center is None else center, "ablate", {"rank": q.shape[1]})


def _one_hot(z: np.ndarray, n: int) -> np.ndarray:
    z = np.asarray(z)
    if len(z) != n:
        raise ToolkitError(f"{n} activation rows but {len(z)} labels")
    if z.ndim == 1 and z.dtype.kind in "iub":
        if (z < 0).any():
            raise ToolkitError("class labels must be non-negative indices")
        return np.eye(int(z.max()) + 1)[z]
    return np.asarray(z, dtype=np.float64).reshape(n, -1)


def leace(x: np.ndarray, z: np.ndarray) -> Eraser:
    """LEACE, the closed form of Belrose et al. (2023), fitted on ``x`` (n, F) and the concept ``z``: class
    indices (n,) (one-hot inside) or values (n, m).

    With Σ the covariance of x, W = (Σ^½)⁺ its whitening and Q an orthonormal basis of the column space of
    W·Cov(x, z), the eraser is r(x) = x − W⁺QQᵀW(x − E[x]).  Afterwards Cov(r(x), z) = 0 on the fitting data
    (no linear probe of z beats a constant one there), with the least mean squared change of any eraser that
    does so.  It removes rank(Cov(x, z)) dimensions: C − 1 for C classes.  Directions whose standard deviation is
    below max(n, F)·eps(float32) of the largest are treated as absent (float32 activations hold no more)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2 or not np.isfinite(x).all():
        raise ToolkitError(f"LEACE needs finite activations shaped (samples ≥ 2, features), got {x.shape}")
    zz = _one_hot(z, len(x))
    mu = x.mean(0)
    xc = x - mu
    cov = xc.T @ xc / len(x)
    xz = xc.T @ (zz - zz.mean(0)) / len(x)
    lam, V = np.linalg.eigh(cov)
    keep = lam > (max(x.shape) * F32_EPS) ** 2 * max(float(lam.max()), 0.0)
    V, r = V[:, keep], np.sqrt(lam[keep])
    qa = direction_basis((V.T @ xz) / r[:, None])  # Q = V qa: the column space of W Cov(x, z), whitened coordinates
    return Eraser(V @ (qa * r[:, None]), V @ (qa / r[:, None]), mu, "leace",
                  {"rank": qa.shape[1], "n_fit": len(x)})


@dataclass
class Refit:
    """A probe retrained by ``retrain``: the engine's summary of its pooled out-of-fold predictions (``metric``:
    accuracy, ``ci_low``/``ci_high``, ``chance``, ``majority`` ...), its folds, and optionally the probe refitted
    on every row."""

    summary: dict
    fold: np.ndarray
    pred: np.ndarray
    probe: Linear | None = None

    @property
    def accuracy(self) -> float:
        return float(self.summary["metric"])

    @property
    def floor(self) -> float:
        """What a label-blind classifier reaches: chance, or the majority rate if higher."""
        return float(max(self.summary["chance"], self.summary.get("majority") or 0.0))


def retrain(x: np.ndarray, classes: np.ndarray, episode: np.ndarray, task: np.ndarray | None = None, *,
            solver: str = "ridge", n_folds: int = 5, seed: int = 0, lambdas=LAMBDAS, fold: np.ndarray | None = None,
            final: bool = False) -> Refit:
    """Train and score a classification probe as ``toolkit probe`` does, on arrays: K outer folds of whole
    episodes stratified by ``task`` (default the labels; ``make_folds``), λ by leave-one-fold-out inside each
    training set (``NestedRidge``, intercepts from the selection's class proportions, as the engine's) or l2 by
    grouped CV (``logistic_probe``),
    pooled out-of-fold accuracy with the episode-clustered interval (``classification_summary``; chance: the
    training folds' majority rate where the metrics offer it).  ``fold``: reuse folds (the original probe's, or
    those of the run before an edit); ``final``: also refit on every row (ridge at the CV λ, logistic at the
    median l2)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(classes).astype(np.int64)
    ep = np.asarray(episode)
    if x.ndim != 2 or not len(x) == len(y) == len(ep):
        raise ToolkitError(f"retraining needs activations (samples, features) and one label and episode per sample; "
                           f"got {x.shape}, {len(y)} labels, {len(ep)} episodes")
    if (y < 0).any() or len(np.unique(y)) < 2:
        raise ToolkitError("retraining a classification probe needs class indices ≥ 0 of at least 2 classes")
    n_classes = int(y.max()) + 1
    if fold is None:
        strata = (y if task is None else np.asarray(task)).astype(str)
        fold = make_folds("episodes", ep, strata, n_folds, seed).fold
    fold = np.unique(np.asarray(fold), return_inverse=True)[1].astype(np.int64)  # 0..K−1, whatever ids came in
    K = int(fold.max()) + 1
    if K < 3:
        raise ToolkitError(f"retraining a probe needs at least 3 folds of episodes; the data has {len(np.unique(ep))} "
                           "episodes")
    pred = np.full(len(y), -1, dtype=np.int64)
    model = None
    if solver == "ridge":
        shift = x.mean(0)
        xs, Y, cols = x - shift, np.eye(n_classes)[y], np.arange(n_classes)
        stats = []
        for k in range(K):
            s = Stats.zeros(x.shape[1], n_classes)
            s.add(xs[fold == k], Y[fold == k])
            stats.append(s)
        nr = NestedRidge(stats, {"probe": cols}, shift, tuple(lambdas), prior=cols)  # intercepts as the engine's
        for k, fits in enumerate(nr.outers(final=final)):
            pred[fold == k] = fits["probe"].model.predict(x[fold == k]).argmax(1)
        model = nr.final()["probe"].model if final else None
    elif solver == "logistic":
        fits = []
        for k in range(K):
            tr, te = fold != k, fold == k
            fits.append(logistic_probe(x[tr], y[tr], fold[tr], n_classes, seed=seed))
            pred[te] = fits[-1].model.predict(x[te]).argmax(1)
        if final:
            model = logistic_probe(x, y, fold, n_classes, seed=seed,
                                   l2=float(np.median([f.lam for f in fits]))).model
    else:
        raise ToolkitError(f"retraining fits classification probes with the ridge or logistic solver, not {solver!r}")
    summary = M.classification_summary(pred, y, ep, fold, n_classes)
    if callable(getattr(M, "train_majority", None)):  # the engine's chance line: the training folds' majority
        summary["chance"] = M.train_majority(y, fold)
    return Refit(summary, fold, pred, model)


def decodability(fit: Refit | dict, tolerance: float = TOLERANCE) -> tuple[bool | None, str]:
    """(decodable?, one plain sentence) for a retrained probe: True when its interval lies above chance (or the
    majority rate), False when it scores at most ``tolerance`` above it, None (inconclusive) otherwise.  Below
    chance is "not decodable" too: out-of-fold scores on label-free data fall under chance with few episodes
    (cross-validation's negative bias), the more so after an erasure fitted on the same rows."""
    s = fit.summary if isinstance(fit, Refit) else fit
    floor = float(max(s["chance"], s.get("majority") or 0.0))
    v, lo, hi = float(s["metric"]), float(s["ci_low"]), float(s["ci_high"])
    score = f"a probe retrained on the edited activations scores {v:.3f} [{lo:.3f}, {hi:.3f}] (chance {floor:.3f})"
    if lo > floor:
        return True, f"still linearly decodable: {score}"
    if v <= floor + tolerance:
        return False, f"no longer linearly decodable: {score}, at most chance + {tolerance:g}"
    return None, f"inconclusive: {score}, above chance + {tolerance:g} but its interval reaches chance"


def inlp(x: np.ndarray, classes: np.ndarray, episode: np.ndarray, task: np.ndarray | None = None, *,
         solver: str = "ridge", n_folds: int = 5, seed: int = 0, lambdas=LAMBDAS, tolerance: float = TOLERANCE,
         max_iter: int = 20, fold: np.ndarray | None = None, start: np.ndarray | None = None) -> Eraser:
    """INLP (Ravfogel et al. 2020): train a probe (``retrain``: the project's CV and solvers, the same folds every
    round), project the directions it reads out (a classifier's column contrasts, made orthogonal to those
    already removed), repeat until the retrained probe's out-of-fold accuracy is within ``tolerance`` of chance
    (or the majority rate), or ``max_iter`` rounds.  The eraser is the orthogonal projection off all of them,
    through the data's mean; ``info`` holds each round's accuracy and whether it reached chance.  ``fold``: the
    folds to use (default: dealt by ``make_folds`` with ``seed``); ``start``: directions removed before the
    first round (``fit_eraser`` starts from the probe's own span, so the probe itself is at chance whatever the
    cross-validated rounds find)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(classes).astype(np.int64)
    mu = x.mean(0)
    q = np.zeros((x.shape[1], 0)) if start is None else direction_basis(start)
    history: list[float] = []
    floor, reached = float("nan"), False
    for _ in range(max(1, int(max_iter)) + 1):
        xe = x - ((x - mu) @ q) @ q.T
        fit = retrain(xe, y, episode, task, solver=solver, n_folds=n_folds, seed=seed, lambdas=lambdas, fold=fold,
                      final=len(history) < max_iter)
        fold, floor = fit.fold, fit.floor
        history.append(fit.accuracy)
        if fit.accuracy <= floor + tolerance:
            reached = True
            break
        if fit.probe is None:
            break
        W = fit.probe.W - fit.probe.W.mean(1, keepdims=True)
        new = direction_basis(W - q @ (q.T @ W))
        if not new.shape[1] or q.shape[1] + new.shape[1] > x.shape[1]:
            break
        q = direction_basis(np.concatenate([q, new], 1), rtol=1e-10)  # orthonormal pieces: no rank noise here
    return Eraser(q, q, mu, "inlp", {"rank": q.shape[1], "rounds": len(history) - 1, "accuracy": history,
                                     "chance": floor, "reached_chance": reached, "tolerance": tolerance,
                                     "n_fit": len(x)})


@dataclass
class Amnesic:
    """Amnesic probing (Elazar et al. 2021): the same probe and a retrained one, before and after a removal."""

    rank: int  # dimensions removed
    before: Refit  # retrained on the unedited activations
    after: Refit  # retrained on the edited activations (same folds)
    same: float | None = None  # the original probe's accuracy on the edited activations
    same_before: float | None = None  # ... and on the unedited ones
    tolerance: float = TOLERANCE

    @property
    def chance(self) -> float:
        return self.after.floor

    @property
    def decodable(self) -> bool | None:
        """True: the information survives the removal (a retrained probe finds it); False: it is gone."""
        return decodability(self.after, self.tolerance)[0]

    def text(self) -> str:
        same = "" if self.same is None else (f"the same probe goes from {self.same_before:.3f} to {self.same:.3f} "
                                             f"(chance {self.chance:.3f}); ")
        return (f"After removing {self.rank} dimension(s): {same}the label is "
                f"{decodability(self.after, self.tolerance)[1]}; retrained before removal: "
                f"{self.before.accuracy:.3f}.")


def amnesic(x: np.ndarray, classes: np.ndarray, episode: np.ndarray, remove: Eraser | np.ndarray, probe: Any = None,
            task: np.ndarray | None = None, *, alpha: float = 1.0, solver: str = "ridge", n_folds: int = 5,
            seed: int = 0, lambdas=LAMBDAS, tolerance: float = TOLERANCE) -> Amnesic:
    """Remove ``remove`` (an ``Eraser``, or direction(s) projected out as ``ablate`` does) from ``x`` and measure
    what is left: ``probe`` (anything with W, b, shift: a ``ProbeDirection``, a ``Linear``) on the edited rows,
    and a probe retrained on them with ``retrain`` on the same folds as one retrained on the unedited rows."""
    y = np.asarray(classes).astype(np.int64)
    eraser = remove if isinstance(remove, Eraser) else ablation_eraser(remove)
    x = np.asarray(x, dtype=np.float64)
    xe = eraser(x, alpha)
    kw = dict(solver=solver, n_folds=n_folds, seed=seed, lambdas=lambdas)
    before = retrain(x, y, episode, task, **kw)
    after = retrain(xe, y, episode, task, fold=before.fold, **kw)
    same = same_before = None
    if probe is not None:
        W, b, shift = (np.asarray(a, dtype=np.float64) for a in (probe.W, probe.b, probe.shift))
        same = float((((xe - shift) @ W + b).argmax(1) == y).mean())
        same_before = float((((x - shift) @ W + b).argmax(1) == y).mean())
    return Amnesic(eraser.rank, before, after, same, same_before, tolerance)


# ----------------------------------------------------------------------------- a probe's own data


def probe_activations(store: Store, probe: ProbeDirection, samples: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(sample rows, activations (n, F) float32) of a store read with the probe's own selection: its site,
    stream, layer, denoising step, tokens and pooling.  ``samples``: also the probe run's sample filters
    (steps, tasks, episodes, its rollout-step bucket), to read the very rows it was trained on."""
    row, sel = probe.row, probe.selection
    t = row.get("t")
    has_t = t is not None and not (isinstance(t, float) and np.isnan(t)) and str(t) not in ("", "None", "nan")
    extra: dict[str, Any] = {}
    if samples:
        extra = {k: (tuple(sel[k]) if k.endswith("_range") else sel[k])
                 for k in ("steps", "task_range", "episode_range") if sel.get(k) is not None}
        step = str(row.get("step", "all"))
        if step not in ("all", "None", "", "nan"):
            extra["steps"] = step
    res = resolve(store, Selection(site=row["site"], stream=row.get("stream") or sel.get("stream"),
                                   layers=str(int(row["layer"])), t=str(t) if has_t else None,
                                   tokens=sel.get("tokens"), pool=sel.get("pool") or "mean", **extra))
    x = np.zeros((len(res.rows), res.n_features), dtype=np.float32)
    for pos, block in iter_blocks(store, res, 0):
        x[pos] = block.mean(1)
    return res.rows, x


def _target_field(probe: ProbeDirection) -> str:
    kind, _, arg = str(probe.row.get("target", "")).partition(":")
    return arg.partition(":")[0] if kind == "field" else kind  # field:success[:classification] reads success


def probe_labels(store: Store, probe: ProbeDirection, rows: np.ndarray) -> np.ndarray | None:
    """A classification probe's class index of each sample (-1 for a class it never saw); else None."""
    from toolkit.analysis.probe.target import StoreLabels

    name = _target_field(probe)
    if probe.row.get("kind") != "classification" or name not in store.fields():
        return None
    values = text_values(StoreLabels(store, np.asarray(rows))[name])
    index = {c: i for i, c in enumerate(probe.classes)}
    return np.array([index.get(v, -1) for v in values], dtype=np.int64)


def fit_eraser(probe: ProbeDirection, method: str = "leace", store: str | Path | Store | None = None, *,
               tolerance: float = TOLERANCE, max_iter: int = 20) -> Eraser:
    """Fit a complete linear eraser of what ``probe`` decodes, on the rows it was trained on: ``store`` (default
    the probe's own store) read with its selection, labelled by its target.  ``leace`` (classification or
    regression probes) or ``inlp`` (classification; the probe run's solver, folds and λ grid)."""
    from toolkit.analysis.probe.target import StoreLabels

    if method not in ERASERS:
        raise ToolkitError(f"unknown erasure {method!r}: use one of {', '.join(ERASERS)}")
    where = store if store is not None else probe.store
    if where is None:
        raise ToolkitError("the probe's results do not name its store: give the store to fit the eraser on "
                           "(--erasure-store)")
    if not isinstance(where, Store) and "://" not in str(where) and not Path(where).exists():
        raise ToolkitError(f"the store to fit the eraser on, {where}, does not exist: give one with --erasure-store "
                           "(the same samples as the probe's, at its hook)")
    s = where if isinstance(where, Store) else open_store(where)
    rows, x = probe_activations(s, probe, samples=True)
    info = {"store": str(s.path), "hook": probe.hook, "probe": probe.row.get("id"), "target": probe.row.get("target")}
    kind = probe.row.get("kind")
    if kind == "classification":
        y = probe_labels(s, probe, rows)
        if y is None:
            raise ToolkitError(f"{s.path} has no field {_target_field(probe)!r} to label the eraser's samples")
        keep = y >= 0
        if len(np.unique(y[keep])) < 2:
            raise ToolkitError(f"{s.path} holds fewer than 2 of the probe's classes at its selection: nothing to erase")
        x, y, rows = x[keep], y[keep], rows[keep]
        if method == "leace":
            e = leace(x, y)
        else:
            cfg = probe.config
            solver = cfg.get("solver") if cfg.get("solver") in ("ridge", "logistic") else "ridge"
            labels = StoreLabels(s, rows)
            fold = None
            if probe.folds:  # the probe run's own folds, where they cover these episodes
                fold = np.array([probe.folds.get(k, -1) for k in text_values(labels["episode_key"])])
                fold = fold if (fold >= 0).all() and len(np.unique(fold)) >= 3 else None
            e = inlp(x, y, labels["episode"], labels["task"], solver=solver, n_folds=int(cfg.get("n_folds", 5)),
                     seed=int(cfg.get("seed", 0)), lambdas=tuple(cfg.get("lambdas") or LAMBDAS), tolerance=tolerance,
                     max_iter=max_iter, fold=fold, start=probe.span())
    elif kind == "regression" and method == "leace":
        e = leace(x, np.asarray(StoreLabels(s, rows)[_target_field(probe)], dtype=np.float64))
    else:
        raise ToolkitError(f"--erasure {method} needs a classification probe{' or a regression one' * (method == 'leace')}"
                           f"; probe {probe.row.get('id')} is a {kind or 'different'} probe")
    return Eraser(e.left, e.right, e.center, e.method, {**e.info, **info})


ERASERS = ("leace", "inlp")
