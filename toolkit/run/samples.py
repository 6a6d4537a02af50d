"""A run's samples: every ``stride``-th step of each episode in the dataset's deterministic order (open loop), or
every policy call of a simulator's episodes (closed loop); their per-sample coordinates and fields; and the
per-sample random streams that make a resumed or a Ray-split run equal an uninterrupted one."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from toolkit.sdk import fields
from toolkit.sdk.adapters import Episode, Step
from toolkit.sdk.errors import ToolkitError
from toolkit.store.chunks import CorruptStoreError, read_chunk

if TYPE_CHECKING:
    from toolkit.run.spec import RunSpec
    from toolkit.store.writer import StoreWriter


@dataclass
class Sample:
    index: int  # position along the store's sample axis
    episode_index: int  # ordinal of the episode in this run
    episode: Episode
    step: Step
    capture: bool = True  # closed loop: False for a policy call that drives the simulator but is not stored
    call: int = 0  # closed loop: the policy call's ordinal within its episode


@dataclass
class EpisodeEnd:
    """Closed loop: the episode's steps are exhausted, so its metadata and step fields are final."""

    episode_index: int
    episode: Episode


def run_episodes(dataset, spec: RunSpec) -> Iterator[Episode]:
    """The episodes a run processes, in the dataset's deterministic order: those ``spec.episodes`` picks by
    position (all by default), at most ``spec.max_episodes`` of them."""
    picked = spec.picked_episodes()
    episodes = dataset.episodes() if picked is None else (ep for i, ep in enumerate(dataset.episodes())
                                                          if i in picked)
    return itertools.islice(episodes, spec.max_episodes)


def iter_samples(dataset, spec: RunSpec) -> Iterator[Sample]:
    """Every ``spec.stride``-th step of the first ``spec.max_steps`` of each episode the run processes."""
    index = 0
    for e, ep in enumerate(run_episodes(dataset, spec)):
        for k, step in enumerate(itertools.islice(ep.steps(), spec.max_steps)):
            if k % spec.stride:
                continue
            yield Sample(index, e, ep, step)
            index += 1


def iter_closed_loop(dataset, spec: RunSpec, done: list[str] | None = None, start: int = 0,
                     only: int | None = None) -> Iterator[Sample | EpisodeEnd]:
    """Every step (= policy call) of a closed-loop dataset, every ``stride``-th one marked for capture,
    and an ``EpisodeEnd`` after each episode.  A resumed run passes the keys of the episodes the store
    holds (``done``, in order) and its sample count (``start``): those episodes are checked and skipped
    without running them.  ``only``: run just that episode (one Ray actor's share, ``toolkit.run.ray``)."""
    done = list(done or [])
    index, seen = start, 0
    for e, ep in enumerate(run_episodes(dataset, spec)):
        seen = e + 1
        if e < len(done):
            if ep.key != done[e]:
                raise ToolkitError(f"cannot resume: episode {e} of the store is {done[e]}, but the dataset gives "
                                   f"{ep.key}; the store was made from other options (use --overwrite)")
            continue
        if only is not None and e != only:
            continue
        for k, step in enumerate(ep.steps()):
            capture = k % spec.stride == 0
            yield Sample(index, e, ep, step, capture, k)
            index += capture
        yield EpisodeEnd(e, ep)
    if seen < len(done):
        raise ToolkitError(f"cannot resume: the store holds {len(done)} episodes, the dataset gives {seen} "
                           "(use --overwrite)")


def closed_loop_options(spec: RunSpec) -> dict[str, Any]:
    """A closed-loop dataset's options: the run's seed and --max-steps go to the simulator, which needs each
    call's actions before it can give the next step (so batches of one)."""
    if spec.batch_size != 1:
        raise ToolkitError(f"dataset {spec.dataset!r} runs closed-loop (a simulator): --batch-size must be 1, "
                           f"got {spec.batch_size}")
    return {"seed": spec.seed, **({} if spec.max_steps is None else {"max_steps": spec.max_steps}),
            **spec.dataset_options}


