"""OpenVLA-OFT (moojink/openvla-oft): the L1-regression action head, the proprio projector, and finding and
loading them beside an OpenVLA checkpoint.

An OFT fine-tune directory holds the merged OpenVLA model (config.json, safetensors shards, tokenizer) and, written
by upstream's ``vla-scripts/finetune.py``:

* ``action_head--{step}_checkpoint.pt``: ``L1RegressionActionHead``, an ``MLPResNet`` under ``model.``
  (``layer_norm1``, ``fc1``, two ``mlp_resnet_blocks.N.ffn`` = LayerNorm/Linear/ReLU with a residual,
  ``layer_norm2``, ``fc2``), input width ``llm_dim * ACTION_DIM`` (one row per action of the chunk), hidden width
  ``llm_dim``, output ``ACTION_DIM``;
* ``proprio_projector--{step}_checkpoint.pt``: ``fc1`` (proprio_dim -> llm_dim), GELU, ``fc2`` (llm_dim -> llm_dim);
* ``dataset_statistics.json``: the fine-tuning dataset's statistics, replacing the config's ``norm_stats``;
* in variants the toolkit does not implement: ``noisy_action_projector--*`` (diffusion head) and
  ``vision_backbone--*`` (FiLM).

The ``.pt`` files are ``state_dict()``s, with DDP's ``module.`` prefix when trained on several GPUs; upstream finds
each by the substring of its name plus ``checkpoint`` (exactly one per component).  They are read with
``torch.load(weights_only=True)``: tensors only, never arbitrary pickled objects.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from toolkit.sdk.checkpoint import CheckpointError, LoadReport, load_into, strip_prefix
from toolkit.sdk.errors import ToolkitError
from toolkit.sdk.hf import one_line

ACTION_HEAD = "action_head"
PROPRIO_PROJECTOR = "proprio_projector"
# component name pattern -> what the variant is; the toolkit refuses these in one line naming the file
UNSUPPORTED = {
    "noisy_action_projector": "the diffusion action head's noisy-action projector (OFT's diffusion variant)",
    "vision_backbone": "the FiLM vision backbone (OFT+, FiLM language conditioning)",
}
STATISTICS = "dataset_statistics.json"
# upstream's platform constants (prismatic/vla/constants.py): chunk, and the normalisation of actions and proprio
PLATFORMS = {
    "libero": {"chunk": 8, "normalization": "bounds_q99"},
    "aloha": {"chunk": 25, "normalization": "bounds"},
    "bridge": {"chunk": 5, "normalization": "bounds_q99"},
}


def component_files(ckpt: Path, pattern: str) -> list[Path]:
    """The files of one OFT component, found as upstream's ``find_checkpoint_file`` does: the pattern and
    ``checkpoint`` both in the name."""
    if not ckpt.is_dir():
        return []
    return sorted(p for p in ckpt.iterdir() if pattern in p.name and "checkpoint" in p.name and p.is_file())


def component_file(ckpt: Path, pattern: str) -> Path | None:
    """The one file of a component (None: absent); several are one line listing them."""
    found = component_files(ckpt, pattern)
    if len(found) > 1:
        raise CheckpointError(f"openvla-oft: {ckpt} holds {len(found)} {pattern} checkpoints "
                              f"({', '.join(p.name for p in found)}); keep exactly one (upstream loads only one)")
    return found[0] if found else None


def oft_head_file(ckpt: Path) -> Path | None:
    """The directory's ``action_head--*checkpoint*`` file: the sign of an OpenVLA-OFT fine-tune."""
    return next(iter(component_files(ckpt, ACTION_HEAD)), None)


def refuse_unsupported(ckpt: Path) -> None:
    """One line naming the file of an OFT variant the toolkit does not implement (diffusion, FiLM)."""
    for pattern, what in UNSUPPORTED.items():
        found = component_files(ckpt, pattern)
        if found:
            raise CheckpointError(f"openvla-oft: {found[0]} is {what}, which the toolkit does not implement; only "
                                  "L1-regression OFT checkpoints (action_head + proprio_projector) are supported")


def read_component(path: Path) -> dict[str, torch.Tensor]:
    """A component's state dict: ``torch.load(weights_only=True)``, DDP's ``module.`` prefix stripped."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a corrupt file, or one pickling more than tensors: one line
        raise CheckpointError(f"openvla-oft: cannot read {path} as a state dict with torch.load(weights_only=True) "
                              f"({one_line(e)})") from None
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"openvla-oft: {path} is not a state dict of tensors (upstream saves "
                              "module.state_dict())")
    return strip_prefix(obj, ["module."])


def _shape(sd: dict[str, torch.Tensor], key: str, path: Path, ndim: int) -> tuple[int, ...]:
    t = sd.get(key)
    if t is None or t.ndim != ndim:
        raise CheckpointError(f"openvla-oft: {path} has no {ndim}-D tensor {key!r}; is it an OFT "
                              f"{path.name.split('--')[0]} checkpoint? (keys: {', '.join(list(sd)[:5])})")
    return tuple(t.shape)


def read_statistics(ckpt: Path) -> dict[str, Any] | None:
    """``dataset_statistics.json`` ({dataset: {action: {...}, proprio: {...}}}), or None when absent."""
    path = ckpt / STATISTICS
    if not path.is_file():
        return None
    try:
        stats = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ToolkitError(f"openvla-oft: cannot read {path}: {one_line(e)}") from None
    if not isinstance(stats, dict) or not all(isinstance(v, dict) and "action" in v for v in stats.values()):
        raise ToolkitError(f"openvla-oft: {path} is not {{dataset: {{action: {{...}}}}}} statistics")
    return stats


# --------------------------------------------------------------------------- the modules (upstream's names)


class MLPResNetBlock(nn.Module):
    """Pre-LayerNorm feed-forward block with a residual: x + ReLU(Linear(LayerNorm(x)))."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(x)


