"""Vector-neuron detection by a probe forward (issue 12a): channel maps written in styles that the
source-text rule does not know (einsum, F.linear with the weight, permute + Linear, helper function,
channel axis not last) are found from what they do on rotated example inputs."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from relax_vn.plugin import VNLinearRelaxation, VNModuleRelaxation
from torch import Tensor, nn

import relax_plugins as rp

DT = torch.float64
EPS = 1e-6


def random_rotation(seed: int, proper: bool = True) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=DT))
    q = q * torch.sign(torch.diagonal(r))
    if (torch.det(q) > 0) != proper:
        q[:, 0] = -q[:, 0]
    return q


def leaky(x: Tensor, d: Tensor, axis: int, slope: float = 0.2) -> Tensor:
    dot = (x * d).sum(axis, keepdim=True)
    dd = (d * d).sum(axis, keepdim=True)
    return x - (1 - slope) * (dot < 0).to(x.dtype) * dot / (dd + EPS) * d


# -- five independently written styles --------------------------------------------------------


class PermuteVNLinearLeakyReLU(nn.Module):
    """[B, C, 3, N]; Linears applied after permuting channels last: their input is [B, 3, N, C]."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.feat = nn.Linear(c_in, c_out, bias=False)
        self.dirs = nn.Linear(c_in, c_out, bias=False)
        self.bn = nn.BatchNorm1d(c_out)

    def forward(self, x: Tensor) -> Tensor:
        xl = x.permute(0, 2, 3, 1)
        p = self.feat(xl).permute(0, 3, 1, 2)
        d = self.dirs(xl).permute(0, 3, 1, 2)
        norm = p.norm(dim=2) + EPS  # [B, C, N]
        p = p * (self.bn(norm) / norm).unsqueeze(2)
        return leaky(p, d, axis=2)


class FLinearVNLeaky(nn.Module):
    """[B, C, 3, N]; the Linears' weights are used through F.linear, the modules are never called."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.map_to_feat = nn.Linear(c_in, c_out, bias=False)
        self.map_to_dir = nn.Linear(c_in, c_out, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        xt = x.transpose(1, -1)
        p = F.linear(xt, self.map_to_feat.weight).transpose(1, -1)
        d = F.linear(xt, self.map_to_dir.weight).transpose(1, -1)
        return leaky(p, d, axis=2)


class EinsumVNLinear(nn.Module):
    """[B, C, 3, N]; an own weight parameter applied with einsum."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in) / c_in**0.5)

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("oc,bcj...->boj...", self.weight, x)


def apply_channel_map(lin: nn.Linear, x: Tensor) -> Tensor:
    """Helper of the [B, N, C, 3] style: channels are on axis -2."""
    return lin(x.transpose(-1, -2)).transpose(-1, -2)


class HelperVNLinear(nn.Module):
    """[B, N, C, 3] features (channel axis not last, xyz last); a helper function applies the map."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.lin = nn.Linear(c_in, c_out, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return apply_channel_map(self.lin, x)


class ChannelMiddleEinsum(nn.Module):
    """[B, N, C, 3]; own weight, einsum over the channel axis 2, a leaky ReLU with a shared direction."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(c_out, c_in) / c_in**0.5)
        self.u = nn.Parameter(torch.randn(1, c_in) / c_in**0.5)

    def forward(self, x: Tensor) -> Tensor:
        p = torch.einsum("oc,bncj->bnoj", self.w, x)
        d = torch.einsum("oc,bncj->bnoj", self.u, x)
        return leaky(p, d, axis=3)


class MixedVNPointNet(nn.Module):
    """A small VN-PointNet: points [B, N, 3] → class logits, one layer of every style."""

    def __init__(self, n_classes: int = 4) -> None:
        super().__init__()
        self.l1 = PermuteVNLinearLeakyReLU(1, 6)
        self.l2 = FLinearVNLeaky(6, 8)
        self.l3 = EinsumVNLinear(8, 8)
        self.l4 = HelperVNLinear(8, 6)
        self.l5 = ChannelMiddleEinsum(6, 5)
        self.head = nn.Sequential(nn.Linear(25, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, n_classes))

    def forward(self, points: Tensor) -> Tensor:
        x = points.transpose(1, 2)[:, None]  # [B, 1, 3, N]
        x = self.l3(self.l2(self.l1(x)))  # [B, 8, 3, N]
        x = x.permute(0, 3, 1, 2)  # [B, N, 8, 3]
        x = self.l5(self.l4(x))  # [B, N, 5, 3]
        g = x.mean(1)  # [B, 5, 3]
        inv = torch.einsum("bcj,bdj->bcd", g, g).flatten(1)  # invariant Gram matrix
        return self.head(inv)


EXPECTED = {"l1.feat", "l1.dirs", "l2", "l3", "l4.lin", "l5"}


def _points(b: int = 4, n: int = 20, seed: int = 0) -> Tensor:
    return torch.randn(b, n, 3, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _rel(a: Tensor, b: Tensor) -> float:
    return float(((a - b).norm() / b.norm().clamp_min(1e-30)).detach())


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modes": [m.training for m in model.modules()],
        "rng": torch.random.get_rng_state(),
    }


def test_styles_not_found_from_source_text_and_error_says_how_to_help():
    model = MixedVNPointNet().double()
    with pytest.raises(rp.NothingToRelaxError, match="example_inputs"):
        rp.relax(model, adapters=["vn"])


def test_probe_finds_every_style_and_leaves_the_model_untouched():
    torch.manual_seed(0)
    model = MixedVNPointNet().double().train()
    model.l1.bn.running_mean.fill_(0.3)
    pts = _points()
    before = _snapshot(model)
    rp.relax(model, adapters=["vn"], example_inputs=pts)
    names = {n for n, _ in rp.relaxed_modules(model)}
    assert names == EXPECTED
    after = _snapshot(model)
    assert after["modes"][0] is True and torch.equal(after["rng"], before["rng"])
    original = rp.projected_state_dict(model)  # the original keys, the base layers' values
    assert set(original) == set(before["state"])
    for k, v in before["state"].items():  # untouched, BatchNorm running statistics included
        assert torch.equal(original[k], v), k
    assert all(m.training for m in model.modules())
    terms = {n: m.term for n, m in rp.relaxed_modules(model)}
    assert type(terms["l1.feat"]) is VNLinearRelaxation and terms["l1.feat"].axes == {4: 1}
    assert terms["l4.lin"].axes == {4: 2}
    assert type(terms["l3"]) is VNModuleRelaxation and (terms["l3"].layout.xyz, terms["l3"].layout.channel) == (2, 1)
    assert (terms["l5"].layout.xyz, terms["l5"].layout.channel) == (3, 2)


@pytest.mark.parametrize("merge", [False, True])
def test_relax_train_project_is_exactly_invariant_with_original_keys(merge):
    torch.manual_seed(1)
    model = MixedVNPointNet().double()
    keys = list(model.state_dict())
    classes = [type(m) for m in model.modules()]
    pts, labels = _points(8, 16, seed=1), torch.arange(8) % 4
    model.eval()
    ref = model(pts)
    model.train()
    rp.relax(model, example_inputs=(pts,), init_std=0.0)
    model.eval()
    assert torch.equal(model(pts), ref)  # θ = 0: unchanged
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    rp.set_theta(model, 1.0)
    for _ in range(3):
        loss = F.cross_entropy(model(pts), labels) + rp.penalty(model, 1e-3, 1e-3)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # make sure W really breaks the symmetry before projecting
        for _, layer in rp.relaxed_modules(model):
            layer.term.weight.add_(0.3 * torch.randn_like(layer.term.weight))
    model.eval()
    R = random_rotation(5)
    assert _rel(model(pts @ R.T), model(pts)) > 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # module-level relaxations cannot merge: dropped
        out = rp.project(model, merge=merge)
    assert list(out.state_dict()) == keys and [type(m) for m in out.modules()] == classes
    for seed, proper in ((5, True), (6, True), (7, False)):
        R = random_rotation(seed, proper)
        assert _rel(out(pts @ R.T), out(pts)) < 1e-10


def test_each_style_alone_and_float32():
    for layer, x in (
        (PermuteVNLinearLeakyReLU(2, 3), torch.randn(2, 2, 3, 7)),
        (FLinearVNLeaky(2, 3), torch.randn(2, 2, 3, 7)),
        (EinsumVNLinear(2, 3), torch.randn(2, 2, 3, 7)),
        (HelperVNLinear(2, 3), torch.randn(2, 7, 2, 3)),
        (ChannelMiddleEinsum(2, 3), torch.randn(2, 7, 2, 3)),
    ):
        model = rp.relax(nn.Sequential(layer), example_inputs=x)  # float32
        assert {n for n, _ in rp.relaxed_modules(model)}, type(layer).__name__
        rp.set_theta(model, 0.5)
        model(x).sum().backward()


def test_example_inputs_validation_and_axis_option():
    model = nn.Sequential(EinsumVNLinear(2, 3)).double()
    with pytest.raises(TypeError, match="example_inputs"):
        rp.relax(model, example_inputs=3.0)
    with pytest.raises(rp.AdapterError, match="example_inputs"):
        rp.relax(model, example_inputs=(torch.randn(2, 5, 3, 4, dtype=DT),))  # wrong channels: forward fails
    assert not list(rp.relaxed_modules(model))
    x = torch.randn(2, 2, 3, 3, dtype=DT)  # axes 2 and 3 both have size 3: the option disambiguates
    rp.relax(model, example_inputs={"args": (x,)}, adapter_options={"vn": {"vn_input_axis": 2}})
    assert model[0].term.layout.xyz == 2
    with pytest.raises(rp.NothingToRelaxError, match="vn: "):
        rp.relax(nn.Sequential(EinsumVNLinear(2, 3)).double(), example_inputs=torch.randn(2, 2, 4, 4, dtype=DT))


def test_probe_agrees_with_the_source_rule_on_classic_vn_files():
    from test_vn_adapter import SmallVNNet, _load_fixture

    tp = _load_fixture()
    for make, x in (
        (SmallVNNet, torch.randn(3, 3, 24)),  # includes [B, C, 3, N, k] edge features and [B, C, 3]
        (lambda: tp.TinyVNNet(dim=4), torch.randn(4, 1, 3, 16)),
        (lambda: tp.TinyVNNet(dim=5), torch.randn(4, 1, 3, 8, 3)),
    ):
        by_source = {n for n, _ in rp.relaxed_modules(rp.relax(make()))}
        model = rp.relax(make(), example_inputs=x)
        assert {n for n, _ in rp.relaxed_modules(model)} == by_source
        rp.set_theta(model, 0.5)
        model(x).sum().backward()


def test_probe_skips_torchscript_submodules():
    """MACE compiles parts of itself with TorchScript, which takes no Python hooks: the VN probe
    observes the rest and the other adapters still relax the model."""
    from relax_toy.layers import SO2Linear

    model = nn.Sequential(SO2Linear(2, 2), torch.jit.script(nn.Tanh()))
    relaxed = rp.relax(model, example_inputs=torch.randn(5, 4))
    assert [name for name, _ in rp.relaxed_modules(relaxed)] == ["0"]
