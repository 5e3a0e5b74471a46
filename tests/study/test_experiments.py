"""The study's experiments, small: the geodesic paper's diagonal-network experiment end to end."""
from __future__ import annotations

import pytest

import sharpfast


def test_diagonal_network_experiment_runs_end_to_end():
    """The paper's diagonal-network experiment (sharpfast.study.experiments.diagonal_networks), small: every
    network interpolates, the gap is the exact population loss, taus are computed, and the
    adaptive column is the scaled solver's adaptive worst case."""
    from sharpfast.study.experiments import diagonal_networks as dn
    r = dn.run(n_nets=4, n_iters=5)
    assert max(r["train_loss"]) <= dn.TARGET_LOSS and len(r["gap"]) == 4
    assert all(-1 <= t <= 1 for t in r["taus"].values()) and set(r["taus"]) == set(dn.PAPER_TAU)
    X, y, beta = dn.data(0)
    _, U, V, _ = dn.train(X, y, 4, 0)
    net = dn.DiagonalNetwork(U[0], V[0])
    assert r["gap"][0] == pytest.approx(float((U[0] * V[0] - beta).square().sum() - dn.mse(net(X), y)), rel=1e-9)
    want = sharpfast.worst_case_sharpness(net, [(X, y)], rho=0.1, norm="l2", solver="scaled", loss_fn=dn.mse,
                                          n_iters=5).sharpness
    assert r["sharpness"]["adaptive"][0] == pytest.approx(want, rel=1e-9)
