"""pi0 on transformers' native ``PI0ForConditionalGeneration``.

Two experts share one attention cache: the VLM (PaliGemma's Gemma, ``model.vlm.language_model``) runs the
prefix ``[image tokens per camera][BOS instruction \\n, padded to 48]`` once per policy call; the action
expert (``model.dit``) runs the suffix ``[state][50 noisy actions]`` once per flow-matching step
(t = 1.0, 0.9, ..., 0.1).  Without a checkpoint a small randomly initialised pi0 of the same architecture
is built (smoke tests only).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field

from toolkit.sdk.adapters import DECODER_STREAMS, Episode, Expert, ModelInputs, PolicyOutput, SiteInfo, Step
from toolkit.sdk.checkpoint import load_into, read_tensors, safetensors_shapes
from toolkit.sdk.options import AdapterOptions
from toolkit_plugins.pi0 import layouts, normalise
from toolkit_plugins.pi0.shared import TINY_EXPERTS, PaliGemmaFlowAdapter, load_tokenizer


class Pi0Options(AdapterOptions):
    """The ``--model-option`` names of pi0."""

    action_dim: int | None = Field(None, ge=1, description="action dimensions kept from the policy's 32 (default: "
                                  "the lerobot checkpoint's action feature size, else 7 as in LIBERO)")
    max_text_tokens: int = Field(48, ge=1, description="instruction tokens (BOS + text + newline), padded")
    cameras: str | list[str] | None = Field(None, description="camera order, comma-separated (default: sorted)")
    num_steps: int | None = Field(None, ge=1, description="flow-matching steps (default: the checkpoint's)")
    tokenizer: str | None = Field(None, description="local PaliGemma tokenizer: a directory or a tokenizer.model")
    stats: str | None = Field(None, description="statistics: a norm_stats.json or a lerobot processor directory")
    normalise: bool = Field(True, description="normalise the state and unnormalise actions with the statistics")


TINY_CONFIG = {**TINY_EXPERTS, "max_state_dim": 32}  # the small random pi0
RANDOM_WARNING = ("pi0: no --checkpoint given, using a small randomly initialised pi0 (same architecture, "
                  "random weights) - results are for smoke tests only")


def build_tiny_model(seed: int):
    from transformers import PI0Config, PI0ForConditionalGeneration

    torch.manual_seed(seed)
    return PI0ForConditionalGeneration(PI0Config(**TINY_CONFIG)).eval()


SITES = {
    "vlm": SiteInfo("vlm", "vlm", "all", "mean", "VLM expert, every prefix token"),
    "text_only": SiteInfo("text_only", "vlm", "text", "mean", "VLM expert, instruction tokens only"),
    "action": SiteInfo("action", "action", "all", "mean", "action expert, state and action tokens"),
}


def pi0_experts(vlm: tuple[int, int], dit: tuple[int, int], cameras: Sequence[str] | None,
                num_steps: int) -> dict[str, Expert]:
    """The two experts, from the (layers, width) of the VLM and of the action expert (one span per camera once
    the camera order is known)."""
    cams = tuple(f"image.{c}" for c in cameras or ())
    return {
        "vlm": Expert("vlm", "model.vlm.language_model.layers", *vlm, ("image", *cams, "text"),
                      streams=dict(DECODER_STREAMS),
                      description="PaliGemma language model over the prefix (images, instruction)"),
        "action": Expert("action", "model.dit.layers", *dit, ("state", "actions"), denoise_steps=num_steps,
                         streams=dict(DECODER_STREAMS),
                         description="action expert over the suffix (state, noisy actions), once per denoising step"),
    }


class Pi0Adapter(PaliGemmaFlowAdapter):
    """pi0 (PaliGemma VLM + flow-matching action expert) on transformers' PI0ForConditionalGeneration."""

    name = "pi0"
    description = "pi0 (PaliGemma VLM + flow-matching action expert), transformers-native"
    Options = Pi0Options
    LAYOUTS = layouts
    TINY_CONFIG = TINY_CONFIG
    SITES = SITES
    experts_of = staticmethod(pi0_experts)
    transformers_model = "PI0ForConditionalGeneration"
    random_warning = RANDOM_WARNING
    build_tiny_model = staticmethod(build_tiny_model)

    def _read_sizes(self) -> None:
        super()._read_sizes()
        self.max_state_dim = self.model.config.max_state_dim
        self.max_text_tokens = int(self.opts["max_text_tokens"])

    # loading ------------------------------------------------------------------------------
    def _load_tokenizer(self, directory: Path | None):
        return load_tokenizer("pi0", self.opts["tokenizer"], directory, self.trust_remote_code)

    @classmethod
    def _recognise(cls, checkpoint: str, shapes: dict[str, tuple[int, ...]], meta: dict[str, Any],
                   directory: Path | None) -> str:
        layouts.refuse_other_family(checkpoint, list(shapes), meta, directory)
        return layouts.recognise(list(shapes))

    def _fill(self, model: torch.nn.Module, checkpoint: str, tensors: dict[str, torch.Tensor], names: set[str]):
        weights, _ = layouts.to_model_names(tensors, names)
        derived = [n for n in layouts.UNUSED if n not in weights and n in names]
        for name in derived:  # never read by pi0's forward; zeros rather than uninitialised memory
            model.get_parameter(name).data.zero_()
        # an untied lm_head beside embed_tokens is unused upstream too: recorded as ignored, not warned about
        return load_into(model, weights, source=checkpoint, layout=self.layout, derived=derived,
                         allow_missing=self.allow_missing, strict=self.strict,
                         ignored=layouts.dropped_lm_head(list(tensors)),
                         file_names=layouts.file_names(list(tensors), names))

    def _find_statistics(self, checkpoint: str, directory: Path, files: list[Path]) -> None:
        self.relative = self._relative_actions(checkpoint, directory, self.meta)
        if self.normalise_enabled:
            self.norm = (normalise.find(directory, self.meta, self.opts["stats"])
                         or normalise.buffer_stats(self._stats_buffers(files), self.meta, str(files[0])))
            if self.norm is None:
                self.warn_once(f"pi0: {checkpoint} has no normalisation statistics (no lerobot processor files, "
                               "no openpi assets/*/norm_stats.json): the state goes in raw and the actions are "
                               "stored in the policy's normalised units; give them with --model-option stats=PATH")

    @staticmethod
    def _stats_buffers(files: list[Path]) -> dict[str, torch.Tensor]:
        """The normalisation buffers the older lerobot policies saved among their weights ({} when none)."""
        keys = [k for k in safetensors_shapes(files) if layouts.STATS_BUFFERS.match(k)]
        return read_tensors(files, keys) if keys else {}

    # inputs ------------------------------------------------------------------------------------
    def _text(self, instruction: str) -> list[int]:
        tok = self.tokenizer
        ids = tok(instruction.strip().replace("\n", " ") + "\n", add_special_tokens=False)["input_ids"]
        if tok.bos_token_id is not None:
            ids = [tok.bos_token_id, *ids]
        if len(ids) > self.max_text_tokens:
            self.warn_once(f"pi0: instruction {instruction[:40]!r}... is {len(ids)} tokens, truncated to "
                            f"{self.max_text_tokens}")
            ids = ids[: self.max_text_tokens]
        return ids

    def _state(self, state: np.ndarray | None) -> torch.Tensor:
        out = torch.zeros(self.max_state_dim)
        if state is None:
            return out
        s = np.asarray(state, dtype=np.float32).reshape(-1)
        if self.norm and self.norm.state:  # normalised first, then zero-padded, as lerobot and openpi do
            s = self.norm.state.normalise(s)
        s = s[: self.max_state_dim]
        out[: len(s)] = torch.from_numpy(s)
        return out

    def prepare(self, batch: Sequence[tuple[Episode, Step]]) -> ModelInputs:
        self._fix_cameras(batch)
        n_img, ids, mask, pixels = self._prefix(len(batch), self.max_text_tokens)
        seq = n_img + self.max_text_tokens
        states = torch.zeros(len(batch), self.max_state_dim)
        raw = [None if s.state is None else np.asarray(s.state, dtype=np.float32).reshape(-1) for _, s in batch]
        for i, (ep, step) in enumerate(batch):
            self._put_images(i, ep, step, pixels, mask)
            text = self._text(ep.instruction)
            ids[i, n_img:n_img + len(text)] = torch.tensor(text, dtype=torch.long)
            mask[i, n_img:n_img + len(text)] = True
            states[i] = self._state(step.state)
        dev, dt = self.device, self.torch_dtype
        tensors = {
            **self._prefix_tensors(ids, mask, pixels),
            "state": states.to(dev, dt),
            # the raw state, for relative actions (lerobot adds it to the unnormalised chunk)
            "raw_state": None if any(r is None for r in raw) or len({len(r) for r in raw}) != 1 else np.stack(raw),
        }
        spans = {
            "vlm": {**self._image_spans(), "text": list(range(n_img, seq))},
            "action": {"state": [0], "actions": list(range(1, self.chunk_size + 1))},
        }
        return ModelInputs(
            tensors=tensors, batch_size=len(batch), spans=spans,
            token_mask={"vlm": mask.to(dev), "action": torch.ones(len(batch), self.chunk_size + 1, dtype=torch.bool,
                                                                   device=dev)},
            seq_len={"vlm": seq, "action": self.chunk_size + 1},
        )

    # running -----------------------------------------------------------------------------------
    def run(self, inputs: ModelInputs, generators: Sequence[torch.Generator]) -> PolicyOutput:
        self._check_generators(inputs.batch_size, generators)
        t = inputs.tensors
        actions = self.model.sample_actions(
            state=t["state"], input_ids=t["input_ids"], pixel_values=t["pixel_values"],
            noise=self.noise(generators).to(self.device, self.torch_dtype), attention_mask=t["attention_mask"],
            pixel_attention_mask=t["pixel_attention_mask"], num_steps=self.num_steps,
        )
        out = actions.float().cpu().numpy()[..., : self.action_dim]
        if self.norm and self.norm.action:
            out = self.norm.action.unnormalise(out)
        if self.relative is not None:  # after unnormalising, as lerobot's AbsoluteActionsProcessorStep
            out = self.relative.to_absolute(out, t.get("raw_state"))
        return PolicyOutput(actions=out, denoise_t=self.denoise_t())

    def reference_hidden_states(self, inputs: ModelInputs, generators: Sequence[torch.Generator]
                                ) -> dict[str, torch.Tensor]:
        """Each VLM layer's output from transformers' own ``output_hidden_states`` (B, L, seq, hidden).

        ``hidden_states[-1]`` is post-final-norm in transformers 5.x, so the final norm is bypassed for this
        call: then ``hidden_states[i + 1]`` is layer i's output for every layer, the last one included.
        """
        t = inputs.tensors
        vlm = self.model.model.vlm
        lm = vlm.language_model
        with torch.no_grad():
            embeds = self.model.model.embed_prefix(t["input_ids"], t["pixel_values"], t["pixel_attention_mask"])
            norm, lm.norm = lm.norm, torch.nn.Identity()
            try:
                out = vlm(inputs_embeds=embeds, attention_mask=t["attention_mask"],
                          position_ids=t["attention_mask"].cumsum(-1) - 1,
                          token_type_ids=torch.zeros_like(embeds)[:, :, 0], output_hidden_states=True)
            finally:
                lm.norm = norm
        return {"vlm": torch.stack(out.hidden_states[1:], 1)}
