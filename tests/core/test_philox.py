"""The extension's Philox4x32-10 sampler against its pure-PyTorch twin (sharpfast.philox),
plus statistical checks of the draws (moments, Kolmogorov-Smirnov, counter independence)."""
import math

import pytest
import torch

from sharpfast import _ops
from sharpfast.philox import philox4x32_10, philox_draw

pytestmark = pytest.mark.skipif(not _ops.available("cpu"), reason=f"extension not built: {_ops.IMPORT_ERROR}")

from tests.helpers import DEVICES

CPU_ISAS = _ops.build_info().get("cpu_isas", ["scalar"]) if _ops.available("cpu") else ["scalar"]


@pytest.fixture(autouse=True, params=CPU_ISAS)
def cpu_isa(request):
    """Every test here runs with each CPU instruction set of the sampling loops (csrc/cpu/isa.h)."""
    if not _ops.available("cpu"):
        yield None
        return
    before = _ops.cpu_isa()
    _ops.cpu_isa(request.param)
    yield request.param
    _ops.cpu_isa(before)
SEEDS = [0, 1, 12345, 2**32 + 7, 2**63 + 11, 2**64 - 1]
OFFSETS = [0, 1, 2, 3, 5, 4097, 2**33 + 3]


def cpp_draw(dist, seed, stream, sample, offset, n, dtype=torch.float32, device="cpu"):
    out = torch.empty(n, dtype=dtype, device=device)
    return _ops.draw_(out, seed, stream, sample, offset, dist)


def test_twin_known_answer_vectors():
    """Random123's Philox4x32-10 known-answer vectors (the twin is the contract)."""
    t = lambda v: torch.tensor([v], dtype=torch.int64)
    out = philox4x32_10(t(0), t(0), t(0), t(0), 0, 0)
    assert [int(x) for x in out] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    out = philox4x32_10(*(t(0xFFFFFFFF) for _ in range(4)), 0xFFFFFFFF, 0xFFFFFFFF)
    assert [int(x) for x in out] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    out = philox4x32_10(t(0x243F6A88), t(0x85A308D3), t(0x13198A2E), t(0x03707344), 0xA4093822, 0x299F31D0)
    assert [int(x) for x in out] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("offset", OFFSETS)
def test_uniform_and_rademacher_bitwise(device, seed, offset):
    n = 1003
    for dist in ("uniform", "rademacher"):
        for stream, sample in ((0, 0), (3, 7), (2**32 - 1, 2**31 + 5)):
            want = philox_draw(dist, seed, stream, sample, offset, n)
            got = cpp_draw(dist, seed, stream, sample, offset, n, device=device).cpu()
            assert torch.equal(got, want), (dist, seed, stream, sample, offset)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("offset", OFFSETS)
