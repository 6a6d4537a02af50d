"""LIBERO-scale probe benchmark: every layer of a pi0-sized store probed with the default nested CV, against the bound.

    python benchmarks/bench_probe_scale.py              # 100,000 samples × 18 layers × 2048, bf16 (~7.4 GB + 7.4 GB)
    python benchmarks/bench_probe_scale.py --quick      # 8,000 × 4 × 512, a smoke run

The store is synthetic (10 tasks, episodes of 200 steps, a task signal growing with depth, a per-episode offset,
noise), written in bfloat16 by the toolkit's own writer with the default codec, and the same bit patterns
layer-major to a raw file beside it; both live in a temporary folder and are deleted afterwards.

Bound: per layer, read the layer's bytes from the raw memmap, widen bf16 to float32 and one float32 ``X.T @ X``
(numpy, i.e. BLAS syrk) in memory; summed over layers.  That is the least any exact ridge probe must do.
Probe: ``toolkit.probe(store, Selection(site="vlm"), ["task"], ProbeConfig(save_weights="none"))``: every layer,
the default nested 5-fold episode CV over 10 λ, 5 control draws, intervals and the online (MDL) code.  Runs are interleaved
(bound, probe, bound, ...); medians with min-max.  Alongside, one layer's nested-CV solve alone (what does not
grow with the number of samples) with its factorisation count, and that layer's statistics pass, so the figure
can be read at other sizes.
Results go to benchmarks/out/bench_probe_scale.json.
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


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (round to nearest even), as the capture stores them."""
    u = x.view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def widen(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def write_scale_store(path: Path, raw: Path, n: int, layers: int, d: int, tasks: int = 10, steps: int = 200,
                      seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((tasks, d)).astype(np.float32)
    n_ep = -(-n // steps)
    ep_task = rng.permutation(np.resize(np.arange(tasks), n_ep))
    scale = np.linspace(0.02, 0.3, layers, dtype=np.float32)
    specs = [ArraySpec("vlm/resid_post", (layers, 1, d), "uint16", ("layer", "token", "feature"), "bfloat16",
                       chunk_inner=(1, 1, d))]
    fields = {"episode": "int32", "step": "int32", "task": "str", "task_id": "int32", "success": "int8",
              "episode_key": "str", "instruction": "str"}
    specs += [ArraySpec(k, (), v, ()) for k, v in fields.items()]
    static = {"vlm/layer": (("layer",), np.arange(layers, dtype=np.int32)),
              "vlm/token": (("token",), np.array([-1], np.int32))}
    w = StoreWriter(path, mode="overwrite")  # the default codec: blosc-lz4 + bitshuffle for bfloat16
    w.initialize({"model": "synthetic"}, specs, static, COORDINATES, expected=n)
    mm = np.lib.format.open_memmap(raw, mode="w+", dtype=np.uint16, shape=(layers, n, d))
    at = 0
    for e in range(n_ep):
        k = min(steps, n - at)
        t = ep_task[e]
        x = rng.standard_normal((k, layers, d), dtype=np.float32)
        x += rng.standard_normal(d, dtype=np.float32) * 0.3 + scale[:, None] * means[t] + 2.0
        bits = to_bf16_bits(x)
        w.append({"vlm/resid_post": bits[:, :, None], "episode": np.full(k, e, np.int32),
                  "step": np.arange(k, dtype=np.int32), "task": np.array([f"task {t}"] * k, dtype=object),
                  "task_id": np.full(k, t, np.int32), "success": np.full(k, e % 2, np.int8),
                  "episode_key": np.array([f"e{e}"] * k, dtype=object),
                  "instruction": np.array([f"do task {t}"] * k, dtype=object)})
        mm[:, at:at + k] = bits.transpose(1, 0, 2)
        at += k
    w.close()
    mm.flush()
    del mm


def bound(raw: Path) -> dict:
    """Per layer: memmap read + bf16 widening, then one float32 XᵀX; seconds of each part, summed."""
    mm = np.load(raw, mmap_mode="r")
    read = gemm = 0.0
    for li in range(mm.shape[0]):
        t = time.perf_counter()
        X = widen(np.asarray(mm[li]))
        read += time.perf_counter() - t
        t = time.perf_counter()
        X.T @ X
        gemm += time.perf_counter() - t
    return {"read": read, "xtx": gemm, "total": read + gemm}


def solve_one_layer(path: Path, n_controls: int = 5) -> dict:
    """Layer 0's nested-CV solve alone, as probe() runs it by default: the task, ``n_controls`` control draws
    (extra columns of the same regressions) and the online code's prefix fits; float32 products, as the probe."""
    from toolkit.analysis.probe.select import Selection, plain, resolve
    from toolkit.analysis.probe.solvers import NestedRidge
    from toolkit.analysis.probe.splits import make_folds
    from toolkit.analysis.probe.stats import FoldStats, iter_blocks
    from toolkit.store.reader import open_store

    store = open_store(path)
    sel = resolve(store, Selection(site="vlm"))
    ep, task = store.coord("episode")[sel.rows], plain(store.coord("task"))[sel.rows]
    folds = make_folds("episodes", ep, task, 5, 0)
    classes = np.unique(task, return_inverse=True)[1]
    C = int(classes.max()) + 1
    rng = np.random.default_rng(0)
    Y = np.concatenate([np.eye(C, dtype=np.float32)[classes]]
                       + [np.eye(C, dtype=np.float32)[rng.permutation(classes)] for _ in range(n_controls)], 1)
    groups = {"t": np.arange(C), **{f"t#control{i}": np.arange(C * (i + 1), C * (i + 2)) for i in range(n_controls)}}
    fs = FoldStats(sel.n_features, Y.shape[1], folds.n_folds)
    t = time.perf_counter()
    for pos, x in iter_blocks(store, sel, 0):
        fs.add(x[:, 0], Y[pos], folds.fold[pos])
    stats = fs.finish()
    stats_s = time.perf_counter() - t
    t = time.perf_counter()
    nr = NestedRidge(stats, groups, fs.shift, prior=np.arange(Y.shape[1]), prefix={"t": groups["t"]})
    nr.outers(final=False)
    nr.prefix_probes("t")
    K = folds.n_folds
    return {"seconds": time.perf_counter() - t, "statistics_seconds": stats_s, "columns": int(Y.shape[1]),
            "factorisations": K * (K - 1) // 2 + K + max(0, K - 3), "precision": nr.precision,
            "workers": nr.workers}


def run_probe(path: Path) -> tuple[float, list]:
    from toolkit.analysis.probe import ProbeConfig, Selection, probe

    t = time.perf_counter()
    res = probe(path, Selection(site="vlm"), ["task"], ProbeConfig(save_weights="none"))
    return time.perf_counter() - t, sorted((r["layer"], r["accuracy"]) for r in res.rows if r["target"] == "task")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8,000 × 4 layers × 512: a smoke run")
    ap.add_argument("--samples", type=int, default=100_000)
    ap.add_argument("--layers", type=int, default=18)
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=1, help="probe runs (the bound runs one more, around them)")
    ap.add_argument("--dir", default=None, help="where to write the temporary store (default: the system's temp)")
    args = ap.parse_args()
    n, layers, d = (8000, 4, 512) if args.quick else (args.samples, args.layers, args.d)
    OUT.mkdir(parents=True, exist_ok=True)
    import torch
    from toolkit.sdk.plugins import registry

    registry()  # plugin imports outside the timed region
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        store, raw = Path(tmp) / "scale.zarr", Path(tmp) / "raw.npy"
        t = time.perf_counter()
        write_scale_store(store, raw, n, layers, d)
        write_s = time.perf_counter() - t
        stored = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
        load_before = [round(v, 2) for v in os.getloadavg()]
        bounds, probes, acc = [bound(raw)], [], None
        for _ in range(args.repeats):
            s, acc = run_probe(store)
            probes.append(s)
            bounds.append(bound(raw))
        solve = solve_one_layer(store)
        load_after = [round(v, 2) for v in os.getloadavg()]
    tb = [b["total"] for b in bounds]
    result = {"samples": n, "layers": layers, "d": d, "dtype": "bfloat16", "store_bytes": stored,
              "raw_bytes": n * layers * d * 2, "write_s": write_s, "threads": torch.get_num_threads(),
              "bound_s": {"median": float(np.median(tb)), "min": min(tb), "max": max(tb), "runs": bounds},
              "probe_s": {"median": float(np.median(probes)), "min": min(probes), "max": max(probes)},
              "fraction_of_bound": float(np.median(tb) / np.median(probes)),
              "solve_one_layer": solve, "solve_all_layers_estimate_s": solve["seconds"] * layers,
              "accuracy_by_layer": acc, "load_before": load_before, "load_after": load_after}
    name = "bench_probe_scale_quick.json" if args.quick else "bench_probe_scale.json"
    (OUT / name).write_text(json.dumps(result, indent=1))
    b, p = result["bound_s"], result["probe_s"]
    print(f"{n} samples × {layers} layers × {d} bf16 ({stored / 2**30:.2f} GiB stored, written in {write_s:.0f} s)")
    print(f"bound (memmap read + float32 XᵀX per layer): {b['median']:.1f} s ({b['min']:.1f}-{b['max']:.1f}); "
          f"read {np.median([r['read'] for r in bounds]):.1f} s, XᵀX {np.median([r['xtx'] for r in bounds]):.1f} s")
    print(f"probe, every layer, default nested CV: {p['median']:.1f} s ({p['min']:.1f}-{p['max']:.1f}) = "
          f"{result['fraction_of_bound']:.0%} of the bound (target >= 50%)")
    print(f"layer 0 alone: statistics (read, decode, per-fold XᵀX) {solve['statistics_seconds']:.1f} s; nested-CV "
          f"solve ({solve['factorisations']} {solve['precision']} factorisations, {solve['columns']} target columns) "
          f"{solve['seconds']:.1f} s; × {layers} layers = {result['solve_all_layers_estimate_s']:.0f} s")
    print(f"accuracy by layer: {' '.join(f'{a:.2f}' for _, a in acc)}; load {load_before} -> {load_after}")


if __name__ == "__main__":
    main()
