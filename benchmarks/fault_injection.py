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
  stale    a stale writer on S3 (a local moto server): writer A is paused (SIGSTOP) at a random moment past
           its lease, writer B takes over with --resume and finishes, then A is resumed; the store must equal an
           uninterrupted run, verify, and show every array's own metadata at the full length; A must end (no
           hang) with one line.  Commits every 2 samples into 4-sample chunks (partial-chunk rewrites)
  hang     runs that must end, not hang (--hang-trials of each): a lost lease (another run takes the lease
           object over while A writes) and a full disk (a small tmpfs where it may mount one, else a file-size
           limit) each end with one line, the lock released, and --resume finishes the store
  repair   the repair and resume cases of benchmarks/repair_cases.py (data removed, shrunk or gone)

    python benchmarks/fault_injection.py --config small --config batch16 --trials 12 [--seed 0] [--out FILE]
    python benchmarks/fault_injection.py --config sim --trials 4
    python benchmarks/fault_injection.py --config stale --trials 20
    python benchmarks/fault_injection.py --config hang --config repair
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
    "stale": ["--model", "pi0", "--dataset", "libero", "--max-episodes", "4", "--chunk-samples", "4",
              "--batch-size", "2", "--streams", "resid_post", "--sites", "vlm,action"],
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


def remote_committed(url: str) -> int:
    import fsspec

    fs, root = fsspec.url_to_fs(url)
    fs.invalidate_cache()
    try:
        return int(json.loads(fs.cat_file(f"{root}/zarr.json"))["attributes"].get("n_samples", 0))
    except (OSError, ValueError, KeyError):
        return -1


def own_metadata_lengths(url: str) -> set[int]:
    """The sample-axis length each array's own zarr.json gives (what a reader that skips the consolidated
    metadata sees)."""
    import fsspec

    fs, root = fsspec.url_to_fs(url)
    fs.invalidate_cache()
    out = set()
    for key in fs.glob(f"{root}/**/zarr.json"):
        meta = json.loads(fs.cat_file(key))
        if meta.get("node_type") == "array" and (meta.get("dimension_names") or [None])[0] == "sample":
            out.add(int(meta["shape"][0]))
    return out


def ends_within(proc: subprocess.Popen, limit: float) -> tuple[bool, str]:
    """(ended, its last stderr line): a process that has not ended after ``limit`` s is a hang (killed)."""
    try:
        _, err = proc.communicate(timeout=limit)
        return True, (err.strip().splitlines() or [""])[-1]
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        return False, (err.strip().splitlines() or [""])[-1]


