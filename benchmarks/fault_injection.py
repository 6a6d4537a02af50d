"""Fault injection: random kills of `toolkit extract`, then `--resume`; how many resumed stores are identical.

Each trial starts the CLI and kills it (mostly SIGKILL, sometimes SIGTERM or SIGINT; in about a third of the
trials a second time while resuming), then resumes to the end and compares every field and stream bit for bit with
an uninterrupted reference run, and checks every chunk (`toolkit.store.verify`).  Three kills in four land at a random
moment while the store is being written (after a random number of committed samples), the others anywhere in the
run (start-up, before any store, included).

Configurations (`--config`, repeatable):
  small    pi0 on the embedded LIBERO sample, 24 samples, --batch-size 2, 4-sample chunks
  batch16  pi0, 96 samples, --batch-size 16, default chunking (one 256-sample chunk): commits come from the
           time-based path (TOOLKIT_COMMIT_SECONDS=1 in half the trials), i.e. partial-chunk commits
  sim      pi0 closed-loop in the LIBERO simulator (libero-sim): deferred commits at episode ends

    python benchmarks/fault_injection.py --config small --config batch16 --trials 12 [--seed 0] [--out FILE]
    python benchmarks/fault_injection.py --config sim --trials 4
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CONFIGS = {
    "small": ["--model", "pi0", "--dataset", "libero", "--max-episodes", "4", "--chunk-samples", "4",
              "--batch-size", "2", "--streams", "resid_post,pre_mlp_norm_scale"],
    "batch16": ["--model", "pi0", "--dataset", "libero", "--max-episodes", "16", "--batch-size", "16",
                "--streams", "resid_post"],
    "sim": ["--model", "pi0", "--dataset", "libero-sim", "--suite", "libero_object", "--tasks", "0", "--trials", "2",
            "--replan-steps", "5", "--dataset-option", "resolution=64", "--dataset-option", "settle_steps=5",
            "--model-option", "num_steps=2", "--layers", "0,5", "--stride", "2", "--max-steps", "20", "--seed", "3"],
}


def command(store: Path, config: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "toolkit", "extract", "--store", str(store), *CONFIGS[config], "--no-progress", *extra]


def snapshot(path: Path) -> dict[str, np.ndarray]:
    import warnings

    from toolkit.store.reader import open_store

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = open_store(path)
    out = {f"field {f}": s.coord(f) for f in s.fields()}
    for site in s.sites:
        for stream in s.streams(site):
            out[f"{site}/{stream}"] = s.read(site, stream)
    out["#n_samples"], out["#complete"] = np.array(s.n_samples), np.array(s.complete)
    return out


def identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> str | None:
    """None when equal, else the first difference."""
    if sorted(a) != sorted(b):
        return f"arrays differ: {sorted(set(a) ^ set(b))}"
    for k in a:
        if a[k].shape != b[k].shape or not np.array_equal(a[k], b[k]):
            return f"{k} differs"
    return None


def committed(store: Path) -> int:
    try:
        return int(json.loads((store / "zarr.json").read_text())["attributes"].get("n_samples", 0))
    except (OSError, ValueError, KeyError):
        return -1


def wait_for_store(store: Path, proc: subprocess.Popen, limit: float) -> float:
    """Seconds until the store's root metadata exists (or the process ends, or ``limit``)."""
    t0 = time.perf_counter()
    while not (store / "zarr.json").exists() and proc.poll() is None and time.perf_counter() - t0 < limit:
        time.sleep(0.01)
    return time.perf_counter() - t0


def wait_for_commit(store: Path, proc: subprocess.Popen, target: int, limit: float) -> float:
    """Seconds until at least ``target`` samples are committed (or the process ends, or ``limit``)."""
    t0 = time.perf_counter()
    while committed(store) < target and proc.poll() is None and time.perf_counter() - t0 < limit:
        time.sleep(0.005)
    return time.perf_counter() - t0


