"""Streaming statistics of stored activations, and the comparison of two stores (the seeds' context-vector
validation: shape, value range, dead/constant/outlier neurons, KL divergence and Wasserstein distance).

Everything streams over the store's chunks (``N samples x 1 layer``), so memory stays flat however many
samples a store holds: one chunk plus O(features x bins) accumulators.

Method:

* A *row* is one stored vector: a (sample[, denoise], token) position of one layer; features are the last axis.
* Mean/variance per feature: Welford within a chunk (numpy, float64) merged across chunks with Chan et al.'s
  parallel update; global mean/std pool all rows x features exactly from the per-feature moments.
* min/max per feature; ``dead`` = every value |x| <= ``dead_eps``; ``constant`` = max - min <= ``const_eps``
  (and not dead); ``outliers`` = live features whose max |x|, std or |mean| lies more than ``outlier_z`` robust
  standard deviations (median/MAD over the live features) above the median.
* KL divergence: a second pass fills histograms with fixed bins over the union range of both stores (per
  feature, and pooled over all features for the global value); probabilities get a floor of ``KL_EPS`` and are
  renormalised, then ``KL(P||Q) = sum p log(p/q)`` in nats (what ``scipy.stats.entropy(p, q)`` gives on the same
  histograms).
* Wasserstein-1: exact for the two histograms, ``sum |CDF_P - CDF_Q| * bin_width``; it differs from the
  distance between the raw samples (``scipy.stats.wasserstein_distance``) by at most one bin width.  With
  ``exact_samples=N`` the per-feature distance is also computed with scipy on a seeded subsample of N rows
  of each store (``wasserstein_sampled``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from toolkit.analysis.moments import DEFAULT_BINS, Histograms, RunningMoments
from toolkit.sdk.errors import ToolkitError
from toolkit.sdk.names import store_layers, store_site_stream
from toolkit.store.codecs import decode
from toolkit.store.reader import Store

KL_EPS = 1e-10


# --------------------------------------------------------------------------- reading


def iter_rows(store: Store, site: str, stream: str, layer: int, block: int | None = None) -> Iterator[np.ndarray]:
    """(rows, features) float64 blocks of one layer, one chunk of samples at a time."""
    arr = store.array(site, stream)
    li = store.layers(site).index(layer)
    n = store.n_samples
    step = block or int(arr.chunks[0])
    stored = arr.attrs.get("stored_dtype")
    for a in range(0, n, step):
        x = decode(arr[a:min(n, a + step), li], stored)
        yield np.asarray(x, dtype=np.float64).reshape(-1, x.shape[-1])


def _probs(counts: np.ndarray) -> np.ndarray:
    p = counts.astype(np.float64)
    p = p / np.maximum(p.sum(-1, keepdims=True), 1)
    p = np.maximum(p, KL_EPS)
    return p / p.sum(-1, keepdims=True)


def kl_divergence(p_counts: np.ndarray, q_counts: np.ndarray) -> np.ndarray:
    """KL(P||Q) in nats along the last axis of two histograms with the same bins (floored at KL_EPS)."""
    p, q = _probs(p_counts), _probs(q_counts)
    return (p * np.log(p / q)).sum(-1)


def wasserstein_hist(p_counts: np.ndarray, q_counts: np.ndarray, width: np.ndarray | float) -> np.ndarray:
    """Exact Wasserstein-1 between two histograms on the same bins: sum |CDF_P - CDF_Q| * bin width."""
    p = p_counts / np.maximum(p_counts.sum(-1, keepdims=True), 1)
    q = q_counts / np.maximum(q_counts.sum(-1, keepdims=True), 1)
    return np.abs(np.cumsum(p - q, -1)).sum(-1) * np.asarray(width)


def _robust_z(v: np.ndarray) -> np.ndarray:
    med = np.median(v)
    mad = np.median(np.abs(v - med)) * 1.4826
    if mad <= 0:
        mad = np.std(v) or 1.0
    return (v - med) / mad


# --------------------------------------------------------------------------- statistics


@dataclass
class LayerStats:
    layer: int
    shape: tuple[int, ...]
    n_rows: int
    moments: RunningMoments
    dead: list[int]
    constant: list[int]
    outliers: list[dict[str, Any]]

    def summary(self, per_feature: bool = False) -> dict[str, Any]:
        m = self.moments
        gmean, gstd = m.global_moments()
        out: dict[str, Any] = {
            "layer": self.layer, "shape": list(self.shape), "n_rows": self.n_rows, "n_features": len(m.mean),
            "global": {"mean": gmean, "std": gstd, "min": float(m.min.min()), "max": float(m.max.max())},
            "per_feature": {name: _quantiles(v) for name, v in
                            (("mean", m.mean), ("std", m.std), ("min", m.min), ("max", m.max))},
            "n_dead": len(self.dead), "dead": self.dead, "n_constant": len(self.constant), "constant": self.constant,
            "n_nonfinite": int(m.nonfinite.sum()), "outliers": self.outliers,
        }
        if per_feature:
            out["features"] = {"mean": m.mean.tolist(), "std": m.std.tolist(), "min": m.min.tolist(),
                               "max": m.max.tolist()}
        return out


def _quantiles(v: np.ndarray) -> dict[str, float]:
    q = np.quantile(v, [0.0, 0.05, 0.5, 0.95, 1.0])
    return {"min": float(q[0]), "p5": float(q[1]), "median": float(q[2]), "p95": float(q[3]), "max": float(q[4]),
            "mean": float(v.mean())}


def layer_stats(store: Store, site: str, stream: str, layer: int, dead_eps: float = 1e-6,
                const_eps: float = 1e-8, outlier_z: float = 6.0, block: int | None = None,
                scheduler: str | None = None) -> LayerStats:
    """``scheduler``: accumulate the moments as Dask tasks, one per chunk (``toolkit.analysis.parallel``)."""
    arr = store.array(site, stream)
    if store.n_samples == 0:
        raise ToolkitError(f"{store.path} holds no committed samples")
    if scheduler:
        from toolkit.analysis.parallel import layer_moments

        m = layer_moments(store, site, stream, layer, dead_eps, scheduler, block)
    else:
        m = RunningMoments(int(arr.shape[-1]), dead_eps)
        for x in iter_rows(store, site, stream, layer, block):
            m.update(x)
    dead = np.flatnonzero(m.near_zero == m.n)
    constant = np.flatnonzero((m.max - m.min <= const_eps) & (m.near_zero < m.n))
    outliers = []
    live = np.setdiff1d(np.arange(len(m.mean)), np.concatenate([dead, constant]))
    if len(live) > 2:  # features far above the others (dead and constant ones are reported apart)
        for name, v in (("max_abs", np.maximum(np.abs(m.min), np.abs(m.max))), ("std", m.std),
                        ("abs_mean", np.abs(m.mean))):
            z = np.full(len(v), -np.inf)
            z[live] = _robust_z(v[live])
            hits = np.flatnonzero(z > outlier_z)
            for f in hits[np.argsort(-z[hits])][:20]:
                outliers.append({"feature": int(f), "by": name, "value": float(v[f]),
                                 "robust_z": round(float(z[f]), 2)})
    shape = (store.n_samples, *arr.shape[2:])
    return LayerStats(layer, shape, m.n, m, dead.tolist(), constant.tolist(), outliers)


def store_stats(store: Store | str, site: str | None = None, stream: str | None = None, layers: Any = None,
                progress: bool | None = False, **kw: Any) -> dict[str, Any]:
    """Statistics of every selected layer of one site/stream; a JSON-able dict (``layers`` maps layer -> stats).
    ``progress``: a bar per layer on stderr (None: only on a terminal)."""
    from toolkit.store.reader import open_store

    s = open_store(store) if not isinstance(store, Store) else store
    site, stream = store_site_stream(s, site, stream)
    arr = s.array(site, stream)
    out = {"store": str(s.path), "site": site, "stream": stream,
           "dims": list(arr.metadata.dimension_names), "shape": [s.n_samples, *arr.shape[1:]],
           "dtype": arr.attrs.get("stored_dtype") or str(arr.dtype), "n_samples": s.n_samples,
           "model": (s.attrs.get("model") or {}).get("name"), "layers": {}}
    per_feature = kw.pop("per_feature", False)
    for layer in _progress(store_layers(s, site, layers), progress, "stats"):
        out["layers"][str(layer)] = layer_stats(s, site, stream, layer, **kw).summary(per_feature)
    return out


def _progress(layers: list[int], enabled: bool | None, desc: str):
    """A bar over the layers (with a total, so an ETA) on stderr; ``enabled=None``: only on a terminal."""
    if enabled is False:
        return layers
    from tqdm.auto import tqdm

    return tqdm(layers, desc=desc, unit="layer", disable=None if enabled is None else not enabled,
                dynamic_ncols=True)


# --------------------------------------------------------------------------- comparison


def compare_layer(a: Store, b: Store, site: str, stream: str, layer: int, bins: int = DEFAULT_BINS,
                  exact_samples: int = 0, seed: int = 0, top: int = 20, dead_eps: float = 1e-6,
                  block: int | None = None, scheduler: str | None = None) -> dict[str, Any]:
    """Two passes per store: moments (and ranges), then histograms over the union range (``scheduler``: both
    passes as Dask tasks, one per chunk)."""
    fa, fb = a.array(site, stream).shape[-1], b.array(site, stream).shape[-1]
    if fa != fb:
        raise ToolkitError(f"cannot compare {site}/{stream}: {a.path} has {fa} features, {b.path} has {fb}")
    sa = layer_stats(a, site, stream, layer, dead_eps=dead_eps, block=block, scheduler=scheduler)
    sb = layer_stats(b, site, stream, layer, dead_eps=dead_eps, block=block, scheduler=scheduler)
    ma, mb = sa.moments, sb.moments
    lo, hi = np.minimum(ma.min, mb.min), np.maximum(ma.max, mb.max)
    if scheduler:
        from toolkit.analysis.parallel import layer_histograms

        ha = layer_histograms(a, site, stream, layer, lo, hi, bins, scheduler, block)
        hb = layer_histograms(b, site, stream, layer, lo, hi, bins, scheduler, block)
    else:
        ha, hb = Histograms(lo, hi, bins), Histograms(lo, hi, bins)
        for x in iter_rows(a, site, stream, layer, block):
            ha.update(x)
        for x in iter_rows(b, site, stream, layer, block):
            hb.update(x)
    kl_ab = kl_divergence(ha.counts, hb.counts)
    kl_ba = kl_divergence(hb.counts, ha.counts)
    w1 = wasserstein_hist(ha.counts, hb.counts, ha.width)
    dmean, dstd = mb.mean - ma.mean, mb.std - ma.std
    dmax = mb.max - ma.max
    corr = float(np.corrcoef(ma.mean, mb.mean)[0, 1]) if ma.mean.std() > 0 and mb.mean.std() > 0 else float("nan")
    corr_std = float(np.corrcoef(ma.std, mb.std)[0, 1]) if ma.std.std() > 0 and mb.std.std() > 0 else float("nan")
    dead_a, dead_b = set(sa.dead), set(sb.dead)
    union = dead_a | dead_b
    order = np.argsort(-w1)[:top]
    ga, gb = ma.global_moments(), mb.global_moments()
    out: dict[str, Any] = {
        "layer": layer, "n_rows": {"a": sa.n_rows, "b": sb.n_rows}, "n_features": int(fa), "bins": bins,
        "global": {
            "a": {"mean": ga[0], "std": ga[1], "min": float(ma.min.min()), "max": float(ma.max.max())},
            "b": {"mean": gb[0], "std": gb[1], "min": float(mb.min.min()), "max": float(mb.max.max())},
            "kl_ab": float(kl_divergence(ha.gcounts, hb.gcounts)), "kl_ba": float(kl_divergence(hb.gcounts, ha.gcounts)),
            "wasserstein": float(wasserstein_hist(ha.gcounts, hb.gcounts, ha.gwidth)),
            "max_shift": float(mb.max.max() - ma.max.max()), "min_shift": float(mb.min.min() - ma.min.min()),
        },
        "per_feature": {
            "kl_ab": _quantiles(kl_ab), "kl_ba": _quantiles(kl_ba), "wasserstein": _quantiles(w1),
            "mean_diff": _quantiles(dmean), "abs_mean_diff": _quantiles(np.abs(dmean)), "std_diff": _quantiles(dstd),
            "max_shift": _quantiles(dmax),
        },
        "correlation_of_means": corr, "correlation_of_stds": corr_std,
        "dead": {"a": len(dead_a), "b": len(dead_b), "both": len(dead_a & dead_b),
                 "jaccard": len(dead_a & dead_b) / len(union) if union else 1.0,
                 "only_a": sorted(dead_a - dead_b)[:50], "only_b": sorted(dead_b - dead_a)[:50]},
        "top_shifted": [{"feature": int(f), "wasserstein": float(w1[f]), "kl_ab": float(kl_ab[f]),
                         "mean_a": float(ma.mean[f]), "mean_b": float(mb.mean[f]), "std_a": float(ma.std[f]),
                         "std_b": float(mb.std[f]), "max_a": float(ma.max[f]), "max_b": float(mb.max[f])}
                        for f in order],
        "_arrays": {"mean_a": ma.mean, "mean_b": mb.mean, "w1": w1, "kl_ab": kl_ab, "hist_a": ha.gcounts,
                    "hist_b": hb.gcounts, "edges": ha.edges(), "feature_hist_a": ha.counts[order[:4]],
                    "feature_hist_b": hb.counts[order[:4]], "feature_edges": [ha.edges(int(f)) for f in order[:4]],
                    "top": order[:4]},
    }
    if exact_samples:
        from scipy.stats import wasserstein_distance

        xa = reservoir(a, site, stream, layer, exact_samples, seed, block)
        xb = reservoir(b, site, stream, layer, exact_samples, seed + 1, block)
        ws = np.array([wasserstein_distance(xa[:, f], xb[:, f]) for f in range(fa)])
        out["per_feature"]["wasserstein_sampled"] = _quantiles(ws)
        out["wasserstein_sampled_rows"] = {"a": len(xa), "b": len(xb)}
    return out


def reservoir(store: Store, site: str, stream: str, layer: int, k: int, seed: int = 0,
              block: int | None = None) -> np.ndarray:
    """A seeded uniform sample of ``k`` rows without replacement, streamed one block at a time: every row
    draws a uniform key and the ``k`` smallest keys survive (numpy's argpartition per block)."""
    rng = np.random.default_rng(seed)
    keep: np.ndarray | None = None
    keys = np.empty(0)
    for x in iter_rows(store, site, stream, layer, block):
        rows = x if keep is None else np.concatenate([keep, x])
        keys = np.concatenate([keys, rng.random(len(x))])
        if len(keys) > k:
            best = np.argpartition(keys, k)[:k]
            rows, keys = rows[best], keys[best]
        keep = rows
    return keep if keep is not None else np.empty((0, 0))


def compare_stores(a: Store | str, b: Store | str, site: str | None = None, stream: str | None = None,
                   layers: Any = None, progress: bool | None = False, **kw: Any) -> dict[str, Any]:
    from toolkit.store.reader import open_store

    sa = open_store(a) if not isinstance(a, Store) else a
    sb = open_store(b) if not isinstance(b, Store) else b
    site, stream = store_site_stream(sa, site, stream)
    store_site_stream(sb, site, stream)
    la, lb = store_layers(sa, site, layers), set(sb.layers(site))
    common = [v for v in la if v in lb]
    if not common:
        raise ToolkitError(f"{sa.path} and {sb.path} share no layer of site {site!r}")
    return {"a": str(sa.path), "b": str(sb.path), "site": site, "stream": stream,
            "model": {"a": (sa.attrs.get("model") or {}).get("name"), "b": (sb.attrs.get("model") or {}).get("name")},
            "checkpoint": {"a": (sa.attrs.get("model") or {}).get("checkpoint"),
                           "b": (sb.attrs.get("model") or {}).get("checkpoint")},
            "n_samples": {"a": sa.n_samples, "b": sb.n_samples},
            "layers": {str(layer): compare_layer(sa, sb, site, stream, layer, **kw)
                       for layer in _progress(common, progress, "compare")}}


# --------------------------------------------------------------------------- reports


def strip_arrays(report: dict[str, Any]) -> dict[str, Any]:
    """The report without its numpy side arrays (``_arrays``), for JSON."""
    out = dict(report)
    out["layers"] = {k: {kk: vv for kk, vv in v.items() if kk != "_arrays"} for k, v in report["layers"].items()}
    return out


def _f(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def stats_markdown(rep: dict[str, Any]) -> str:
    lines = [f"# Activation statistics: {rep['site']}/{rep['stream']}", "",
             f"- store: `{rep['store']}` (model {rep['model']})", f"- shape {rep['shape']} {rep['dtype']}, dims "
             f"{', '.join(rep['dims'])}", "",
             "| layer | rows | features | mean | std | min | max | dead | constant | outliers | non-finite |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for layer, s in rep["layers"].items():
        g = s["global"]
        lines.append(f"| {layer} | {s['n_rows']} | {s['n_features']} | {_f(g['mean'])} | {_f(g['std'])} | "
                     f"{_f(g['min'])} | {_f(g['max'])} | {s['n_dead']} | {s['n_constant']} | {len(s['outliers'])} | "
                     f"{s['n_nonfinite']} |")
    for layer, s in rep["layers"].items():
        lines += ["", f"## layer {layer}", "", "| per-feature | min | p5 | median | p95 | max |", "|---|---|---|---|---|---|"]
        for name, q in s["per_feature"].items():
            lines.append(f"| {name} | {_f(q['min'])} | {_f(q['p5'])} | {_f(q['median'])} | {_f(q['p95'])} | "
                         f"{_f(q['max'])} |")
        if s["outliers"]:
            lines += ["", "Outlier features (robust z > threshold): " + ", ".join(
                f"{o['feature']} ({o['by']} {_f(o['value'])}, z {o['robust_z']})" for o in s["outliers"][:10])]
        if s["dead"]:
            lines += ["", f"Dead features: {', '.join(map(str, s['dead'][:50]))}"]
    return "\n".join(lines) + "\n"


def compare_markdown(rep: dict[str, Any], figures: dict[str, list[str]] | None = None) -> str:
    lines = [f"# Store comparison: {rep['site']}/{rep['stream']}", "",
             f"- A: `{rep['a']}` ({rep['model']['a']}, checkpoint {rep['checkpoint']['a']}), {rep['n_samples']['a']} samples",
             f"- B: `{rep['b']}` ({rep['model']['b']}, checkpoint {rep['checkpoint']['b']}), {rep['n_samples']['b']} samples",
             "- KL in nats on fixed-bin histograms over the union range (floor 1e-10); Wasserstein-1 exact on the "
             "histograms (within one bin width of the sample distance)", "",
             "| layer | mean A | mean B | std A | std B | max A | max B | KL(A‖B) | KL(B‖A) | W1 | corr(means) | "
             "dead A/B/both |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for layer, c in rep["layers"].items():
        g = c["global"]
        lines.append(f"| {layer} | {_f(g['a']['mean'])} | {_f(g['b']['mean'])} | {_f(g['a']['std'])} | "
                     f"{_f(g['b']['std'])} | {_f(g['a']['max'])} | {_f(g['b']['max'])} | {_f(g['kl_ab'])} | "
                     f"{_f(g['kl_ba'])} | {_f(g['wasserstein'])} | {_f(c['correlation_of_means'])} | "
                     f"{c['dead']['a']}/{c['dead']['b']}/{c['dead']['both']} |")
    for layer, c in rep["layers"].items():
        lines += ["", f"## layer {layer}", "", "| per-feature | min | median | p95 | max | mean |",
                  "|---|---|---|---|---|---|"]
        for name, q in c["per_feature"].items():
            lines.append(f"| {name} | {_f(q['min'])} | {_f(q['median'])} | {_f(q['p95'])} | {_f(q['max'])} | "
                         f"{_f(q['mean'])} |")
        lines += ["", "Most shifted features (by W1):", "", "| feature | W1 | KL(A‖B) | mean A | mean B | max A | max B |",
                  "|---|---|---|---|---|---|---|"]
        for t in c["top_shifted"][:10]:
            lines.append(f"| {t['feature']} | {_f(t['wasserstein'])} | {_f(t['kl_ab'])} | {_f(t['mean_a'])} | "
                         f"{_f(t['mean_b'])} | {_f(t['max_a'])} | {_f(t['max_b'])} |")
        for fig in (figures or {}).get(layer, []):
            lines += ["", f"![{fig}]({fig})"]
    return "\n".join(lines) + "\n"


def compare_figures(rep: dict[str, Any], out_dir) -> dict[str, list[str]]:
    """Per layer: pooled histograms, per-feature mean scatter, top-shifted features.  Returns file names."""
    from toolkit.analysis.figures import pyplot, save_figure

    plt = pyplot()

    made: dict[str, list[str]] = {}
    for layer, c in rep["layers"].items():
        arr = c["_arrays"]
        names = []
        fig, ax = plt.subplots(figsize=(6, 4))
        e = arr["edges"]
        for key, label in (("hist_a", "A"), ("hist_b", "B")):
            h = arr[key] / max(arr[key].sum(), 1)
            ax.stairs(h, e, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("value")
        ax.set_ylabel("fraction")
        ax.set_title(f"{rep['site']}/{rep['stream']} layer {layer}: all values")
        ax.legend()
        names.append(save_figure(fig, out_dir / f"hist_layer{layer}.png").name)
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.scatter(arr["mean_a"], arr["mean_b"], s=4, alpha=0.6)
        lim = [min(arr["mean_a"].min(), arr["mean_b"].min()), max(arr["mean_a"].max(), arr["mean_b"].max())]
        ax.plot(lim, lim, "k--", lw=0.8)
        ax.set_xlabel("feature mean, A")
        ax.set_ylabel("feature mean, B")
        ax.set_title(f"per-feature means (r = {c['correlation_of_means']:.3f})")
        names.append(save_figure(fig, out_dir / f"means_layer{layer}.png").name)
        top = arr["top"]
        fig, axes = plt.subplots(1, max(1, len(top)), figsize=(3.2 * max(1, len(top)), 3), squeeze=False)
        for k, f in enumerate(top):
            ax = axes[0, k]
            ax.stairs(arr["feature_hist_a"][k] / max(arr["feature_hist_a"][k].sum(), 1), arr["feature_edges"][k], label="A")
            ax.stairs(arr["feature_hist_b"][k] / max(arr["feature_hist_b"][k].sum(), 1), arr["feature_edges"][k], label="B")
            ax.set_title(f"feature {int(f)}: W1 {arr['w1'][f]:.3g}", fontsize=9)
        axes[0, 0].legend()
        fig.suptitle("most shifted features")
        names.append(save_figure(fig, out_dir / f"top_shifted_layer{layer}.png").name)
        made[layer] = names
    return made


# --------------------------------------------------------------------------- projection


def sample_vectors(store: Store, site: str, stream: str, layer: int, max_samples: int | None = None,
                   seed: int = 0, denoise: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(sample indices, (n, features)): one vector per sample, the mean over its stored tokens (and denoising
    steps, or at the one denoising step ``denoise``); a seeded subset of ``max_samples`` samples."""
    n = store.n_samples
    idx = np.arange(n)
    if max_samples and n > max_samples:
        idx = np.sort(np.random.default_rng(seed).choice(n, max_samples, replace=False))
    return idx, np.concatenate([x for _, x in iter_sample_vectors(store, site, stream, layer, idx, denoise)])


def iter_sample_vectors(store: Store, site: str, stream: str, layer: int, idx: np.ndarray | None = None,
                        denoise: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(sample indices, (n, features) float64) chunk by chunk: each sample's mean over its stored tokens and
    denoising steps (or at denoising step ``denoise``), for the samples ``idx`` (sorted; None = all)."""
    n = store.n_samples
    idx = np.arange(n) if idx is None else idx
    arr = store.array(site, stream)
    li = store.layers(site).index(layer)
    step = int(arr.chunks[0])
    for a in range(0, n, step):
        sel = idx[(idx >= a) & (idx < a + step)]
        if not len(sel):
            continue
        x = decode(arr[a:min(n, a + step), li], arr.attrs.get("stored_dtype"))[sel - a]
        x = np.asarray(x, dtype=np.float64)
        if denoise is not None:
            x = x[:, denoise]
        yield sel, x.reshape(len(sel), -1, x.shape[-1]).mean(1)


def pca2(x: np.ndarray) -> np.ndarray:
    """(n, features) -> (n, 2) principal-component scores (scikit-learn), zero-padded when fewer exist."""
    from sklearn.decomposition import PCA

    if len(x) < 2:  # one point: it is its own mean
        return np.zeros((len(x), 2))
    y = PCA(n_components=min(2, *x.shape)).fit_transform(np.asarray(x, dtype=np.float64))
    return y if y.shape[1] == 2 else np.pad(y, ((0, 0), (0, 2 - y.shape[1])))


def project(x: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    """2-D projection: pca, tsne (scikit-learn) or umap (umap-learn, when installed)."""
    if len(x) < 3:
        raise ToolkitError(f"a projection needs at least 3 samples, the store has {len(x)}")
    x = x - x.mean(0)
    if method == "pca":
        return pca2(x)
    if method == "tsne":
        from sklearn.manifold import TSNE

        return TSNE(n_components=2, perplexity=min(30.0, max(2.0, (len(x) - 1) / 3)), random_state=seed,
                    init="pca").fit_transform(x)
    if method == "umap":
        try:
            import umap  # type: ignore[import-not-found]
        except ImportError:
            raise ToolkitError("--method umap needs umap-learn, which is not installed: pip install 'toolkit[umap]' "
                               "(or use --method pca or tsne)") from None
        return umap.UMAP(n_components=2, random_state=seed).fit_transform(x)
    raise ToolkitError(f"unknown projection method {method!r}: use pca, tsne or umap")
