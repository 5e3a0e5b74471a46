"""sharpfast.landscape: the fast path against the public loop, closed forms (a quadratic, the second
difference), filter normalization's invariances and the control that must change, the draws, the
files and plots, and bad input."""
import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import sharpfast
from sharpfast.landscapes import directions as D


def conv_bn(seed=1):
    """The test plan's model: Conv-BN-ReLU-Conv-BN-ReLU-GAP-Linear, running statistics not 0/1."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net


def images(n=250, batch=64):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]   # the last batch is partial


@pytest.mark.parametrize("dir_type", ["weights", "states"])
def test_the_fast_path_is_the_public_loop_on_a_grid_that_is_not_square(dir_type):
    net, data = conv_bn(), images()
    state = copy.deepcopy(net.state_dict())
    kw = dict(x=(-1, 1, 7), y=(-0.5, 1.0, 5), dir_type=dir_type, seed=3)
    fast = sharpfast.landscape(net, data, points_per_pass=4, **kw)
    loop = sharpfast.landscape(net, data, backend="reference", **kw)
    assert fast.loss.shape == (5, 7) and fast.error.shape == (5, 7)   # rows follow y
    np.testing.assert_allclose(fast.loss, loop.loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fast.error, loop.error, atol=1 / 250 + 1e-12)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), state.values()))   # put back
    assert net.training   # and its mode


def test_the_origin_is_a_plain_evaluation_and_the_axes_are_where_the_docs_say():
    net, data = conv_bn(), images()
    r = sharpfast.landscape(net, data, x=(-1, 1, 5), y=(0, 2, 3))
    net.eval()
    with torch.no_grad():
        plain = sum(float(nn.functional.cross_entropy(net(x), y)) * len(y) for x, y in data) / 250
    assert r.loss[0, 2] == pytest.approx(plain, rel=1e-6) and r.base_loss == pytest.approx(plain, rel=1e-6)
    d1, d2 = r.directions
    point = {n: p + 0.5 * d1[n] + 2.0 * d2[n] for n, p in net.named_parameters()}   # x = 0.5, y = 2
    with torch.no_grad():
        at = sum(float(nn.functional.cross_entropy(torch.func.functional_call(net, point, (x,)), y)) * len(y)
                 for x, y in data) / 250
    assert r.loss[2, 3] == pytest.approx(at, rel=1e-5)


class Quadratic(nn.Module):
    """L = 1/2 (t - t*)^T A (t - t*) + c as a model whose output is its loss."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
        self.eigenvalues = torch.tensor([5.0, 2.0, 1.0, 0.5, 0.2, 0.1], dtype=torch.float64)
        self.q = q.to(dtype)
        self.a = (q @ torch.diag(self.eigenvalues) @ q.T).to(dtype)
        self.target = torch.randn(6, generator=g, dtype=torch.float64).to(dtype)
        self.theta = nn.Parameter(self.target.clone().view(2, 3))
        self.c = 0.7

    def forward(self, x):
        d = self.theta.flatten() - self.target
        return 0.5 * d @ self.a @ d + self.c + 0 * x.sum()


def quadratic_loss(out, y):
    return out


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_a_quadratic_landscape_is_its_closed_form(dtype, tol):
    q = Quadratic(dtype)
    data = [(torch.zeros(1, 1, dtype=dtype), torch.zeros(1))]
    dirs = [{"theta": q.q[:, i].reshape(2, 3)} for i in (0, 1)]   # unit eigenvectors of A
    r = sharpfast.landscape(q, data, x=(-1, 1, 5), y=(-2, 2, 5), kind="custom", directions=dirs, norm=None,
                            loss_fn=quadratic_loss)
    X, Y = np.meshgrid(r.x, r.y)
    np.testing.assert_allclose(r.loss, 0.7 + 0.5 * (5.0 * X**2 + 2.0 * Y**2), rtol=tol, atol=tol)
    assert r.error is None


def test_hessian_directions_are_the_top_eigenvectors():
    q = Quadratic()
    data = [(torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1))]
    r = sharpfast.landscape(q, data, x=(-1, 1, 3), y=(-1, 1, 3), kind="hessian", loss_fn=quadratic_loss)
    assert r.eigenvalues == pytest.approx([5.0, 2.0], rel=1e-3)
    for d, i in zip(r.directions, (0, 1)):
        assert abs(float(d["theta"].flatten() @ q.q[:, i])) >= 0.99
        flat = d["theta"].flatten()
        assert flat[flat.abs().argmax()] > 0   # the sign fixed: the largest entry positive
    assert max(r.residuals) < 1e-6 and r.norm is None


