"""Deterministic LIBERO-format pickles: the embedded sample and small latent-carrying test data.

Both are written in exactly the format of the LIBERO latent-collection pickles
(``task_{id}_{name}.pkl``: ``task_name``, ``task_id``, ``task_description``, ``episodes`` ->
``episode_N`` -> ``rollout_steps`` -> ``step_K`` {timestep, action, observation, [latents]} and
``metadata`` {success, total_steps, episode_idx}), as protocol-4 pickles of plain dicts and numpy
arrays.

Regenerate the embedded sample (``plugins/libero/data/``)::

    python -m toolkit_plugins.libero.sample plugins/libero/data
"""

from __future__ import annotations

import pickle
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from toolkit_plugins.libero.tasks import LIBERO_OBJECT, task_name

SAMPLE_EPISODES = 4
SAMPLE_STEPS = 6
SAMPLE_STRIDE = 5
SAMPLE_MAX_STEPS = 30  # the sample's rollout limit: failed episodes run to it
IMAGE_SIZE = 32
PROTOCOL = 4
DENOISE_T = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)

# Per-task object colours (RGB), one per libero_object item.
_OBJECT_COLOURS = np.array([
    [200, 40, 40], [235, 235, 220], [120, 180, 60], [110, 50, 30], [220, 30, 20],
    [180, 20, 40], [240, 210, 90], [250, 250, 250], [90, 50, 20], [250, 150, 20],
], dtype=np.float32)
_TABLE = np.array([150, 110, 70], dtype=np.float32)
_BASKET = np.array([170, 140, 90], dtype=np.float32)


def file_name(task_id: int, name: str) -> str:
    return f"task_{task_id}_{name}.pkl"


def _success(task_id: int, episode: int) -> bool:
    # two of the four episodes of every task succeed, a different pair per task
    return (task_id * 3 + episode * 5) % 4 < 2


def _blob(image: np.ndarray, cy: float, cx: float, radius: float, colour: np.ndarray) -> None:
    h, w = image.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
    image[inside] = colour


