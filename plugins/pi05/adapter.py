"""pi0.5 on transformers' native ``PI05ForConditionalGeneration``.

The VLM (PaliGemma's Gemma, ``model.vlm.language_model``) runs the prefix ``[image tokens per camera][BOS Task:
..., State: <256-bin state>;\\nAction: ]`` once per policy call; the action expert (``model.dit``) runs the 50
noisy actions once per flow-matching step (t = 1.0, 0.9, ..., 0.1), its norms modulated by the time embedding
(adaptive RMS norms: a scale, a shift and a gate per norm, exposed as streams of their own).  There is no state
token: the state is read as text.  Without a checkpoint a small randomly initialised pi0.5 of the same
architecture is built (smoke tests only).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field

from toolkit.sdk.adapters import DECODER_STREAMS, Episode, Expert, ModelInputs, PolicyOutput, SiteInfo, Step
from toolkit.sdk.checkpoint import CheckpointError, load_into
from toolkit.sdk.errors import ToolkitError
from toolkit.sdk.options import AdapterOptions
from toolkit_plugins.pi0.shared import TINY_EXPERTS, PaliGemmaFlowAdapter, load_tokenizer
from toolkit_plugins.pi05 import layouts, normalise, prompt
from toolkit_plugins.pi05.modulation import tap


class Pi05Options(AdapterOptions):
    """The ``--model-option`` names of pi05."""

    action_dim: int | None = Field(None, ge=1, description="action dimensions kept from the policy's 32 (default: "
                                  "the lerobot checkpoint's action feature size, else 7 as in LIBERO)")
    max_text_tokens: int | None = Field(None, ge=1, description="the prompt's token budget, as the tokenizer's max "
                                        "length upstream (default: the checkpoint's tokenizer_max_length, else 200)")
    cameras: str | list[str] | None = Field(None, description="camera order, comma-separated (default: sorted)")
    num_steps: int | None = Field(None, ge=1, description="flow-matching steps (default: the checkpoint's)")
    tokenizer: str | None = Field(None, description="local PaliGemma tokenizer: a directory or a tokenizer.model")
    stats: str | None = Field(None, description="statistics: a norm_stats.json or a lerobot processor directory")
    normalise: bool = Field(True, description="normalise the state (quantiles by default) before discretising it, "
                            "and unnormalise actions, with the checkpoint's statistics")


TINY_CONFIG = dict(TINY_EXPERTS)  # the small random pi0.5 (no state token: no max_state_dim)
TINY_TEXT_TOKENS = 64  # the prompt budget of the small model (200 for the real one)
RANDOM_WARNING = ("pi05: no --checkpoint given, using a small randomly initialised pi0.5 (same architecture, "
                  "random weights) - results are for smoke tests only")
DEFAULT_TEXT_TOKENS = 200  # lerobot PI05Config.tokenizer_max_length, openpi's max_token_len for pi0.5


def _init_weights(model: torch.nn.Module, seed: int) -> None:
    """transformers zero-initialises the adaptive norms' dense layers (the modulation would be constant 0): the
    small random model gets small random ones, so that scale, shift and gate depend on the time, as trained."""
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if ".dense." in name:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.05 + (0.5 if name.endswith("bias") else 0.0))


def build_tiny_model(seed: int):
    from transformers import PI05Config, PI05ForConditionalGeneration

    torch.manual_seed(seed)
    model = PI05ForConditionalGeneration(PI05Config(**TINY_CONFIG)).eval()
    _init_weights(model, seed)
    return model


SITES = {
    "vlm": SiteInfo("vlm", "vlm", "all", "mean", "VLM expert, every prefix token"),
    "text_only": SiteInfo("text_only", "vlm", "text", "mean", "VLM expert, prompt tokens only (task and state)"),
    "state_only": SiteInfo("state_only", "vlm", "state", "mean", "VLM expert, the discretised state's tokens"),
    "action": SiteInfo("action", "action", "all", "mean", "action expert, the noisy action tokens"),
}
# the adaptive norms' modulation, per layer (and denoising step): what each norm's dense layer makes of the time
MODULATION_STREAMS = {
    f"{where}_{part}": ("output", f"{norm}.{part}")
    for where, norm in (("pre_attn", "input_layernorm"), ("pre_mlp", "post_attention_layernorm"))
    for part in ("scale", "shift", "gate")
}


def pi05_experts(vlm: tuple[int, int], dit: tuple[int, int], cameras: Sequence[str] | None,
                 num_steps: int) -> dict[str, Expert]:
    """The two experts, from the (layers, width) of the VLM and of the action expert."""
    cams = tuple(f"image.{c}" for c in cameras or ())
    return {
        "vlm": Expert("vlm", "model.vlm.language_model.layers", *vlm, ("image", *cams, "text", "task", "state"),
                      streams=dict(DECODER_STREAMS),
                      description="PaliGemma language model over the prefix (images, task, discretised state)"),
        "action": Expert("action", "model.dit.layers", *dit, ("actions",), denoise_steps=num_steps,
                         streams={**DECODER_STREAMS, **MODULATION_STREAMS},
                         description="action expert over the noisy actions, once per denoising step; attn_out "
                                     "and mlp_out are before their gate (resid_mid = resid_pre + pre_attn_gate * "
                                     "attn_out)"),
    }


class _PassNorm(torch.nn.Module):
    """Stands in for the action expert's final (adaptive) norm in ``reference_hidden_states``."""

    def forward(self, hidden_states, timestep_embeds=None):
        return hidden_states, None