def expected_samples(dataset, spec: RunSpec) -> int | None:
    """How many samples an open-loop run will store, from the dataset's ``length_hint()`` (None: unknown)."""
    hint = dataset.length_hint()
    if hint is None:
        return None
    picked = spec.picked_episodes()
    if picked is not None:
        hint = [n for i, n in enumerate(hint) if i in picked]
    steps = itertools.islice(hint, spec.max_episodes)
    return sum(-(-(n if spec.max_steps is None else min(n, spec.max_steps)) // spec.stride) for n in steps)


def batches(samples: Iterator[Sample], size: int) -> Iterator[list[Sample]]:
    while batch := list(itertools.islice(samples, size)):
        yield batch


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The per-sample random stream: the same sample gets the same noise in any run or resume."""
    return torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63))


def call_generator(seed: int, episode_index: int, call: int) -> torch.Generator:
    """Closed loop: the random stream of policy call ``call`` of episode ``episode_index`` (captured or not)."""
    return sample_generator(seed, episode_index * 1_000_003 + call)


def sample_fields(batch: list[Sample], check: fields.FieldCheck | None = None) -> dict[str, np.ndarray]:
    """Per-sample coordinates and dataset fields for a batch, checked against their declared types
    (``toolkit.sdk.fields``; ``check`` carries the sizes first seen in the run) before anything is stored."""
    actions = fields.check_samples([(s.episode, s.step) for s in batch], check or fields.FieldCheck())
    out: dict[str, Any] = {
        "episode": np.array([s.episode_index for s in batch], dtype=np.int32),
        "step": np.array([s.step.index for s in batch], dtype=np.int32),
        "task": np.array([s.episode.task for s in batch], dtype=object),
        "task_id": np.array([fields.task_id(s.episode.task_id, "") for s in batch], dtype=np.int32),
        "success": np.array([fields.success(s.episode.metadata.get("success"), "") for s in batch], dtype=np.int8),
        "episode_key": np.array([s.episode.key for s in batch], dtype=object),
        "instruction": np.array([s.episode.instruction for s in batch], dtype=object),
    }
    if actions[0] is not None:
        out["dataset_action"] = np.stack(actions)
    for name in batch[0].step.fields:
        values = [s.step.fields.get(name) for s in batch]
        # strings stay variable-length (a fixed-width array would cut a longer value in a later batch)
        kind = object if any(isinstance(v, str) for v in values) else None
        out[f"field_{name}" if name in out else name] = np.array(values, dtype=kind)
    return out


def stored_episodes(writer: StoreWriter) -> list[str]:
    """Keys of the episodes a resumed store holds, in order (closed loop: all of them finished)."""
    if not writer.committed:
        return []
    keys = [str(k) for k in writer.root["episode_key"][:writer.committed]]
    return list(dict.fromkeys(keys))


# The per-sample fields a store keeps that say which sample it is: a resume or a repair may only continue a store
# whose samples the data still gives, in order, with these values.
IDENTITY = ("episode_key", "episode", "step", "task", "task_id", "instruction")


def sample_identity(s: Sample) -> dict[str, Any]:
    """A sample's identity as the store keeps it (``IDENTITY``; as ``sample_fields`` stores it)."""
    return {"episode_key": s.episode.key, "episode": s.episode_index, "step": s.step.index, "task": s.episode.task,
            "task_id": fields.task_id(s.episode.task_id, s.episode.key), "instruction": s.episode.instruction}


def stored_identities(root: Any, n: int, skip_bad: bool = False) -> dict[str, list[Any]]:
    """The first ``n`` values of each ``IDENTITY`` field a store holds, read through the checked chunk path
    (``read_chunk``).  ``skip_bad``: a chunk that cannot be read gives None for its samples (a repair checks what
    is readable) instead of raising ``CorruptStoreError``."""
    out: dict[str, list[Any]] = {}
    for name in IDENTITY:
        try:
            arr = root[name]
        except KeyError:
            continue  # a store made before the field existed: not compared
        values: list[Any] = []
        size = int(arr.chunks[0])
        for c in range(-(-n // size) if n else 0):
            want = min(size, n - c * size)
            try:
                values += [v.item() if hasattr(v, "item") else v for v in read_chunk(arr, c)[:want]]
            except CorruptStoreError:
                if not skip_bad:
                    raise
                values += [None] * want
        out[name] = values[:n]
    return out


def _describe(ident: dict[str, Any]) -> str:
    return f"{ident.get('episode_key')} step {ident.get('step')}"


def identity_difference(stored: dict[str, list[Any]], k: int, s: Sample) -> str | None:
    """How sample ``k`` of the store differs from the data's sample ``s`` (None: the same)."""
    given = sample_identity(s)
    for name, values in stored.items():
        old = values[k]
        if old is None:  # unreadable (a bad chunk being repaired): the other fields decide
            continue
        new = given[name]
        same = str(old) == str(new) if isinstance(new, str) else int(old) == int(new)
        if not same:
            if name in ("episode_key", "step"):
                had = {n: v[k] for n, v in stored.items()}
                return f"the store has {_describe(had)}, the data gives {_describe(given)}"
            return f"{_describe(given)} has {name} {old!r} in the store but {new!r} in the data"
    return None


def _restore(data: str | None) -> str:
    where = f" ({data})" if data else ""
    return f"restore the data it was made from{where}"


def check_samples(stored: dict[str, list[Any]], samples: Iterator[Sample], n: int, *, exact: bool, what: str,
                  data: str | None = None) -> None:
    """The data's first ``n`` samples must be the store's ``n`` (``stored``: ``stored_identities``), in order;
    ``exact``: and no more (a complete store).  ``what`` opens the one-line refusal (``cannot resume STORE``)."""
    got = 0
    for s in itertools.islice(samples, n):
        diff = identity_difference(stored, got, s)
        if diff:
            raise ToolkitError(f"{what}: sample {got} differs: {diff}; {_restore(data)} or re-extract with "
                               "--overwrite")
        got += 1
    if got < n:
        raise ToolkitError(f"{what}: it holds {n} committed samples but the data now gives {got}; "
                           f"{_restore(data)} or re-extract with --overwrite")
    if exact:
        extra = next(samples, None)
        if extra is not None:
            raise ToolkitError(f"{what}: it is complete with {n} samples but the data now gives more (sample {n} "
                               f"would be {_describe(sample_identity(extra))}); {_restore(data)} or re-extract "
                               "with --overwrite")


def check_resume_prefix(writer: StoreWriter, samples: Iterator[Sample], committed: int) -> None:
    """A resumed open-loop store: the data gives at least its ``committed`` samples, the same ones in order (and no
    more when the store is complete), before anything is written."""
    complete = bool(writer.root.attrs.get("complete"))
    data = (writer.spec or {}).get("data")
    check_samples(stored_identities(writer.root, committed), samples, committed, exact=complete,
                  what=f"cannot resume {writer.path}", data=data)