def _render(task_id: int, progress: float, rng: np.random.Generator, wrist: bool) -> np.ndarray:
    """A procedural camera image: table, basket, and the task's object moving towards the basket."""
    s = IMAGE_SIZE
    img = np.empty((s, s, 3), dtype=np.float32)
    img[:] = _TABLE + (task_id - 4.5) * 3.0  # table colour, slightly tinted per task
    colour = _OBJECT_COLOURS[task_id % len(_OBJECT_COLOURS)]
    # object starts at a task-dependent spot and drifts towards the basket (bottom right)
    y0, x0 = 6 + (task_id * 7) % 16, 5 + (task_id * 11) % 18
    y, x = y0 + (24 - y0) * progress, x0 + (24 - x0) * progress
    if wrist:  # the wrist camera sees the object large and close, gripper fingers at the sides
        img[:] = 0.6 * img + 0.4 * np.array([60, 60, 65], dtype=np.float32)
        _blob(img, s / 2 + (y - s / 2) * 0.3, s / 2 + (x - s / 2) * 0.3, 7 + 3 * progress, colour)
        img[:, :3] = img[:, -3:] = 40.0
    else:
        _blob(img, 24, 24, 6, _BASKET)
        _blob(img, y, x, 3, colour)
    img += rng.normal(0.0, 6.0, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _episode(task_id: int, episode: int) -> dict:
    rng = np.random.default_rng([task_id, episode, 2023])
    success = _success(task_id, episode)
    total = SAMPLE_STRIDE * (SAMPLE_STEPS - 1) + 2 + (task_id + episode) % 3 if success else SAMPLE_MAX_STEPS
    start = np.array([-0.05, 0.0, 1.15], dtype=np.float32) + rng.normal(0, 0.01, 3).astype(np.float32)
    target = np.array([0.1 * np.cos(task_id), 0.1 * np.sin(task_id), 0.95], dtype=np.float32)
    steps = {}
    for i in range(SAMPLE_STEPS):
        t = i * SAMPLE_STRIDE
        progress = t / SAMPLE_MAX_STEPS * (1.0 if success else 0.6)
        eef = start + (target - start) * progress
        axis_angle = np.array([np.pi, 0.0, 0.05 * progress], dtype=np.float32)
        grip = 0.04 * (1.0 - min(1.0, 2 * progress)) + 0.001
        state = np.concatenate([eef, axis_angle + rng.normal(0, 0.005, 3), [grip, -grip]]).astype(np.float32)
        delta = np.clip((target - eef) * 5.0 + rng.normal(0, 0.05, 3), -1, 1)
        action = np.concatenate([delta, rng.normal(0, 0.02, 3), [1.0 if progress > 0.4 else -1.0]])
        steps[f"step_{t}"] = {
            "timestep": t,
            "action": action.astype(np.float32),
            "observation": {
                "agentview_image": _render(task_id, progress, rng, wrist=False),
                "wrist_image": _render(task_id, progress, rng, wrist=True),
                "state": state,
            },
        }
    return {"rollout_steps": steps,
            "metadata": {"success": success, "total_steps": int(total), "episode_idx": episode}}


def sample_task(task_id: int) -> dict:
    """One task of the embedded sample (libero_object, no latents)."""
    instruction = LIBERO_OBJECT[task_id]
    return {
        "task_name": task_name(instruction),
        "task_id": task_id,
        "task_description": instruction,
        "episodes": {f"episode_{e}": _episode(task_id, e) for e in range(SAMPLE_EPISODES)},
    }


def write_sample(out_dir: str | Path) -> list[Path]:
    """Write the embedded sample: the 10 libero_object tasks, 4 episodes of 6 steps each, no latents."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for task_id in range(len(LIBERO_OBJECT)):
        task = sample_task(task_id)
        path = out / file_name(task_id, task["task_name"])
        path.write_bytes(pickle.dumps(task, protocol=PROTOCOL))
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- latent test data


def _latent_block(rng: np.random.Generator, n_layers: int, seq: int, width: int) -> dict[str, np.ndarray]:
    """The four streams of one forward, as the collection script stored them (batch dim of 1)."""
    hidden = rng.standard_normal((n_layers, 1, seq, width)).astype(np.float32)
    mid = rng.standard_normal((n_layers, 1, seq, width)).astype(np.float32)
    return {
        "hidden_states": hidden,
        "post_attn_embedding": mid,
        # norm scales: one per token, stored without a feature dim
        "pre_attn_norm_scales": rng.uniform(0.5, 2.0, (n_layers, 1, seq)).astype(np.float32),
        "pre_mlp_norm_scales": rng.uniform(0.5, 2.0, (n_layers, 1, seq)).astype(np.float32),
    }


def write_latent_pickles(
    out_dir: str | Path,
    n_tasks: int = 3,
    n_episodes: int = 3,
    n_steps: int = 3,
    n_layers: int = 4,
    width: int = 16,
    n_img: int = 8,
    text: int = 48,
    denoise_t: Sequence[float] = DENOISE_T,
    action_tokens: int = 5,
    action_width: int = 8,
    style: str = "layer_output",
    seed: int = 0,
) -> list[Path]:
    """Write small latent-carrying pickles in the seed format, with seeded random values.

    ``style="layer_output"``: ``vlm_layer_output`` and ``action_expert_hidden_state_t{t}`` (four
    streams each, written in the order given by ``denoise_t``).  ``style="experts"``:
    ``expert_0_hidden_states``, ``expert_1_hidden_states`` and ``text_only_hidden_states``.
    Read the values back with ``toolkit.sdk.safe_pickle.load`` to compare.  Steps are step_0, step_5, ...
    """
    if style not in ("layer_output", "experts"):
        raise ValueError(f"style must be 'layer_output' or 'experts', not {style!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seq = n_img + text
    paths = []
    for task_id in range(n_tasks):
        instruction = LIBERO_OBJECT[task_id % len(LIBERO_OBJECT)]
        rng = np.random.default_rng([seed, task_id])
        episodes = {}
        for e in range(n_episodes):
            steps = {}
            for i in range(n_steps):
                t = i * SAMPLE_STRIDE
                step: dict = {
                    "timestep": t,
                    "action": rng.standard_normal(7).astype(np.float32),
                    "observation": {
                        "agentview_image": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
                        "wrist_image": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
                        "state": rng.standard_normal(8).astype(np.float32),
                    },
                }
                if style == "layer_output":
                    step["vlm_layer_output"] = _latent_block(rng, n_layers, seq, width)
                    for dt in denoise_t:
                        step[f"action_expert_hidden_state_t{dt}"] = _latent_block(rng, n_layers, action_tokens,
                                                                                   action_width)
                else:
                    vlm = rng.standard_normal((n_layers, 1, seq, width)).astype(np.float32)
                    step["expert_0_hidden_states"] = vlm
                    step["expert_1_hidden_states"] = rng.standard_normal(
                        (n_layers, 1, action_tokens, action_width)).astype(np.float32)
                    step["text_only_hidden_states"] = vlm[:, :, seq - text:].copy()
                steps[f"step_{t}"] = step
            episodes[f"episode_{e}"] = {
                "rollout_steps": steps,
                "metadata": {"success": bool((task_id + e) % 2 == 0), "total_steps": SAMPLE_STRIDE * n_steps,
                             "episode_idx": e},
            }
        task = {"task_name": task_name(instruction), "task_id": task_id, "task_description": instruction,
                "episodes": episodes}
        path = out / file_name(task_id, task["task_name"])
        path.write_bytes(pickle.dumps(task, protocol=PROTOCOL))
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m toolkit_plugins.libero.sample OUTDIR", file=sys.stderr)
        return 2
    paths = write_sample(argv[0])
    size = sum(p.stat().st_size for p in paths)
    print(f"wrote {len(paths)} task pickles ({size / 1e6:.2f} MB) to {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
