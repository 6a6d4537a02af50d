"""Probe solvers: closed-form ridge over a λ path, multinomial logistic (L-BFGS), cosine-loss linear probe.

Ridge is the default because it needs only the streamed statistics: one eigendecomposition of the
standardised training gram gives W(λ) = V diag(1/(s+λn)) VᵀXᵀY for every λ and every target at once.
λ is relative to the mean eigenvalue of the standardised gram (which is n), so one grid means the same
thing at every layer whatever its activation scale.  Features are standardised with training statistics
only (the z-score comes from the diagonal of the centred training gram, no second pass).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from toolkit.probe.stats import Stats

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


class RidgePath:
    """The eigendecomposition of one training set's standardised gram, ready to solve for any λ and target."""

    def __init__(self, s: Stats):
        self.n = s.n
        self.mx, self.my = s.sx / s.n, s.sy / s.n
        gc = s.G - s.n * np.outer(self.mx, self.mx)
        bc = s.B - s.n * np.outer(self.mx, self.my)
        self.sd = np.sqrt(np.clip(np.diag(gc) / s.n, 0, None))
        self.sd[self.sd < 1e-8 * max(1.0, float(self.sd.max(initial=0.0)))] = np.inf  # constant features drop out
        inv = 1.0 / self.sd
        self.evals, self.V = np.linalg.eigh(gc * np.outer(inv, inv))
        self.VtB = self.V.T @ (bc * inv[:, None])
        self.inv = inv

    def solve(self, lam: float, cols: slice | np.ndarray = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """(W, b) for the given relative λ and target columns, in (shifted) raw feature space."""
        wz = self.V @ (self.VtB[:, cols] / (self.evals[:, None] + lam * self.n))
        w = wz * self.inv[:, None]
        return w, self.my[cols] - self.mx @ w


def validation_sse(path: RidgePath, v: Stats, lambdas, cols: np.ndarray) -> np.ndarray:
    """Σ‖y − xW(λ) − b(λ)‖² per (λ, target column) over a validation fold, from its statistics alone.

    Everything is projected into the training eigenbasis once per fold, so each λ costs one D×D×M product.
    """
    vi = path.V * path.inv[:, None]  # rows of V scaled: W = vi @ A
    C = vi.T @ v.B[:, cols]  # (D, M)
    H = vi.T @ v.G @ vi  # (D, D)
    u, s = vi.T @ path.mx, vi.T @ v.sx
    out = np.empty((len(lambdas), len(cols)))
    for i, lam in enumerate(lambdas):
        A = path.VtB[:, cols] / (path.evals[:, None] + lam * path.n)
        b = path.my[cols] - u @ A
        out[i] = (v.yy[cols] - 2 * (A * C).sum(0) - 2 * b * v.sy[cols] + (A * (H @ A)).sum(0)
                  + 2 * b * (s @ A) + v.n * b * b)
    return out


def choose_lambda(folds: list[Stats], targets: dict[str, slice], lambdas=LAMBDAS) -> tuple[dict[str, float], dict]:
    """λ per target by grouped K-fold CV on the training folds (held-out squared error from the statistics).

    Squared error is what ridge minimises and, unlike accuracy, is computable without re-reading rows.
    """
    total = folds[0]
    for f in folds[1:]:
        total = total + f
    cols = np.concatenate([np.arange(total.B.shape[1])[c] for c in targets.values()])
    sse = np.zeros((len(lambdas), len(cols)))
    for v in folds:
        if v.n == 0 or total.n - v.n < 2:
            continue
        sse += validation_sse(RidgePath(total - v), v, lambdas, cols)
    chosen, curves, at = {}, {}, 0
    for name, c in targets.items():
        k = len(np.arange(total.B.shape[1])[c])
        e = sse[:, at:at + k].sum(1)
        at += k
        chosen[name] = float(lambdas[int(np.argmin(e))])
        curves[name] = e.tolist()
    return chosen, curves


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


def logistic_probe(x_train, y_train, groups, x_test, n_classes: int, l2_grid=(1e-4, 1e-3, 1e-2, 1e-1),
                   seed: int = 0) -> tuple[np.ndarray, float, np.ndarray]:
    """Choose l2 by grouped CV (warm-started from strong to weak), refit, predict the test rows' classes.

    Returns (predicted classes, chosen l2, (D+1, K) weights in standardised space).
    """
    mu, sd = _standardise(x_train)
    z = (x_train - mu) / sd
    zt = (x_test - mu) / sd
    acc = np.zeros(len(l2_grid))
    for g in np.unique(groups):
        tr, va = groups != g, groups == g
        w0 = None
        for i, l2 in enumerate(sorted(l2_grid, reverse=True)):
            W, b = fit_logistic(z[tr], y_train[tr], n_classes, l2, w0, max_iter=100, seed=seed)
            w0 = np.vstack([W, b])
            acc[l2_grid.index(l2)] += ((z[va] @ W + b).argmax(1) == y_train[va]).sum()
    best = float(l2_grid[int(np.argmax(acc))])
    W, b = fit_logistic(z, y_train, n_classes, best, seed=seed)
    return (zt @ W + b).argmax(1), best, np.vstack([W, b])


# ----------------------------------------------------------------------------- cosine-loss probe


@dataclass
class CosineOptions:
    """The seed's training flags for its cosine-similarity linear probe."""

    lr: float = 1e-3
    epochs: int = 100
    batch_size: int = 256
    patience: int = 10  # epochs without validation improvement before stopping


def cosine_probe(x_train, y_train, groups, x_test, opts: CosineOptions, seed: int = 0):
    """Linear map trained with 1 − cos(pred, target) by Adam; early stopping on one held-out fold of episodes.

    Returns (test predictions, epochs run, (D+1, E) weights on standardised features).
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mu, sd = _standardise(x_train)
    z = torch.from_numpy(((x_train - mu) / sd).astype(np.float32))
    zt = torch.from_numpy(((x_test - mu) / sd).astype(np.float32))
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
        pred = model(zt).numpy()
        w = np.vstack([model.weight.numpy().T, model.bias.numpy()[None]])
    return pred, epochs, w
