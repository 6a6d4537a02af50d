"""Probe engine benchmark: read throughput, sweep speed against scikit-learn, memory as the store grows.

    python benchmarks/bench_probe.py            # ~2-4 minutes on 2 cores
    python benchmarks/bench_probe.py --quick    # smaller stores, for a smoke run

Three ratios, all measured in this one run on synthetic stores written here:
1. read: the probe's chunked layer-slice reader vs a raw numpy memmap of the same bytes (target ≥ 0.8);
2. sweep: the all-layer ridge sweep (nested 5-fold episode CV over 10 λ, with its control task) vs
   scikit-learn on the same outer folds: RidgeClassifierCV with the same λ grid and inner folds (the same
   procedure) and one LogisticRegression fit per fold; pooled out-of-fold accuracies side by side;
3. memory: peak RSS of a probe run on a store 10x larger, over the small one (target ≈ 1, i.e. flat);
4. one layer end to end (``--layer-only`` runs just this): ``probe()`` on a one-layer store vs the float32
   XᵀX bound (numpy ``X.T @ X`` of the same rows, in memory), and the nested-CV solve alone with the
   default float32 factorisation (float64 by refinement) vs float64 eigh; interleaved repeats, medians (min-max).
Results go to benchmarks/out/bench_probe.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from toolkit.run.layout import COORDINATES
from toolkit.store.layout import ArraySpec
from toolkit.store.writer import StoreWriter

OUT = Path(__file__).parent / "out"


def write_store(path: Path, n_tasks: int, eps_per_task: int, steps: int, layers: int, d: int, codec: str = "none",
                seed: int = 0, raw: Path | None = None, tokens: int = 1) -> Path:
    """Synthetic rollouts: task signal growing with depth, a per-episode offset, noise; written in batches.
    ``tokens`` > 1 stores that many noisy copies per sample (what a pooled probe reads)."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((n_tasks, d)).astype(np.float32)
    n_ep = n_tasks * eps_per_task
    n = n_ep * steps
    specs = [ArraySpec("vlm/resid_post", (layers, tokens, d), "float32", ("layer", "token", "feature"),
                       chunk_inner=(1, tokens, d))]
    fields = {"episode": "int32", "step": "int32", "task": "str", "task_id": "int32", "success": "int8",
              "episode_key": "str", "instruction": "str"}
    specs += [ArraySpec(k, (), v, ()) for k, v in fields.items()]
    static = {"vlm/layer": (("layer",), np.arange(layers, dtype=np.int32)),
              "vlm/token": (("token",), np.array([-1], np.int32) if tokens == 1 else np.arange(tokens, dtype=np.int32))}
    w = StoreWriter(path, mode="overwrite", codec=codec)
    w.initialize({"model": "synthetic"}, specs, static, COORDINATES, chunk_samples=256)
    mm = np.lib.format.open_memmap(raw, mode="w+", dtype=np.float32, shape=(n, layers, tokens, d)) if raw else None
    ep_task = rng.permutation(np.repeat(np.arange(n_tasks), eps_per_task))
    scale = np.linspace(0.05, 0.6, layers, dtype=np.float32)
    for e0 in range(0, n_ep, 16):
        eps = np.arange(e0, min(n_ep, e0 + 16))
        episode = np.repeat(eps, steps).astype(np.int32)
        task = ep_task[episode]
        x = rng.standard_normal((len(episode), layers, tokens, d), dtype=np.float32)
        x += rng.standard_normal((len(eps), 1, 1, d), dtype=np.float32)[episode - e0] * 0.5
        x += scale[None, :, None, None] * means[task][:, None, None, :] + 3.0
        batch = {"vlm/resid_post": x, "episode": episode, "step": np.tile(np.arange(steps), len(eps)).astype(np.int32),
                 "task": np.array([f"task {t}" for t in task], dtype=object), "task_id": task.astype(np.int32),
                 "success": (episode % 2).astype(np.int8), "episode_key": np.array([f"e{e}" for e in episode], object),
                 "instruction": np.array([f"do task {t}" for t in task], dtype=object)}
        w.append(batch)
        if mm is not None:
            mm[e0 * steps:e0 * steps + len(episode)] = x
    w.close()
    if mm is not None:
        mm.flush()
    return path