class MLPResNet(nn.Module):
    """LayerNorm -> Linear -> ReLU -> residual blocks -> LayerNorm -> Linear."""

    def __init__(self, num_blocks: int, input_dim: int, hidden_dim: int, output_dim: int) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(input_dim)
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.relu = nn.ReLU()
        self.mlp_resnet_blocks = nn.ModuleList(MLPResNetBlock(hidden_dim) for _ in range(num_blocks))
        self.layer_norm2 = nn.LayerNorm(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.fc1(self.layer_norm1(x)))
        for block in self.mlp_resnet_blocks:
            x = block(x)
        return self.fc2(self.layer_norm2(x))


class L1RegressionActionHead(nn.Module):
    """OFT's L1-regression head.  Its input (the hooked one) is the LLM's final hidden states at the chunk's
    ``chunk * action_dim`` action positions, (B, chunk * action_dim, llm_dim); each action's ``action_dim``
    states are concatenated into one row, and the MLP gives that action: (B, chunk, action_dim)."""

    def __init__(self, llm_dim: int, action_dim: int, num_blocks: int = 2) -> None:
        super().__init__()
        self.action_dim = action_dim
        self.model = MLPResNet(num_blocks, llm_dim * action_dim, llm_dim, action_dim)

    def forward(self, actions_hidden_states: torch.Tensor) -> torch.Tensor:
        b, k, h = actions_hidden_states.shape
        return self.model(actions_hidden_states.reshape(b, k // self.action_dim, self.action_dim * h))


class ProprioProjector(nn.Module):
    """The proprioceptive state (normalised) -> one LLM token: fc1 -> GELU -> fc2."""

    def __init__(self, llm_dim: int, proprio_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(proprio_dim, llm_dim)
        self.act_fn1 = nn.GELU()
        self.fc2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, proprio: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act_fn1(self.fc1(proprio)))


# --------------------------------------------------------------------------- loading


def head_shapes(head: Path, proprio: Path | None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None,
                                                           int, int | None]:
    """The two state dicts, the head's action width (its ``fc2`` rows) and the projector's proprio width."""
    head_sd = read_component(head)
    action_dim = _shape(head_sd, "model.fc2.weight", head, 2)[0]
    proprio_sd = read_component(proprio) if proprio is not None else None
    proprio_dim = _shape(proprio_sd, "fc1.weight", proprio, 2)[1] if proprio_sd is not None else None
    return head_sd, proprio_sd, action_dim, proprio_dim


def attach_heads(model: nn.Module, llm_dim: int, action_dim: int, proprio_dim: int | None) -> None:
    """``model.action_head`` (and ``model.proprio_projector``) in the model's dtype and device, default-initialised
    (float32 build: the seeded random weights of --random-weights and of the small default)."""
    ref = next(model.language_model.parameters())
    model.action_head = L1RegressionActionHead(llm_dim, action_dim).to(ref.device, ref.dtype)
    if proprio_dim is not None:
        model.proprio_projector = ProprioProjector(llm_dim, proprio_dim).to(ref.device, ref.dtype)


def load_heads(model: nn.Module, ckpt: Path, base: LoadReport, *, allow_missing: bool, strict: bool) -> LoadReport:
    """Attach and load the OFT head (and projector) onto the loaded Prismatic model; the returned report is the
    base model's extended with the heads' tensors (names under ``action_head.`` / ``proprio_projector.``)."""
    head, proprio = component_file(ckpt, ACTION_HEAD), component_file(ckpt, PROPRIO_PROJECTOR)
    if head is None:
        raise CheckpointError(f"openvla-oft: {ckpt} has no action_head--*checkpoint.pt: it is not an OFT "
                              "fine-tune (run plain OpenVLA checkpoints with --model openvla)")
    head_sd, proprio_sd, action_dim, proprio_dim = head_shapes(head, proprio)
    attach_heads(model, model.language_model.config.hidden_size, action_dim, proprio_dim)
    parts = [("action_head", head, head_sd, "L1-regression MLPResNet head")]
    if proprio_sd is not None:
        parts.append(("proprio_projector", proprio, proprio_sd, "proprio projector"))
    report = LoadReport(source=base.source, layout=base.layout, n_params=base.n_params, loaded=list(base.loaded),
                        derived=list(base.derived), missing=list(base.missing), unexpected=list(base.unexpected))
    for name, path, sd, what in parts:
        r = load_into(getattr(model, name), sd, source=str(path), layout=f"openvla-oft {what}",
                      allow_missing=allow_missing, strict=strict)
        report.layout += f" + {path.name}"
        report.n_params += r.n_params
        for field in ("loaded", "derived", "missing", "unexpected"):
            getattr(report, field).extend(f"{name}.{n}" for n in getattr(r, field))
    return report
