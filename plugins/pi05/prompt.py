"""pi0.5's prompt: the task and the state discretised into 256 bins, as lerobot's ``Pi05PrepareStateTokenizer
ProcessorStep`` and transformers' ``PI05Processor`` write it, laid out in fixed slots.

Upstream: the state, normalised to [-1, 1], becomes ``digitize(state, linspace(-1, 1, 257)[:-1]) - 1`` (bins
0..255; -1 below -1, no clipping), and the prompt is ``BOS + "Task: {task}, State: {b0 b1 ...};\\nAction: "``
(the task stripped, ``_`` and newlines as spaces), tokenised in one piece and cut to the tokenizer's max length.

Here the same token ids are placed in three slots with padding between them: ``[BOS Task: ..., State:]`` (the
upstream budget), ``[the state's tokens]`` (at most one per character) and ``[;\\nAction: ]``.  Padding is masked
and positions count real tokens only (``cumsum(mask) - 1``), so every real token sees the same tokens at the same
positions as upstream's contiguous prompt, while the spans ``task`` and ``state`` are the same for every sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BINS = 256
TAIL = ";\nAction: "


def discretise(state: np.ndarray) -> np.ndarray:
    """Normalised state -> bin indices, exactly as openpi/lerobot (``np.digitize`` over 256 left edges, minus 1)."""
    edges = np.linspace(-1, 1, BINS + 1)[:-1]
    return np.digitize(np.asarray(state, dtype=np.float32), bins=edges) - 1


def clean_task(instruction: str) -> str:
    return instruction.strip().replace("_", " ").replace("\n", " ")


def prompt_text(instruction: str, bins: np.ndarray | None) -> tuple[str, int, int]:
    """(the prompt without BOS, start and end character of the state's numbers; both at the tail without state)."""
    head = f"Task: {clean_task(instruction)}"
    if bins is None:
        return head + TAIL, len(head), len(head)
    numbers = " ".join(str(int(b)) for b in bins)
    start = len(head) + len(", State: ")
    return f"{head}, State: {numbers}{TAIL}", start, start + len(numbers)


def state_slot(n_state: int) -> int:
    """Tokens the state's numbers can take: at most one per character (``-1`` .. ``255``, space-separated)."""
    return 4 * n_state if n_state else 0


@dataclass
class Slots:
    """Widths of the three slots of the language region."""

    head: int  # BOS + "Task: ..., State:" (upstream's whole budget, so nothing is cut that upstream keeps)
    state: int
    tail: int = len(TAIL)

    @property
    def total(self) -> int:
        return self.head + self.state + self.tail


def split_tokens(tokenizer, text: str, start: int, end: int, max_tokens: int
                 ) -> tuple[list[int], list[int], list[int], bool]:
    """Tokenise ``text`` as upstream does (BOS first, one call, cut to ``max_tokens``) and split the ids by where
    each token starts: before the state's numbers, inside them, after them.  The last item says whether upstream's
    length limit cut the prompt."""
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):  # a tokenizer that adds no BOS: put it first, as upstream
        ids, offsets = [bos, *ids], [(0, 0), *offsets]
    cut = len(ids) > max_tokens
    ids, offsets = ids[:max_tokens], offsets[:max_tokens]
    head, state, tail = [], [], []
    for i, (a, b) in zip(ids, offsets):
        special = a == b == 0
        (head if special or a < start else state if a < end else tail).append(i)
    return head, state, tail, cut