def test_the_second_difference_tends_to_the_curvature_along_the_direction():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    data = [(torch.randn(32, 5, dtype=torch.float64), torch.randint(0, 3, (32,)))]
    params = dict(net.named_parameters())
    r = sharpfast.landscape(net, data, x=(-1e-2, 1e-2, 3), norm="filter")
    d = r.directions[0]
    x, y = data[0]
    loss = nn.functional.cross_entropy(net(x), y)
    g = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    hv = torch.autograd.grad(sum((gi * d[n]).sum() for gi, n in zip(g, params)), list(params.values()))
    dhd = float(sum((h * d[n]).sum() for h, n in zip(hv, params)))
    errors = []
    for h in (1e-2, 5e-3):
        c = sharpfast.landscape(net, data, x=(-h, h, 3), norm="filter").curvature_along(0)
        errors.append(abs(c - dhd))
    assert errors[1] < errors[0] / 3 and errors[1] < 1e-3 * abs(dhd)   # O(h^2)


def raw_draws(net, seed=0):
    return D.draw(seed, 0, D.space(net, "weights"))[0], D.draw(seed, 1, D.space(net, "weights"))[0]


def test_filter_normalization_is_blind_to_layer_rescaling_and_batchnorm_absorbed_filter_scales():
    """The same raw draws, normalized against rescaled weights, give the same grid: (i) one layer x
    3.7 (weight and bias), the next x 1/3.7, no BatchNorm between (ReLU is 1-homogeneous); (ii) a
    convolution's filters x c_i with the BatchNorm after it in eval mode taking c_i into its
    statistics."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4))
    data = [(torch.randn(40, 6), torch.randint(0, 4, (40,)))]
    kw = dict(x=(-1, 1, 5), y=(-1, 1, 3), kind="custom")
    raw = raw_draws(mlp)
    before = sharpfast.landscape(mlp, data, directions=raw, **kw)
    scaled = copy.deepcopy(mlp)
    with torch.no_grad():
        scaled[0].weight.mul_(3.7)
        scaled[0].bias.mul_(3.7)
        scaled[2].weight.div_(3.7)
    np.testing.assert_allclose(sharpfast.landscape(scaled, data, directions=raw, **kw).loss, before.loss, rtol=1e-5)

    net, images_ = conv_bn(), images(n=64)
    net[1].eps = net[4].eps = 1e-12
    raw = raw_draws(net)
    before = sharpfast.landscape(net, images_, directions=raw, **kw)
    c = torch.linspace(0.3, 3.0, 4)
    with torch.no_grad():
        net[0].weight.mul_(c.view(-1, 1, 1, 1))
        net[0].bias.mul_(c)
        net[1].running_mean.mul_(c)
        net[1].running_var.mul_(c**2)
    np.testing.assert_allclose(sharpfast.landscape(net, images_, directions=raw, **kw).loss, before.loss,
                               rtol=1e-5, atol=1e-6)


def test_per_neuron_rescaling_changes_the_filter_plot_but_not_the_weight_plot():
    """Dinh et al.'s per-neuron rescaling (neuron i of a layer x c_i, the next layer's column i x 1/c_i)
    leaves the function unchanged; the filter-normalized plot changes (the next layer's rows change
    norm), the |w|-scaled one does not."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4))
    data = [(torch.randn(40, 6), torch.randint(0, 4, (40,)))]
    raw = raw_draws(mlp)
    c = torch.linspace(0.2, 5.0, 10)
    scaled = copy.deepcopy(mlp)
    with torch.no_grad():
        scaled[0].weight.mul_(c.view(-1, 1))
        scaled[0].bias.mul_(c)
        scaled[2].weight.div_(c.view(1, -1))
    for norm, changes in (("filter", True), ("weight", False)):
        kw = dict(x=(-1, 1, 5), y=(-1, 1, 3), kind="custom", directions=raw, norm=norm)
        a = sharpfast.landscape(mlp, data, **kw).loss
        b = sharpfast.landscape(scaled, data, **kw).loss
        if changes:
            assert np.abs(a - b).max() > 1e-3
        else:
            np.testing.assert_allclose(a, b, rtol=1e-5)


