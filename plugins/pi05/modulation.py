"""The action expert's adaptive RMS norms, with their modulation (scale, shift, gate) exposed as modules.

transformers' ``PI05AdaptiveRMSNorm`` computes ``scale, shift, gate = dense(time embedding)`` inside its forward
(one vector per sample, broadcast over the tokens), so no module outputs them.  ``tap`` gives each adaptive norm
three parameter-free identity modules (``scale``, ``shift``, ``gate``) that the forward passes the modulation
through, token-broadcast to ``(batch, tokens, hidden)``: capture reads them as streams and interventions write
them, like any module output.  The arithmetic is transformers' own, so outputs are unchanged (the state dict too).
"""

from __future__ import annotations

import torch
from transformers.models.pi05.modeling_pi05 import PI05AdaptiveRMSNorm

PARTS = ("scale", "shift", "gate")


class TappedAdaptiveRMSNorm(PI05AdaptiveRMSNorm):
    """``PI05AdaptiveRMSNorm`` whose scale, shift and gate pass through identity modules of those names."""

    def forward(self, hidden_states: torch.Tensor, timestep_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        input_dtype = hidden_states.dtype
        tokens = hidden_states.shape[1]
        hidden_states = hidden_states.float()
        hidden_states = hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + self.eps)
        parts = self.dense(timestep_embeds)[:, None, :].chunk(3, dim=-1)
        scale, shift, gate = (getattr(self, name)(p.expand(-1, tokens, -1)) for name, p in zip(PARTS, parts))
        hidden_states = hidden_states * (1.0 + scale.float()) + shift.float()
        return hidden_states.to(input_dtype), gate.to(input_dtype)


def tap(model: torch.nn.Module) -> int:
    """Turn every ``PI05AdaptiveRMSNorm`` of ``model`` into a ``TappedAdaptiveRMSNorm`` (in place); their count."""
    n = 0
    for module in model.modules():
        if type(module) is PI05AdaptiveRMSNorm:
            module.__class__ = TappedAdaptiveRMSNorm
            for name in PARTS:
                module.add_module(name, torch.nn.Identity())
            n += 1
    return n
