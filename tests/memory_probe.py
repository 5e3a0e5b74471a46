"""Peak memory of a call on the CPU, where torch has no allocator statistics (tests and benchmarks)."""
from __future__ import annotations

from torch.profiler import ProfilerActivity, profile


def peak_cpu_bytes(fn) -> int:
    """Peak of the bytes allocated on the CPU while ``fn`` runs, from the torch profiler's allocation
    events in time order (each op's net allocation, plus the frees that happen outside ops)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak
