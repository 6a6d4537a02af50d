"""The RoboVLMs Kosmos-2 policy, rebuilt with RoboVLMs' attribute names so its state dicts load as they are.

``RoboKosmosPolicy`` holds what ``robovlms.model.backbone.robokosmos.RoboKosMos`` holds for the continuous
LSTM policy: ``backbone`` (``transformers.Kosmos2ForConditionalGeneration``), ``act_head`` (an
``LSTMDecoder`` with ``rnn``, ``actions``, ``gripper``) and the learned ``action_token``.  One frame's
sequence is ``[<s>][hand image latents][image latents][text][ACT x latent][</s>]`` (hand camera latents only
with a hand camera, as for a policy trained with ``use_hand_rgb``; ``action_position="end"`` puts the action
token after ``</s>``).  The backbone runs through ``backbone.text_model.model(inputs_embeds=...)``, as
RoboVLMs' patched Kosmos-2 forward does (the stock forward refuses a call without ``pixel_values``); its
output is already through the final ``layer_norm``, i.e. RoboVLMs' ``output.hidden_states[-1]``.  The context
vector ``action_hs`` (batch, window, latent, hidden) is the input of ``act_head``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _mlp(hidden_size: int, output_size: int, tanh: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(hidden_size, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU(),
                               nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, output_size)]
    if tanh:
        layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class MLPTanhHead(nn.Module):
    """RoboVLMs' ``MLPTanhHead``: ``mlp`` = Linear(h,1024) ReLU Linear(1024,512) ReLU Linear(512,256) ReLU Linear Tanh."""

    def __init__(self, hidden_size: int, output_size: int):
        super().__init__()
        self.mlp = _mlp(hidden_size, output_size, tanh=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class MLPSigmoidHead(nn.Module):
    """RoboVLMs' ``MLPSigmoidHead`` (which returns logits: its Sigmoid is commented out upstream)."""

    def __init__(self, hidden_size: int, output_size: int):
        super().__init__()
        self.mlp = _mlp(hidden_size, output_size, tanh=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class LSTMDecoder(nn.Module):
    """RoboVLMs' ``LSTMDecoder`` (down_sample "none"), stateless.

    RoboVLMs' evaluation feeds one frame per call and keeps the history itself: while an episode has at most
    ``window_size`` frames the LSTM state runs on from the episode's first frame, afterwards the LSTM reruns
    from a zero state over the last ``window_size`` frames.  Both are "the LSTM from a zero state over the
    episode's last min(t+1, window_size) frames", which is what ``forward`` computes for a whole window at once;
    ``valid`` says how many of the window's frames are real (right-aligned; the rest is padding before the
    episode's start)."""

    def __init__(self, in_features: int, action_dim: int = 7, latent: int = 1, fwd_pred_next_n: int = 1,
                 window_size: int = 1, hidden_size: int = 1024, num_layers: int = 4):
        super().__init__()
        self.in_features, self.action_dim, self.latent = in_features, action_dim, latent
        self.fwd_pred_next_n, self.window_size, self.hidden_size = fwd_pred_next_n, window_size, hidden_size
        self.rnn = nn.LSTM(input_size=in_features * latent, hidden_size=hidden_size * latent, num_layers=num_layers,
                           bidirectional=False, batch_first=True)
        self.actions = MLPTanhHead(hidden_size * latent, fwd_pred_next_n * (action_dim - 1))
        self.gripper = MLPSigmoidHead(hidden_size * latent, fwd_pred_next_n)

    def forward(self, tok_seq: torch.Tensor, valid: torch.Tensor | None = None,
                **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """(bs, window, latent, d) -> actions (bs, window, n, action_dim-1), gripper logits (bs, window, n, 1).

        With ``valid`` (bs,), row b's last ``valid[b]`` frames are real: they are moved to the front (the LSTM is
        causal, so the padding behind them cannot reach them), and the outputs moved back; outputs at padding
        positions are zero."""
        bs, ws = tok_seq.shape[:2]
        x = tok_seq.reshape(bs, ws, -1)
        if valid is None or bool((valid >= ws).all()):
            x, _ = self.rnn(x)
        else:
            shift = (ws - valid.to(x.device).clamp(1, ws))[:, None]
            pos = torch.arange(ws, device=x.device)[None]
            front = ((pos + shift) % ws)[..., None]
            out, _ = self.rnn(x.gather(1, front.expand(-1, -1, x.shape[-1])))
            back = ((pos - shift) % ws)[..., None]
            x = out.gather(1, back.expand(-1, -1, out.shape[-1])) * (pos >= shift)[..., None].to(out.dtype)
        actions = self.actions(x).reshape(bs, ws, self.fwd_pred_next_n, -1)
        gripper = self.gripper(x).reshape(bs, ws, self.fwd_pred_next_n, -1)
        return actions, gripper


class RoboKosmosPolicy(nn.Module):
    """Kosmos-2 backbone + learned action token + LSTM action head (RoboVLMs' continuous "post" policy)."""

    def __init__(self, kosmos_config, action_dim: int = 7, latent: int = 1, fwd_pred_next_n: int = 1,
                 window_size: int = 1, head_hidden_size: int = 1024, head_layers: int = 4):
        super().__init__()
        from transformers import Kosmos2ForConditionalGeneration

        self.backbone = Kosmos2ForConditionalGeneration(kosmos_config)
        hidden = kosmos_config.text_config.embed_dim
        self.latent_num = latent
        self.action_token = nn.Parameter(torch.zeros(hidden))
        self.act_head = LSTMDecoder(hidden, action_dim, latent, fwd_pred_next_n, window_size, head_hidden_size,
                                    head_layers)

    @property
    def hidden_size(self) -> int:
        return self.backbone.config.text_config.embed_dim

    @property
    def word_embedding(self) -> nn.Embedding:
        return self.backbone.text_model.model.embed_tokens

    @property
    def text_tower(self) -> nn.Module:
        return self.backbone.text_model.model

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) CLIP-normalised -> (N, latent_query_num, hidden), as RoboKosMos.model_encode_images."""
        out = self.backbone.vision_model(pixel_values=pixel_values)
        feats = self.backbone.vision_model.model.post_layernorm(out[0])
        feats = F.normalize(feats, dim=-1)
        return self.backbone.image_to_text_projection(feats)[0]
