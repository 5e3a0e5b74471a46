"""Micro-benchmarks of sharpfast's fused ops against the same math written with
``torch._foreach_*`` ops and with a per-tensor Python loop.

Cases: the parameter list of a 25-layer MLP (width 512) and one 100M-parameter buffer
(``--small``: 10M). Ops: the linf APGD step, the l2 APGD step, the ellipsoid norms for 16
candidate lambdas (l2 bisection), perturb (w0 + rho c xi) and batched perturb (K = 8). The
fused ops run with the scale c = |w0| as a buffer (``fused``) and derived from w0 inside the
kernels (``fused, c from w0``: one buffer fewer to read, what the evaluators use for adaptive
and standard sharpness).
Reports the median time, the effective bandwidth (bytes the op must move / time) and its
fraction of the device's peak memory bandwidth (CUDA: from the device's memory clock and bus
width) and of a measured device copy (``clone``) bandwidth.

    python -m benchmarks.bench_ops --device cpu --small      # prints a markdown table
    python -m benchmarks.bench_ops --device cuda --out benchmarks/OPS_RESULTS.md
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time

import torch

from benchmarks.results import write_section
from sharpfast import _ops

RHO, MOM, STEP, GS, K, N_LAMBDAS = 0.05, 0.75, 0.1, 1e-3, 8, 16
FROM_W0 = _ops.DerivedScale(adaptive=True, eta=0.0)   # the same c = |w0| as State.c, with no buffer


def mlp_shapes(depth=25, width=512, d_in=784, d_out=10):
    dims = [d_in] + [width] * (depth - 1) + [d_out]
    shapes = []
    for a, b in zip(dims[:-1], dims[1:]):
        shapes += [(b, a), (b,)]
    return shapes


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device, min_time=0.3, max_reps=200, warmup=1):
    """Best of several repetitions (the minimum is the least noisy estimate on a shared machine)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    t_start = time.perf_counter()
    while len(times) < max_reps and (time.perf_counter() - t_start < min_time or len(times) < 3):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


class State:
    """One set of buffers, both flat (for the fused ops) and as per-parameter views."""

    def __init__(self, shapes, device, dtype):
        self.shapes = shapes
        self.n = sum(torch.Size(s).numel() for s in shapes)
        g = torch.Generator(device=device).manual_seed(0)
        mk = lambda: torch.randn(self.n, generator=g, device=device, dtype=dtype)
        self.w0 = mk()
        self.c = self.w0.abs()
        self.grad = mk()
        self.delta = 0.01 * mk() * self.c
        self.delta_prev = self.delta.clone()
        self.params = self.w0 + self.delta
        self.out = torch.empty_like(self.w0)
        self.step = torch.tensor(STEP, dtype=torch.float64, device=device)
        self.gs = torch.tensor(GS, dtype=torch.float64, device=device)
        self.lam = torch.tensor(0.1, dtype=torch.float64, device=device)
        self.lambdas = torch.logspace(-4, 2, N_LAMBDAS, dtype=torch.float64, device=device)
        self._initial = {k: getattr(self, k).clone() for k in ("params", "delta", "delta_prev")}

    def reset(self):
        """Same starting point for every implementation (repeated steps drift the state)."""
        for k, v in self._initial.items():
            getattr(self, k).copy_(v)

    def views(self, flat):
        out, i = [], 0
        for s in self.shapes:
            k = torch.Size(s).numel()
            out.append(flat[i:i + k].view(s))
            i += k
        return out

    def lists(self, *names):
        return [self.views(getattr(self, n)) for n in names]


# ------------------------------------------------------------------------------ implementations

def linf_fused(s, scale=None):
    c = s.c if scale is None else scale
    return lambda: _ops.apgd_step_linf_(s.params, s.delta, s.delta_prev, s.grad, s.w0, c, s.step, RHO, MOM)


def linf_foreach(s):
    P, D, DP, G, W, C = s.lists("params", "delta", "delta_prev", "grad", "w0", "c")

    def f():
        z = torch._foreach_sign(G)
        torch._foreach_mul_(z, C)
        torch._foreach_mul_(z, s.step)
        torch._foreach_add_(z, D)
        bound = torch._foreach_mul(C, RHO)
        torch._foreach_minimum_(z, bound)
        torch._foreach_neg_(bound)
        torch._foreach_maximum_(z, bound)
        torch._foreach_mul_(z, MOM)
        torch._foreach_add_(z, DP, alpha=1 - MOM)
        torch._foreach_copy_(DP, D)
        torch._foreach_copy_(D, z)
        torch._foreach_copy_(P, W)
        torch._foreach_add_(P, z)
    return f


