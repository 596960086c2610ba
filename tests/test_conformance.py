"""The adapter conformance kit (relax_plugins.testing.check_adapter): it certifies every first-party
adapter and the third-party example, and rejects deliberately wrong adapters, naming the property."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from relax_toy.layers import CNLinear, SO2Linear, so2_generator
from relax_toy.plugin import SO2Relaxation
from shared_layers import VecLayer

import relax_plugins as rp
from relax_plugins.testing import PROPERTIES, ConformanceReport, check_adapter

warnings.filterwarnings("ignore", message=".*py3nj.*")
DOCS = Path(__file__).resolve().parents[1] / "docs" / "ADAPTERS.md"


def _certified(report: ConformanceReport, relaxed: list[str]) -> None:
    assert report.ok, str(report)
    assert report.relaxed == relaxed
    for prop in ("outputs_after_relax", "penalty_on_image", "projection_idempotent", "merge", "project_drop"):
        assert prop in report.errors, prop


# ---------------------------------------------------------------------------------------------
# certifies the first-party adapters
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_toy_adapter_conforms(dtype):
    report = check_adapter("toy", SO2Linear(2, 3), torch.randn(32, 4), dtype=dtype)
    _certified(report, ["layer"])
    assert report.merged == {"layer": True}
    assert set(report.errors) == set(PROPERTIES)  # a LinearRelaxation: nothing skipped
    _certified(check_adapter("toy", CNLinear(2, 3, n=4), torch.randn(32, 8), dtype=dtype), ["layer"])


def test_adapter_given_as_registered_plugin_module():
    import relax_toy.plugin

    report = check_adapter(relax_toy.plugin, SO2Linear(1, 2), torch.randn(8, 2))
    assert report.adapter == "toy" and report.ok


def test_e3nn_adapter_conforms():
    o3 = pytest.importorskip("e3nn.o3")
    lin = o3.Linear("2x0e + 1x1o", "1x0e + 2x1o")
    _certified(check_adapter("e3nn", lin, torch.randn(32, 5)), ["layer"])
    tp = o3.FullyConnectedTensorProduct("1x0e + 1x1o", "1x0e + 1x1o", "1x0e + 1x1o + 1x1e")
    report = check_adapter("e3nn", tp, (torch.randn(32, 4), torch.randn(32, 4)))
    _certified(report, ["layer"])
    assert report.merged == {"layer": False}  # a TP cannot hold θ·P(W)·x1: dropped with a warning, as documented


def test_escnn_adapter_conforms():
    pytest.importorskip("escnn")
    from escnn import group, gspaces
    from escnn import nn as enn

    gs = gspaces.rot2dOnR2(4)
    t_in = enn.FieldType(gs, [gs.regular_repr])
    t_out = enn.FieldType(gs, [gs.regular_repr, gs.trivial_repr])
    conv = enn.R2Conv(t_in, t_out, 3, padding=1)
    # escnn samples its kernel bases in float32: even its own float64 filters commute with the grid
    # rotations to ~2e-7 only, so the generator check gets that tolerance
    report = check_adapter("escnn", conv, t_in(torch.randn(2, 4, 7, 7)), tolerances={"projected_equivariant": 1e-6})
    _certified(report, ["layer"])
    assert set(report.skipped) == {"projection_complete", "projected_output"}  # not a LinearRelaxation

    g0 = gspaces.no_base_space(group.so2_group(3))
    a = enn.FieldType(g0, [g0.irrep(1)] * 2 + [g0.trivial_repr])
    b = enn.FieldType(g0, [g0.irrep(1), g0.trivial_repr, g0.irrep(2)])
    _certified(check_adapter("escnn", enn.Linear(a, b), a(torch.randn(32, a.size))), ["layer"])


def test_vn_adapter_conforms():
    from relax_vn.layers import VNLinear, VNLinearLeakyReLU

    x = torch.randn(2, 3, 3, 8)
    _certified(check_adapter("vn", VNLinear(3, 4), x), ["layer.map_to_feat"])
    # a VN block with two channel maps (and a BatchNorm in train mode): both terms are checked
    report = check_adapter("vn", VNLinearLeakyReLU(3, 4), x, observe=False)  # found from the source text
    _certified(report, ["layer.map_to_feat", "layer.map_to_dir"])


def _merge_scale(layer, delta, term):
    return {"scale": delta.trace() / 3}


class Scaled(torch.nn.Module):
    """A 1o → 1o scaling whose declaration can merge θ·P(W) = c·I into ``scale``."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(1.5))

    def forward(self, v):
        return self.scale * v


