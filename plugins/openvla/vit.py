"""The two vision towers of Prismatic/OpenVLA, with timm's ``VisionTransformer`` module and parameter names.

OpenVLA's checkpoints hold its towers as timm ViTs (``blocks.N.attn.qkv``, ``ls1.scale_factor``, ``reg_token``,
``pos_embed``, ``attn_pool.*`` ...).  timm itself is not used: its current releases import torchvision at
start-up, and torchvision does not load beside the CPU torch build this project pins ("operator
torchvision::nms does not exist", measured), while the remote code pins timm 0.9.x.  These modules keep
timm 0.9's names and arithmetic (pre-norm blocks, fused qkv, LayerScale, LayerNorm eps 1e-6, exact GELU,
position embeddings over the patches only, prefix tokens ``[cls][registers][patches]``), so the checkpoint's
keys load one to one and the capture paths are the real model's (``vision_backbone.featurizer.blocks``).

The forward is the one OpenVLA patches in: ``get_intermediate_layers(n={depth - 2})``, i.e. the patch tokens
of the second-to-last block, prefix tokens dropped, without the final norm.  Like timm 0.9, every block runs
(so a hook on the last block fires too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.sdk.errors import ToolkitError

LN_EPS = 1e-6  # timm's ViT LayerNorm


@dataclass(frozen=True)
class ViTSpec:
    """One timm ViT architecture, as far as OpenVLA's checkpoints need it."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden: int
    patch_size: int = 14
    reg_tokens: int = 0
    class_token: bool = False
    layer_scale: bool = False  # LayerScale after attention and MLP (DINOv2)
    map_head: bool = False  # SigLIP's attention-pooling head: in the checkpoint, unused by OpenVLA
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # the tower's image normalisation
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_DINOV2_L = ViTSpec(1024, 24, 16, 4096, reg_tokens=4, class_token=True, layer_scale=True, mean=IMAGENET_MEAN,
                    std=IMAGENET_STD)
_SIGLIP_SO400M = ViTSpec(1152, 27, 16, 4304, map_head=True)
# timm model names (without the pretrained tag) that Prismatic checkpoints name in ``timm_model_ids``
KNOWN_VITS: dict[str, ViTSpec] = {
    "vit_large_patch14_reg4_dinov2": _DINOV2_L,
    "vit_so400m_patch14_siglip_224": _SIGLIP_SO400M,
    "vit_so400m_patch14_siglip_384": _SIGLIP_SO400M,
}


def vit_spec(timm_id: str, overrides: dict | None = None) -> ViTSpec:
    """The architecture of a ``timm_model_ids`` entry (e.g. ``vit_large_patch14_reg4_dinov2.lvd142m``)."""
    spec = KNOWN_VITS.get(timm_id.split(".")[0])
    if spec is None:
        raise ToolkitError(f"vision backbone {timm_id!r} is not one the toolkit implements "
                           f"({', '.join(KNOWN_VITS)})")
    if overrides:
        fields = {**spec.__dict__, **overrides}
        fields["mean"], fields["std"] = tuple(fields["mean"]), tuple(fields["std"])
        spec = ViTSpec(**fields)
    return spec


class PatchEmbed(nn.Module):
    def __init__(self, spec: ViTSpec) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, spec.embed_dim, spec.patch_size, stride=spec.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ToolkitError(f"ViT width {dim} is not divisible by its {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class LayerScale(nn.Module):
    """timm's LayerScale; its ``gamma`` is called ``scale_factor`` in OpenVLA's checkpoints."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale_factor = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale_factor


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, spec: ViTSpec) -> None:
        super().__init__()
        d = spec.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=LN_EPS)
        self.attn = Attention(d, spec.num_heads)
        self.ls1 = LayerScale(d) if spec.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(d, eps=LN_EPS)
        self.mlp = Mlp(d, spec.mlp_hidden)
        self.ls2 = LayerScale(d) if spec.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class AttentionPoolLatent(nn.Module):
    """SigLIP's attention-pooling head (timm ``attn_pool``).  OpenVLA's forward never calls it, but its
    weights are in the checkpoint; it is held so that every checkpoint tensor has a place and the parameter
    count is the real model's.  No forward on purpose."""

    def __init__(self, spec: ViTSpec) -> None:
        super().__init__()
        d = spec.embed_dim
        self.latent = nn.Parameter(torch.empty(1, 1, d))
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d, eps=LN_EPS)
        self.mlp = Mlp(d, spec.mlp_hidden)


class VisionTransformer(nn.Module):
    """A timm-named ViT whose forward returns the second-to-last block's patch tokens (OpenVLA's featurizer)."""

    def __init__(self, spec: ViTSpec, image_size: int) -> None:
        super().__init__()
        if image_size % spec.patch_size:
            raise ToolkitError(f"image size {image_size} is not a multiple of the ViT patch size {spec.patch_size}")
        if spec.depth < 2:
            raise ToolkitError(f"a Prismatic vision tower needs at least 2 blocks (it reads the second-to-last), "
                               f"got {spec.depth}")
        self.spec = spec
        self.embed_dim = spec.embed_dim
        self.n_patches = (image_size // spec.patch_size) ** 2
        self.n_prefix = int(spec.class_token) + spec.reg_tokens
        if spec.class_token:
            self.cls_token = nn.Parameter(torch.empty(1, 1, spec.embed_dim))
        if spec.reg_tokens:
            self.reg_token = nn.Parameter(torch.empty(1, spec.reg_tokens, spec.embed_dim))
        self.pos_embed = nn.Parameter(torch.empty(1, self.n_patches, spec.embed_dim))
        self.patch_embed = PatchEmbed(spec)
        self.blocks = nn.ModuleList(Block(spec) for _ in range(spec.depth))
        self.norm = nn.LayerNorm(spec.embed_dim, eps=LN_EPS)  # in the checkpoint; OpenVLA reads pre-norm patches
        if spec.map_head:
            self.attn_pool = AttentionPoolLatent(spec)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels) + self.pos_embed
        prefix = [t.expand(x.shape[0], -1, -1) for t in (getattr(self, "cls_token", None),
                                                         getattr(self, "reg_token", None)) if t is not None]
        x = torch.cat([*prefix, x], dim=1)
        take = len(self.blocks) - 2
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == take:
                out = x
        return out[:, self.n_prefix:]

    @torch.no_grad()
    def init_weights(self) -> None:
        """timm's initialisation (truncated normal 0.02, tiny prefix tokens, LayerScale 1e-5), for random models."""
        for name, p in self.named_parameters():
            if name.endswith("scale_factor"):
                p.fill_(1e-5)
            elif name.endswith(("cls_token", "reg_token", "latent")):
                nn.init.normal_(p, std=1e-6)
            elif name == "pos_embed":
                nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.Conv2d)):
                m.reset_parameters()