def bench_read(store_path: Path, raw: Path, repeats: int = 3) -> dict:
    from toolkit.analysis.probe.select import Selection, resolve
    from toolkit.analysis.probe.stats import iter_blocks
    from toolkit.store.reader import open_store

    store = open_store(store_path)
    res = resolve(store, Selection(site="vlm"))
    mm = np.load(raw, mmap_mode="r")
    cs = 256

    def probe_read():
        total = 0
        for li in range(len(res.layers)):
            for _, x in iter_blocks(store, res, li):
                total += x.nbytes
        return total

    def memmap_read():
        total = 0
        for li in range(mm.shape[1]):
            for a in range(0, mm.shape[0], cs):
                x = np.array(mm[a:a + cs, li, 0])
                total += x.nbytes
        return total

    out = {}
    for name, fn in (("probe", probe_read), ("memmap", memmap_read)):
        fn()  # warm the page cache: both sides read from memory, so this compares the code paths
        best = min(_timed(fn) for _ in range(repeats))
        out[f"{name}_MBps"] = mm.nbytes / best / 2**20
    out["ratio"] = out["probe_MBps"] / out["memmap_MBps"]
    return out


def bench_layer(tmp: Path, d: int, n: int, repeats: int) -> dict:
    """One layer: end-to-end probe rows/s vs the float32 XᵀX bound; solver float32+refinement vs float64."""
    from toolkit.analysis.probe import ProbeConfig, Selection, probe
    from toolkit.analysis.probe.select import plain, resolve
    import torch

    from toolkit.analysis.probe.solvers import NestedRidge, solver_workers
    from toolkit.analysis.probe.splits import make_folds
    from toolkit.analysis.probe.stats import FoldStats, iter_blocks
    from toolkit.store.reader import open_store

    steps = 50
    path = write_store(tmp / f"layer{d}.zarr", 16, max(1, n // (16 * steps)), steps, 1, d)
    store = open_store(path)
    sel = resolve(store, Selection(site="vlm"))
    X = np.concatenate([x[:, 0] for _, x in iter_blocks(store, sel, 0)])
    ep, task = store.coord("episode")[sel.rows], plain(store.coord("task"))[sel.rows]
    folds = make_folds("episodes", ep, task, 5, 0)
    Y = np.eye(16, dtype=np.float32)[np.unique(task, return_inverse=True)[1]]
    fs = FoldStats(d, 32, 5)
    fs.add(X, np.concatenate([Y, Y], 1), folds.fold)  # task and a control of the same width, as the probe fits
    stats = fs.finish()
    cfg = ProbeConfig(mdl=False, success=False, save_weights="none")

    def solve(**kw):  # the nested-CV solve alone: K(K−1)/2 inner + K outer factorisations, as probe() runs it
        return NestedRidge(stats, {"t": np.arange(16), "t#control": np.arange(16, 32)}, fs.shift, **kw).outers(
            final=False)

    fns = {"probe": lambda: probe(path, Selection(site="vlm"), ["task"], cfg),
           "xtx_bound": lambda: X.T @ X,
           "solve_float32": lambda: solve(precision="float32"),
           "solve_float32_1_worker": lambda: solve(precision="float32", workers=1),
           "solve_float64": lambda: solve(precision="float64")}
    fns["probe"]()  # plugin registry import and page cache, outside the timed region
    times, load_before = {k: [] for k in fns}, _load()
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(_timed(fn))
    rows = len(X)
    out = {"d": d, "rows": rows, "repeats": repeats, "load_before": load_before,
           "seconds": {k: {"median": float(np.median(v)), "min": min(v), "max": max(v)} for k, v in times.items()}}
    med = {k: v["median"] for k, v in out["seconds"].items()}
    out["probe_rows_per_s"], out["bound_rows_per_s"] = rows / med["probe"], rows / med["xtx_bound"]
    out["fraction_of_bound"] = med["xtx_bound"] / med["probe"]
    out["solve_speedup_float32"] = med["solve_float64"] / med["solve_float32"]
    out["solve_speedup_workers"] = med["solve_float32_1_worker"] / med["solve_float32"]
    out["workers"], out["threads"] = solver_workers(), torch.get_num_threads()
    out["factorisations"] = 5 * 4 // 2 + 5
    out["load_after"] = _load()
    return out


def _load() -> list[float]:
    import os

    return [round(v, 2) for v in os.getloadavg()]


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_sweep(store_path: Path) -> dict:
    """The probe's nested CV against scikit-learn doing the same on the same outer folds, pooled out of fold.

    scikit-learn side, per layer and outer fold: ``RidgeClassifierCV`` with the same λ grid (alpha = λ·n on
    standardised features) and the same inner episode folds (the same procedure), and one
    ``LogisticRegression`` fit at C=1 (no search).  Reading the activations is outside its timed region.
    """
    from sklearn.linear_model import LogisticRegression, RidgeClassifierCV
    from sklearn.preprocessing import StandardScaler

    from toolkit.analysis.probe import LAMBDAS, ProbeConfig, Selection, probe
    from toolkit.analysis.probe.select import plain, resolve
    from toolkit.analysis.probe.splits import make_folds
    from toolkit.analysis.probe.stats import iter_blocks
    from toolkit.store.reader import open_store

    t = time.perf_counter()
    res = probe(store_path, Selection(site="vlm"), ["task"], ProbeConfig(mdl=False, save_weights="none"))
    ours = time.perf_counter() - t
    store = open_store(store_path)
    sel = resolve(store, Selection(site="vlm"))
    ep, task = store.coord("episode")[sel.rows], plain(store.coord("task"))[sel.rows]
    folds = make_folds("episodes", ep, task, 5, 0)
    y = np.unique(task, return_inverse=True)[1]
    rc_time, lr_time, rc_acc, lr_acc = 0.0, 0.0, [], []
    for li in range(len(sel.layers)):
        X = np.concatenate([x[:, 0] for _, x in iter_blocks(store, sel, li)])
        pr, pl = np.empty(len(y), int), np.empty(len(y), int)
        for k in range(folds.n_folds):
            tr, te = folds.train(k), folds.test(k)
            t = time.perf_counter()
            sc = StandardScaler().fit(X[tr])
            z, zt = sc.transform(X[tr]), sc.transform(X[te])
            inner = folds.fold[tr]
            cv = [(np.flatnonzero(inner != g), np.flatnonzero(inner == g)) for g in np.unique(inner)]
            pr[te] = RidgeClassifierCV(alphas=[lam * tr.sum() for lam in LAMBDAS], cv=cv).fit(z, y[tr]).predict(zt)
            rc_time += time.perf_counter() - t
            t = time.perf_counter()
            pl[te] = LogisticRegression(max_iter=200).fit(z, y[tr]).predict(zt)
            lr_time += time.perf_counter() - t
        rc_acc.append(float(np.mean(pr == y)))
        lr_acc.append(float(np.mean(pl == y)))
    acc = [r["accuracy"] for r in sorted(res.rows, key=lambda r: r["layer"])]
    return {"layers": len(sel.layers), "rows": int(len(y)), "probe_s": ours,
            "ridgecv_s": rc_time, "speedup_ridgecv": rc_time / ours, "logistic_s": lr_time,
            "speedup_logistic": lr_time / ours, "logistic_one_fit_per_layer_s": lr_time / folds.n_folds,
            "speedup_logistic_one_fit_per_layer": lr_time / folds.n_folds / ours, "probe_acc": acc, "ridgecv_acc": rc_acc, "logistic_acc": lr_acc,
            "max_abs_acc_diff_ridgecv": float(np.max(np.abs(np.array(acc) - np.array(rc_acc)))),
            "max_abs_acc_diff_logistic": float(np.max(np.abs(np.array(acc) - np.array(lr_acc))))}


RSS_CHILD = """
import resource, sys
from toolkit.sdk.plugins import registry
from toolkit.analysis.probe import ProbeConfig, Selection, probe
registry()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
probe(sys.argv[1], Selection(site="vlm"), ["task"], ProbeConfig())
print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_mb(store_path: Path) -> tuple[float, float]:
    """(peak RSS of a probe run, its growth over the process's peak after imports), in MB."""
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, str(store_path)], check=True, capture_output=True, text=True)
    base, peak = (int(v) / 1024 for v in out.stdout.strip().splitlines()[-1].split())
    return peak, peak - base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller stores")
    ap.add_argument("--layer-only", action="store_true", help="only the one-layer end-to-end comparison")
    ap.add_argument("--layer-sizes", default="2048:50000,512:20000", help="D:N pairs for the one-layer comparison")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        layer = [bench_layer(Path(tmp), int(d), int(n), args.repeats)
                 for d, n in (p.split(":") for p in args.layer_sizes.split(",") if p)]
    for r in layer:
        s = r["seconds"]

        def m(k):
            return f"{s[k]['median']:.2f} s ({s[k]['min']:.2f}-{s[k]['max']:.2f})"

        print(f"D={r['d']} N={r['rows']}: probe {r['probe_rows_per_s']:.0f} rows/s, XᵀX bound {r['bound_rows_per_s']:.0f}"
              f" rows/s = {r['fraction_of_bound']:.0%} of the bound (target >= 80%); probe {m('probe')}, XᵀX"
              f" {m('xtx_bound')}; nested-CV solve ({r['factorisations']} factorisations) float32+refine on"
              f" {r['workers']} workers {m('solve_float32')}, on 1 worker {m('solve_float32_1_worker')}"
              f" ({r['solve_speedup_workers']:.2f}x), float64 {m('solve_float64')}; load {r['load_before']} ->"
              f" {r['load_after']}")
    if args.layer_only:
        (OUT / "bench_probe_layer.json").write_text(json.dumps(layer, indent=1))
        return
    tasks, eps, steps, layers, d = (10, 8, 20, 6, 256) if args.quick else (16, 20, 50, 8, 512)
    load_before = _load()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small = write_store(tmp / "small.zarr", tasks, eps, steps, layers, d, raw=tmp / "raw.npy")
        read = bench_read(small, tmp / "raw.npy")
        sweep = bench_sweep(small)
        big = write_store(tmp / "big.zarr", tasks, eps * 10, steps, layers, d)
        (rss_small, grow_small), (rss_big, grow_big) = peak_rss_mb(small), peak_rss_mb(big)
    result = {"load_before": load_before, "load_after": _load(), "layer": layer, "store": {"tasks": tasks, "episodes": tasks * eps, "steps": steps, "layers": layers, "d": d},
              "read": read, "sweep": sweep,
              "memory": {"samples_small": tasks * eps * steps, "samples_big": tasks * eps * steps * 10,
                         "peak_rss_small_mb": rss_small, "peak_rss_big_mb": rss_big, "ratio": rss_big / rss_small,
                         "growth_over_imports_small_mb": grow_small, "growth_over_imports_big_mb": grow_big}}
    (OUT / "bench_probe.json").write_text(json.dumps(result, indent=1))
    print(f"{'measure':<44} {'value':>10} {'target':>10}")
    print(f"{'read: probe layer slices MB/s':<44} {read['probe_MBps']:>10.0f}")
    print(f"{'read: raw numpy memmap MB/s':<44} {read['memmap_MBps']:>10.0f}")
    print(f"{'read: ratio':<44} {read['ratio']:>10.2f} {'>= 0.80':>10}")
    print(f"{'sweep: probe nested CV, all {} layers (s)'.format(sweep['layers']):<44} {sweep['probe_s']:>10.2f}")
    print(f"{'sweep: sklearn RidgeClassifierCV, same folds (s)':<44} {sweep['ridgecv_s']:>10.2f}")
    print(f"{'sweep: speedup vs RidgeClassifierCV':<44} {sweep['speedup_ridgecv']:>10.2f} {'> 1':>10}")
    print(f"{'sweep: max |accuracy difference| (RidgeCV)':<44} {sweep['max_abs_acc_diff_ridgecv']:>10.3f}")
    print(f"{'sweep: sklearn LogisticRegression C=1 (s)':<44} {sweep['logistic_s']:>10.2f}")
    print(f"{'sweep: speedup vs one logistic fit per fold':<44} {sweep['speedup_logistic']:>10.2f} {'> 1':>10}")
    print(f"{'sweep: speedup vs one logistic fit per layer':<44} {sweep['speedup_logistic_one_fit_per_layer']:>10.2f}"
          f" {'> 1':>10}")
    print(f"{'sweep: max |accuracy difference| (logistic)':<44} {sweep['max_abs_acc_diff_logistic']:>10.3f}")
    print(f"{'memory: peak RSS small store (MB)':<44} {rss_small:>10.0f}")
    print(f"{'memory: peak RSS 10x store (MB)':<44} {rss_big:>10.0f}")
    print(f"{'memory: ratio':<44} {rss_big / rss_small:>10.2f} {'~1':>10}")
    print(f"{'memory: growth over imports, small / 10x (MB)':<44} {grow_small:>5.0f} / {grow_big:<5.0f}")
    print(f"wrote {OUT / 'bench_probe.json'}")


if __name__ == "__main__":
    main()
