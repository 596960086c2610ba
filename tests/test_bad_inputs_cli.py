"""Misuse of the command line and of the escnn adapter: one-line errors, no NaN from the library."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from relax_toy.layers import SO2Linear
from torch import nn

import relax_plugins as rp
from relax_plugins.cli import main


def toy_model() -> nn.Sequential:
    """--model factory for the tests below."""
    return nn.Sequential(SO2Linear(1, 1))


@pytest.fixture
def ckpt(tmp_path):
    model = rp.relax(toy_model())
    rp.set_theta(model, 0.5)
    path = tmp_path / "relaxed.pt"
    torch.save(model.state_dict(), path)
    return path


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda p: p / "missing.pt", "no such file"),
        (lambda p: p, "not a file"),
        (lambda p: (p / "junk.pt").write_bytes(bytes(range(256)) * 4) and p / "junk.pt", "checkpoint"),
        (lambda p: (p / "text.pt").write_text("hello") and p / "text.pt", "checkpoint"),
        (lambda p: (p / "empty.pt").write_bytes(b"") or p / "empty.pt", "checkpoint"),
    ],
    ids=["missing", "directory", "random_bytes", "text", "empty"],
)
def test_report_unreadable_files(tmp_path, capsys, make, match):
    code, out, err = run_cli(capsys, "report", str(make(tmp_path)))
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and match in err and "Traceback" not in err


def test_report_truncated_and_non_checkpoint(ckpt, tmp_path, capsys):
    data = ckpt.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save(toy_model(), tmp_path / "pickled_model.pt")
    for name in ("trunc.pt", "list.pt", "pickled_model.pt"):
        code, _, err = run_cli(capsys, "report", str(tmp_path / name))
        assert code == 2 and len(err.strip().splitlines()) == 1, (name, err)


@pytest.mark.parametrize(
    "spec,match",
    [
        ("no_colon", "package.module:factory"), (":factory", "package.module:factory"),
        ("not_a_module_xyz:f", "cannot import"), ("tests.test_bad_inputs_cli:nothing", "no attribute"),
        ("tests.test_bad_inputs_cli:math", "not callable"), ("torch.nn:Linear", "factory failed"),
        ("builtins:dict", "not a torch.nn.Module"), ("torch.nn:Identity", "relax"),
        ("tests.test_bad_inputs_cli:other_model", "does not belong"),
    ],
)
def test_report_bad_model_spec(ckpt, capsys, spec, match):
    code, _, err = run_cli(capsys, "report", str(ckpt), "--model", spec)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and match in err, err


def other_model() -> nn.Sequential:
    return nn.Sequential(SO2Linear(1, 1), SO2Linear(1, 1))


def test_report_good_checkpoint(ckpt, capsys, tmp_path):
    code, out, _ = run_cli(capsys, "report", str(ckpt), "--model", "tests.test_bad_inputs_cli:toy_model",
                           "--json", str(tmp_path / "r.json"))
    assert code == 0 and "rel_weight_error" in out.replace(" ", "") or "theta" in out
    assert (tmp_path / "r.json").is_file()


def two_layer_model() -> nn.Sequential:
    """--model factory: two relaxable layers."""
    return nn.Sequential(SO2Linear(2, 2), SO2Linear(2, 2))


@pytest.mark.parametrize("options", [{"rank": 1, "init_std": 0.1}, {"include": ["1"]}, {"include": ["1"], "rank": 2}],
                         ids=["rank", "include", "both"])
def test_report_rebuilds_rank_and_layers_from_the_checkpoint(options, tmp_path, capsys):
    model = rp.relax(two_layer_model(), **options)
    rp.set_theta(model, 0.5)
    path = tmp_path / "relaxed.pt"
    torch.save(model.state_dict(), path)
    code, out, err = run_cli(capsys, "report", str(path), "--model", "tests.test_bad_inputs_cli:two_layer_model")
    assert code == 0, err
    layers = [line.split()[0] for line in out.splitlines()[2:] if line.strip()]
    assert layers == (["1"] if "include" in options else ["0", "1"])


def test_report_refuses_mixed_ranks_with_a_clear_message(tmp_path, capsys):
    state = {**{f"0.{k}": v for k, v in rp.relax(nn.Sequential(SO2Linear(2, 2)), rank=1)[0].state_dict().items()},
             **{f"1.{k}": v for k, v in rp.relax(nn.Sequential(SO2Linear(2, 2)))[0].state_dict().items()}}
    path = tmp_path / "mixed.pt"
    torch.save(state, path)
    code, _, err = run_cli(capsys, "report", str(path), "--model", "tests.test_bad_inputs_cli:two_layer_model")
    assert code == 2 and "mix" in err


class _OwnTheta(nn.Module):
    """A user's layer with parameters named theta (not relaxation's)."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.randn(3))
        self.register_buffer("scale", torch.tensor(0.3))


