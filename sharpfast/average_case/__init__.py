"""Average-case sharpness: the reference (reference.py) beside its fast path (fused.py)."""
