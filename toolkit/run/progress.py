"""The progress bar of a run: samples/s, episodes, steps and MB written; a total and an ETA where the dataset knows
its size."""

from __future__ import annotations

from typing import Any


class Progress:
    """tqdm bar: samples/s, episodes, steps and MB written; a total and an ETA where the dataset knows its size."""

    def __init__(self, enabled: bool, writer: Any, initial: int, total: int | None = None):
        self.writer = writer
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm
            self.bar = tqdm(unit="sample", initial=initial, total=total, dynamic_ncols=True, desc="extract")
        self.episodes: set[int] = set()

    def update(self, batch: list[Any]) -> None:
        if self.bar is None:
            return
        self.episodes.update(s.episode_index for s in batch)
        self.bar.update(len(batch))
        self.bar.set_postfix(episodes=len(self.episodes), step=batch[-1].step.index,
                             MB=f"{self.writer.bytes_added / 1e6:.1f}", refresh=False)

    def advance(self, n: int, **postfix: Any) -> None:
        """``n`` more samples done elsewhere (Ray workers): the bar moves, with ``postfix`` beside it."""
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(**postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
