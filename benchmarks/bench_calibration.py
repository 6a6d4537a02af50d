"""Calibration of the probe's 95 % intervals, by simulation: coverage and null exclusion rate.

    python benchmarks/bench_calibration.py              # 4 and 16 episodes per task, ~10 minutes on 2 cores
    python benchmarks/bench_calibration.py --stores 10  # a quick look

Stores are simulated like rollouts: 4 tasks, 8 steps per episode, 16 features, and per layer an independent
per-episode nuisance offset (so steps of one episode are correlated) plus per-step noise.  Each store holds
several layers, each an independent replicate.

* null: no task signal.  A label-blind probe's true accuracy on balanced tasks is 1/4, so the null
  exclusion rate is the share of intervals that exclude 0.25 (target ≤ 7 %).
* planted: a fixed task signal.  The estimand of K-fold cross-validation is the expected held-out accuracy
  of the same procedure trained on (K−1)/K of the episodes; it is computed here by fitting the engine's
  own nested ridge on that many fresh episodes and scoring a large fresh test set, averaged over many
  draws.  Coverage is the share of intervals containing it (target 95 % ± 3 %).

Both at 4 and at 16 episodes per task.  Results go to benchmarks/out/bench_calibration.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from toolkit.run.layout import COORDINATES
from toolkit.store.layout import ArraySpec
from toolkit.store.writer import StoreWriter

OUT = Path(__file__).parent / "out"
N_TASKS, STEPS, D, N_FOLDS = 4, 8, 16, 5


def world(signal: float, seed: int = 1234) -> np.ndarray:
    """Class means of one simulated world (fixed across replicates, so the estimand is one number)."""
    return np.random.default_rng(seed).standard_normal((N_TASKS, D)).astype(np.float32) * signal


def episodes(means: np.ndarray, eps_per_task: int, layers: int, rng, offset: float = 1.0):
    """(x (n, layers, D), episode, task) for eps_per_task episodes of every task, in random order."""
    n_ep = N_TASKS * eps_per_task
    ep_task = rng.permutation(np.repeat(np.arange(N_TASKS), eps_per_task))
    episode = np.repeat(np.arange(n_ep), STEPS)
    task = ep_task[episode]
    x = rng.standard_normal((len(episode), layers, D)).astype(np.float32)
    x += offset * rng.standard_normal((n_ep, layers, D)).astype(np.float32)[episode]
    x += means[task][:, None, :]
    return x, episode, task


def write_store(path: Path, means: np.ndarray, eps_per_task: int, layers: int, seed: int) -> Path:
    x, episode, task = episodes(means, eps_per_task, layers, np.random.default_rng(seed))
    n = len(episode)
    fields = {"episode": episode.astype(np.int32), "step": np.tile(np.arange(STEPS), n // STEPS).astype(np.int32),
              "task": np.array([f"task {t}" for t in task], dtype=object), "task_id": task.astype(np.int32),
              "success": (episode % 2).astype(np.int8),
              "episode_key": np.array([f"e{e}" for e in episode], dtype=object),
              "instruction": np.array([f"do task {t}" for t in task], dtype=object)}
    specs = [ArraySpec("vlm/resid_post", (layers, 1, D), "float32", ("layer", "token", "feature"),
                       chunk_inner=(1, 1, D))]
    specs += [ArraySpec(k, (), "str" if v.dtype == object else str(v.dtype), ()) for k, v in fields.items()]
    static = {"vlm/layer": (("layer",), np.arange(layers, dtype=np.int32)),
              "vlm/token": (("token",), np.array([-1], np.int32))}
    w = StoreWriter(path, mode="overwrite", codec="none")
    w.initialize({"model": {"name": "simulated", "checkpoint": None, "random_init": False}}, specs, static,
                 COORDINATES, chunk_samples=256)
    w.append({"vlm/resid_post": x[:, :, None, :], **fields})
    w.close()
    return path


def true_accuracy(means: np.ndarray, eps_per_task: int, draws: int, seed: int = 99) -> float:
    """Expected held-out accuracy of the nested ridge procedure trained on (K−1)/K of the episodes."""
    from toolkit.analysis.probe.solvers import LAMBDAS, NestedRidge
    from toolkit.analysis.probe.splits import make_folds
    from toolkit.analysis.probe.stats import FoldStats

    rng = np.random.default_rng(seed)
    train_per_task = round(eps_per_task * (N_FOLDS - 1) / N_FOLDS)  # stratified, like the outer folds
    xt, _, tt = episodes(means, 200, 1, rng)
    accs = []
    for _ in range(draws):
        x, ep, task = episodes(means, train_per_task, 1, rng)
        x = x[:, 0]
        folds = make_folds("episodes", ep, task.astype(str), N_FOLDS - 1, int(rng.integers(1 << 30)))
        fs = FoldStats(D, N_TASKS, folds.n_folds)
        fs.add(x, np.eye(N_TASKS, dtype=np.float32)[task], folds.fold)
        nr = NestedRidge(fs.finish(), {"y": np.arange(N_TASKS)}, fs.shift, LAMBDAS, prior=np.arange(N_TASKS))
        for k in range(folds.n_folds):
            nr.outer(k)
        model = nr.final()["y"].model
        accs.append(float(np.mean(model.predict(xt[:, 0]).argmax(1) == tt)))
    return float(np.mean(accs))


def run(kind: str, eps_per_task: int, n_stores: int, layers: int, truth: float, tmp: Path) -> dict:
    from toolkit.analysis.probe import ProbeConfig, Selection, probe

    means = world(0.0 if kind == "null" else SIGNAL[eps_per_task])
    inside, excl, metrics, widths = [], [], [], []
    for s in range(n_stores):
        path = write_store(tmp / f"{kind}_{eps_per_task}_{s}.zarr", means, eps_per_task, layers, seed=1000 + s)
        rows = probe(path, Selection(site="vlm"), ["task"], ProbeConfig(seed=s, mdl=False, save_weights="none")).rows
        for r in rows:
            inside.append(r["ci_low"] <= truth <= r["ci_high"])
            excl.append(not r["ci_low"] <= 1 / N_TASKS <= r["ci_high"])
            metrics.append(r["metric"])
            widths.append(r["ci_high"] - r["ci_low"])
    n = len(inside)
    cov = float(np.mean(inside))
    return {"kind": kind, "episodes_per_task": eps_per_task, "probes": n, "truth": truth,
            "coverage": cov, "coverage_se": float(np.sqrt(cov * (1 - cov) / n)),
            "null_exclusion": float(np.mean(excl)) if kind == "null" else None,
            "mean_metric": float(np.mean(metrics)), "mean_width": float(np.mean(widths))}


SIGNAL = {4: 0.45, 16: 0.3}  # task-signal scale per size: mid-range accuracies (not at the ceiling)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stores", type=int, default=60, help="simulated stores per configuration")
    ap.add_argument("--layers", type=int, default=6, help="independent replicates (layers) per store")
    ap.add_argument("--sizes", default="4,16", help="episodes per task")
    args = ap.parse_args()
    load = os.getloadavg()
    out = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for e in (int(v) for v in args.sizes.split(",")):
            truth = true_accuracy(world(SIGNAL[e]), e, draws=200)
            for kind in ("null", "planted"):
                r = run(kind, e, args.stores, args.layers, 1 / N_TASKS if kind == "null" else truth, Path(tmp))
                out.append(r)
                excl = "" if r["null_exclusion"] is None else f"  null excludes chance {r['null_exclusion']:6.1%}"
                print(f"{kind:8s} {e:3d} episodes/task  {r['probes']:4d} probes  truth {r['truth']:.3f}  "
                      f"mean {r['mean_metric']:.3f}  width {r['mean_width']:.3f}  coverage {r['coverage']:6.1%} "
                      f"(± {r['coverage_se']:.1%}){excl}", flush=True)
    OUT.mkdir(exist_ok=True)
    info = {"results": out, "load_average_start": load, "load_average_end": os.getloadavg(),
            "seconds": time.perf_counter() - t0, "args": vars(args)}
    (OUT / "bench_calibration.json").write_text(json.dumps(info, indent=1))
    print(f"load average {load[0]:.2f} → {os.getloadavg()[0]:.2f}; {info['seconds']:.0f} s; "
          f"wrote {OUT / 'bench_calibration.json'}")


if __name__ == "__main__":
    main()
