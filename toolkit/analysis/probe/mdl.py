"""Minimum description length by online (prequential) coding, Voita & Titov 2020, over episode blocks.

The labels are transmitted block by block; the first block with the uniform code, every later block with
a probe trained on the blocks before it.  The total code length in bits measures how well *and how
easily* (with how little data) the representation gives the labels, which accuracy alone does not.
Compression = uniform code length / online code length (1 = nothing learned).

The blocks are the outer cross-validation folds in order (whole episodes, so no block shares an episode
with another), which makes every prefix probe a sum of fold statistics: K − 1 prefix probes, of which the last
two reuse nested-CV training sets, so K − 3 extra factorisations.
Each prefix probe is ridge at a λ chosen on the past only (the squared error of the previous block under
the previous prefix probe; λ = 1 for the first).  Its scores become probabilities softmax(β·scores), with
β chosen on the past only as well: the β that best codes every earlier block under the probe that coded it
(β = 1 for block 1, which has no coded predecessor; β = 0 is the uniform code, so a probe that learned
nothing costs about the uniform code).  Every choice uses only already transmitted labels, so it is a
valid code.  (Choosing β on a probe's own training rows made null probes 5× longer than uniform; on the previous
block alone, up to 2.5× longer.)

**Interval** (``online_code``'s ``*_ci_low``/``*_ci_high``): a bootstrap over episodes *within the blocks*,
given the fitted code (the prefix probes and each block's β).  Given the code, the online code length is a
sum over blocks of per-episode code lengths, and the blocks differ by design: block 0 costs the uniform code,
block 1 is coded by a probe trained on one block, the last by one trained on K − 1.  The block sizes are part
of the procedure, like strata, so each draw resamples every block's episodes with replacement inside that
block and keeps its size.  Pooling per-episode contributions across blocks instead would let a draw hold more
uniform-coded (block-0) episodes than the code has, and turn the blocks' different costs into spurious
variance.  Each block's bootstrap deviations are scaled by √(n/(n − 1)) for its n episodes (Rao & Wu's
rescaling), so the bootstrap variance of a block's total is unbiased even at 3 episodes per block.  The
per-episode bits are computed once: a draw is one weighted sum per block, nothing is refitted (2000 draws,
milliseconds per cell).  The interval is the percentile interval of the code length, and of the compression =
uniform / online with the uniform code N·log2(C) of the same draw (N rows, C classes).

What it describes: the code length these prefix probes, at these β, give the labels of other episodes drawn
like these (tasks as often as in the selection; stratified folds fix each block's task make-up, so at a few
episodes per task and block the interval is somewhat wider than that design needs), with the same block sizes.
That is the right reference for "does the representation compress the labels better than the uniform code":
under a null (labels independent of the activations, balanced classes) no fitted code beats the uniform code
in expectation on fresh episodes, so a lower end above 1 is evidence against the null (none of 240 null probes
had one in ``benchmarks/bench_calibration.py``'s ``mdl_calibration``; with unbalanced classes the class
frequencies alone beat the uniform code, so there a lower end above 1 may show no more than those).  It does not include how much the prefix
probes (and the β chosen on the past) would change with other training episodes; only a refit per draw could
add that, and re-choosing β per draw without refitting tripled the interval's width at 4 episodes per task
(over-covering).  ``mdl_calibration`` measured, over 300 simulated data sets per world (4 tasks, 8 steps per
episode, 16 features): coverage of the conditional code length 94–97 % on null worlds and 93–95 % with a
planted signal (4 and 16 episodes per task); of the mean code length over fresh data sets, which the interval
does not claim, 96–99 % on null worlds but 84 % and 69 % with a signal, where the prefix probes' own
variability is as large as the coded episodes'.  So two stores' or layers' intervals understate the
uncertainty of their difference.  Units are episodes; under the ``steps`` split an episode's rows in
different blocks count as separate units.
"""

from __future__ import annotations

import numpy as np
from scipy.special import log_softmax

BETAS = (0.0, 0.03, 0.1, 0.3, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)  # β = 0 is the uniform code


def code_bits(scores: np.ndarray, labels: np.ndarray, beta: float) -> float:
    """Bits to transmit ``labels`` with probabilities softmax(β·scores)."""
    if not len(labels):
        return 0.0
    lp = log_softmax(beta * scores.astype(np.float64), axis=1)
    return float(-lp[np.arange(len(labels)), labels].sum() / np.log(2))


def best_beta(scores: np.ndarray, labels: np.ndarray) -> float:
    return min(BETAS, key=lambda b: code_bits(scores, labels, b)) if len(labels) else 1.0


N_DRAWS = 2000  # bootstrap draws of the code-length interval (vectorised; a few ms per cell)
LEVEL = 0.95
# the MDL columns of a row without a code (not a classification target, --no-mdl, or a solver other than ridge)
NO_CODE = {"mdl_bits": float("nan"), "mdl_bits_ci_low": float("nan"), "mdl_bits_ci_high": float("nan"),
           "uniform_bits": float("nan"), "compression": float("nan"), "compression_ci_low": float("nan"),
           "compression_ci_high": float("nan"), "mdl_draws": 0, "mdl_betas": ""}