def test_report_ignores_a_users_own_theta(tmp_path, capsys):
    model = nn.Sequential(_OwnTheta(), SO2Linear(1, 1))
    model[0].register_buffer("theta2", torch.tensor(1.0))
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    code, out, _ = run_cli(capsys, "report", str(tmp_path / "plain.pt"))
    assert code == 0 and "no relaxed layer" in out
    # a scalar `theta` buffer of the user's, next to a relaxed layer: only the relaxed one is listed
    holder = nn.Sequential(nn.Module(), rp.relax(nn.Sequential(SO2Linear(1, 1))))
    holder[0].register_buffer("theta", torch.tensor(0.7))
    rp.set_theta(holder[1], 0.25)
    torch.save(holder.state_dict(), tmp_path / "mixed.pt")
    code, out, _ = run_cli(capsys, "report", str(tmp_path / "mixed.pt"))
    assert code == 0 and "0.25" in out and "0.7" not in out


def test_report_lightning_checkpoint_is_not_called_projected(tmp_path, capsys):
    model = rp.relax(toy_model())
    rp.set_theta(model, 0.25)
    ckpt = {"state_dict": rp.projected_state_dict(model), "relax_plugins": {"state_dict": model.state_dict()},
            "epoch": 3}
    torch.save(ckpt, tmp_path / "lightning.ckpt")
    code, out, _ = run_cli(capsys, "report", str(tmp_path / "lightning.ckpt"))
    assert code == 0
    assert "already projected" not in out and "RelaxationCallback" in out and "0.25" in out


# -- escnn: empty batches and autocast ---------------------------------------------------------
def _escnn_model(**options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        escnn = pytest.importorskip("escnn")
    gs = escnn.gspaces.rot2dOnR2(4)
    t = escnn.nn.FieldType(gs, [gs.regular_repr])
    model = rp.relax(escnn.nn.SequentialModule(escnn.nn.R2Conv(t, t, 3, padding=1)),
                     adapter_options={"escnn": options} if options else None)
    return model, t


@pytest.fixture
def escnn_model():
    return _escnn_model()


def test_escnn_penalty_before_any_forward(escnn_model):
    model, _ = escnn_model
    with pytest.raises(rp.RelaxError, match="'0'.*forward"):
        rp.penalty(model)


def test_escnn_empty_batch_gives_a_finite_penalty(escnn_model):
    model, t = escnn_model
    rp.set_theta(model, 1.0)
    with torch.no_grad():
        model[0].term.weight.normal_()
    model(t(torch.randn(0, t.size, 7, 7)))
    pen = rp.penalty(model)
    pen.backward()
    assert math.isfinite(float(pen))
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _empty_batch_case(kind: str):
    if kind == "vn":
        from relax_vn.layers import VNLinear

        return torch.nn.Sequential(VNLinear(2, 3)), torch.randn(0, 2, 3, 4)
    o3 = pytest.importorskip("e3nn.o3")
    return torch.nn.Sequential(o3.Linear("2x0e + 1x1o", "2x0e + 1x1o")), torch.randn(0, 5)


@pytest.mark.parametrize("rank", [None, 2], ids=["dense", "rank2"])
@pytest.mark.parametrize("kind", ["vn", "e3nn"])
def test_empty_batch_contributes_a_zero_penalty(kind, rank):
    model, x = _empty_batch_case(kind)
    rp.relax(model, rank=rank)
    rp.set_theta(model, 0.5)
    with torch.no_grad():
        for p in rp.relaxation_parameters(model):
            p.normal_()
    model(x)
    assert float(rp.penalty(model, form="mean").detach()) == 0.0
    for form in ("sqrt", "paper"):  # √(0 + eps) for each of the two sums
        assert float(rp.penalty(model, 1.0, 1.0, form=form, eps=1e-12).detach()) == pytest.approx(2e-6, rel=1e-6)
    rp.penalty(model, form="mean").backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert all(math.isfinite(v) for row in rp.projection_report(model).values() for v in row.values())


def test_escnn_penalty_under_bf16_autocast(escnn_model):
    model, t = escnn_model
    with torch.no_grad():
        model[0].term.weight.normal_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(t(torch.randn(2, t.size, 7, 7)))
        pen = rp.penalty(model)
    pen.backward()
    assert math.isfinite(float(pen)) and model[0].term.weight.grad is not None
    exact = float(rp.penalty(model))  # the projection itself runs in float32 under autocast
    assert math.isclose(float(pen), exact, rel_tol=1e-5)


@pytest.mark.parametrize("rows", [2, 40], ids=["per-sample", "moments"])
def test_penalty_after_a_forward_under_inference_mode(rows):
    o3 = pytest.importorskip("e3nn.o3")
    model = rp.relax(nn.Sequential(o3.Linear("2x0e + 1x1o", "2x0e + 1x1o")))
    with torch.no_grad():
        model[0].term.weight.normal_()
    x = torch.randn(rows, 5)
    with torch.inference_mode():
        model(x)
    pen = rp.penalty(model)
    pen.backward()
    assert model[0].term.weight.grad is not None and torch.isfinite(model[0].term.weight.grad).all()
    model(x)  # the same penalty from a normal forward
    assert torch.allclose(rp.penalty(model).detach(), pen.detach())


def test_escnn_exact_norm_penalty_after_a_forward_under_inference_mode():
    model, t = _escnn_model(escnn_activation_norm="exact")
    with torch.no_grad():
        model[0].term.weight.normal_()
    with torch.inference_mode():
        model(t(torch.randn(2, t.size, 7, 7)))
    rp.penalty(model).backward()
    assert torch.isfinite(model[0].term.weight.grad).all()