def stale_trial(url: str, ref: dict, rng: random.Random, env: dict, lease: float, duration: float) -> dict:
    """Writer A paused at a random moment (after a random number of commits, plus a random delay) for longer
    than its lease; B resumes and finishes; A is resumed and must stop without changing B's store."""
    total = int(ref["#n_samples"])
    a = subprocess.Popen(command(url, "stale"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    target = rng.randrange(0, total)
    t0 = time.perf_counter()
    while remote_committed(url) < target and a.poll() is None and time.perf_counter() - t0 < 3 * duration:
        time.sleep(0.01)
    time.sleep(rng.uniform(0, 0.6))
    if a.poll() is not None:
        return {"pause": "A ended before the pause", "problem": None if a.returncode == 0 else "A failed"}
    state = remote_committed(url)
    a.send_signal(signal.SIGSTOP)
    time.sleep(lease + 0.5)
    b = subprocess.run(command(url, "stale", "--resume"), env=env, capture_output=True, text=True)
    a.send_signal(signal.SIGCONT)
    ended, a_line = ends_within(a, 120)
    out = {"pause": f"{state} committed", "b_exit": b.returncode, "a_exit": a.returncode, "a_ended": ended,
           "a_line": a_line}
    if b.returncode != 0:
        out["problem"] = "B failed: " + (b.stderr.strip().splitlines() or ["?"])[-1]
        return out
    from toolkit.store.verify import verify

    report = verify(url)
    lengths = own_metadata_lengths(url)
    problems = [p for p in (
        None if ended else "A hung after SIGCONT (killed after 120 s)",
        identical(ref, snapshot(url)),
        f"verify: {report['bad'][0]}" if report["bad"] else None,
        f"arrays' own metadata give {sorted(lengths)} samples" if lengths != {total} else None) if p]
    out["problem"] = "; ".join(problems) or None
    return out


def lost_lease_trial(url: str, env: dict, ref: dict, rng: random.Random) -> dict:
    """Another run takes A's lease over (its lease object replaced) after a random number of commits: A must end
    within bounded time with one line, and --resume (once the other run has gone) finishes the store."""
    import fsspec

    fs, root = fsspec.url_to_fs(url)
    lease_key = root.rsplit("/", 1)[0] + "/." + root.rsplit("/", 1)[1] + ".lock"
    a = subprocess.Popen(command(url, "stale"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    target = rng.randrange(0, int(ref["#n_samples"]) - 2)
    t0 = time.perf_counter()
    while remote_committed(url) < target and a.poll() is None and time.perf_counter() - t0 < 180:
        time.sleep(0.01)
    fs.pipe_file(lease_key, json.dumps({"token": "thief", "holder": "the benchmark",
                                        "expires": time.time() + 3600}).encode())
    ended, line = ends_within(a, 90)
    fs.rm_file(lease_key)  # the other run goes away; --resume finishes
    res = subprocess.run(command(url, "stale", "--resume"), env=env, capture_output=True, text=True)
    if a.returncode == 0 and ended:
        problem = None if "wrote" in (res.stdout + res.stderr) or res.returncode == 0 else "A ended 0, resume failed"
        state = "A had finished"
    else:
        state = f"taken at {target} committed"
        problem = None if ended and "lease" in line else f"A: ended={ended} exit {a.returncode}: {line}"
    if not problem and res.returncode != 0:
        problem = "resume: " + (res.stderr.strip().splitlines() or ["?"])[-1]
    return {"case": f"lost lease (S3, {state})", "a_line": line, "problem": problem or identical(ref, snapshot(url))}


def disk_full_trial(work: Path, env: dict, ref: dict, rng: random.Random, i: int) -> dict:
    """A local store on a full disk: a small tmpfs where we may mount one (root), else a file-size limit (EFBIG
    on the first large chunk).  The run must end with one line and no lock left; --resume on room finishes it."""
    disk = work / f"small{i}"
    disk.mkdir(exist_ok=True)
    size = rng.choice([300, 450, 600, 800, 1000])
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}k", "tmpfs", str(disk)],
                             capture_output=True).returncode == 0
    store = disk / "full.zarr"

    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (size * 300, size * 300))

    try:
        a = subprocess.Popen(command(store, "stale"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, preexec_fn=None if mounted else limit)
        ended, line = ends_within(a, 120)
        lock_left = (disk / ".full.zarr.lock").exists()
        if mounted:
            subprocess.run(["mount", "-o", "remount,size=256m", str(disk)], check=True)
        res = subprocess.run(command(store, "stale", "--resume"), env=env, capture_output=True, text=True)
        if a.returncode == 0:
            problem = None  # the store fitted
        else:
            problem = None if ended and not lock_left and line.startswith("error: ") else (
                f"ended={ended} exit {a.returncode} lock left={lock_left}: {line}")
        if not problem and res.returncode != 0:
            problem = "resume: " + (res.stderr.strip().splitlines() or ["?"])[-1]
        if not problem:
            problem = identical(ref, snapshot(store))
        how = f"tmpfs {size} kB" if mounted else f"RLIMIT_FSIZE {size * 300 // 1000} kB"
        return {"case": f"disk full ({how}{', fitted' if a.returncode == 0 else ''})", "a_line": line,
                "problem": problem}
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)])


