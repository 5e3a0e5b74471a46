"""GL blocks (DESIGN.md §2c.2): each finder's blocks, acted on by random group elements, leave the
model's function unchanged; layers whose weights also enter otherwise are left adaptive."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import sharpfast
from sharpfast import GLBlock, GLFactor
from tests.geodesic.models import act


def test_zoo_vit_blocks_leave_its_function_unchanged():
    from sharpfast.study import zoo
    torch.manual_seed(0)
    model = zoo.vit(width=16, heads=2).double()
    blocks = sharpfast.find_gl_blocks(model)
    assert len(blocks) == 4
    x = torch.randn(3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(act(model, blocks)(x), model(x), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("arch", ["vit", "clip", "gpt2"])
def test_hugging_face_blocks_leave_the_function_unchanged(arch):
    """The blocks found in Hugging Face ViT, CLIP and GPT-2 are symmetries: the group's action on
    them changes no output."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if arch == "vit":
        model = transformers.ViTModel(transformers.ViTConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=8,
            patch_size=4, num_channels=1), add_pooling_layer=False)
        x = {"pixel_values": torch.randn(2, 1, 8, 8)}
    elif arch == "clip":
        model = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=20, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=8))
        x = {"input_ids": torch.randint(0, 20, (2, 6))}
    else:
        model = transformers.GPT2Model(transformers.GPT2Config(vocab_size=20, n_embd=16, n_layer=1, n_head=2,
                                                               n_positions=8))
        x = {"input_ids": torch.randint(0, 20, (2, 6))}
    model = model.double().eval()
    blocks = sharpfast.find_gl_blocks(model)
    assert len(blocks) == 2
    moved = act(model, blocks, lo=-1, hi=1).eval()
    out = lambda m: m(**x).last_hidden_state
    torch.testing.assert_close(out(moved), out(model), rtol=1e-8, atol=1e-10)


def test_find_gl_blocks_leaves_add_bias_kv_alone():
    model = nn.MultiheadAttention(8, 2, add_bias_kv=True)
    assert sharpfast.find_gl_blocks(model) == []
    assert GLBlock("a", "b").g == GLFactor("a")


@pytest.mark.parametrize("kwargs", [dict(), dict(bias=False), dict(kdim=6, vdim=5, bias=False)])
def test_multihead_attention_blocks_leave_the_function_unchanged(kwargs):
    """Fused and separate in-projections (kdim, vdim), with and without biases."""
    torch.manual_seed(0)
    m = nn.MultiheadAttention(8, 2, batch_first=True, **kwargs).double()
    blocks = sharpfast.find_gl_blocks(m)
    assert len(blocks) == 2
    q = torch.randn(3, 4, 8, dtype=torch.float64)
    k = torch.randn(3, 5, kwargs.get("kdim", 8), dtype=torch.float64)
    v = torch.randn(3, 5, kwargs.get("vdim", 8), dtype=torch.float64)
    out = lambda mod: mod(q, k, v, need_weights=False)[0]
    torch.testing.assert_close(out(act(m, blocks)), out(m), rtol=1e-9, atol=1e-11)
    separate_with_bias = nn.MultiheadAttention(8, 2, kdim=6, vdim=5)   # one [3E] bias: left adaptive
    assert sharpfast.find_gl_blocks(separate_with_bias) == []
