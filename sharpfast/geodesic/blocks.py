"""GL(h) blocks: pairs of parameters that enter a network only through ``G H^T`` per head, so that
``(G, H) -> (G A^{-1}, H A^T)`` moves the weights without moving the function (DESIGN.md §2c.2).

A :class:`GLFactor` says how one side's matrix is read from the model's parameters: ``G`` is
``n x (heads * h)``, its columns the acted-on axis (``axis`` of the stored tensor, restricted to
``span``), its rows the other axis, with ``bias`` appended as one more row. PyTorch's ``Linear``
stores ``out x in`` and computes ``x W^T``, so a query projection is ``GLFactor(weight, axis=0)``
(``G = W^T``) and an output projection, whose *columns* belong to the heads, ``axis=1`` (``G = W``).

:func:`resolve` turns blocks into index maps into the flat parameter vector (``params.split``'s
order): one ``[n, h]`` and one ``[m, h]`` integer tensor per head, so every backend reads and
writes a head's matrices by gathering, whatever layout the model stores them in.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..params import ParamSet

log = logging.getLogger("sharpfast.geodesic")


@dataclass(frozen=True)
class GLFactor:
    """One side of a block: parameter ``param`` (2-D), acted on along ``axis`` (0: its rows, as a
    ``Linear``'s query/key/value weight; 1: its columns, as an output projection's), restricted to
    ``span = (start, stop)`` of that axis (a fused in-projection's slice), with the 1-D parameter
    ``bias`` (same span) appended as one more row of ``G``."""

    param: str
    axis: int = 0
    span: tuple[int, int] | None = None
    bias: str | None = None

    def __post_init__(self) -> None:
        if self.axis not in (0, 1):
            raise ValueError(f"GLFactor axis must be 0 or 1, got {self.axis!r}")
        if self.span is not None:
            object.__setattr__(self, "span", (int(self.span[0]), int(self.span[1])))

    def describe(self) -> str:
        span = "" if self.span is None else f"[{self.span[0]}:{self.span[1]}]"
        return f"{self.param}{span}@{self.axis}" + (f"+{self.bias}" if self.bias else "")


@dataclass(frozen=True)
class GLBlock:
    """Two parameters entering the network only through ``G H^T`` per head (``heads`` splits the
    acted-on axis; None: one head), or with ``elementwise=True`` two same-shaped parameters
    multiplied elementwise, every coordinate its own GL(1) block (the diagonal linear network
    ``y = x^T (u * v)``). ``g`` and ``h`` are parameter names (``GLFactor(name)``: rows acted on)
    or :class:`GLFactor`."""

    g: str | GLFactor
    h: str | GLFactor
    heads: int | None = None
    elementwise: bool = False

    def __post_init__(self) -> None:
        for side in ("g", "h"):
            value = getattr(self, side)
            if isinstance(value, str):
                object.__setattr__(self, side, GLFactor(value))
            elif not isinstance(value, GLFactor):
                raise TypeError(f"GLBlock.{side} must be a parameter name or a GLFactor, got {type(value).__name__}")
        if self.heads is not None and (isinstance(self.heads, bool) or int(self.heads) != self.heads or self.heads < 1):
            raise ValueError(f"GLBlock heads must be a positive integer or None, got {self.heads!r}")
        if self.elementwise and (self.heads is not None or self.g != GLFactor(self.g.param)
                                 or self.h != GLFactor(self.h.param)):
            raise ValueError("an elementwise GLBlock takes two parameter names only (no heads, axis, span or bias)")

    def describe(self) -> str:
        if self.elementwise:
            return f"{self.g.param}*{self.h.param}"
        return f"{self.g.describe()}~{self.h.describe()}" + (f"/{self.heads}" if self.heads else "")


@dataclass
class Heads:
    """Index maps of one or more heads of equal shape: ``g`` ``[B, n, h]`` and ``hh`` ``[B, m, h]``
    into the flat parameter vector."""

    g: torch.Tensor
    hh: torch.Tensor


def resolve(blocks: list[GLBlock], params: ParamSet) -> list[Heads]:
    """Every block's heads as index maps, grouped by shape (one :class:`Heads` per shape). Checks
    that the names exist, shapes agree and no coordinate is in two blocks."""
    flat_index = {name: (offset + torch.arange(p.numel(), device=p.device)).view(p.shape)
                  for name, p, offset in zip(params.names, params.tensors, params.offsets)}
    by_shape: dict[tuple, tuple[list, list]] = {}
    for block in blocks:
        if not isinstance(block, GLBlock):
            raise TypeError(f"blocks must be GLBlock instances, got {type(block).__name__}")
        for g, h in _heads_of(block, flat_index):
            gs, hs = by_shape.setdefault((tuple(g.shape), tuple(h.shape)), ([], []))
            gs.append(g)
            hs.append(h)
    out = [Heads(torch.cat(gs), torch.cat(hs)) for gs, hs in by_shape.values()]
    used = torch.cat([t.reshape(-1) for heads in out for t in (heads.g, heads.hh)]) if out else torch.zeros(0)
    if used.numel() != used.unique().numel():
        raise ValueError("GL blocks overlap: a parameter coordinate belongs to two blocks (or twice to one)")
    return out


def _heads_of(block: GLBlock, flat_index: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(G indices [heads, n, h], H indices [heads, m, h])]`` of one block."""
    if block.elementwise:
        g, h = (_named(flat_index, side.param, block) for side in (block.g, block.h))
        if g.shape != h.shape:
            raise ValueError(f"elementwise GLBlock {block.describe()}: {block.g.param!r} has shape {list(g.shape)} "
                             f"but {block.h.param!r} has shape {list(h.shape)}")
        return [(g.reshape(-1, 1, 1), h.reshape(-1, 1, 1))]
    g, h = (_factor(flat_index, side, block) for side in (block.g, block.h))
    heads = block.heads or 1
    for side, f in (("g", g), ("h", h)):
        if f.shape[1] % heads:
            raise ValueError(f"GLBlock {block.describe()}: {side}'s acted-on axis has {f.shape[1]} entries, "
                             f"not a multiple of heads={heads}")
    if g.shape[1] != h.shape[1]:
        raise ValueError(f"GLBlock {block.describe()}: G has {g.shape[1]} columns but H has {h.shape[1]}; "
                         "G H^T needs the same acted-on width")
    split = lambda f: f.reshape(f.shape[0], heads, -1).permute(1, 0, 2)
    return [(split(g), split(h))]


def _named(flat_index: dict, name: str, block: GLBlock) -> torch.Tensor:
    if name not in flat_index:
        raise ValueError(f"GLBlock {block.describe()} names {name!r}, which is not a trainable floating-point "
                         "parameter of the model")
    return flat_index[name]


def _factor(flat_index: dict, f: GLFactor, block: GLBlock) -> torch.Tensor:
    """A factor's indices as the ``n x width`` matrix ``G`` (acted-on axis last, bias as a last row)."""
    w = _named(flat_index, f.param, block)
    if w.dim() != 2:
        raise ValueError(f"GLBlock {block.describe()}: {f.param!r} has shape {list(w.shape)}; a factor is a matrix")
    w = w if f.axis == 1 else w.T
    lo, hi = f.span if f.span is not None else (0, w.shape[1])
    if not 0 <= lo < hi <= w.shape[1]:
        raise ValueError(f"GLBlock {block.describe()}: span {f.span} is outside {f.param!r}'s {w.shape[1]} entries "
                         f"along axis {f.axis}")
    w = w[:, lo:hi]
    if f.bias is not None:
        b = _named(flat_index, f.bias, block)
        if b.dim() != 1 or b.shape[0] < hi:
            raise ValueError(f"GLBlock {block.describe()}: bias {f.bias!r} has shape {list(b.shape)}, which does not "
                             f"cover the span [{lo}:{hi}]")
        w = torch.cat([w, b[lo:hi][None]])
    return w


# ----------------------------------------------------------------------------- finding blocks

def find_gl_blocks(model: nn.Module) -> list[GLBlock]:
    """The GL blocks of the attention layers ``blocks="auto"`` treats: ``nn.MultiheadAttention``
    (the fused in-projection sliced per head), any module with a ``gl_blocks(prefix)`` method (the
    zoo's ViT), and the self-attention of Hugging Face BERT, ViT, CLIP and GPT-2. Per attention
    layer, two blocks: query/key (``b_q``, ``b_k`` appended) and value/output (``b_v`` appended;
    ``b_o`` stays an ordinary parameter). Layers whose weights also enter otherwise (``add_bias_kv``,
    relative position keys, cross-attention) are left to the adaptive treatment and logged."""
    found: list[GLBlock] = []
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()}
    for prefix, module in model.named_modules():
        pre = f"{prefix}." if prefix else ""
        blocks = None
        if hasattr(module, "gl_blocks") and callable(module.gl_blocks):
            blocks = module.gl_blocks(pre)
        elif isinstance(module, nn.MultiheadAttention):
            blocks = _multihead_attention(module, pre)
        else:
            finder = _HF_FINDERS.get(type(module).__name__)
            blocks = finder(module, pre) if finder is not None else None
        if not blocks:
            continue
        names = {n for b in blocks for side in (b.g, b.h) for n in (side.param, side.bias) if n}
        if not names <= trainable:
            log.info("sharpfast: %s's attention has frozen or missing parameters (%s); treated adaptively",
                     prefix or "the model", ", ".join(sorted(names - trainable)))
            continue
        found += blocks
    return found


