"""The geodesic tests' shared fixture."""
import pytest
import torch

from tests.geodesic.models import Attention


@pytest.fixture
def attention_model():
    torch.manual_seed(0)
    return Attention().double()