def linf_loop(s):
    P, D, DP, G, W, C = s.lists("params", "delta", "delta_prev", "grad", "w0", "c")

    def f():
        for p, d, dp, g, w, c in zip(P, D, DP, G, W, C):
            z = d + s.step * g.sign() * c
            z = torch.maximum(torch.minimum(z, RHO * c), -RHO * c)
            new = MOM * z + (1 - MOM) * dp
            dp.copy_(d)
            d.copy_(new)
            torch.add(w, new, out=p)
    return f


def l2_fused(s, scale=None):
    c = s.c if scale is None else scale
    return lambda: _ops.apgd_step_l2_(s.params, s.delta, s.delta_prev, s.grad, s.w0, c, s.gs, s.lam, MOM)


def l2_foreach(s):
    P, D, DP, G, W, C = s.lists("params", "delta", "delta_prev", "grad", "w0", "c")

    def f():
        z = torch._foreach_mul(G, C)
        torch._foreach_mul_(z, s.gs)
        torch._foreach_add_(z, D)
        c2 = torch._foreach_mul(C, C)
        den = torch._foreach_add(c2, 2 * s.lam)
        torch._foreach_mul_(z, c2)
        torch._foreach_div_(z, den)      # c = 0 -> 0 / (2 lam) = 0 here (lam > 0)
        torch._foreach_mul_(z, MOM)
        torch._foreach_add_(z, DP, alpha=1 - MOM)
        torch._foreach_copy_(DP, D)
        torch._foreach_copy_(D, z)
        torch._foreach_copy_(P, W)
        torch._foreach_add_(P, z)
    return f


def l2_loop(s):
    P, D, DP, G, W, C = s.lists("params", "delta", "delta_prev", "grad", "w0", "c")

    def f():
        for p, d, dp, g, w, c in zip(P, D, DP, G, W, C):
            z = d + s.gs * g * c
            c2 = c * c
            zp = torch.where(c > 0, z * c2 / (c2 + 2 * s.lam), torch.zeros_like(z))
            new = MOM * zp + (1 - MOM) * dp
            dp.copy_(d)
            d.copy_(new)
            torch.add(w, new, out=p)
    return f


def norms_fused(s, scale=None):
    c = s.c if scale is None else scale
    return lambda: _ops.ellipsoid_sq_norms(s.delta, s.grad, s.w0, c, s.gs, s.lambdas)


def norms_foreach(s):
    D, G, C = s.lists("delta", "grad", "c")
    lams = s.lambdas.tolist()

    def f():
        z = torch._foreach_mul(G, C)
        torch._foreach_mul_(z, s.gs)
        torch._foreach_add_(z, D)
        zc = torch._foreach_mul(z, C)
        c2 = torch._foreach_mul(C, C)
        out = []
        for lam in lams:        # one pass per candidate: the unfused bisection's cost
            q = torch._foreach_div(zc, torch._foreach_add(c2, 2 * lam))
            out.append(torch.stack(torch._foreach_norm(q)).double().pow(2).sum())
        return torch.stack(out)
    return f


def norms_loop(s):
    D, G, C = s.lists("delta", "grad", "c")
    lams = s.lambdas.tolist()

    def f():
        out = []
        for lam in lams:
            tot = 0.0
            for d, g, c in zip(D, G, C):
                z = d + s.gs * g * c
                tot = tot + (z * c / (c * c + 2 * lam)).double().pow(2).sum()
            out.append(tot)
        return torch.stack(out)
    return f


def perturb_fused(s, scale=None):
    c = s.c if scale is None else scale
    return lambda: _ops.perturb_(s.out, s.w0, c, RHO, 1, 0, 0, 0, "normal")


def perturb_foreach(s):
    O, W, C = s.lists("out", "w0", "c")

    def f():
        xi = [torch.randn_like(w) for w in W]   # torch has no foreach sampler
        torch._foreach_mul_(xi, C)
        torch._foreach_mul_(xi, RHO)
        torch._foreach_add_(xi, W)
        torch._foreach_copy_(O, xi)
    return f


def perturb_loop(s):
    O, W, C = s.lists("out", "w0", "c")

    def f():
        for o, w, c in zip(O, W, C):
            torch.add(w, RHO * c * torch.randn_like(w), out=o)
    return f


def batched_fused(s, scale=None):
    c = s.c if scale is None else scale
    out = torch.empty(K, s.n, device=s.w0.device, dtype=s.w0.dtype)
    return lambda: _ops.perturb_batched_(out, s.w0, c, RHO, 1, 0, 0, 0, "normal", False)


