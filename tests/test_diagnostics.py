"""Equivariance report (dict, table, JSON, PNG) and the command line."""

from __future__ import annotations

import json

import pytest
import torch
from relax_toy.layers import SO2Gate, SO2Linear, rotation_2d
from torch import nn

import relax_plugins as rp
from relax_plugins import cli


def make_model() -> nn.Module:
    return nn.Sequential(SO2Linear(2, 3), SO2Gate(), SO2Linear(3, 1)).double()


def relaxed_trained_model() -> nn.Module:
    model = rp.relax(make_model())
    with torch.no_grad():
        for _, layer in rp.relaxed_modules(model):
            layer.term.weight.normal_()
    rp.set_theta(model, 0.5)
    return model


def error_fn(model: nn.Module) -> float:
    x = torch.randn(32, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    R_in, R_out = rotation_2d(0.7, 2, torch.float64), rotation_2d(0.7, 1, torch.float64)
    return float((model(x @ R_in.T) - model(x) @ R_out.T).norm() / model(x).norm())


def test_report_dict_table_json_png(tmp_path):
    model = relaxed_trained_model()
    x = torch.randn(16, 4, dtype=torch.float64)
    report = rp.equivariance_report(model, x, error_fn=error_fn)
    assert set(report["layers"]) == {"0", "2"}
    row = report["layers"]["0"]
    assert row["adapter"] == "toy" and row["layer"] == "SO2Linear" and row["theta"] == 0.5
    assert row["relax_ratio"] > 0 and row["lie_defect"] > 0
    assert report["model"]["relaxed"] > 1e-3 and report["model"]["projected"] < 1e-12
    assert isinstance(model[0], rp.RelaxedModule)  # the report does not project the model itself
    table = rp.format_report(report)
    assert "relax_ratio" in table and "model equivariance error (projected)" in table
    path = rp.save_report(report, tmp_path / "r.json")
    assert json.loads(path.read_text())["layers"]["2"]["theta"] == 0.5
    png = rp.plot_report(report, tmp_path / "r.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_plot_history(tmp_path):
    model = rp.relax(make_model())
    run = rp.RelaxedTraining(model, "triangular", total=4)
    for _ in range(4):
        run.advance()
        run.loss(model(torch.randn(4, 4, dtype=torch.float64)).square().mean() + 1e-3)
    assert rp.plot_history(run.history, tmp_path / "h.png").stat().st_size > 1000


def test_cli_list(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "toy" in out and "relax-plugins 0.1.0" in out


def test_cli_report_on_checkpoint(tmp_path, capsys, monkeypatch):
    model = relaxed_trained_model()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "epoch": 3}, path)
    assert cli.main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    assert "0.5" in out and out.count("\n") >= 3
    (tmp_path / "factory_mod.py").write_text(
        "import torch\nfrom relax_toy.layers import SO2Gate, SO2Linear\n"
        "def make():\n    return torch.nn.Sequential(SO2Linear(2, 3), SO2Gate(), SO2Linear(3, 1)).double()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cli.main(["report", str(path), "--model", "factory_mod:make", "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert 0 < report["layers"]["0"]["rel_weight_error"] < 1


# -- diagnostics leave a pending backward, recorded activations and random streams alone --------
def test_report_in_train_mode_with_batchnorm_keeps_a_pending_backward():
    torch.manual_seed(0)
    model = rp.relax(nn.Sequential(SO2Linear(2, 2), nn.BatchNorm1d(4), SO2Linear(2, 2))).train()
    x = torch.randn(8, 4)
    loss = model(x).square().mean()  # BatchNorm saved its running statistics for this backward
    stats = model[1].running_mean.clone()
    rp.equivariance_report(model, torch.randn(8, 4))
    loss.backward()  # not "modified by an inplace operation"
    assert torch.equal(model[1].running_mean, stats) and model.training


def test_probe_forward_keeps_a_pending_backward_and_the_recorded_activations():
    from relax_plugins.probe import probe_forward

    model = rp.relax(nn.Sequential(SO2Linear(2, 2), SO2Gate(), SO2Linear(2, 2)))
    with torch.no_grad():
        for p in rp.relaxation_parameters(model):
            p.normal_()
    x = torch.randn(8, 4)
    loss = model(x).sum()
    before = float(rp.penalty(model).detach())
    probe_forward(model, (torch.randn(16, 4) * 10,), {})
    assert float(rp.penalty(model).detach()) == before  # the penalty still sees the user's batch
    loss.backward()


class _ForcesInside(nn.Module):
    """Differentiates inside forward (as MACE does for forces): needs grad mode."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(SO2Linear(2, 2), SO2Gate(), SO2Linear(2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().requires_grad_()
        energy = self.net(x).square().sum()
        (forces,) = torch.autograd.grad(energy, x, create_graph=self.training)
        return forces


def test_report_on_a_model_that_differentiates_inside_forward():
    model = rp.relax(_ForcesInside())
    report = rp.equivariance_report(model, torch.randn(8, 4))
    assert set(report["layers"]) == {"net.0", "net.2"}
    assert all(p.grad is None for p in model.parameters())  # nothing was backpropagated into the model


def test_reports_do_not_move_the_generator_sampling_stream():
    def build():
        torch.manual_seed(0)
        model = rp.relax(nn.Sequential(SO2Linear(3, 3), SO2Linear(3, 3)))
        for _, layer in rp.relaxed_modules(model):
            layer.term.symmetry.lie_in = torch.randn(4, 6, 6, dtype=torch.float64)  # several generators
            layer.term.symmetry.lie_out = torch.randn(4, 6, 6, dtype=torch.float64)
            layer.term.penalty_generators = 1
        with torch.no_grad():
            for p in rp.relaxation_parameters(model):
                p.normal_()
        return model

    x = torch.randn(32, 6)
    plain, reported = build(), build()
    for _ in range(4):
        plain(x)
        reported(x)
        rp.projection_report(reported)
        assert torch.equal(rp.penalty(plain), rp.penalty(reported))


def test_saved_report_is_strict_json_and_plots_return_the_file_written(tmp_path):
    import json

    report = {"layers": {"0": {"theta": 0.5, "lie_defect": float("nan"), "relax_ratio": float("inf")}},
              "model": {"relaxed": float("-inf")}}
    path = rp.save_report(report, tmp_path / "r.json")

    def refuse(value):
        raise ValueError(f"not JSON: {value}")

    loaded = json.loads(path.read_text(), parse_constant=refuse)
    assert loaded["layers"]["0"] == {"theta": 0.5, "lie_defect": None, "relax_ratio": None}
    pytest.importorskip("matplotlib")
    for written in (rp.plot_report(report, tmp_path / "report"), rp.plot_history([{"theta": 0.5, "task": 1.0,
                                                                                  "penalty": 0.1}], tmp_path / "h")):
        assert written.exists() and written.suffix == ".png"
    with pytest.raises(TypeError, match="columns"):
        rp.plot_report(report, tmp_path / "x.png", columns="theta")
    with pytest.raises(ValueError, match="unknown columns"):
        rp.plot_report(report, tmp_path / "x.png", columns=["thetaa"])