def test_mirror_zero_and_draws_that_do_not_depend_on_how_the_grid_is_cut():
    net, data = conv_bn(), images(n=64)
    r = sharpfast.landscape(net, data, x=(-1, 1, 5), points_per_pass=1)
    flipped = sharpfast.landscape(net, data, x=(-1, 1, 5), kind="custom", norm=None,
                                  directions=[{n: -t for n, t in r.directions[0].items()}])
    np.testing.assert_allclose(flipped.loss, r.loss[::-1], rtol=1e-6)
    zero = sharpfast.landscape(net, data, x=(-1, 1, 5), kind="custom", norm=None,
                               directions=[{n: torch.zeros_like(t) for n, t in r.directions[0].items()}])
    assert np.all(zero.loss == zero.loss[0]) and zero.loss[0] == pytest.approx(r.base_loss)
    again = sharpfast.landscape(net, data, x=(-1, 1, 5), points_per_pass=5)
    assert all(torch.equal(a, b) for a, b in zip(again.directions[0].values(), r.directions[0].values()))
    np.testing.assert_allclose(again.loss, r.loss, rtol=1e-6)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = sharpfast.landscape(net, data, x=(-1, 1, 5), points_per_pass=1)
    finally:
        torch.set_num_threads(prev)
    assert all(torch.equal(a, b) for a, b in zip(one.directions[0].values(), r.directions[0].values()))
    k = r.keys[0]["0.weight"]
    assert k[:2] == (0, 0) and r.keys[0]["0.weight"] != r.keys[0]["3.weight"]


def test_biases_get_zero_or_a_copy_of_the_weights_as_the_public_code_gives_them():
    net, data = conv_bn(), images(n=64)
    kept = sharpfast.landscape(net, data, x=[0.0], ignore=None).directions[0]
    ignored = sharpfast.landscape(net, data, x=[0.0]).directions[0]
    assert torch.equal(kept["0.bias"], net[0].bias.detach()) and torch.equal(kept["1.weight"], net[1].weight.detach())
    assert not ignored["0.bias"].any() and not ignored["1.weight"].any()


def test_interpolation_reaches_model2_at_one_with_batchnorm_statistics():
    net, data = conv_bn(), images(n=64)
    net2 = conv_bn(seed=2)
    r = sharpfast.landscape(net, data, x=(-0.5, 1.5, 5), kind="interpolate", model2=net2, dir_type="states")
    net2.eval()
    with torch.no_grad():
        at_one = sum(float(nn.functional.cross_entropy(net2(x), y)) * len(y) for x, y in data) / 64
    assert r.loss[3] == pytest.approx(at_one, rel=1e-5) and r.loss[1] == pytest.approx(r.base_loss, rel=1e-6)
    assert r.norm is None


def test_pca_of_a_trajectory_in_a_plane_finds_the_plane():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    data = [(torch.randn(16, 4), torch.randint(0, 2, (16,)))]
    w = {n: p.detach().clone() for n, p in mlp.named_parameters()}
    u = {n: torch.randn_like(t) for n, t in w.items()}
    v = {n: torch.randn_like(t) for n, t in w.items()}
    trajectory = [{n: w[n] + a * u[n] + b * v[n] for n in w} for a, b in ((3, 1), (2, -1), (1, 0.5), (0.5, 0.2))]
    r = sharpfast.landscape(mlp, data, x=(-1, 1, 3), y=(-1, 1, 3), kind="pca", checkpoints=trajectory + [w],
                            ignore=None)
    assert sum(r.explained_variance) == pytest.approx(1.0, abs=1e-6)
    plane = torch.stack([torch.cat([d[n].flatten() for n in w]).double() for d in r.directions])
    for t in (u, v):
        vec = torch.cat([t[n].flatten() for n in w]).double()
        residual = vec - plane.T @ (plane @ vec)
        assert float(residual.norm()) < 1e-5 * float(vec.norm())


