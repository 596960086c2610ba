"""The MACE adapter (``relax_mace``) and the MACE round trip of ``examples/mace``.

Needs mace-torch (``.venv-mace`` of the Makefile, e3nn 0.4.4); skipped where mace is not importable.
Everything in float64: relax keeps outputs, the SymmetricContraction term learns and is dropped at
project(), and the projected MACE has O(3)+translation-invariant energies and equivariant forces.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest

pytest.importorskip("mace")

import torch  # noqa: E402
from mace.modules.symmetric_contraction import SymmetricContraction  # noqa: E402
from relax_e3nn import random_o3  # noqa: E402
from relax_e3nn.irreps import D_from_matrix64, _float64_default  # noqa: E402
from relax_mace import MaceSymmetricContractionRelaxation, contraction_input_irreps  # noqa: E402
from torch import nn  # noqa: E402

import relax_plugins as rp  # noqa: E402
from examples.mace import run as mace_run  # noqa: E402
from relax_plugins.testing import PROPERTIES, check_adapter  # noqa: E402


class Holder(nn.Module):
    """A SymmetricContraction inside a container, called as MACE calls it: (features, one-hot elements)."""

    def __init__(self, sc: nn.Module) -> None:
        super().__init__()
        self.sc = sc

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.sc(x, y)


def _contraction(irreps_in: str = "3x0e + 3x1o + 3x2e", irreps_out: str = "3x0e + 3x1o", correlation: int = 2):
    torch.manual_seed(0)
    with _float64_default():
        return SymmetricContraction(irreps_in, irreps_out, correlation=correlation, num_elements=2)


def _inputs(sc: nn.Module, n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    fibre, channels, ell = contraction_input_irreps(sc)
    x = torch.randn(n, channels, ell, dtype=torch.float64)
    y = torch.nn.functional.one_hot(torch.arange(n) % 2, 2).double()
    return x, y


def _rotate(x: torch.Tensor, fibre, R: torch.Tensor) -> torch.Tensor:
    return (x.reshape(x.shape[0], -1) @ D_from_matrix64(fibre, R).T).reshape(x.shape)


def test_mace_adapter_is_registered_by_entry_point():
    infos = {a.name: a for a in rp.list_adapters()}
    assert infos["mace"].distribution.startswith("relax-plugins "), infos.get("mace")
    assert "SymmetricContraction" in infos["mace"].layers


def test_fibre_layout_is_the_contractions_own_representation():
    # the irreps that the term assumes for vec(x) make SymmetricContraction itself O(3)-equivariant
    sc = _contraction()
    fibre, channels, ell = contraction_input_irreps(sc)
    assert (channels, ell, fibre.dim) == (3, 9, 27)
    x, y = _inputs(sc)
    out = sc(x, y)
    assert out.shape == (10, sc.irreps_out.dim)
    for R in random_o3(3, generator=torch.Generator().manual_seed(1)):
        moved = sc(_rotate(x, fibre, R), y)
        assert torch.allclose(moved, out @ D_from_matrix64(sc.irreps_out, R).T, atol=1e-12)


def test_symmetric_contraction_term_keeps_outputs_penalises_and_projects():
    sc = _contraction()
    fibre, *_ = contraction_input_irreps(sc)
    model = rp.relax(Holder(copy.deepcopy(sc)))
    layer = model.sc
    assert layer.adapter == "mace" and isinstance(layer.term, MaceSymmetricContractionRelaxation)
    x, y = _inputs(sc)
    rp.set_theta(model, 1.0)
    with torch.no_grad():
        assert torch.equal(model(x, y), sc(x, y))  # W = 0
        layer.term.weight.normal_()
    out = model(x, y)
    assert float(rp.penalty(model).detach()) > 0
    W = layer.term.dense().detach()
    assert torch.allclose(out, sc(x, y) + x.reshape(10, -1) @ W.T, atol=1e-12)
    P = layer.term.project_dense(W)
    assert torch.allclose(layer.term.project_dense(P), P, atol=1e-14)  # idempotent
    assert 0 < float(P.norm()) < float(W.norm())
    for R in random_o3(3, generator=torch.Generator().manual_seed(2)):
        D_in, D_out = D_from_matrix64(fibre, R), D_from_matrix64(sc.irreps_out, R)
        assert torch.allclose(P @ D_in, D_out @ P, atol=1e-12)  # P(W) ∈ Hom_O(3)(in, out)
    with torch.no_grad():
        layer.term.weight.copy_(P)
    model(x, y)
    terms = layer.term.penalty_terms()
    # intertwiners are in the penalty's null space
    assert float(terms.lie.detach()) < 1e-20 * float(terms.norm.detach())
    rel = rp.projection_report(model)["sc"]
    assert rel["mergeable"] == 0.0 and not layer.term.can_merge
    with pytest.warns(UserWarning, match="dropped"):
        projected = rp.project(model, merge=True)
    assert type(projected.sc) is SymmetricContraction
    assert torch.equal(projected(x, y), sc(x, y))  # dropped, base weights bit-identical


def test_wrong_input_shape_and_options():
    sc = _contraction()
    model = rp.relax(Holder(sc))
    with pytest.raises(ValueError, match="input must be"):
        model(torch.randn(4, 27, dtype=torch.float64), torch.ones(4, 2, dtype=torch.float64))
    with pytest.raises(rp.AdapterError, match="subgroup"):
        rp.relax(Holder(_contraction()), adapters=["mace"], adapter_options={"mace": {"subgroup": "C4"}})
    with pytest.raises(rp.NothingToRelaxError):
        rp.relax(Holder(_contraction()), adapters=["mace"],
                 adapter_options={"mace": {"mace_symmetric_contractions": False}})
    term = rp.relax(Holder(_contraction()), adapters=["mace"], rank=2).sc.term
    assert term.rank == 2 and term.dense().shape == (12, 27)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(
    "irreps_in, irreps_out, correlation",
    [("3x0e + 3x1o + 3x2e", "3x0e + 3x1o", 2), ("2x0e + 2x1o + 2x2e", "2x0e + 2x1o", 3), ("2x0e + 2x1o", "2x0e", 3)],
    ids=["l2-corr2", "l2-corr3", "scalars-out"],
)
def test_symmetric_contraction_conforms(irreps_in, irreps_out, correlation, dtype):
    # the conformance kit certifies the mace adapter's term: every property of relax_plugins.testing
    sc = _contraction(irreps_in, irreps_out, correlation)
    report = check_adapter("mace", sc, _inputs(sc, n=64), dtype=dtype)
    assert report.ok, str(report)
    assert report.relaxed == ["layer"] and report.merged == {"layer": False}  # never merged: dropped, warned
    assert set(report.errors) == set(PROPERTIES) and not report.skipped  # a LinearRelaxation: nothing skipped


# ---------------------------------------------------------------------------------------------
# a whole MACE: relax → train → project


def _classes(model: nn.Module) -> dict[str, str]:
    # by name: torch.fx makes one GraphModule class per instance (and per deepcopy)
    return {n: f"{type(m).__module__}.{type(m).__qualname__}" for n, m in model.named_modules()}


@pytest.fixture(scope="module")
def mace_setup():
    mols = mace_run.make_molecules(8, seed=0)
    model = mace_run.make_mace(mace_run.fit_e0s(mols), seed=0, correlation=2, channels=4)
    return model, mols


def test_mace_round_trip(mace_setup):
    base, mols = mace_setup
    original = copy.deepcopy(base)
    keys = list(original.state_dict())
    classes = _classes(original)
    batch = mace_run.to_batch(mols[:4])
    e_ref, f_ref = mace_run.predict(original, batch)

    model = rp.relax(copy.deepcopy(base))
    by_adapter = {}
    for name, layer in rp.relaxed_modules(model):
        by_adapter.setdefault(layer.adapter, []).append(name)
    assert by_adapter["mace"] == ["products.0.symmetric_contractions", "products.1.symmetric_contractions"]
    assert "interactions.0.conv_tp" in by_adapter["e3nn"] and "products.0.linear" in by_adapter["e3nn"]
    rp.set_theta(model, 1.0)
    e, f = mace_run.predict(model, batch)
    assert torch.equal(e, e_ref) and torch.allclose(f, f_ref, rtol=0, atol=1e-14)  # W = 0: outputs unchanged

    losses = mace_run.train(model, mols, steps=6, batch_size=4, seed=0)
    assert all(torch.isfinite(torch.tensor(losses)))
    sc_terms = [model.get_submodule(n).term for n in by_adapter["mace"]]
    assert all(float(t.dense().detach().norm()) > 0 for t in sc_terms)  # the contractions were actually relaxed
    rp.set_theta(model, 1.0)
    mace_run.predict(model, batch)
    assert float(rp.penalty(model).detach()) > 0
    assert all(float(t.penalty_terms().lie.detach()) > 0 for t in sc_terms)
    assert mace_run.rigid_motion_errors(model, mols[:3], n=2)["energy"] > 1e-8  # relaxed: not invariant

    sc_state = {k: v.clone() for k, v in rp.projected_state_dict(model).items() if "symmetric_contractions" in k}
    with pytest.warns(UserWarning, match="symmetric_contractions"):
        projected = rp.project(copy.deepcopy(model), merge=True)
    # dropped: the contractions' own weights are untouched by the merge
    assert all(torch.equal(projected.state_dict()[k], v) for k, v in sc_state.items()) and sc_state
    for merged, p in (("merge", projected), ("drop", rp.project(model))):
        assert list(p.state_dict()) == keys, merged
        assert _classes(p) == classes, merged
        assert not any(isinstance(m, rp.RelaxedModule) for m in p.modules())
        errs = mace_run.rigid_motion_errors(p, mols[:4], n=3, seed=3)
        assert errs["energy"] <= 1e-10 and errs["forces"] <= 1e-10, (merged, errs)
    # merge=True folds θ·P(W) of the o3.Linears into their weights: it differs from the dropped model
    assert not torch.equal(mace_run.predict(projected, batch)[0], mace_run.predict(model, batch)[0])


def test_training_export_of_a_relaxed_mace_runs(mace_setup):
    # export() copies without deepcopy (module_copy): the torch.fx GraphModules of the contractions
    # (graph_opt_main, ...) must keep their generated forward in the copy
    base, mols = mace_setup
    model = rp.relax(copy.deepcopy(base), init_std=0.1)
    rp.set_theta(model, 1.0)
    batch = mace_run.to_batch(mols[:2])
    run = rp.RelaxedTraining(model, "constant", total=1)
    exported = run.export()
    e, f = mace_run.predict(exported, batch)
    e_ref, f_ref = mace_run.predict(rp.project(copy.deepcopy(model)), batch)
    assert torch.equal(e, e_ref) and torch.equal(f, f_ref)
    assert _classes(exported) == _classes(base)


def test_equivariance_report_on_a_mace_that_cannot_be_deep_copied(mace_setup):
    # use_so3=True (or odd-parity hidden irreps) gives contractions without paths, whose weights are
    # mace's EmptyParam: copy.deepcopy of the model fails, the report's projected copy must not
    _, mols = mace_setup
    from e3nn import o3
    from mace import modules

    torch.manual_seed(0)
    with mace_run.default_dtype(torch.float64):
        base = modules.MACE(
            r_max=mace_run.R_MAX, num_bessel=4, num_polynomial_cutoff=5, max_ell=1,
            interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
            interaction_cls_first=modules.interaction_classes["RealAgnosticInteractionBlock"],
            num_interactions=2, num_elements=len(mace_run.Z_TABLE), hidden_irreps=o3.Irreps("2x0e + 2x1o"),
            MLP_irreps=o3.Irreps("2x0e"), gate=torch.nn.functional.silu, atomic_energies=np.zeros(4),
            avg_num_neighbors=3.0, atomic_numbers=list(mace_run.Z_TABLE), correlation=2, use_so3=True,
        )
    with pytest.raises(TypeError):
        copy.deepcopy(base)  # mace's own limitation (EmptyParam.__new__ takes no requires_grad)
    model = rp.relax(base, init_std=0.1)
    rp.set_theta(model, 1.0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = rp.equivariance_report(
        model, mace_run.to_batch(mols[:2]), error_fn=lambda m: mace_run.rigid_motion_errors(m, mols[:2], n=1)["energy"]
    )
    assert report["model"]["projected"] <= 1e-10 < report["model"]["relaxed"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_example_main_smoke(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = mace_run.main(["--steps", "2", "--train", "4", "--test", "2", "--out", str(tmp_path)])
    assert result["keys_restored"] and result["relaxed_layers"]["mace"] == 2
    assert result["rigid_motion_errors_projected"]["energy"] <= 1e-10
    assert (tmp_path / "results.json").exists()
