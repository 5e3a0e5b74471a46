"""What the tests and benchmarks share: the devices and dtypes to run on."""
import os

import pytest
import torch

from sharpfast import _ops

# CPU always; CUDA when the extension is built with it and a GPU is present
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not _ops.available("cuda"),
                                                                 reason="no CUDA build or GPU"))]
DATA_DIR = os.path.join(os.path.dirname(__file__), "data")   # files written by earlier versions
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
requires_extension = pytest.mark.skipif(not _ops.available("cpu"), reason=f"extension not built: {_ops.IMPORT_ERROR}")
