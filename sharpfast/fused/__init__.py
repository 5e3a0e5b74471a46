"""Fast evaluators on the extension's fused ops: the reference's numbers, many times faster.

* :mod:`.flat`: the flat buffers of a call (the model's parameters view them), availability,
  the loss and error as device tensors, the one read-back of the results;
* :mod:`.problems`: a worst-case call's APGD problems as rows, one at a time through the model
  or all at once in a vmapped forward/backward, chosen once before the loop, or the problems of
  a stack of models (``sharpfast.evaluate_many``) as the rows of one group;
* :mod:`.bookkeeping`: APGD's best point, step size and halving rule, on the device;
* :mod:`.worst_case`, :mod:`.average_case`: the two entry points; :mod:`.scaled`: the scaled
  solver's run, which the worst-case entry point uses for ``solver="scaled"``.
"""
from .average_case import average_many, average_sharpness
from .flat import SUPPORTED_DTYPES, available
from .worst_case import worst_case_many, worst_case_sharpness

__all__ = ["available", "worst_case_sharpness", "average_sharpness", "worst_case_many", "average_many",
           "SUPPORTED_DTYPES"]
