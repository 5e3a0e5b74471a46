"""sharpfast.selftest: every op checked on the device, once per process, and what happens when
one is wrong (auto falls back with a warning naming it, fused raises)."""
import pytest

import sharpfast
from sharpfast import _ops, kernel_check
from tests.toy_models import model_and_data

pytestmark = pytest.mark.skipif(not _ops.available("cpu"), reason=f"extension not built: {_ops.IMPORT_ERROR}")


def test_every_op_passes_on_the_cpu():
    r = sharpfast.selftest("cpu")
    assert r.ok and r.failed == [] and r.device == "cpu"
    assert sorted(r.errors) == sorted(_ops.build_info()["ops"])   # every op of the build is checked
    assert all(0 <= e < 1e-6 for e in r.errors.values())
    assert "self-test on cpu: ok" in str(r)


@pytest.mark.cuda
@pytest.mark.skipif(not _ops.available("cuda"), reason="no CUDA build or GPU")
def test_every_op_passes_on_the_gpu():
    r = sharpfast.selftest("cuda")
    assert r.ok, str(r)


def broken_linf_step(real):
    def step(params, delta, delta_prev, grad, w0, c, step_size, rho, momentum=0.75):
        real(params, delta, delta_prev, grad, w0, c, step_size, rho, momentum)
        delta.add_(1e-3)   # a kernel that is wrong by a little
    return step


def test_a_wrong_kernel_is_reported_by_name(monkeypatch):
    monkeypatch.setattr(_ops, "apgd_step_linf_", broken_linf_step(_ops.apgd_step_linf_))
    r = sharpfast.selftest("cpu")
    assert not r.ok and r.failed == ["apgd_step_linf_"]
    assert r.errors["apgd_step_linf_"] == pytest.approx(1e-3, rel=1e-2)
    assert "FAIL" in str(r) and "elements off" in str(r)


def test_a_raising_kernel_is_a_failed_op(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("no kernel image is available for execution on the device")
    monkeypatch.setattr(_ops, "sum_squares", boom)
    r = sharpfast.selftest("cpu")
    assert r.failed == ["sum_squares"] and "no kernel image" in str(r)


def test_auto_falls_back_to_the_reference_and_fused_raises(monkeypatch):
    monkeypatch.setattr(kernel_check, "_VERIFIED", {})
    monkeypatch.setattr(_ops, "apgd_step_linf_", broken_linf_step(_ops.apgd_step_linf_))
    model, data = model_and_data("mlp")
    with pytest.warns(RuntimeWarning, match="self-test failed on cpu for apgd_step_linf_"):
        r = sharpfast.worst_case_sharpness(model, data, rho=0.05, n_iters=5)
    assert r.backend == "reference"
    want = sharpfast.worst_case_sharpness(model, data, rho=0.05, n_iters=5, backend="reference")
    assert r.per_batch == want.per_batch
    with pytest.raises(RuntimeError, match="backend='fused' is not available.*apgd_step_linf_"):
        sharpfast.worst_case_sharpness(model, data, rho=0.05, n_iters=5, backend="fused")


def test_runs_once_per_device_per_process(monkeypatch):
    monkeypatch.setattr(kernel_check, "_VERIFIED", {})
    calls = []
    real = kernel_check.selftest
    monkeypatch.setattr(kernel_check, "selftest", lambda device: calls.append(device) or real(device))
    model, data = model_and_data("mlp")
    for _ in range(3):
        assert sharpfast.average_sharpness(model, data, rho=0.05, n_samples=2).backend == "fused"
    assert len(calls) == 1
    assert sharpfast.average_sharpness(model, data, rho=0.05, n_samples=2, backend="reference").backend == "reference"
    assert len(calls) == 1


def test_no_kernels_for_the_device_is_a_clear_error():
    with pytest.raises(RuntimeError, match="no kernels for meta"):
        sharpfast.selftest("meta")