def test_pyg_declared_layers_conform():
    relax_pyg = pytest.importorskip("relax_pyg")
    relax_pyg.declare(VecLayer, inputs={"vec": "2x1o", "pos": "pos"}, outputs="2x1o", edge_index="edge_index",
                      pos_center="edges")
    relax_pyg.declare(Scaled, inputs={"v": "1o"}, outputs="1o", merge=_merge_scale)
    try:
        batch = torch.tensor([0, 0, 0, 1, 1, 1, 1])
        edges = relax_pyg.fully_connected_edge_index(batch)
        call = {"args": (torch.randn(7, 2, 3), torch.randn(7, 3)), "kwargs": {"edge_index": edges}}
        report = check_adapter("pyg", VecLayer(), call)
        _certified(report, ["layer"])
        assert report.merged == {"layer": False}  # declared without a merge: dropped with a warning
        report = check_adapter("pyg", Scaled(), torch.randn(16, 3))
        _certified(report, ["layer"])
        assert report.merged == {"layer": True}
    finally:
        relax_pyg.undeclare(VecLayer)
        relax_pyg.undeclare(Scaled)


def test_third_party_example_conforms():
    setlinear = pytest.importorskip("setlinear_adapter")
    import setlinear_adapter.plugin as plugin

    report = check_adapter(plugin, setlinear.SetLinear(2, 3), torch.randn(8, 2, 5), adapter_options={"set_size": 5})
    _certified(report, ["layer"])
    assert report.adapter == "setlinear"


def test_callers_layer_and_random_state_untouched():
    layer = SO2Linear(2, 2)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(8, 4)
    rng = torch.get_rng_state()
    check_adapter("toy", layer, x)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in before.items())
    assert layer.a.dtype == torch.float32  # the check ran on float64 copies


def test_report_is_reproducible_and_printable():
    x = torch.randn(16, 4)
    a = check_adapter("toy", SO2Linear(2, 3), x, seed=3)
    b = check_adapter("toy", SO2Linear(2, 3), x, generator=torch.Generator().manual_seed(3))
    assert a.errors.keys() == b.errors.keys()
    text = str(a)
    assert "conforms" in text and all(p in text for p in PROPERTIES)


def test_argument_errors():
    with pytest.raises(ValueError, match="no adapter named"):
        check_adapter("nope", SO2Linear(1, 1), torch.randn(4, 2))
    with pytest.raises(ValueError, match="unknown properties"):
        check_adapter("toy", SO2Linear(1, 1), torch.randn(4, 2), tolerances={"merged": 1.0})
    with pytest.raises(ValueError, match="theta"):
        check_adapter("toy", SO2Linear(1, 1), torch.randn(4, 2), theta=0.0)


# ---------------------------------------------------------------------------------------------
# rejects wrong adapters (copies of the toy adapter with one thing broken)
# ---------------------------------------------------------------------------------------------
class ReturnsW(SO2Relaxation):
    def project_dense(self, W):
        return W  # no projection at all


class Doubled(SO2Relaxation):
    def project_dense(self, W):
        return 2 * super().project_dense(W)  # image in the intertwiners, but not idempotent


class Oblique(SO2Relaxation):
    def project_dense(self, W):
        # idempotent onto the intertwiners, but along a skewed direction: not orthogonal
        P = super().project_dense
        return P(W) + P((W - P(W)).roll(1, dims=1))


class Zero(SO2Relaxation):
    def project_dense(self, W):
        return torch.zeros_like(W)  # idempotent, orthogonal to nothing, misses every intertwiner


class Offset(SO2Relaxation):
    def forward(self, base, theta, *args, **kwargs):
        return super().forward(base, theta, *args, **kwargs) + theta * 1e-3  # changes outputs at W = 0