def run_stale(a, rng: random.Random, base_env: dict) -> list[dict]:
    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    from s3server import local_s3

    results = []
    lease = 3.0
    with local_s3() as bucket:
        env = {**base_env, **{k: os.environ[k] for k in os.environ if k.startswith("AWS_")},
               "TOOLKIT_LEASE_SECONDS": str(lease), "TOOLKIT_COMMIT_SAMPLES": "2"}
        t0 = time.perf_counter()
        ref_url = f"{bucket}/ref.zarr"
        subprocess.run(command(ref_url, "stale"), env=env, check=True, capture_output=True)
        duration = time.perf_counter() - t0
        ref = snapshot(ref_url)
        print(f"# stale: reference {int(ref['#n_samples'])} samples in {duration:.1f} s; lease {lease} s",
              flush=True)
        configs = a.config or []
        for i in range(a.trials if "stale" in configs else 0):
            r = stale_trial(f"{bucket}/stale-{i}.zarr", ref, rng, env, lease, duration)
            r["config"] = "stale"
            results.append(r)
            print(f"stale trial {i}: {'ok' if not r.get('problem') else 'PROBLEM: ' + r['problem']}  "
                  f"[paused at {r['pause']}; A: {r.get('a_line', '')!r}]", flush=True)
        if "hang" in configs:
            work = Path(tempfile.mkdtemp(prefix="fault_hang_"))
            for i in range(a.hang_trials):
                for r in (lost_lease_trial(f"{bucket}/hang-{i}.zarr", env, ref, rng),
                          disk_full_trial(work, env, ref, rng, i)):
                    r["config"] = "hang"
                    results.append(r)
                    print(f"hang {r['case']}: {'ok' if not r['problem'] else 'PROBLEM: ' + r['problem']}  "
                          f"[{r['a_line']!r}]", flush=True)
            shutil.rmtree(work, ignore_errors=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", choices=sorted([*CONFIGS, "hang", "repair"]))
    ap.add_argument("--trials", type=int, default=12, help="trials per configuration")
    ap.add_argument("--hang-trials", type=int, default=5, help="trials of each hang case (lost lease, disk full)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    base_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    print(f"# load average at start: {os.getloadavg()}", flush=True)
    results = []
    configs = a.config or ["small", "batch16"]
    if "stale" in configs or "hang" in configs:
        results += run_stale(a, rng, base_env)
    if "repair" in configs:
        from repair_cases import run_repair_cases

        work = Path(tempfile.mkdtemp(prefix="fault_repair_"))
        for r in run_repair_cases(work):
            results.append({"config": "repair", "case": r["name"], "problem": None if r["held"] else r["detail"]})
            print(f"repair {r['name']}: {'held' if r['held'] else 'PROBLEM: ' + r['detail']}", flush=True)
        shutil.rmtree(work, ignore_errors=True)
    for config in [c for c in configs if c not in ("stale", "hang", "repair")]:
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
    for config in sorted({r["config"] for r in results}):
        rs = [r for r in results if r["config"] == config]
        held = sum(1 for r in rs if not r.get("problem"))
        print(f"{config}: {len(rs)} trials, {held} held, {len(rs) - held} failed", flush=True)
    kill_trials = [r for r in results if "kills" in r]
    if kill_trials:
        n_kills = sum(len(r["kills"]) for r in kill_trials)
        mid = sum(1 for r in kill_trials for k in r["kills"] if k["state"].endswith("committed"))
        print(f"kills: {n_kills} ({mid} while a store was being written, "
              f"{sum(len(r['kills']) == 2 for r in kill_trials)} trials killed twice)", flush=True)
    same = sum(1 for r in results if not r.get("problem"))
    print(f"load average at end: {os.getloadavg()}", flush=True)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"results": results, "held": same, "trials": len(results)}, indent=2, default=str))


if __name__ == "__main__":
    main()
