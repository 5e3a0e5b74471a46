"""``sharpfast doctor``: how the extension was built, which devices there are, and the self-test
of every fused op on each of them (the first thing to run on a new machine or GPU)."""
from __future__ import annotations

import os
import platform

import torch

from . import _ops, kernel_check


def devices() -> list[str]:
    return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def describe_build() -> list[str]:
    info = _ops.build_info()
    lines = [f"python {platform.python_version()}, torch {torch.__version__} "
             f"(CUDA {torch.version.cuda or 'none'}), {platform.machine()}"]
    if _ops.IMPORT_ERROR:
        return lines + [f"extension: NOT LOADED ({_ops.IMPORT_ERROR}); every call uses the pure-PyTorch reference"]
    cuda = (f"CUDA {info['cuda_version']} for {', '.join(info.get('cuda_archs') or ['?'])}" if info["cuda"]
            else "no CUDA kernels")
    lines.append(f"extension: built against torch {info['torch']}, {cuda}, "
                 f"OpenMP {'on' if info['openmp'] else 'OFF (CPU ops run on one thread)'}")
    lines.append(f"threads: torch {torch.get_num_threads()} intra-op, {os.cpu_count()} CPUs")
    lines.append(f"CPU draws: {_ops.cpu_isa()} (this CPU: {', '.join(info.get('cpu_isas', ['scalar']))}; "
                 "SHARPFAST_CPU_ISA chooses)")
    return lines


def describe_device(device: str) -> str:
    if device == "cpu":
        return "cpu: " + (platform.processor() or platform.machine())
    if not torch.cuda.is_available():
        return f"{device}: not available ({'no GPU found' if torch.version.cuda else 'this torch has no CUDA'})"
    props = torch.cuda.get_device_properties(device)
    return (f"{device}: {props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB"
            + ("" if _ops.available(device) else " (no kernels in this build)"))


def run(device: str | None = None, out=print) -> bool:
    """Print the build, the devices and the self-test of ``device`` (default: every device with
    kernels); True when every self-test passed."""
    for line in describe_build():
        out(line)
    ok = True
    for dev in devices() if device is None else [device]:
        out(describe_device(dev))
        if not _ops.available(dev):
            ok = ok and device is None   # asked for a device without kernels: a failure
            continue
        report = kernel_check.selftest(dev)
        out(str(report))
        ok = ok and report.ok
    return ok
