"""Probe solvers: nested cross-validated ridge from fold statistics, multinomial logistic (L-BFGS), cosine-loss probe.

Ridge is the default because it needs only the streamed statistics: one factorisation of a standardised
training gram (G = Q T Qᵀ, T tridiagonal: ``factor.py``) gives W(λ) = Q (T + λn)⁻¹ QᵀXᵀY for every λ and every
target at once, and every training set of the nested cross-validation is a sum of fold statistics (``NestedRidge``).
λ is relative to the mean eigenvalue of the standardised gram (which is n), so one grid means the same
thing at every layer whatever its activation scale.  Features are standardised with training statistics
only (the z-score comes from the diagonal of the centred training gram, no second pass).
Each solver returns ``Fitted`` probes: the linear map, what it chose (λ, l2 or epochs) and its inner score.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from toolkit.sdk.compute import threads_each
from toolkit.analysis.probe.factor import Eigen, Singular, Tridiagonal
from toolkit.analysis.probe.stats import Stats, sum_stats

LAMBDAS = tuple(float(v) for v in np.logspace(-6, 3, 10))


@dataclass
class Linear:
    """A fitted probe in raw feature space: predict(x) = (x - shift) @ W + b."""

    W: np.ndarray  # (D, M)
    b: np.ndarray  # (M,)
    shift: np.ndarray  # (D,)

    def __post_init__(self):
        self._w32, self._b32 = self.W.astype(np.float32), self.b.astype(np.float32)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return (x - self.shift) @ self._w32 + self._b32


def predict_many(models: list[Linear], x: np.ndarray) -> list[np.ndarray]:
    """Every model's predictions on ``x``: one GEMM when they share a shift (a cell's targets and controls)."""
    if len(models) < 2 or any(m.shift is not models[0].shift for m in models):
        return [m.predict(x) for m in models]
    P = (x - models[0].shift) @ np.concatenate([m._w32 for m in models], 1)
    out, at = [], 0
    for m in models:
        out.append(P[:, at:at + m._w32.shape[1]] + m._b32)
        at += m._w32.shape[1]
    return out


@dataclass
class Fitted:
    """One outer fold's probe for one target (or its control), and what its solver chose on the way."""

    model: Linear
    lam: float | None  # the regulariser this solver chose (ridge λ, logistic l2); None for the cosine probe
    inner_score: float  # inner cross-validation score, higher is better: what model selection compares
    epochs: int | None = None  # cosine probe: epochs run before early stopping


def factorisation_precision(d: int, n_lambdas: int, m: int, device: str | None = None) -> str:
    """float32 factorisation + refinement where it is cheaper than a float64 factorisation, else float64.

    On the CPU a float64 tridiagonal reduction costs about 1.3-1.5x a float32 one, while refinement costs
    products of the gram with the λ path's L·M columns, so float32 pays off when 6·L·M < D.  Measured (one
    thread, one training set, the 10-λ grid, medians of 3): D=2048 with 10 columns 0.57 s vs 0.74 s in float64,
    with 60 columns 1.21 s vs 1.04 s; D=4096 with 60 columns 7.8 s vs 8.5 s; D ≤ 1024 within 10 % of each
    other with 10 columns, float64 faster with 60.
    On a GPU a float64 eigendecomposition is cheap next to the refinement's round trips: always float64 there.
    """
    if device is not None and torch.device(device).type != "cpu":
        return "float64"
    return "float32" if 6 * n_lambdas * m < d else "float64"


def solver_workers(device: str | None = None, n_jobs: int | None = None) -> int:
    """How many factorisations run at once: torch's thread budget (capped at 4, each job holds a few D² arrays),
    one on a GPU.  One thread per factorisation degrades least on a busy machine: measured with torch's eigh,
    4 at D=2048 in 5.1 s as 2 jobs × 1 thread vs 17-33 s as 1 job × 2 threads on the loaded 2-core machine.
    Idle, with the tridiagonal reductions (LAPACK called without the GIL, ``lapack.py``) one nested-CV cell at
    D=2048 takes 9.0-9.9 s as 2 jobs × 1 thread vs 10.9-11.9 s as 1 job × 2 threads."""
    if device is not None and torch.device(device).type != "cpu":
        return 1
    return max(1, min(4, torch.get_num_threads(), n_jobs or 4))


