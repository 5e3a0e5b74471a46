"""The zoo's architectures: small MLPs, CNNs and ViTs on 8x8 digits, and the factories manifests
name (``ARCHS``: ``sharpfast.study.zoo:mlp`` and so on, the names every zoo's manifest records)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import digits



def mlp(width: int = 64, depth: int = 2, n_classes: int = digits.N_CLASSES, in_features: int = 64) -> nn.Module:
    """``depth`` hidden ReLU layers of ``width`` units on flattened 8x8 images."""
    layers: list[nn.Module] = [nn.Flatten()]
    d = in_features
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, n_classes))
    return nn.Sequential(*layers)


def cnn(width: int = 16, n_classes: int = digits.N_CLASSES) -> nn.Module:
    """Two 3x3 convolutions (the second with stride 2) and a linear head on 8x8 images."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(2 * width * 16, n_classes),
    )


class ViT(nn.Module):
    """A small vision transformer for 8x8 images: ``patch x patch`` patches embedded to ``dim``,
    learned position embeddings, ``depth`` pre-norm blocks (``heads``-head softmax self-attention, a
    GELU MLP of ``mlp_ratio * dim``), mean-pooled tokens and a linear head. Written out rather than
    ``nn.TransformerEncoderLayer``, whose inference fast path computes other bits than its autograd
    path, and the attention as its formula: ``torch.func.vmap`` (stacked training and evaluation)
    has no batching rule for ``F.scaled_dot_product_attention`` on a CPU, and at 16 tokens the
    formula is as fast."""

    def __init__(self, dim: int = 32, depth: int = 2, heads: int = 2, patch: int = 2, mlp_ratio: int = 2,
                 n_classes: int = digits.N_CLASSES, image: int = 8):
        super().__init__()
        if image % patch or dim % heads:
            raise ValueError(f"the image side ({image}) must be a multiple of patch ({patch}) and dim ({dim}) "
                             f"of heads ({heads})")
        self.patch, self.heads = patch, heads
        self.embed = nn.Linear(patch * patch, dim)
        self.pos = nn.Parameter(torch.zeros(1, (image // patch) ** 2, dim))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "norm1": nn.LayerNorm(dim), "qkv": nn.Linear(dim, 3 * dim), "proj": nn.Linear(dim, dim),
            "norm2": nn.LayerNorm(dim), "fc1": nn.Linear(dim, mlp_ratio * dim), "fc2": nn.Linear(mlp_ratio * dim, dim),
        }) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)

    def gl_blocks(self, prefix: str = "") -> list:
        """The attention's GL(h) blocks (``sharpfast.find_gl_blocks``): per block and head, the
        query/key rows of ``qkv`` and the value rows of ``qkv`` with ``proj``'s columns."""
        from sharpfast.geodesic.blocks import GLFactor, attention_blocks
        E = self.pos.shape[-1]
        out = []
        for i in range(len(self.blocks)):
            qkv = lambda j: GLFactor(f"{prefix}blocks.{i}.qkv.weight", span=(j * E, (j + 1) * E),
                                     bias=f"{prefix}blocks.{i}.qkv.bias")
            out += attention_blocks(self.heads, qkv(0), qkv(1), qkv(2), GLFactor(f"{prefix}blocks.{i}.proj.weight", axis=1))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, p = x.shape[0], self.patch
        x = x.reshape(b, 1, x.shape[-2] // p, p, x.shape[-1] // p, p).permute(0, 2, 4, 1, 3, 5)
        h = self.embed(x.reshape(b, -1, p * p)) + self.pos
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["norm1"](h)).chunk(3, dim=-1)
            split = lambda t: t.reshape(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)
            q, k, v = split(q), split(k), split(v)
            a = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1) @ v
            h = h + blk["proj"](a.transpose(1, 2).reshape(b, -1, h.shape[-1]))
            h = h + blk["fc2"](F.gelu(blk["fc1"](blk["norm2"](h))))
        return self.head(self.norm(h).mean(dim=1))


def vit(width: int = 32, depth: int = 2, heads: int = 2, patch: int = 2, n_classes: int = digits.N_CLASSES) -> nn.Module:
    """:class:`ViT` with ``dim = width`` on 2x2 patches of the 8x8 digits."""
    return ViT(dim=width, depth=depth, heads=heads, patch=patch, n_classes=n_classes)


ARCHS: dict[str, str] = {"mlp": "sharpfast.study.zoo:mlp", "cnn": "sharpfast.study.zoo:cnn",
                         "vit": "sharpfast.study.zoo:vit"}

def model_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    if cfg["arch"] == "mlp":
        return {"width": int(cfg["width"])}
    if cfg["arch"] == "cnn":  # the CNN's first layer has width/2 channels (its cost grows as width^2)
        return {"width": max(1, int(cfg["width"]) // 2)}
    if cfg["arch"] == "vit":  # dim = width/2, at least 16 (narrower ones do not learn digits), 2 blocks of 2 heads
        return {"width": max(16, int(cfg["width"]) // 4 * 2)}
    raise ValueError(f"unknown arch {cfg['arch']!r}; expected one of {sorted(ARCHS)}")


def build(cfg: dict[str, Any]) -> nn.Module:
    module, fn = ARCHS[cfg["arch"]].split(":")
    return {"mlp": mlp, "cnn": cnn, "vit": vit}[fn](**model_kwargs(cfg))