class HalfMerge(SO2Relaxation):
    def dense_delta(self, base, delta):
        return super().dense_delta(base, delta / 2)  # folds only half of θ·P(W)


class HalfPenalty(SO2Relaxation):
    batched_penalty = False  # its own penalty_terms, always

    def penalty_terms(self):
        # the Lie penalty of the first half of the output rows only: positive on a random W − P(W),
        # blind to every W whose defect lives in the other half, which project() still drops
        x, W = self._x.to(self.weight.dtype), self.weight
        C = W @ self.symmetry.lie_in[0].to(W) - self.symmetry.lie_out[0].to(W) @ W
        lie = (x @ C[: W.shape[0] // 2].T).square().sum()
        return rp.PenaltyTerms(lie, (x @ W.T).square().sum(), x.shape[0])


class Upcast(SO2Relaxation):
    def forward(self, base, theta, *args, **kwargs):
        return super().forward(base, theta, *args, **kwargs).double()  # a float32 layer now returns float64


class Broken:
    """A plugin object: the toy adapter's SO2Linear rule with a chosen (wrong) term class."""

    def __init__(self, term_cls: type) -> None:
        self.term_cls = term_cls

    @rp.hookimpl
    def relax_make_term(self, module):
        if not isinstance(module, SO2Linear):
            return None
        J_in, J_out = so2_generator(module.c_in), so2_generator(module.c_out)
        return self.term_cls(rp.Symmetry(2 * module.c_in, 2 * module.c_out, lie_in=J_in[None], lie_out=J_out[None]))


@pytest.mark.parametrize(
    "term_cls, first, also",
    [
        (ReturnsW, "penalty_on_image", ["projected_equivariant"]),
        (Doubled, "projection_complete", ["projection_idempotent", "projection_orthogonal"]),
        (Oblique, "projection_orthogonal", []),
        (Zero, "penalty_definite", ["projection_complete"]),
        (Offset, "outputs_w_zero", ["merge"]),
        (HalfMerge, "merge", []),
        (HalfPenalty, "penalty_definite", []),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_wrong_adapters_are_rejected_naming_the_property(term_cls, first, also):
    names = rp.plugins.adapter_names()
    with pytest.raises(AssertionError) as info:
        check_adapter(Broken(term_cls), SO2Linear(2, 3), torch.randn(32, 4))
    message = str(info.value)
    failed = re.findall(r"^  (\w+)(?: \[layer '[^']*'\])?: measured", message, flags=re.M)
    assert failed and failed[0] == first, message
    assert set(also) <= set(failed), message
    assert re.search(rf"{first}.*measured [0-9.e+-]+, needs [<>]= [0-9.e+-]+", message), message
    assert rp.plugins.adapter_names() == names  # the temporary registration is undone
    report = check_adapter(Broken(term_cls), SO2Linear(2, 3), torch.randn(32, 4), raise_on_failure=False)
    assert not report.ok and report.failures[0].startswith(first)


def test_a_changed_output_dtype_is_a_changed_output():
    report = check_adapter(Broken(Upcast), SO2Linear(2, 3), torch.randn(32, 4), dtype=torch.float32,
                           raise_on_failure=False)
    assert not report.ok and report.failures[0].startswith("outputs_after_relax")


def test_correct_copy_of_the_toy_adapter_passes():
    _certified(check_adapter(Broken(SO2Relaxation), SO2Linear(2, 3), torch.randn(32, 4)), ["layer"])


# ---------------------------------------------------------------------------------------------
# docs/ADAPTERS.md: its examples are this code, run as written
# ---------------------------------------------------------------------------------------------
def _doc_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)


def test_adapters_doc_examples_run_and_the_first_is_short(capsys):
    blocks = _doc_blocks()
    assert len(blocks) >= 2
    assert len(blocks[0].strip().splitlines()) < 20, "the complete adapter of docs/ADAPTERS.md must stay under 20 lines"
    namespace: dict = {"__name__": "adapters_doc"}
    for block in blocks:
        exec(compile(block, str(DOCS), "exec"), namespace)  # raises if the kit rejects the documented adapter
    assert "conforms" in capsys.readouterr().out