def attention_blocks(heads: int, q: GLFactor, k: GLFactor, v: GLFactor, o: GLFactor) -> list[GLBlock]:
    """The two blocks of one attention layer: ``(q, k)`` and ``(v, o)``."""
    return [GLBlock(q, k, heads=heads), GLBlock(v, o, heads=heads)]


def _multihead_attention(m: nn.MultiheadAttention, pre: str) -> list[GLBlock] | None:
    if m.bias_k is not None or m.bias_v is not None:
        log.info("sharpfast: %s has add_bias_kv (its extra key/value tokens are not G H^T); treated adaptively",
                 pre.rstrip(".") or "the model")
        return None
    E = m.embed_dim
    bias = f"{pre}in_proj_bias" if m.in_proj_bias is not None else None
    if m._qkv_same_embed_dim:
        part = lambda i: GLFactor(f"{pre}in_proj_weight", axis=0, span=(i * E, (i + 1) * E), bias=bias)
        q, k, v = part(0), part(1), part(2)
    elif bias is None:   # separate projections (kdim, vdim != embed_dim)
        q, k, v = (GLFactor(f"{pre}{n}_proj_weight") for n in "qkv")
    else:   # separate weights sharing one [3E] bias: a layout GLFactor does not describe
        log.info("sharpfast: %s has separate q/k/v weights with one fused bias; treated adaptively",
                 pre.rstrip(".") or "the model")
        return None
    return attention_blocks(m.num_heads, q, k, v, GLFactor(f"{pre}out_proj.weight", axis=1))