def parallel_map(fn, items: list, workers: int) -> list:
    """``[fn(i) for i in items]`` on ``workers`` threads (torch and BLAS release the GIL), the thread budget
    divided between them for the duration; in order, and plainly sequential for one worker."""
    if workers <= 1 or len(items) <= 1:
        return [fn(i) for i in items]
    from concurrent.futures import ThreadPoolExecutor

    with threads_each(workers), ThreadPoolExecutor(workers) as ex:
        return list(ex.map(fn, items))



class RidgePath:
    """One training set's standardised gram, factorised once, ready to solve for any λ and target.

    On the CPU the factorisation is a tridiagonal reduction (``factor.Tridiagonal``: every λ is then an O(D)
    solve between two applications of Q), in float32 where ``factorisation_precision`` says so (nested CV needs
    17 per cell); answers stay float64 by mixed-precision iterative refinement: the float32 factorisation is
    only an approximate inverse of (G + λn) z = b, applied to a residual that is exact in float64 the first
    time (one float64 GEMM against the gram) and afterwards updated by the correction's own product in float32
    (the correction is ~1e-6 of z, so its float32 rounding is ~1e-12 of the residual's scale, and that rounding
    is added up as a bound and counted against the tolerance).  The whole λ path is refined together.  If
    refinement stalls (a gram too ill-conditioned for float32), the path refactorises in float64 and solves
    directly: slower, never less accurate.  ``device`` (e.g. cuda) factorises by eigendecomposition on that
    device (``factor.Eigen``); the products around it stay numpy.
    """

    # Normwise backward error accepted: the statistics are float32 products summed in float64, so the gram's own
    # entries carry ~1e-7 relative rounding; 1e-10 makes every answer the exact solve of a gram 1000x closer to the
    # given one than that.
    TOL = 1e-10
    MAX_STEPS = 8
    # A float32 GEMM's rounding, probabilistically √D·u relative to ‖G‖‖x‖, with a factor 10 of margin
    _UPDATE_ROUNDING = 10 * float(np.finfo(np.float32).eps) / 2

    def __init__(self, s: Stats, precision: str = "float32", device: str | None = None):
        self.n = s.n
        self.device = device
        self.mx, self.my = s.sx / s.n, s.sy / s.n
        gc = s.G - s.n * np.outer(self.mx, self.mx)
        bc = s.B - s.n * np.outer(self.mx, self.my)
        self.sd = np.sqrt(np.clip(np.diag(gc) / s.n, 0, None))
        self.sd[self.sd < 1e-8 * max(1.0, float(self.sd.max(initial=0.0)))] = np.inf  # constant features drop out
        inv = 1.0 / self.sd
        self.inv = inv
        self.Gz = gc * np.outer(inv, inv)
        self.Bz = bc * inv[:, None]
        self._g32 = None
        self._factorise(precision)

    def _factorise(self, precision: str) -> None:
        self.precision = precision
        dtype = np.float32 if precision == "float32" else np.float64
        on_device = self.device is not None and torch.device(self.device).type != "cpu"
        if on_device or len(self.Gz) < 2:
            self.factor = Eigen(self.Gz, dtype, self.device if on_device else None)
        else:
            self.factor = Tridiagonal(self.Gz, dtype)

    def coefs(self, lambdas, cols: slice | np.ndarray = slice(None)) -> np.ndarray:
        """(L, D, M): per λ, the standardised weights z solving (G + λn I) z = Bᵀ to float64 accuracy."""
        shifts = np.asarray(lambdas, dtype=np.float64) * self.n
        b = self.Bz[:, cols]
        (D, M), L = b.shape, len(shifts)
        f = self.factor
        try:
            z = f.solve(b, shifts).astype(np.float64)
        except Singular:  # an exactly singular shifted tridiagonal factor: not the ridge grid's positive shifts
            if self.precision == "float64":
                self.factor = Eigen(self.Gz, np.float64)
                return self.coefs(lambdas, cols)
            return self._exactly(lambdas, cols)
        if self.precision == "float64":
            return z.transpose(1, 0, 2)
        if self._g32 is None:
            self._g32 = self.Gz.astype(np.float32)
        bn, scale = np.linalg.norm(b), f.norm + shifts  # (L,)
        r, drift = None, np.zeros(L)
        for _ in range(self.MAX_STEPS):
            bound = scale * np.sqrt((z * z).sum((0, 2))) + bn  # the backward error's denominator per λ
            if r is None or np.any(drift > self.TOL / 4 * bound):
                # the exact residual: on the first step, and whenever the float32 updates' rounding bound grows
                r = b[:, None, :] - (self.Gz @ z.reshape(D, L * M)).reshape(D, L, M) - shifts[None, :, None] * z
                drift[:] = 0.0
            if np.all(np.sqrt((r * r).sum((0, 2))) + drift <= self.TOL * bound):  # backward error
                return z.transpose(1, 0, 2)
            try:
                dz = f.solve(r.astype(np.float32), shifts)
            except Singular:
                break
            z += dz
            r -= (self._g32 @ dz.reshape(D, L * M)).reshape(D, L, M) + shifts[None, :, None].astype(np.float32) * dz
            drift += self._UPDATE_ROUNDING * (np.sqrt(D) + 1) * scale * np.sqrt((dz.astype(np.float64) ** 2).sum((0, 2)))
        return self._exactly(lambdas, cols)  # refinement stalled: exact path

    def release(self) -> None:
        """Drop the D² arrays (gram, factorisation); ``raw`` still maps weights to feature space."""
        self.Gz = self.Bz = self.factor = self._g32 = None

    def _exactly(self, lambdas, cols) -> np.ndarray:
        """Refactorise in float64 and solve directly."""
        self._g32 = None
        self._factorise("float64")
        return self.coefs(lambdas, cols)

    def raw(self, z: np.ndarray, cols: slice | np.ndarray = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """(W, b) in (shifted) raw feature space from standardised weights ``z`` (D, M) or (L, D, M) of ``coefs``."""
        w = z * self.inv[:, None]
        return w, self.my[cols] - self.mx @ w

    def solve(self, lam: float, cols: slice | np.ndarray = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """(W, b) for the given relative λ and target columns, in (shifted) raw feature space."""
        return self.raw(self.coefs((lam,), cols)[0], cols)


def validation_sse(path: RidgePath, v: Stats, lambdas, cols: np.ndarray, A: np.ndarray | None = None,
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Σ‖y − xW(λ) − b(λ)‖² per (λ, target column) over a validation fold, from its statistics alone,
    and the same for the training mean (W = 0): the R² denominator.  ``A``: ``path.coefs(lambdas, cols)``
    if already computed (one training set validated on two folds solves once).  The quadratic term xᵀWᵀWx
    is Wᵀ G W over the whole λ path in one product.
    """
    A = path.coefs(lambdas, cols) if A is None else A  # (L, D, M) standardised weights
    L, D, M = A.shape
    W = A * path.inv[:, None]  # raw (shifted) weights per λ
    Wf = np.ascontiguousarray(W.transpose(1, 0, 2)).reshape(D, L * M)  # the λ path side by side: one GEMM
    quad = (Wf * (v.G @ Wf)).sum(0).reshape(L, M)
    my = path.my[cols]
    ss0 = v.yy[cols] - 2 * my * v.sy[cols] + v.n * my * my
    b = my[None] - path.mx @ W  # (L, M)
    xb = (W * v.B[:, cols][None]).sum(1)  # Σ xᵀw y per column
    out = v.yy[cols] - 2 * xb - 2 * b * v.sy[cols] + quad + 2 * b * (v.sx @ W) + v.n * b * b
    return out, ss0


@dataclass
class _Prefix:
    """What the online code needs from one prefix training set: W, b at every λ (prefix columns) and the
    squared error on the next block (which picks the following prefix's λ)."""

    W: np.ndarray  # (L, D, Mp)
    b: np.ndarray  # (L, Mp)
    sse_next: np.ndarray | None  # (L, Mp) on the block after the prefix


class NestedRidge:
    """Nested cross-validated ridge from per-fold statistics: no row is read twice to fit.

    Classification columns (``prior``) take their intercept from the whole selection's class proportions,
    not the training folds': a held-out fold lacks its own episodes' classes in training, and with few
    episodes that shift alone pushes predictions away from the test fold's classes (the known negative
    bias of cross-validation under the null: measured 0.08 accuracy for chance 0.25 at 4 episodes per
    task).  It is what exact stratification would give, and uses no feature of a test row.

    For outer fold k the training set is every other fold; λ is chosen by leave-one-fold-out among those
    (inner CV on the squared error, computed from statistics).  The inner training set "all but folds j
    and k" serves both outer fold k (validating on j) and outer fold j (validating on k), and is solved
    once for both, so K folds cost K(K−1)/2 + K factorisations, run ``workers`` at a time.
    ``final`` refits on every fold at the λ chosen by CV over all folds (the probe whose weights are saved).

    ``prefix`` (name -> columns) also prepares the online code's probes (``prefix_probes``): prefix i is
    trained on folds 0..i−1; the last two prefixes are the training sets of outer fold K−1 and of the inner
    pair (K−2, K−1), so they reuse those factorisations; only prefixes 1..K−3 cost their own.
    """

    def __init__(self, folds: list[Stats], groups: dict[str, np.ndarray], shift: np.ndarray, lambdas=LAMBDAS,
                 prior: np.ndarray | None = None, precision: str = "auto", prefix: dict[str, np.ndarray] | None = None,
                 device: str | None = None, workers: int | None = None):
        self.folds, self.groups, self.shift, self.lambdas = folds, groups, shift, tuple(lambdas)
        self.K = len(folds)
        self.device = device
        self.cols = np.concatenate(list(groups.values()))
        if precision == "auto":  # of the factorisations; answers are float64 either way (RidgePath)
            precision = factorisation_precision(len(shift), len(self.lambdas), len(self.cols), device)
        self.precision = precision
        self.workers = solver_workers(device) if workers is None else workers
        self.total = sum_stats(folds)
        self.prior = prior  # columns whose intercept is the whole selection's mean (class proportions)
        self.prefix = dict(prefix or {})
        self.pcols = np.concatenate(list(self.prefix.values())) if self.prefix else np.zeros(0, np.int64)
        self._pidx = np.array([np.flatnonzero(self.cols == c)[0] for c in self.pcols], dtype=np.int64)  # in cols
        self._prefixes: dict[int, _Prefix | None] = {}
        m = len(self.cols)
        self.inner = [[np.zeros((len(self.lambdas), m)), np.zeros(m)] for _ in range(self.K)]
        self._inner_done = False
        self.all_cv = [np.zeros((len(self.lambdas), m)), np.zeros(m)]
        self._outer: dict[int, dict[str, Fitted]] = {}
        self._final_path: RidgePath | None = None

    def _jobs(self, outer: list[int], final: bool) -> list:
        """The factorisations still to do for these outer folds (and the final fit), costliest first: the inner
        training sets (every pair of folds left out, validated twice), the outer folds (validated once), the
        online code's own prefixes (its columns only), the all-fold gram (no validation)."""
        K, inner = self.K, not self._inner_done
        jobs: list = [(j, k) for j in range(K) for k in range(j + 1, K)] if inner else []
        jobs += [("outer", k) for k in outer]
        if inner and self.prefix:
            jobs += [("prefix", i) for i in range(1, K - 2)]
        if final and self._final_path is None:
            jobs.append(("final", None))
        return jobs

    def _solve(self, jobs: list) -> None:
        """Run factorisation jobs ``workers`` at a time in one pool, in the order given (the costliest first, so
        the last round leaves no worker idle behind a long job), then take their results: inner ones before the
        outer folds' fits, which choose λ from them."""
        outs = parallel_map(self._job, jobs, self.workers)
        outer = []
        for job, out in zip(jobs, outs):
            if job[0] == "outer":
                outer.append((job[1], out))
            elif job[0] == "final":
                self._final_path = out
            elif job[0] == "prefix":
                self._prefixes[job[1]] = out
            else:
                sses, pre = out
                for o, (sse, ss0) in sses.items():
                    self.inner[o][0] += sse
                    self.inner[o][1] += ss0
                if job == (self.K - 2, self.K - 1) and self.prefix:
                    self._prefixes[self.K - 2] = pre
        if any(not isinstance(job[0], str) for job in jobs):  # the inner pairs, and with them the prefixes
            self._inner_done = True
        for k, out in outer:
            self._take(k, out)

    def _job(self, job):
        if job[0] == "outer":
            return self._outer_solve(job[1])
        if job[0] == "final":
            return self._path(self.total)
        return self._inner_job(job)

    def _path(self, s: Stats) -> RidgePath:
        return RidgePath(s, self.precision, self.device)

    def _prefix_of(self, path: RidgePath, A: np.ndarray, sse_next: np.ndarray | None) -> _Prefix:
        W, b = path.raw(A[:, :, self._pidx], self.pcols)
        return _Prefix(W, b, None if sse_next is None else sse_next[:, self._pidx])

    def _inner_job(self, job):
        if job[0] == "prefix":  # a prefix training set no nested fit shares: folds 0..i−1
            i = job[1]
            s = sum_stats(self.folds[:i])
            if s.n < 2:
                return None
            path = self._path(s)
            A = path.coefs(self.lambdas, self.pcols)
            W, b = path.raw(A, self.pcols)
            nxt = validation_sse(path, self.folds[i], self.lambdas, self.pcols, A)[0] if self.folds[i].n else None
            return _Prefix(W, b, nxt)
        j, k = job
        rest = self.total - self.folds[j] - self.folds[k]
        if rest.n < 2:
            return {}, None
        path = self._path(rest)
        A = path.coefs(self.lambdas, self.cols)
        sses = {outer: validation_sse(path, self.folds[val], self.lambdas, self.cols, A)
                for val, outer in ((j, k), (k, j)) if self.folds[val].n}
        pre = None
        if self.prefix and (j, k) == (self.K - 2, self.K - 1):  # = folds 0..K−3: prefix K−2, validated on K−2
            pre = self._prefix_of(path, A, sses[k][0] if k in sses else None)
        return sses, pre

    def _choose(self, sse: np.ndarray, ss0: np.ndarray) -> dict[str, tuple[float, float]]:
        """Per target group: (λ with the least summed squared error, inner R² at that λ)."""
        out, at = {}, 0
        for name, c in self.groups.items():
            e, e0 = sse[:, at:at + len(c)].sum(1), ss0[at:at + len(c)].sum()
            at += len(c)
            i = int(np.argmin(e))
            out[name] = (float(self.lambdas[i]), float(1 - e[i] / e0) if e0 > 0 else float("nan"))
        return out

    def _outer_solve(self, k: int):
        """Outer fold k's training set solved over the λ path and validated on fold k: what its fits need,
        with the factorisation released (the fits wait for the inner CV's choice of λ)."""
        path = self._path(self.total - self.folds[k])
        A = path.coefs(self.lambdas, self.cols)
        cv = validation_sse(path, self.folds[k], self.lambdas, self.cols, A) if self.folds[k].n else None
        pre = self._prefix_of(path, A, None) if self.prefix and k == self.K - 1 else None  # = folds 0..K−2
        path.release()
        return path, A, cv, pre

    def _outer_fits(self, k: int, path: "RidgePath", A: np.ndarray) -> dict[str, Fitted]:
        chosen = self._choose(*self.inner[k])
        fits, at = {}, 0
        for name, c in self.groups.items():
            lam, score = chosen[name]
            fits[name] = self._fitted(path.raw(A[self.lambdas.index(lam), :, at:at + len(c)], c), c, lam, score, path)
            at += len(c)
        return fits

    def outer(self, k: int) -> dict[str, Fitted]:
        """Outer fold k's probe per target group, λ chosen by the inner CV on its training folds."""
        if k not in self._outer:
            self._solve(self._jobs([k], final=False))
        return self._outer[k]

    def outers(self, final: bool = True) -> list[dict[str, Fitted]]:
        """Every outer fold's probes.  Every factorisation still to do (the inner training sets, the online
        code's prefixes, the outer folds and, with ``final``, the all-fold gram, whose λ is known only afterwards
        but whose factorisation is not needed to know it) runs in one pool, ``workers`` at a time."""
        todo = self._jobs([k for k in range(self.K) if k not in self._outer], final)
        if todo:
            self._solve(todo)
        return [self._outer[k] for k in range(self.K)]

    def _take(self, k: int, out) -> None:
        path, A, cv, pre = out
        self._outer[k] = self._outer_fits(k, path, A)
        if cv is not None:
            self.all_cv[0] += cv[0]
            self.all_cv[1] += cv[1]
        if k == self.K - 1 and self.prefix:
            self._prefixes[k] = pre

    def final(self) -> dict[str, Fitted]:
        """Every fold's rows, λ by CV over all folds (call after ``outer`` for every k)."""
        path = self._final_path or self._path(self.total)
        self._final_path = None  # D² arrays: held only until used
        chosen = self._choose(*self.all_cv)
        return {name: self._fitted(path.solve(chosen[name][0], c), c, *chosen[name], path)
                for name, c in self.groups.items()}

    def _fitted(self, wb: tuple[np.ndarray, np.ndarray], cols: np.ndarray, lam: float, score: float,
                path: RidgePath) -> Fitted:
        W, b = wb
        if self.prior is not None and np.isin(cols, self.prior).all():
            b = b + (self.total.sy / self.total.n - path.my)[cols]
        return Fitted(Linear(W, b, self.shift), lam, score)

    def prefix_probes(self, name: str) -> list[Linear | None]:
        """The online code's probes for prefix group ``name``: entry i is trained on folds 0..i−1 (entry 0 is
        None).  λ for prefix i ≥ 2 is the one with the least squared error on fold i−1 under prefix i−1 (past
        data only); prefix 1, or one whose predecessor is missing, uses λ = 1.  Call after ``outers``."""
        if self.K - 1 not in self._outer:
            self.outer(self.K - 1)
        at = 0
        for n, c in self.prefix.items():
            if n == name:
                sl = slice(at, at + len(c))
                break
            at += len(c)
        out: list[Linear | None] = [None]
        for i in range(1, self.K):
            prev, cur = self._prefixes.get(i - 1), self._prefixes.get(i)
            lam = 1.0
            if prev is not None and prev.sse_next is not None:
                lam = self.lambdas[int(np.argmin(prev.sse_next[:, sl].sum(1)))]
            if cur is None:
                out.append(None)
                continue
            li = self.lambdas.index(lam) if lam in self.lambdas else None
            if li is None:  # λ = 1 outside the grid: a plain solve on the prefix statistics
                path = self._path(sum_stats(self.folds[:i]))
                out.append(Linear(*path.solve(lam, self.prefix[name]), self.shift))
            else:
                out.append(Linear(cur.W[li][:, sl], cur.b[li][sl], self.shift))
        return out


# ----------------------------------------------------------------------------- logistic


def _standardise(x_train: np.ndarray):
    mu = x_train.mean(0)
    sd = x_train.std(0)
    sd[sd < 1e-8] = np.inf
    return mu, sd


def fit_logistic(x: np.ndarray, y: np.ndarray, n_classes: int, l2: float, w0: np.ndarray | None = None,
                 max_iter: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression on standardised x: mean cross-entropy + l2/2‖W‖², torch L-BFGS.

    Full-batch L-BFGS with strong-Wolfe line search converges in tens of iterations on probe-sized data and
    is deterministic; ``w0`` warm-starts it (from ridge, or from the previous point on the l2 path).
    Returns (W, b) for standardised features.
    """
    torch.manual_seed(seed)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).double()
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    d = x.shape[1]
    W = torch.zeros(d, n_classes, dtype=torch.float64) if w0 is None else torch.tensor(w0[:d], dtype=torch.float64)
    b = torch.zeros(n_classes, dtype=torch.float64) if w0 is None else torch.tensor(w0[d], dtype=torch.float64)
    W.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-6,
                            tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ W + b, yt) + 0.5 * l2 * (W * W).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach().numpy(), b.detach().numpy()


def _raw(w: np.ndarray, mu: np.ndarray, sd: np.ndarray) -> Linear:
    """(D+1, M) weights on standardised features -> a Linear on raw features."""
    W = w[:-1] / sd[:, None]
    return Linear(W, w[-1] - (mu / sd) @ w[:-1], np.zeros_like(mu))


def logistic_probe(x_train, y_train, groups, n_classes: int, l2_grid=(1e-4, 1e-3, 1e-2, 1e-1), seed: int = 0,
                   l2: float | None = None) -> Fitted:
    """Choose l2 by grouped CV over ``groups`` (inner folds; warm-started from strong to weak), then refit.

    The inner score is the inner-CV accuracy at the chosen l2.  A given ``l2`` skips the search.
    """
    mu, sd = _standardise(x_train)
    z = (x_train - mu) / sd
    score = float("nan")
    if l2 is None:
        hits = np.zeros(len(l2_grid))
        for g in np.unique(groups):
            tr, va = groups != g, groups == g
            w0 = None
            for l2_ in sorted(l2_grid, reverse=True):
                W, b = fit_logistic(z[tr], y_train[tr], n_classes, l2_, w0, max_iter=100, seed=seed)
                w0 = np.vstack([W, b])
                hits[l2_grid.index(l2_)] += ((z[va] @ W + b).argmax(1) == y_train[va]).sum()
        i = int(np.argmax(hits))
        l2, score = float(l2_grid[i]), float(hits[i] / len(y_train))
    W, b = fit_logistic(z, y_train, n_classes, l2, seed=seed)
    return Fitted(_raw(np.vstack([W, b]), mu, sd), l2, score)


# ----------------------------------------------------------------------------- cosine-loss probe


@dataclass
class CosineOptions:
    """The seed's training flags for its cosine-similarity linear probe."""

    lr: float = 1e-3
    epochs: int = 100
    batch_size: int = 256
    patience: int = 10  # epochs without validation improvement before stopping


def cosine_probe(x_train, y_train, groups, opts: CosineOptions, seed: int = 0) -> Fitted:
    """Linear map trained with 1 − cos(pred, target) by Adam; early stopping on one inner fold of episodes.

    The inner score is the best validation cosine; no λ is involved.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mu, sd = _standardise(x_train)
    z = torch.from_numpy(((x_train - mu) / sd).astype(np.float32))
    y = torch.from_numpy(np.asarray(y_train, dtype=np.float32))
    val_group = np.unique(groups)[0]
    va = torch.from_numpy(groups == val_group) if len(np.unique(groups)) > 1 else torch.zeros(len(z), dtype=bool)
    tr_idx = torch.nonzero(~va).flatten()
    model = torch.nn.Linear(z.shape[1], y.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=opts.lr)
    best, best_state, bad, epochs = -np.inf, None, 0, 0
    for epoch in range(opts.epochs):
        epochs = epoch + 1
        perm = tr_idx[torch.randperm(len(tr_idx), generator=gen)]
        for i in range(0, len(perm), opts.batch_size):
            idx = perm[i:i + opts.batch_size]
            loss = 1 - torch.nn.functional.cosine_similarity(model(z[idx]), y[idx]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        if va.any():
            with torch.no_grad():
                score = torch.nn.functional.cosine_similarity(model(z[va]), y[va]).mean().item()
            if score > best + 1e-5:
                best, bad = score, 0
                best_state = {k: v.clone() for k, v in model.state_dict().items()}
            else:
                bad += 1
                if bad >= opts.patience:
                    break
    if best_state is not None:
        model.load_state_dict(best_state)
    with torch.no_grad():
        w = np.vstack([model.weight.numpy().T, model.bias.numpy()[None]]).astype(np.float64)
    return Fitted(_raw(w, mu.astype(np.float64), sd.astype(np.float64)), None, float(best), epochs)