def online_code(fold: np.ndarray, labels: np.ndarray, n_classes: int, held_out: np.ndarray,
                episode: np.ndarray | None = None, n_draws: int = N_DRAWS, seed: int = 0,
                level: float = LEVEL) -> dict[str, float]:
    """Online code length from per-row scores, with a bootstrap interval over episodes (module docstring).

    ``held_out[i]`` are row i's scores under the probe trained on the blocks before its own (rows of block 0,
    sent with the uniform code, are unused); ``episode`` (per row) gives the bootstrap's units (without it,
    every row is its own unit); ``n_draws = 0`` skips the interval.
    """
    labels = np.asarray(labels, np.int64)
    n = len(labels)
    if n == 0:
        return dict(NO_CODE)
    fold = np.asarray(fold, np.int64)
    units, unit = np.unique(np.stack([fold, np.arange(n) if episode is None else np.asarray(episode, np.int64)], 1),
                            axis=0, return_inverse=True)
    unit = unit.ravel()
    block = units[:, 0]
    K = int(block.max()) + 1
    per_row = np.full((n, len(BETAS)), np.log2(n_classes))  # block 0 and missing prefix probes: the uniform code
    coded = fold >= 1
    if coded.any():
        s, y = held_out[coded].astype(np.float64), labels[coded]
        per_row[coded] = np.stack([-log_softmax(b * s, axis=1)[np.arange(len(y)), y] for b in BETAS], 1) / np.log(2)
    bits_u = np.zeros((len(units), len(BETAS)))  # per unit (block, episode): its bits at every β
    np.add.at(bits_u, unit, per_row)
    rows_u = np.bincount(unit, minlength=len(units)).astype(np.float64)
    point, choice = _code_length(np.stack([bits_u[block == i].sum(0) for i in range(K)])[None],
                                 np.array([[rows_u[block == i].sum() for i in range(K)]]))
    point_bits, choice = point[0], choice[0]
    uniform = n * np.log2(n_classes)
    out = {"mdl_bits": float(point_bits), "uniform_bits": float(uniform),
           "compression": float(uniform / point_bits) if point_bits else float("nan")}
    lo_hi = {k: (float("nan"), float("nan")) for k in ("mdl_bits", "compression")}
    if n_draws > 0:
        rng = np.random.default_rng(seed)
        coded_u = bits_u[np.arange(len(units)), choice[block]]  # each unit's bits at its block's β
        bits, rows = np.zeros(n_draws), np.zeros(n_draws)
        for i in range(K):
            m = block == i
            k = int(m.sum())
            if k == 0:
                continue
            w = rng.multinomial(k, np.full(k, 1.0 / k), size=n_draws).astype(np.float64)  # episode counts
            scale = np.sqrt(k / (k - 1)) if k > 1 else 0.0  # Rao & Wu: an unbiased variance of the block total
            b0, r0 = coded_u[m].sum(), rows_u[m].sum()
            bits += np.maximum(b0 + scale * (w @ coded_u[m] - b0), 0.0)
            rows += np.maximum(r0 + scale * (w @ rows_u[m] - r0), 0.0)
        comp = rows * np.log2(n_classes) / np.where(bits > 0, bits, np.nan)
        q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
        lo_hi = {"mdl_bits": tuple(np.percentile(bits, q)), "compression": tuple(np.nanpercentile(comp, q))}
    for key, (lo, hi) in lo_hi.items():
        out[f"{key}_ci_low"], out[f"{key}_ci_high"] = float(lo), float(hi)
    out["mdl_draws"] = int(n_draws)
    out["mdl_betas"] = ",".join(f"{BETAS[c]:g}" for c in choice[1:])  # the softmax β of blocks 1..K−1
    return out


def _code_length(T: np.ndarray, R: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Online code lengths and the β index of every block, from per-block bits at every β (``T``: draws ×
    blocks × β) and per-block rows (``R``: draws × blocks): block 0 with the uniform code, block 1 at β = 1,
    block i ≥ 2 at the β that best codes blocks 1..i−1 (β = 1 while they hold no row)."""
    draws, K, _ = T.shape
    one = BETAS.index(1.0)
    bits = T[:, 0, 0].copy()
    choice = np.zeros((draws, K), np.int64)  # block 0: β = 0, the uniform code
    past, past_rows = np.zeros((draws, len(BETAS))), np.zeros(draws)
    for i in range(1, K):
        choice[:, i] = np.where(past_rows > 0, past.argmin(1), one) if i > 1 else one
        bits += T[np.arange(draws), i, choice[:, i]]
        past += T[:, i]
        past_rows += R[:, i]
    return bits, choice