def test_files_and_plots(tmp_path):
    h5py = pytest.importorskip("h5py")
    net, data = conv_bn(), images(n=64)
    r = sharpfast.landscape(net, data, x=(-1, 1, 4), y=(-1, 1, 3))
    r.to_h5(str(tmp_path / "surface.h5"), str(tmp_path / "dirs.h5"))
    with h5py.File(tmp_path / "surface.h5") as f:
        assert f["train_loss"].shape == (3, 4) and np.allclose(f["train_loss"][()], r.loss)
        assert np.allclose(f["train_acc"][()], 100 * (1 - r.error)) and f["xcoordinates"].shape == (4,)
    with h5py.File(tmp_path / "dirs.h5") as f:
        assert set(f) == {"xdirection", "ydirection"} and len(f["xdirection"]) == len(r.directions[0])
        assert np.array_equal(f["xdirection"]["0"][()], r.directions[0]["0.weight"].numpy())
    r.plot(str(tmp_path / "2d.png"))
    sharpfast.landscape(net, data, x=(-1, 1, 4)).plot(str(tmp_path / "1d.png"), log=True)
    for name in ("2d.png", "1d.png"):
        assert open(tmp_path / name, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_bad_input_is_refused_by_name():
    net, data = conv_bn(), images(n=64)
    names = [n for n, _ in net.named_parameters()]
    good = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    with pytest.raises(ValueError, match="names 'nope'"):
        sharpfast.landscape(net, data, x=(-1, 1, 3), kind="custom", directions=[{**good, "nope": torch.zeros(1)}])
    with pytest.raises(ValueError, match=f"has no tensor for '{names[0]}'"):
        sharpfast.landscape(net, data, x=(-1, 1, 3), kind="custom", directions=[{n: good[n] for n in names[1:]}])
    with pytest.raises(ValueError, match="has shape"):
        sharpfast.landscape(net, data, x=(-1, 1, 3), kind="custom", directions=[{**good, names[0]: torch.zeros(3)}])
    with pytest.raises(ValueError, match="empty grid"):
        sharpfast.landscape(net, data, x=[])
    with pytest.raises(ValueError, match="positive integer num"):
        sharpfast.landscape(net, data, x=(-1, 1, 0))
    with pytest.raises(ValueError, match="not of model's architecture"):
        sharpfast.landscape(net, data, x=(-1, 1, 3), kind="interpolate", model2=nn.Linear(3, 2))
    with pytest.raises(ValueError, match="needs model2"):
        sharpfast.landscape(net, data, kind="interpolate")
    with pytest.raises(ValueError, match="norm must be one of"):
        sharpfast.landscape(net, data, norm="unit")
    assert math.isfinite(sharpfast.landscape(net, data, x=[0.0]).base_loss)
    with pytest.warns(RuntimeWarning, match="running_var"):   # the public rule's NaN, said
        r = sharpfast.landscape(net, data, x=(-1.5, 0, 4), dir_type="states", ignore=None)
    assert np.isnan(r.loss[0]) and np.isfinite(r.loss[-1])


def test_custom_directions_without_a_norm_are_used_exactly_as_given():
    net, data = conv_bn(), images(n=64)
    given = {n: torch.full_like(p, 0.01) for n, p in net.named_parameters()}
    r = sharpfast.landscape(net, data, x=[0.0, 1.0], kind="custom", directions=[given], norm=None)
    assert all(torch.equal(r.directions[0][n], given[n]) for n in given)   # biases and BatchNorm too


def test_hessian_directions_of_a_network_are_its_dense_hessians_eigenvectors():
    """A float64 MLP: the top two eigenpairs of the dense Hessian (torch.autograd.functional), to
    1e-3 in lambda and |cos| >= 0.99 (their gap is well above 10%)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(64, 4, dtype=torch.float64), torch.randint(0, 3, (64,))
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    flat0 = torch.cat([p.detach().flatten() for p in net.parameters()])

    def loss_of(flat):
        tensors, off = {}, 0
        for n, s in zip(names, shapes):
            tensors[n] = flat[off:off + s.numel()].view(s)
            off += s.numel()
        return nn.functional.cross_entropy(torch.func.functional_call(net, tensors, (x,)), y)

    evals, evecs = torch.linalg.eigh(torch.autograd.functional.hessian(loss_of, flat0))
    r = sharpfast.landscape(net, [(x, y)], x=(-0.1, 0.1, 3), y=(-0.1, 0.1, 3), kind="hessian")
    assert (evals[-1] - evals[-2]) / evals[-1] > 0.1
    for k, i in ((0, -1), (1, -2)):
        assert r.eigenvalues[k] == pytest.approx(float(evals[i]), rel=1e-3)
        mine = torch.cat([r.directions[k][n].flatten() for n in names])
        assert abs(float(mine @ evecs[:, i])) >= 0.99