def test_normal_matches_twin(device, seed, offset):
    n = 1001
    for stream, sample in ((0, 0), (5, 2**31 + 1)):
        want = philox_draw("normal", seed, stream, sample, offset, n, dtype=torch.float64)
        got64 = cpp_draw("normal", seed, stream, sample, offset, n, torch.float64, device).cpu()
        torch.testing.assert_close(got64, want, rtol=1e-12, atol=1e-14)
        got32 = cpp_draw("normal", seed, stream, sample, offset, n, torch.float32, device).cpu()
        torch.testing.assert_close(got32, want.float(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dist", ["normal", "uniform", "rademacher"])
def test_half_draws(device, dtype, dist):
    """Half draws are the float32 draw rounded once more (normal: double -> float -> half may
    differ from double -> half by one unit in the last place, rarely)."""
    n, seed, offset = 4099, 2**40 + 3, 6
    want = philox_draw(dist, seed, 1, 2, offset, n, dtype=torch.float64)
    got = cpp_draw(dist, seed, 1, 2, offset, n, dtype, device).cpu()
    assert got.dtype == dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got.double(), want, rtol=eps, atol=eps * 1e-3)
    if dist != "normal":
        assert torch.equal(got, want.float().to(dtype))


@pytest.mark.parametrize("dist", ["normal", "uniform", "rademacher"])
def test_thread_count_independent(dist):
    n = 300_001
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpp_draw(dist, 99, 1, 2, 3, n)
        w0, c = torch.randn(n), torch.rand(n)
        p1 = _ops.perturb_(torch.empty(n), w0, c, 0.1, 99, 1, 2, 3, dist)
        torch.set_num_threads(2)
        two = cpp_draw(dist, 99, 1, 2, 3, n)
        p2 = _ops.perturb_(torch.empty(n), w0, c, 0.1, 99, 1, 2, 3, dist)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(one, two)
    assert torch.equal(p1, p2)


def test_offset_consistency():
    """A buffer drawn at offset k equals the slice [k:] of a draw from offset 0."""
    full = cpp_draw("normal", 7, 0, 0, 0, 2000, torch.float64)
    for k in (1, 2, 3, 4, 5, 999):
        part = cpp_draw("normal", 7, 0, 0, k, 2000 - k, torch.float64)
        assert torch.equal(part, full[k:])


# ------------------------------------------------------------------------------ statistics

N_STAT = 200_000


def test_normal_moments_and_ks():
    stats = pytest.importorskip("scipy.stats")
    x = cpp_draw("normal", 2024, 0, 0, 1, N_STAT, torch.float64)
    se = 1.0 / math.sqrt(N_STAT)
    assert abs(x.mean().item()) < 5 * se
    assert abs(x.var().item() - 1.0) < 5 * math.sqrt(2.0) * se
    assert abs((x**3).mean().item()) < 5 * math.sqrt(15.0) * se
    assert abs((x**4).mean().item() - 3.0) < 5 * math.sqrt(96.0) * se
    assert stats.kstest(x.numpy(), "norm").pvalue > 1e-3


def test_uniform_moments_and_ks():
    stats = pytest.importorskip("scipy.stats")
    x = cpp_draw("uniform", 2025, 0, 0, 3, N_STAT, torch.float64)
    se = 1.0 / math.sqrt(N_STAT)
    assert x.min() >= -1.0 and x.max() < 1.0
    assert abs(x.mean().item()) < 5 * math.sqrt(1 / 3) * se
    assert abs(x.var().item() - 1 / 3) < 5 * math.sqrt(4 / 45) * se
    assert stats.kstest(x.numpy(), "uniform", args=(-1.0, 2.0)).pvalue > 1e-3


def test_rademacher_moments():
    x = cpp_draw("rademacher", 2026, 0, 0, 0, N_STAT, torch.float64)
    assert set(x.unique().tolist()) == {-1.0, 1.0}
    assert abs(x.mean().item()) < 5 / math.sqrt(N_STAT)


def _corr(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.mark.parametrize("dist", ["normal", "uniform", "rademacher"])
def test_counter_independence(dist):
    n = N_STAT
    tol = 5 / math.sqrt(n)
    base = cpp_draw(dist, 11, 0, 0, 0, n, torch.float64)
    others = {
        "seed+1": cpp_draw(dist, 12, 0, 0, 0, n, torch.float64),
        "seed+2^32": cpp_draw(dist, 11 + 2**32, 0, 0, 0, n, torch.float64),
        "sample+1": cpp_draw(dist, 11, 0, 1, 0, n, torch.float64),
        "stream+1": cpp_draw(dist, 11, 1, 0, 0, n, torch.float64),
        "offset+4": cpp_draw(dist, 11, 0, 0, 4, n, torch.float64),
    }
    for name, other in others.items():
        assert abs(_corr(base, other)) < tol, name
    for lag in (1, 2, 3, 4):   # neighbouring elements (same block and next block)
        assert abs(_corr(base[:-lag], base[lag:])) < tol, lag
    if dist == "normal":      # Box-Muller partners share one radius; exact BM makes them independent: check |x| too
        a = base.abs()
        assert abs(_corr(a[0::2], a[1::2])) < 5 / math.sqrt(n / 2)


@pytest.mark.skipif(not _ops.available("cpu"), reason="extension not built")
def test_every_instruction_set_draws_and_perturbs_the_same_bits(cpu_isa):
    """Against the scalar loop, bit for bit: every distribution and dtype, lengths and offsets that
    end inside a vector step and cross tiles, and the perturbation ops built on the draws."""
    def run():
        out = []
        for dist in ("normal", "uniform", "rademacher"):
            for dtype in (torch.float32, torch.float64, torch.bfloat16):
                for n, offset in ((1, 0), (7, 3), (129, 5), (4096 + 37, 2**32 - 9), (70001, 123)):
                    t = torch.empty(n, dtype=dtype)
                    _ops.draw_(t, 2**63 + 11, 3, 2**31 + 1, offset, dist)
                    out.append(t)
            w0 = torch.randn(3001, generator=torch.Generator().manual_seed(0))
            rows = torch.empty(4, 3001)
            _ops.perturb_batched_(rows, w0, _ops.DerivedScale(True, 0.01), 0.1, 5, 2, 9, 17, dist, True)
            one = torch.empty(3001)
            _ops.perturb_(one, w0, _ops.DerivedScale(False, 0.0) if dist == "normal" else w0.abs(), 0.1, 5, 2, 9, 17, dist)
            out += [rows, one]
        return out
    got = run()
    _ops.cpu_isa("scalar")
    for a, b in zip(got, run()):
        assert torch.equal(a, b), cpu_isa


@pytest.mark.skipif(not _ops.available("cpu"), reason="extension not built")
def test_the_instruction_set_is_chosen_by_name_and_refused_by_name(cpu_isa):
    import subprocess
    import sys

    assert _ops.cpu_isa() == cpu_isa and CPU_ISAS[0] == "scalar"
    with pytest.raises(ValueError, match="unknown CPU instruction set 'sse9'"):
        _ops.cpu_isa("sse9")
    assert _ops.cpu_isa() == cpu_isa   # unchanged
    code = ("from sharpfast import _ops; import torch; _ops.draw_(torch.empty(10**6), 0, 0, 0, 0, 'normal'); "
            "print(_ops.cpu_isa())")   # a draw large enough for the parallel loop
    run = lambda env: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                     env={**__import__("os").environ, **env})
    r = run({"SHARPFAST_CPU_ISA": "scalar"})
    assert r.returncode == 0 and r.stdout.strip() == "scalar", r.stderr
    r = run({"SHARPFAST_CPU_ISA": ""})
    assert r.returncode == 0 and r.stdout.strip() == CPU_ISAS[-1]   # the widest by default
    r = run({"SHARPFAST_CPU_ISA": "avx1024"})
    assert r.returncode != 0 and "unknown CPU instruction set 'avx1024'" in r.stderr