def trial(work: Path, config: str, timing: tuple[float, float], ref: dict, rng: random.Random, env: dict,
          incremental: bool) -> dict:
    """Kill once or twice.  Three kills in four land while the store is being written: once a random number of
    samples is committed (``incremental``: the run commits as it goes), plus a random delay so the kill falls
    inside the next block; the others at a random moment of the whole run, start-up included."""
    store = work / "t.zarr"
    shutil.rmtree(store, ignore_errors=True)
    startup, duration = timing
    total = int(ref["#n_samples"])
    kills = []
    for k in range(2 if rng.random() < 0.35 else 1):
        sig = rng.choices([signal.SIGKILL, signal.SIGTERM, signal.SIGINT], weights=[7, 2, 1])[0]
        proc = subprocess.Popen(command(store, config, *(["--resume"] if k else [])), cwd=work, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if rng.random() < 0.75:
            if incremental:
                target = rng.randrange(max(0, committed(store)) + 1, total) if committed(store) + 1 < total else 0
                waited, delay = wait_for_commit(store, proc, target, 3 * duration), rng.uniform(0, 0.5)
            else:
                waited = wait_for_store(store, proc, 3 * duration)
                delay = rng.uniform(0, max(0.1, duration - startup))
        else:
            waited, delay = 0.0, rng.uniform(0.3, duration)
        at = waited + delay
        try:
            proc.wait(timeout=delay)
            state = "ended before the kill"
        except subprocess.TimeoutExpired:
            before = committed(store)
            proc.send_signal(sig)
            proc.wait()
            state = "no store yet" if before < 0 else f"{before} committed"
        err = proc.stderr.read().strip().splitlines()
        kills.append({"signal": signal.Signals(sig).name, "at_s": round(at, 2), "state": state,
                      "exit": proc.returncode, "last_line": err[-1] if err else ""})
    res = subprocess.run(command(store, config, "--resume"), cwd=work, env=env, capture_output=True, text=True)
    out = {"config": config, "kills": kills, "resume_exit": res.returncode}
    if res.returncode != 0:
        out["problem"] = (res.stderr.strip().splitlines() or ["?"])[-1]
        return out
    from toolkit.store.verify import verify

    report = verify(store)
    out["problem"] = identical(ref, snapshot(store)) or (f"verify: {report['bad'][0]}" if report["bad"] else None)
    out["partial_files"] = len(list(store.rglob("*.partial")))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", choices=sorted(CONFIGS))
    ap.add_argument("--trials", type=int, default=12, help="trials per configuration")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    base_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    print(f"# load average at start: {os.getloadavg()}", flush=True)
    results = []
    for config in a.config or ["small", "batch16"]:
        work = Path(tempfile.mkdtemp(prefix=f"fault_{config}_"))
        t0 = time.perf_counter()
        proc = subprocess.Popen(command(work / "ref.zarr", config), cwd=work, env=base_env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        startup = wait_for_store(work / "ref.zarr", proc, 3600)
        err = proc.communicate()[1]
        duration = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"reference run of {config} failed: {err.strip().splitlines()[-1]}")
        ref = snapshot(work / "ref.zarr")
        print(f"# {config}: reference {int(ref['#n_samples'])} samples in {duration:.1f} s (store created after "
              f"{startup:.1f} s)", flush=True)
        for i in range(a.trials):
            env = dict(base_env)
            if config == "batch16" and i % 2:
                env["TOOLKIT_COMMIT_SECONDS"] = "1"
            incremental = config != "batch16" or env.get("TOOLKIT_COMMIT_SECONDS") == "1"
            r = trial(work, config, (startup, duration), ref, rng, env, incremental)
            r["commit_seconds"] = env.get("TOOLKIT_COMMIT_SECONDS", "default")
            results.append(r)
            kills = "; ".join(f"{k['signal']}@{k['at_s']}s ({k['state']}, exit {k['exit']})" for k in r["kills"])
            print(f"{config} trial {i}: {'identical' if not r.get('problem') else 'PROBLEM: ' + r['problem']}  "
                  f"[{kills}]", flush=True)
        shutil.rmtree(work, ignore_errors=True)
    n_kills = sum(len(r["kills"]) for r in results)
    mid = sum(1 for r in results for k in r["kills"] if k["state"].endswith("committed"))
    same = sum(1 for r in results if not r.get("problem"))
    print(f"identical resumes: {same}/{len(results)} trials ({n_kills} kills: {mid} while a store was being "
          f"written, {sum(len(r['kills']) == 2 for r in results)} trials killed twice); "
          f"load average at end: {os.getloadavg()}", flush=True)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"results": results, "identical": same, "trials": len(results)}, indent=2))


if __name__ == "__main__":
    main()
