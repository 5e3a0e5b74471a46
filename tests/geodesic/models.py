"""The models, data and group actions the geodesic tests share."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sharpfast.geodesic import blocks as gl
from sharpfast.geodesic.batched import BatchedGeometry
from sharpfast.geodesic.reference import ReferenceGeometry
from sharpfast.params import ParamSet

METRICS = ("mix", "inv")
GEOMETRIES = (ReferenceGeometry, BatchedGeometry)


class Attention(nn.Module):
    """``nn.MultiheadAttention`` on a short sequence, mean-pooled, and a linear head."""

    def __init__(self, dim=8, heads=2, classes=3):
        super().__init__()
        self.att = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        return self.head(self.norm(x + self.att(x, x, x, need_weights=False)[0]).mean(1))


def sse(out, y):
    return ((out - y) ** 2).sum()


def attention_data(dim=8, seed=0, n_batches=2):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 5, dim, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g))
            for _ in range(n_batches)]


def tiny_bert(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=20, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config).double()


def bert_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [({"input_ids": torch.randint(1, 20, (4, 7), generator=g)}, torch.randint(0, 3, (4,), generator=g))]


def random_group_element(h, lo=-2.0, hi=2.0, generator=None):
    """``U diag(10^s) V`` with ``s ~ U(lo, hi)``: singular values from 10^lo to 10^hi."""
    U, _ = torch.linalg.qr(torch.randn(h, h, generator=generator, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(h, h, generator=generator, dtype=torch.float64))
    return U @ torch.diag(10 ** (torch.rand(h, generator=generator, dtype=torch.float64) * (hi - lo) + lo)) @ V


def act(model, blocks, seed=0, lo=-2.0, hi=2.0):
    """A copy of ``model`` with ``(G, H) -> (G A^-1, H A^T)`` on every head, A random per head."""
    model = copy.deepcopy(model)
    params = ParamSet(model)
    w = torch.cat([p.detach().reshape(-1) for p in params.tensors])
    g = torch.Generator().manual_seed(seed)
    for group in gl.resolve(blocks, params):
        for ig, ih in zip(group.g, group.hh):
            A = random_group_element(ig.shape[-1], lo, hi, g).to(w.dtype)
            w[ig], w[ih] = w[ig] @ torch.linalg.inv(A), w[ih] @ A.T
    with torch.no_grad():
        for p, value in zip(params.tensors, params.split(w)):
            p.copy_(value)
    return model


def geometry(Geo, model, blocks, metric, eps=0.0, second_order=True):
    params = ParamSet(model)
    w0 = torch.cat([p.detach().reshape(-1) for p in params.tensors])
    return Geo(w0, w0.abs(), gl.resolve(blocks, params), metric, eps, second_order), params


def vertical(geo_model, blocks, seed=0):
    """A random vertical vector: ``(G X, -H X^T)`` per head (the group's orbit direction)."""
    params = ParamSet(geo_model)
    w0 = torch.cat([p.detach().reshape(-1) for p in params.tensors])
    out = torch.zeros_like(w0)
    g = torch.Generator().manual_seed(seed)
    for group in gl.resolve(blocks, params):
        for ig, ih in zip(group.g, group.hh):
            X = torch.randn(ig.shape[-1], ig.shape[-1], generator=g, dtype=w0.dtype)
            out[ig], out[ih] = w0[ig] @ X, -w0[ih] @ X.T
    return out