def batched_foreach(s):
    W, C = s.lists("w0", "c")
    out = torch.empty(K, s.n, device=s.w0.device, dtype=s.w0.dtype)
    rows = [s.views(out[k]) for k in range(K)]

    def f():
        for k in range(K):
            xi = [torch.randn_like(w) for w in W]
            torch._foreach_mul_(xi, C)
            torch._foreach_mul_(xi, RHO)
            torch._foreach_add_(xi, W)
            torch._foreach_copy_(rows[k], xi)
    return f


def batched_loop(s):
    W, C = s.lists("w0", "c")
    out = torch.empty(K, s.n, device=s.w0.device, dtype=s.w0.dtype)
    rows = [s.views(out[k]) for k in range(K)]

    def f():
        for k in range(K):
            for o, w, c in zip(rows[k], W, C):
                torch.add(w, RHO * c * torch.randn_like(w), out=o)
    return f


def from_w0(make):
    return lambda s: make(s, FROM_W0)


# (op, {impl: (buffers moved in units of N elements, maker)}); "fused" first: the ratios' reference
OPS_TABLE = [
    ("linf step", {"fused": (8, linf_fused), "fused, c from w0": (7, from_w0(linf_fused)),
                   "foreach": (8, linf_foreach), "loop": (8, linf_loop)}),
    ("l2 step", {"fused": (8, l2_fused), "fused, c from w0": (7, from_w0(l2_fused)),
                 "foreach": (8, l2_foreach), "loop": (8, l2_loop)}),
    (f"ellipsoid norms (L={N_LAMBDAS})", {"fused": (3, norms_fused), "fused, c from w0": (3, from_w0(norms_fused)),
                                          "foreach": (3, norms_foreach), "loop": (3, norms_loop)}),
    ("perturb (normal)", {"fused": (3, perturb_fused), "fused, c from w0": (2, from_w0(perturb_fused)),
                          "foreach": (3, perturb_foreach), "loop": (3, perturb_loop)}),
    (f"batched perturb (K={K}, normal)", {"fused": (2 + K, batched_fused),
                                         "fused, c from w0": (1 + K, from_w0(batched_fused)),
                                         "foreach": (2 + K, batched_foreach), "loop": (2 + K, batched_loop)}),
]


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except Exception:
        model = platform.processor() or "CPU"
    return f"{model}, {torch.get_num_threads()} threads"


def _loadavg():
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "n/a"


def peak_bandwidth(device):
    """Theoretical peak (bytes/s) on CUDA from the memory clock and bus width, else None."""
    if device.type != "cuda":
        return None
    p = torch.cuda.get_device_properties(device)
    clock = getattr(p, "memory_clock_rate", None)   # kHz
    bus = getattr(p, "memory_bus_width", None)      # bits
    if not clock or not bus:
        return None
    return 2.0 * clock * 1e3 * bus / 8.0


def copy_bandwidth(device, n, dtype):
    """Best observed bandwidth of a device copy and of an a + b add (bytes moved / time)."""
    x = torch.randn(n, device=device, dtype=dtype)
    y, z = torch.empty_like(x), torch.randn_like(x)
    t_copy = timeit(lambda: y.copy_(x), device, min_time=1.0)
    t_add = timeit(lambda: torch.add(x, z, out=y), device, min_time=1.0)
    return max(2 * n * x.element_size() / t_copy, 3 * n * x.element_size() / t_add)


DRAW_ELEMENTS = 1_532_426   # the 25-layer 256-wide MLP's parameters: a 6 MB float32 buffer


