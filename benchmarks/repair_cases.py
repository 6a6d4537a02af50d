"""Does repair or resume ever invent, drop or demote data?  The cases of "The store never lies", through the CLI.

A small LIBERO pickle dataset (3 task pickles of the embedded sample, 4 episodes each, ``--max-steps 3``: 36
samples, 4-sample chunks) is extracted once with the tiny random pi0; each case copies that store and its data,
changes the data and/or damages a chunk, and runs `toolkit verify --repair` or `toolkit extract --resume` as a
subprocess.  A case holds when the command either refuses in one line (exit 2, ``error: ...``, no traceback) and
leaves every file of the store byte-identical, or ends with a store identical to the clean run's (the honest
outcomes); anything else (exit 0 over changed data, a store rolled back and left so, samples replaced) fails.

  (a) one task pickle removed, a chunk damaged: `verify --repair` must refuse (it dropped 12 samples)
  (b) one episode removed from a pickle, a chunk damaged: refuse (it replaced intact samples with others)
  (c) the last task pickle removed, a chunk past the data's new end damaged: refuse (it kept samples the data no
      longer gives)
  (d) the data folder gone, a chunk damaged: refuse before anything changes (it rolled the store back first)
  (e) `extract --resume` of an interrupted store whose data shrank below its committed count: refuse, never mark
      it complete; of a complete store: say it was complete and wrote nothing, the store unchanged
  control: the data intact, a chunk damaged: `verify --repair` restores the store bit-identically

    python benchmarks/repair_cases.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from fault_injection import identical, snapshot  # noqa: E402
from synthetic import write_libero_pickles as write_data  # noqa: E402

STORE = "s.zarr"
ARGS = ["--model", "pi0", "--dataset", "libero", "--data", "data", "--max-steps", "3", "--chunk-samples", "4",
        "--batch-size", "2", "--no-progress"]
N_SAMPLES = 36  # 3 tasks x 4 episodes x 3 steps


def toolkit(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run([sys.executable, "-m", "toolkit", *args], cwd=cwd, capture_output=True, text=True,
                          env=env)


def fingerprint(store: Path) -> dict[str, str]:
    """Every file of a store (relative path -> sha256)."""
    return {str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(store.rglob("*")) if p.is_file()}


def damage(store: Path, chunk: int, array: str = "vlm/resid_post") -> str:
    """Flip bytes in the middle of one sample-chunk (its first file: layer 0) of ``array``; its key."""
    f = min(p for p in (store / array / "c" / str(chunk)).rglob("*") if p.is_file())
    key = str(f.relative_to(store))
    b = bytearray(f.read_bytes())
    for i in range(len(b) // 2, min(len(b), len(b) // 2 + 16)):
        b[i] ^= 0xFF
    f.write_bytes(bytes(b))
    return key


def refused_unchanged(res: subprocess.CompletedProcess, before: dict[str, str], store: Path,
                      expect: str) -> tuple[bool, str]:
    """(held, detail) for a command that must refuse in one line and change nothing."""
    err = res.stderr.strip().splitlines()
    errors = [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("error:")]
    line = errors[0] if errors else (err[-1] if err else "")
    if res.returncode == 0:
        return False, f"exit 0 (not refused): {(res.stdout.strip().splitlines() or [''])[-1]}"
    if "Traceback" in res.stderr or len(errors) != 1:
        return False, f"exit {res.returncode} without one error line: {line}"
    after = fingerprint(store)
    if after != before:
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        return False, f"refused but the store changed ({len(changed)} files, e.g. {changed[0]}): {line}"
    if expect not in line:
        return False, f"refused, but not for the data: {line}"
    return True, f"exit {res.returncode}, store byte-identical: {line}"


def committed(store: Path) -> tuple[int, bool]:
    attrs = json.loads((store / "zarr.json").read_text())["attributes"]
    return int(attrs.get("n_samples", 0)), bool(attrs.get("complete"))


def run_repair_cases(workdir: str | Path) -> list[dict]:
    """Run every case in ``workdir`` (a folder of its own per case); one dict per case: name, held, detail."""
    from toolkit.store.layout import write_consolidated

    work = Path(workdir)
    ref = work / "clean"
    shutil.rmtree(ref, ignore_errors=True)
    write_data(ref / "data")
    res = toolkit(ref, "extract", STORE, *ARGS)
    if res.returncode != 0:
        raise RuntimeError(f"the clean run failed: {(res.stderr.strip().splitlines() or ['?'])[-1]}")
    clean = snapshot(ref / STORE)
    assert int(clean["#n_samples"]) == N_SAMPLES, clean["#n_samples"]

    def case(name: str) -> Path:
        d = work / name
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(ref, d)
        return d

    def repair_refusal(name: str, title: str, chunk: int, change) -> dict:
        d = case(name)
        change(d / "data")
        damage(d / STORE, chunk)
        before = fingerprint(d / STORE)
        held, detail = refused_unchanged(toolkit(d, "verify", "--repair", STORE), before, d / STORE,
                                         f"cannot repair {STORE}")
        return {"name": title, "held": held, "detail": detail}

    def remove_task(task: int):
        def change(data: Path) -> None:
            next(data.glob(f"task_{task}_*.pkl")).unlink()
        return change

    def drop_episode(data: Path) -> None:
        for p in data.glob("*.pkl"):
            p.unlink()
        write_data(data, drop_episode=(1, 2))

    out = [
        repair_refusal("a", "a: task pickle removed, verify --repair", 1, remove_task(1)),
        repair_refusal("b", "b: episode removed, verify --repair", 1, drop_episode),
        repair_refusal("c", "c: damaged chunk past the data's end, verify --repair", 7, remove_task(2)),
        repair_refusal("d", "d: data gone, verify --repair", 1, lambda data: shutil.rmtree(data)),
    ]

    # (e) resume of an interrupted store whose data shrank below its committed count
    d = case("e1")
    write_consolidated(d / STORE, 28, False)  # as if killed after 28 committed samples
    remove_task(2)(d / "data")  # the data now gives 24
    res = toolkit(d, "extract", STORE, *ARGS, "--resume")
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    n, complete = committed(d / STORE)
    held = (res.returncode == 2 and len(errors) == 1 and "Traceback" not in res.stderr
            and "cannot resume" in errors[0] and not complete and n == 28)
    out.append({"name": "e: resume, data shrank below the committed count", "held": held,
                "detail": f"exit {res.returncode}, {n} committed, complete={complete}: "
                          f"{errors[0] if errors else (res.stdout.strip().splitlines() or [''])[-1]}"})

    # (e) resume of a complete store: nothing to do, and it says so
    d = case("e2")
    before = fingerprint(d / STORE)
    res = toolkit(d, "extract", STORE, *ARGS, "--resume")
    last = (res.stdout.strip().splitlines() or [""])[-1]
    held = (res.returncode == 0 and "already complete" in last and "nothing written" in last
            and not last.startswith("wrote") and fingerprint(d / STORE) == before)
    out.append({"name": "e: resume of a complete store", "held": held,
                "detail": f"exit {res.returncode}, store {'unchanged' if fingerprint(d / STORE) == before else 'CHANGED'}"
                          f": {last or (res.stderr.strip().splitlines() or [''])[-1]}"})

    # control: an honest repair still restores the store bit for bit
    d = case("control")
    damage(d / STORE, 1)
    damage(d / STORE, 5, "action/resid_post")
    res = toolkit(d, "verify", "--repair", STORE)
    problem = (f"exit {res.returncode}: {(res.stderr.strip().splitlines() or [''])[-1]}" if res.returncode
               else identical(clean, snapshot(d / STORE)))
    out.append({"name": "control: data intact, verify --repair", "held": problem is None,
                "detail": problem or "repaired, identical to the clean run"})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", type=Path, help="where the cases run (default: a temporary folder, removed)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        results = run_repair_cases(args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="repair-cases-") as tmp:
            results = run_repair_cases(tmp)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        width = max(len(r["name"]) for r in results)
        for r in results:
            print(f"{r['name']:<{width}}  {'held' if r['held'] else 'FAILED':<6}  {r['detail']}")
        print(f"{sum(r['held'] for r in results)} of {len(results)} cases honest")
    return 0 if all(r["held"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
