"""Test helpers: a synthetic dataset adapter and in-process plugin registration."""

import contextlib
import sys
import types
from pathlib import Path

import numpy as np

from toolkit.sdk.adapters import DatasetAdapter, Episode, Step
from toolkit.sdk.hookspecs import hookimpl
from toolkit.sdk.plugins import plugin_manager, registry

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "toolkit-tinyvla"))
import toolkit_tinyvla  # noqa: E402


class SyntheticDataset(DatasetAdapter):
    """Episodes of random images whose instruction depends on the task."""

    name = "synthetic"
    description = "synthetic episodes for tests"

    def __init__(self, data=None, n_tasks=3, n_episodes=2, n_steps=5, **options):
        super().__init__(data, **options)
        self.n_tasks, self.n_episodes, self.n_steps = int(n_tasks), int(n_episodes), int(n_steps)

    def episodes(self):
        for t in range(self.n_tasks):
            for e in range(self.n_episodes):
                rng = np.random.default_rng(100 * t + e)
                steps = [Step(index=k, images={"agentview": rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)},
                              state=rng.normal(size=8).astype(np.float32),
                              action=rng.normal(size=7).astype(np.float32), fields={"progress": k / self.n_steps})
                         for k in range(self.n_steps)]
                yield Episode(key=f"task_{t}/episode_{e}", task=f"task {t}", task_id=t,
                              instruction=f"pick up object number {t}", metadata={"success": bool((t + e) % 2)},
                              n_steps=self.n_steps, _steps=steps)


_plugin = types.ModuleType("toolkit_test_synthetic")


@hookimpl
def register_datasets(register):
    register(SyntheticDataset)


_plugin.register_datasets = register_datasets


@contextlib.contextmanager
def registered():
    """Make the synthetic dataset and the tiny VLA model available by name, in this process."""
    pm = plugin_manager()
    added = [m for m in (_plugin, toolkit_tinyvla) if not pm.is_registered(m)
             and "tinyvla" not in registry()["model"] or m is _plugin]
    for m in added:
        if not pm.is_registered(m):
            pm.register(m)
    registry.cache_clear()
    try:
        yield
    finally:
        for m in added:
            if pm.is_registered(m):
                pm.unregister(m)
        registry.cache_clear()


def camera_episodes(instructions, n_episodes=2, n_steps=2):
    """LIBERO-like episodes: agentview (64x64) and wrist (48x48) cameras, 8-dim state, 7-dim action."""
    eps = []
    for e in range(n_episodes):
        rng = np.random.default_rng(e)
        steps = [Step(index=k, images={"agentview": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
                                       "wrist": rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)},
                      state=rng.normal(size=8).astype(np.float32), action=rng.normal(size=7).astype(np.float32))
                 for k in range(n_steps)]
        eps.append(Episode(key=f"task_{e}/episode_0", task=f"task {e}", task_id=e,
                           instruction=instructions[e % len(instructions)], metadata={"success": True},
                           n_steps=n_steps, _steps=steps))
    return eps


@contextlib.contextmanager
def dataset_registered(cls):
    """Make one dataset adapter class available by its name, in this process."""
    plugin = types.SimpleNamespace(register_datasets=hookimpl(lambda register: register(cls)))
    pm = plugin_manager()
    pm.register(plugin, name=cls.name)
    registry.cache_clear()
    try:
        yield cls.name
    finally:
        pm.unregister(plugin)
        registry.cache_clear()


def assert_same_store(a, b, n_samples: int) -> None:
    """Two stores hold the same samples: every coordinate/field and every stream equal, array by array."""
    import toolkit

    a, b = toolkit.open_store(a), toolkit.open_store(b)
    assert b.complete and a.n_samples == b.n_samples == n_samples
    assert a.fields() == b.fields() and a.sites == b.sites
    for f in a.fields():
        assert np.array_equal(a.coord(f), b.coord(f)), f
    for site in a.sites:
        for stream in a.streams(site):
            np.testing.assert_array_equal(a.read(site, stream), b.read(site, stream), err_msg=f"{site}/{stream}")


def register_libero_sim() -> None:
    """The libero-sim plugin through the entry-point group, or registered here when the checkout's metadata
    predates it."""
    if "libero-sim" not in registry()["dataset"]:
        import toolkit_plugins.libero_sim as plugin

        plugin_manager().register(plugin, name="libero_sim")
        registry.cache_clear()


def tinyvla_batch():
    """Three steps of the synthetic dataset for the fixture plugin's tiny VLA: two of one episode, one of another."""
    eps = list(SyntheticDataset().episodes())
    return [(eps[0], s) for s in list(eps[0].steps())[:2]] + [(eps[3], next(eps[3].steps()))]


class ToolkitProcess:
    """``python -m toolkit ARGS`` started in a process of its own; ``wait()`` asserts it succeeded and returns
    ``result``.  A reference run started this way is made while the test that needs it runs its own processes
    (two cores: the reference no longer comes first, in series)."""

    def __init__(self, args, result=None, cwd=None, env=None):
        import subprocess

        self.result = result
        self.proc = subprocess.Popen([sys.executable, "-m", "toolkit", *map(str, args)], cwd=cwd, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.stderr: str | None = None

    def wait(self):
        if self.stderr is None:
            _, self.stderr = self.proc.communicate(timeout=600)
        assert self.proc.returncode == 0, self.stderr[-3000:]
        return self.result

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def write_libero_pickles(folder, tasks=(0, 1, 2), drop_episode=None) -> None:
    """LIBERO task pickles of the embedded sample in ``folder``; ``drop_episode`` (task, episode) leaves one
    episode out (data that changed after a store was made from it)."""
    import pickle
    from pathlib import Path

    from toolkit_plugins.libero.sample import PROTOCOL, file_name, sample_task

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for t in tasks:
        task = sample_task(t)
        if drop_episode and drop_episode[0] == t:
            del task["episodes"][f"episode_{drop_episode[1]}"]
        (folder / file_name(t, task["task_name"])).write_bytes(pickle.dumps(task, protocol=PROTOCOL))


def page_data(html: str) -> dict:
    """The JSON a `toolkit view` page embeds (its `<script id="data">`), from the page's text."""
    import json
    import re

    return json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', html, re.S).group(1))