def draws_table(device, threads=(1, 2)) -> list[str]:
    """Philox draws (``_ops.draw_``, float32) per distribution and, on a CPU, per instruction set
    (csrc/cpu/isa.h): ns per element at each thread count, and the roofline: the bytes written
    (4 per element), the rate they are written at, and that rate against the measured
    write-only bandwidth of ``fill_`` on the same buffer (a draw cannot be faster than writing)."""
    out = torch.empty(DRAW_ELEMENTS, device=device)
    isas = _ops.build_info().get("cpu_isas", ["scalar"]) if device.type == "cpu" else [device.type]
    before_isa, before_threads = (_ops.cpu_isa() if device.type == "cpu" else None), torch.get_num_threads()
    lines = [f"Draws of {DRAW_ELEMENTS:,} float32 elements; best of >= 3 repetitions. Roofline: 4 bytes written "
             "per element; `% write bw` is against `fill_` on the same buffer and thread count.", "",
             "| instruction set | distribution | threads | ns / element | ns / element / core | GB/s written | "
             "`fill_` GB/s | % write bw |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    try:
        for n_threads in threads if device.type == "cpu" else (None,):
            if n_threads:
                torch.set_num_threads(n_threads)
            fill = timeit(lambda: out.fill_(1.0), device, min_time=0.5)
            fill_bw = 4 * DRAW_ELEMENTS / fill
            for isa in isas:
                if device.type == "cpu":
                    _ops.cpu_isa(isa)
                for dist in ("normal", "uniform", "rademacher"):
                    t = timeit(lambda: _ops.draw_(out, 0, 0, 0, 0, dist), device, min_time=0.5)
                    ns = t / DRAW_ELEMENTS * 1e9
                    bw = 4 * DRAW_ELEMENTS / t
                    lines.append(f"| {isa} | {dist} | {n_threads or '-'} | {ns:.2f} | {ns * (n_threads or 1):.2f} | "
                                 f"{bw / 1e9:.1f} | {fill_bw / 1e9:.1f} | {100 * bw / fill_bw:.0f}% |")
                    print(lines[-1], flush=True)
    finally:
        torch.set_num_threads(before_threads)
        if before_isa:
            _ops.cpu_isa(before_isa)
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    ap.add_argument("--small", action="store_true", help="10M-parameter flat buffer instead of 100M")
    ap.add_argument("--skip-loop-large", action="store_true", help="skip the per-tensor loop on the large buffer")
    ap.add_argument("--out", help="also write the table (markdown) to this file")
    ap.add_argument("--draws", action="store_true",
                    help="only the Philox draws per instruction set, with the roofline (replaces that section of --out)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.draws:
        command = "`python -m benchmarks.bench_ops " + " ".join(argv if argv is not None else sys.argv[1:]) + "`"
        lines = [f"## Draws ({device.type})", "", command + f" on **{device_name(device)}**, torch {torch.__version__}, "
                 f"load average at start {_loadavg()}.", ""] + draws_table(device)
        if args.out:
            write_section(args.out, f"draws {device.type}", "\n".join(lines), "# sharpfast op micro-benchmarks\n")
        return
    if device.type == "cpu":
        torch.set_flush_denormal(True)   # repeated l2 steps shrink delta towards denormals
    if not _ops.available(device):
        sys.exit(f"sharpfast extension not available on {device}: {_ops.build_info()}")

    big = 10_000_000 if args.small else 100_000_000
    cases = [("MLP 25x512 (%d tensors)" % len(mlp_shapes()), mlp_shapes()), (f"flat {big / 1e6:.0f}M", [(big,)])]
    peak = peak_bandwidth(device)
    copy_bw = copy_bandwidth(device, min(big, 50_000_000), dtype)
    esize = torch.empty((), dtype=dtype).element_size()

    lines = [f"Device: **{device_name(device)}**; dtype {args.dtype}; torch {torch.__version__}; "
             f"extension {_ops.build_info()}",
             "",
             f"Measured device bandwidth (best of copy_ and add over {min(big, 50_000_000) / 1e6:.0f}M elements): "
             f"{copy_bw / 1e9:.1f} GB/s; load average at start {_loadavg()}"
             + (f"; theoretical peak {peak / 1e9:.0f} GB/s" if peak else ""),
             "",
             "GB/s = bytes the op must move (fused: each buffer read/written once) / time. "
             "`% peak` is against the theoretical peak on CUDA, against the measured copy/add bandwidth on CPU (a fused op can exceed it: it streams several buffers at once).",
             "",
             "Times: best of >= 3 repetitions (>= 0.3 s of repetitions) after one warm-up call.",
             "",
             "| case | op | impl | time (ms) | GB/s | % peak | fused speedup |",
             "|---|---|---|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for case_name, shapes in cases:
        s = State(shapes, device, dtype)
        for op_name, impls in OPS_TABLE:
            times = {}
            for impl_name, (_, make) in impls.items():
                if impl_name == "loop" and args.skip_loop_large and len(shapes) == 1:
                    continue
                s.reset()
                times[impl_name] = timeit(make(s), device)
            for impl_name, t in times.items():
                bw = impls[impl_name][0] * s.n * esize / t
                ref = peak or copy_bw
                row = (f"| {case_name} | {op_name} | {impl_name} | {t * 1e3:.3f} | {bw / 1e9:.1f} | "
                       f"{100 * bw / ref:.0f}% | {t / times['fused']:.2f}x |")
                lines.append(row)
                print(row, flush=True)
        del s
    if args.out:
        with open(args.out, "w") as f:
            f.write("# sharpfast op micro-benchmarks\n\n`python -m benchmarks.bench_ops "
                    + " ".join(argv if argv is not None else sys.argv[1:]) + "`\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
