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


def wait_for_rows(store: str, n: int, running, status: str | None = "ok", guard_s: float = 600.0) -> int:
    """Wait until the store at ``store`` holds at least ``n`` rows (of ``status``; None: any) or
    ``running()`` turns false; return the rows it holds. Tests synchronize on this event, never on
    the clock: ``guard_s`` only stops a hang, it measures no speed."""
    import time

    from sharpfast.study.store import Store, StoreError

    done, deadline = 0, time.time() + guard_s
    while done < n and running() and time.time() < deadline:
        time.sleep(0.2)
        if os.path.exists(store):
            try:
                with Store(store, readonly=True) as st:
                    counts = st.counts()
            except StoreError:   # still being created
                continue
            done = counts.get(status, 0) if status else sum(counts.values())
    return done