class Pi05Adapter(PaliGemmaFlowAdapter):
    """pi0.5 (PaliGemma VLM + flow-matching action expert with adaptive norms) on transformers' PI05."""

    name = "pi05"
    description = "pi0.5 (PaliGemma VLM, state as text, adaptive-norm flow-matching action expert), transformers"
    Options = Pi05Options
    family = "pi0.5"
    openpi_config = "pi05_libero"
    LAYOUTS = layouts
    TINY_CONFIG = TINY_CONFIG
    SITES = SITES
    experts_of = staticmethod(pi05_experts)
    transformers_model = "PI05ForConditionalGeneration"
    random_warning = RANDOM_WARNING
    build_tiny_model = staticmethod(build_tiny_model)

    def _adapt_model(self) -> None:
        tap(self.model)  # the adaptive norms' scale, shift and gate as modules of their own

    def _read_sizes(self) -> None:
        super()._read_sizes()
        text_tokens = (TINY_TEXT_TOKENS if self.checkpoint is None else self.meta.get("tokenizer_max_length")
                       or self.meta.get("max_token_len") or DEFAULT_TEXT_TOKENS)
        self.max_text_tokens = int(self.opts["max_text_tokens"] or text_tokens)
        self.state_dim: int | None = None  # fixed by the first batch, like the cameras

    # loading ------------------------------------------------------------------------------
    def _load_tokenizer(self, directory: Path | None):
        return load_tokenizer("pi05", self.opts["tokenizer"], directory, self.trust_remote_code)

    @classmethod
    def _recognise(cls, checkpoint: str, shapes: dict[str, tuple[int, ...]], meta: dict[str, Any],
                   directory: Path | None) -> str:
        try:
            return layouts.recognise(list(shapes), meta)
        except CheckpointError as e:
            raise CheckpointError(f"{checkpoint}: {e}") from None

    def _fill(self, model: torch.nn.Module, checkpoint: str, tensors: dict[str, torch.Tensor], names: set[str]):
        weights, dropped, file_names = layouts.to_model_names(tensors, names)
        return load_into(model, weights, source=checkpoint, layout=self.layout, ignored=dropped,
                         file_names=file_names, allow_missing=self.allow_missing, strict=self.strict)

    def _find_statistics(self, checkpoint: str, directory: Path, files: list[Path]) -> None:
        if self.normalise_enabled:
            self.norm = normalise.find(directory, self.meta, self.opts["stats"])
            if self.norm is None:
                self.warn_once(f"pi05: {checkpoint} has no normalisation statistics (no lerobot processor files, "
                               "no openpi assets/*/norm_stats.json): the state is discretised raw and the actions "
                               "are stored in the policy's normalised units; give them with --model-option "
                               "stats=PATH")
        self.relative = self._relative_actions(checkpoint, directory, self.meta)

    # what the adapter exposes ----------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return super().describe(state_dim=self.state_dim, max_text_tokens=self.max_text_tokens)

    # inputs ------------------------------------------------------------------------------------
    def state_bins(self, state: np.ndarray | None) -> np.ndarray | None:
        """The step's state as upstream writes it into the prompt: normalised (when statistics are known), then
        put into 256 bins; None without a state."""
        if state is None:
            return None
        s = np.asarray(state, dtype=np.float32).reshape(-1)
        if self.norm and self.norm.state:
            s = self.norm.state.normalise(s)
        return prompt.discretise(s)

    def _slots(self, batch: Sequence[tuple[Episode, Step]]) -> prompt.Slots:
        if self.state_dim is None:  # fixed by the first batch, so every batch has the same layout
            first = batch[0][1].state
            self.state_dim = 0 if first is None else int(np.asarray(first).size)
        return prompt.Slots(head=self.max_text_tokens, state=prompt.state_slot(self.state_dim))

    def prepare(self, batch: Sequence[tuple[Episode, Step]]) -> ModelInputs:
        self._fix_cameras(batch)
        slots = self._slots(batch)
        n_img, ids, mask, pixels = self._prefix(len(batch), slots.total)
        head0, state0, tail0 = n_img, n_img + slots.head, n_img + slots.head + slots.state
        seq = n_img + slots.total
        raw_states = []
        for i, (ep, step) in enumerate(batch):
            self._put_images(i, ep, step, pixels, mask)
            if step.state is None:
                self.warn_once(f"pi05: a step of {ep.key} has no state; its prompt has no 'State:' part")
            bins = self.state_bins(step.state)
            text, start, end = prompt.prompt_text(ep.instruction, bins)
            head, state, tail, cut = prompt.split_tokens(self.tokenizer, text, start, end, self.max_text_tokens)
            if cut:
                self.warn_once(f"pi05: the prompt of {ep.key} is longer than {self.max_text_tokens} tokens and is cut "
                               "there, as upstream's tokenizer does")
            if len(state) > slots.state:
                raise ToolkitError(f"pi05: a step of {ep.key} has a state of {np.asarray(step.state).size} values, "
                                   f"the run's first step {self.state_dim}; every step needs the same state size")
            for start_pos, part in ((head0, head), (state0, state), (tail0, tail)):
                ids[i, start_pos:start_pos + len(part)] = torch.tensor(part, dtype=torch.long)
                mask[i, start_pos:start_pos + len(part)] = True
            raw_states.append(None if step.state is None else np.asarray(step.state, dtype=np.float32).reshape(-1))
        dev = self.device
        tensors = {**self._prefix_tensors(ids, mask, pixels), "raw_states": raw_states}
        spans = {
            "vlm": {**self._image_spans(), "text": list(range(n_img, seq)), "task": list(range(head0, state0)),
                    "state": list(range(state0, tail0))},
            "action": {"actions": list(range(self.chunk_size))},
        }
        return ModelInputs(
            tensors=tensors, batch_size=len(batch), spans=spans,
            token_mask={"vlm": mask.to(dev),
                        "action": torch.ones(len(batch), self.chunk_size, dtype=torch.bool, device=dev)},
            seq_len={"vlm": seq, "action": self.chunk_size},
        )

    # running -----------------------------------------------------------------------------------
    def run(self, inputs: ModelInputs, generators: Sequence[torch.Generator]) -> PolicyOutput:
        self._check_generators(inputs.batch_size, generators)
        t = inputs.tensors
        actions = self.model.sample_actions(
            input_ids=t["input_ids"], pixel_values=t["pixel_values"],
            noise=self.noise(generators).to(self.device, self.torch_dtype), attention_mask=t["attention_mask"],
            pixel_attention_mask=t["pixel_attention_mask"], num_steps=self.num_steps,
        )
        return PolicyOutput(actions=self.postprocess(actions.float().cpu().numpy(), t["raw_states"]),
                            denoise_t=self.denoise_t())

    def postprocess(self, actions: np.ndarray, raw_states: Sequence[np.ndarray | None]) -> np.ndarray:
        """The policy's (B, chunk, 32) output as upstream returns it: cut to the action size, unnormalised, and
        made absolute when the checkpoint predicts relative actions (lerobot's postprocessor order)."""
        out = actions[..., : self.action_dim]
        if self.norm and self.norm.action:
            out = self.norm.action.unnormalise(out)
        if self.relative is not None:  # after unnormalising, as lerobot's AbsoluteActionsProcessorStep
            states = None if any(s is None for s in raw_states) else np.stack(raw_states)
            out = self.relative.to_absolute(out, states)
        return out

    def reference_hidden_states(self, inputs: ModelInputs, generators: Sequence[torch.Generator]
                                ) -> dict[str, torch.Tensor]:
        """Each layer's output from transformers' own ``output_hidden_states``: the VLM's (B, L, seq, hidden) over
        the prefix, and the action expert's (B, L, denoise, chunk, hidden) at every denoising step of the same
        flow (the final norms are bypassed, so ``hidden_states[i + 1]`` is layer i's output, the last included)."""
        t = inputs.tensors
        model = self.model
        vlm, dit = model.model.vlm, model.model.dit
        lm = vlm.language_model
        mask = t["attention_mask"]
        out_vlm, out_dit = [], []
        with torch.no_grad():
            embeds = model.model.embed_prefix(t["input_ids"], t["pixel_values"], t["pixel_attention_mask"])
            norms = lm.norm, dit.norm
            lm.norm, dit.norm = torch.nn.Identity(), _PassNorm()
            try:
                out = vlm(inputs_embeds=embeds, attention_mask=mask, position_ids=mask.cumsum(-1) - 1,
                          token_type_ids=torch.zeros_like(embeds)[:, :, 0], use_cache=True, output_hidden_states=True)
                out_vlm = torch.stack(out.hidden_states[1:], 1)
                cache, prefix = out.cache, out.cache.get_seq_length()
                x = self.noise(generators).to(self.device, self.torch_dtype)
                dt = -1.0 / self.num_steps
                for step in range(self.num_steps):
                    time = torch.full((x.shape[0],), 1.0 + step * dt, dtype=torch.float32, device=self.device)
                    o = model(noise=x, timestep=time, attention_mask=mask, cache=cache, output_hidden_states=True,
                              pixel_attention_mask=t["pixel_attention_mask"])
                    out_dit.append(torch.stack(o.hidden_states[1:], 1))
                    cache.crop(prefix - cache.get_seq_length())
                    # the velocity through the real final norm (bypassed above only for the hidden states)
                    x = x + dt * self._velocity(o.hidden_states[-1], time, norms[1])
            finally:
                lm.norm, dit.norm = norms
        return {"vlm": out_vlm, "action": torch.stack(out_dit, 2)}

    def _velocity(self, last: torch.Tensor, time: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
        _, timestep_embeds = self.model.embed_action_time(torch.zeros(last.shape[0], self.chunk_size,
                                                                      self.max_action_dim, device=last.device,
                                                                      dtype=last.dtype), time)
        normed, _ = norm(last, timestep_embeds)
        return self.model.action_out_proj(normed[:, -self.chunk_size:])