def _linear(name: str, module: nn.Module, axis: int = 0) -> GLFactor:
    """A ``Linear``'s weight (its bias appended where it has one and ``axis`` is its rows)."""
    bias = f"{name}.bias" if axis == 0 and getattr(module, "bias", None) is not None else None
    return GLFactor(f"{name}.weight", axis=axis, bias=bias)


def _projections(m: nn.Module, pre: str) -> list[GLBlock] | None:
    """BERT's, ViT's and CLIP's self-attention: ``Linear`` query, key, value and output projections,
    found under the names these models use (``query``/``q_proj``, possibly inside ``self`` or
    ``attention``; ``output.dense``/``out_proj``/``o_proj``)."""
    inner, inner_name = m, ""
    for name in ("self", "attention"):
        if isinstance(getattr(m, name, None), nn.Module) and hasattr(getattr(m, name), "query"):
            inner, inner_name = getattr(m, name), f"{name}."
    qkv = next((names for names in (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"))
                if all(isinstance(getattr(inner, n, None), nn.Linear) for n in names)), None)
    outputs = (("output.dense", getattr(getattr(m, "output", None), "dense", None)),
               ("out_proj", getattr(m, "out_proj", None)), ("o_proj", getattr(m, "o_proj", None)))
    out = next(((n, mod) for n, mod in outputs if isinstance(mod, nn.Linear)), None)
    heads = next((getattr(obj, a) for obj in (inner, m, getattr(inner, "config", None))
                  for a in ("num_attention_heads", "num_heads") if isinstance(getattr(obj, a, None), int)), None)
    if qkv is None or out is None or heads is None:
        return None
    if getattr(inner, "position_embedding_type", "absolute") != "absolute" or getattr(inner, "is_decoder", False):
        log.info("sharpfast: %s's keys also meet position embeddings or a decoder cache; treated adaptively",
                 pre.rstrip("."))
        return None
    widths = {getattr(inner, n).out_features for n in qkv} | {out[1].in_features}
    if len(widths) != 1:   # grouped keys and values: not one GL(h) per head
        log.info("sharpfast: %s's projections have different widths %s; treated adaptively", pre.rstrip("."), widths)
        return None
    q, k, v = (_linear(f"{pre}{inner_name}{n}", getattr(inner, n)) for n in qkv)
    return attention_blocks(heads, q, k, v, _linear(f"{pre}{out[0]}", out[1], axis=1))


def _gpt2(m: nn.Module, pre: str) -> list[GLBlock] | None:
    """GPT-2's ``Conv1D`` stores ``in x out`` and computes ``x W + b``: the heads are the columns of
    ``c_attn`` (q, k, v side by side) and the rows of ``c_proj``."""
    if getattr(m, "is_cross_attention", False):
        log.info("sharpfast: %s is cross-attention; treated adaptively", pre.rstrip("."))
        return None
    E = m.embed_dim
    part = lambda i: GLFactor(f"{pre}c_attn.weight", axis=1, span=(i * E, (i + 1) * E), bias=f"{pre}c_attn.bias")
    return attention_blocks(m.num_heads, part(0), part(1), part(2), GLFactor(f"{pre}c_proj.weight", axis=0))


# by class name: only models whose attention is known to be a GL(h) symmetry (rotary embeddings,
# as in Llama, commute with only part of the group)
_HF_FINDERS = {
    "BertAttention": _projections, "RobertaAttention": _projections, "ViTAttention": _projections,
    "CLIPAttention": _projections, "GPT2Attention": _gpt2,
}
