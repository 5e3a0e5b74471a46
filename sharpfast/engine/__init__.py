"""The shared engine of the fused backends: flat buffers and problem rows, on the extension's ops.

* :mod:`.flat`: the flat buffers of a call (the model's parameters view them), availability,
  the loss and error as device tensors, the one read-back of the results;
* :mod:`.problems`: a call's problems (one per m-batch, or per (model, m-batch) of a stack) as
  the rows of one group, evaluated one at a time through the model or all at once in a vmapped
  forward/backward, chosen once before the loop.

The measures' fast paths (``worst_case.fused``, ``average_case.fused``) are written on it; the
engine imports no measure.
"""
from .flat import SUPPORTED_DTYPES, available

__all__ = ["available", "SUPPORTED_DTYPES"]
