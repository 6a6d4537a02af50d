"""The watchdog of a local Ray cluster: ``python -I ray_watchdog.py DRIVER_PID SESSION_DIR RAY_DIR``.

Linux only; a process of its own that imports nothing of Ray or the toolkit.  Ray ties its head processes (gcs_server, raylet, dashboard, monitors) to the driver with
PR_SET_PDEATHSIG, and the raylet's workers exit a second or two after it, but its dashboard and runtime-env agents
see the raylet die and then block ~60 s reporting that to the dead GCS before they exit (measured, Ray 2.60).
When the driver is gone (even SIGKILLed) this kills every process of the cluster's session: a process whose
command line is Ray's (``ray::…`` or a program under Ray's package folder) and that holds a file of the
session's folder open (each of them holds its logs or the raylet's inherited ones).  A cluster the user started
has another session folder, so it is never touched.  When the raylet ends first (``ray.shutdown()``: a run that
ended, failed or was interrupted) the watchdog just exits; it also ends once its sweep finds nothing left.

Run as a script by ``toolkit.run.ray._watch_driver``; it imports nothing but the standard library.
"""

import os
import signal
import sys
import time


def stat(pid):  # (ppid, state, start time), or None when the process is gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return int(fields[1]), fields[0], fields[19]


def alive(pid, start):
    st = stat(pid)
    return st is not None and st[1] not in "ZXx" and st[2] == start


def args(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")
    except OSError:
        return [""]


def pids():
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]


def in_session(pid, session, ray_dir):
    a = args(pid)
    if not (a[0].startswith("ray::") or any(x.startswith(ray_dir) for x in a[:3])):
        return False
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(session):
                return True
        except OSError:
            pass
    return False


def main() -> None:
    driver, session, ray_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    first = stat(driver) if os.getppid() == driver else None  # None: the driver is gone already
    raylet = next(((p, st[2]) for p in pids() if (st := stat(p)) and st[0] == driver
                   and os.path.basename(args(p)[0]) == "raylet"), None)
    if raylet is None:
        return  # the driver's cluster is not one it started: not ours to end
    while first and alive(driver, first[2]):
        if not alive(*raylet):
            return  # the driver shut its cluster down
        time.sleep(0.5)
    for _ in range(40):  # the driver is gone: end its cluster
        left = [p for p in pids() if in_session(p, session, ray_dir)]
        if not left:
            break
        for p in left:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.25)

if __name__ == "__main__":
    main()
