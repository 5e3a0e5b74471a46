"""err_sharpness: the classification error where outputs and labels are a classification pair,
the user's error_fn where given, and None otherwise (never argmax != y over unrelated shapes)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sharpfast
from sharpfast import _ops
from tests.toy_models import mlp

BACKENDS = ["reference", pytest.param("fused", marks=pytest.mark.skipif(not _ops.available("cpu"),
                                                                          reason="extension not built"))]


class TinyLM(nn.Module):
    """Next-token logits [B, T, V] from tokens [B, T]."""

    def __init__(self, vocab=7, d=8):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Embedding(vocab, d), nn.Linear(d, vocab)

    def forward(self, tokens):
        return self.head(torch.tanh(self.embed(tokens)))


def shifted_loss(logits, tokens):   # a language model's loss: position t predicts token t + 1
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


def shifted_error(logits, tokens):
    return (logits[:, :-1].argmax(-1) != tokens[:, 1:]).float().mean()


def lm_batches():
    g = torch.Generator().manual_seed(1)
    return [(t, t) for t in (torch.randint(0, 7, (4, 6), generator=g) for _ in range(2))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", [sharpfast.worst_case_sharpness, sharpfast.average_sharpness])
def test_a_custom_sequence_loss_has_no_error_unless_error_fn_is_given(backend, fn):
    kw = dict(rho=0.05, loss_fn=shifted_loss, backend=backend)
    r = fn(TinyLM(), lm_batches(), **kw)
    assert r.err_sharpness is None and r.per_batch_err is None and r.init_err is None
    r = fn(TinyLM(), lm_batches(), error_fn=shifted_error, **kw)
    model = TinyLM().eval()
    with torch.no_grad():
        want = sum(float(shifted_error(model(x), y)) for x, y in lm_batches()) / 2
    assert r.init_err == pytest.approx(want) and r.err_sharpness is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_classification_error_is_kept_where_it_means_what_the_loss_means(backend):
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(2)]
    smoothed = lambda f, y: F.cross_entropy(f, y, label_smoothing=0.1)
    # [B, K] logits with [B] labels: the 0-1 error, whatever the loss
    assert sharpfast.worst_case_sharpness(mlp(), data, rho=0.05, loss_fn=smoothed, backend=backend).err_sharpness is not None
    # token classification under the default loss: [B, T, K] with [B, T] labels
    tokens = lm_batches()
    assert sharpfast.worst_case_sharpness(TinyLM(), tokens, rho=0.05, backend=backend).err_sharpness is not None
    # regression targets: no error
    reg = [(x, torch.randn(16, 3, generator=g)) for x, _ in data]
    r = sharpfast.worst_case_sharpness(mlp(), reg, rho=0.05, loss_fn=F.mse_loss, backend=backend)
    assert r.err_sharpness is None


def test_error_fn_must_be_callable_and_return_one_element():
    data = lm_batches()
    with pytest.raises(TypeError, match="error_fn must be callable"):
        sharpfast.worst_case_sharpness(TinyLM(), data, rho=0.05, error_fn=3)
    with pytest.raises(TypeError, match="error_fn\\(output, y\\) must return the mean error"):
        sharpfast.worst_case_sharpness(TinyLM(), data, rho=0.05, loss_fn=shifted_loss, backend="reference",
                                       error_fn=lambda f, y: (f.argmax(-1) != y).float())
