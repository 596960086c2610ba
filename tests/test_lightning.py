"""Lightning callback: θ schedule, penalty in the loss, projected checkpoints, resume, fit-end projection."""

from __future__ import annotations

import pytest
import torch
from relax_toy.layers import SO2Gate, SO2Linear
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import relax_plugins as rp

pl = pytest.importorskip("pytorch_lightning")
from relax_plugins.lightning import RelaxationCallback  # noqa: E402


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(SO2Linear(2, 4), SO2Gate(), SO2Linear(4, 1))
        self.thetas: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.thetas.append(rp.get_theta(self.net)["0"] if any(True for _ in rp.relaxed_modules(self.net)) else -1)
        return (self.net(x) - y).square().mean()

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val", (self.net(x) - y).square().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(32, 4, generator=g), torch.randn(32, 2, generator=g)), batch_size=8)


def trainer(tmp_path, epochs, callbacks):
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks)


def test_callback_schedule_penalty_projection_and_checkpoints(tmp_path):
    module = Module()
    rp.relax(module.net)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, monitor="val", save_last=True)
    cb = RelaxationCallback("triangular", per="epoch")
    trainer(tmp_path, 5, [cb, ckpt]).fit(module, loader(), loader())
    # θ per epoch: 0, 0.5, 1, 0.5, 0 (4 batches each)
    assert module.thetas[::4] == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0], abs=1e-6)
    # fit end: projected in place
    assert not any(True for _ in rp.relaxed_modules(module)) and type(module.net[0]) is SO2Linear
    # the best checkpoint's state_dict is the projected model: loadable by a never-relaxed module
    state = torch.load(ckpt.best_model_path, weights_only=False)["state_dict"]
    fresh = Module()
    fresh.load_state_dict(state)
    assert set(state) == set(fresh.state_dict())
    # penalty reached the relaxation weights during training
    relaxed_state = torch.load(ckpt.last_model_path, weights_only=False)["relax_plugins"]["state_dict"]
    assert relaxed_state["net.0.term.weight"].abs().max() > 0


def test_callback_resume_mid_schedule(tmp_path):
    module = Module()
    rp.relax(module.net)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1, save_top_k=-1)
    trainer(tmp_path, 2, [RelaxationCallback(rp.schedules.Triangular(total=5)), ckpt]).fit(module, loader())
    # a new run resumes from epoch 2 of 5 and continues the schedule where it stopped
    module2 = Module()
    rp.relax(module2.net)
    mid = str(tmp_path / "epoch=1-step=8.ckpt")
    trainer(tmp_path, 5, [RelaxationCallback(rp.schedules.Triangular(total=5))]).fit(module2, loader(), ckpt_path=mid)
    assert module2.thetas[::4] == pytest.approx([1.0, 0.5, 0.0], abs=1e-6)
    assert type(module2.net[0]) is SO2Linear


def test_callback_refuses_unrelaxed_module(tmp_path):
    with pytest.raises(RuntimeError, match="no relaxed layer"):
        trainer(tmp_path, 1, [RelaxationCallback()]).fit(Module(), loader())


def test_callback_per_step_moves_theta_once_per_optimizer_step_under_accumulation(tmp_path):
    module = Module()
    rp.relax(module.net)
    tr = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=tmp_path, accumulate_grad_batches=2,
                    callbacks=[RelaxationCallback("triangular", per="step")])
    tr.fit(module, loader())  # 4 batches an epoch, 2 per optimiser step: 4 steps in all
    # Triangular(total=4): 0, 2/3, 2/3, 0, each held for the two batches of its step
    assert module.thetas == pytest.approx([0.0, 0.0, 2 / 3, 2 / 3, 2 / 3, 2 / 3, 0.0, 0.0], abs=1e-6)


class SkippingModule(Module):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return None if batch_idx == 1 else loss  # Lightning skips a batch whose step returns None


@pytest.mark.filterwarnings("ignore:.*returned `None`")
def test_callback_passes_a_skipped_batch_through(tmp_path):
    module = SkippingModule()
    rp.relax(module.net)
    trainer(tmp_path, 2, [RelaxationCallback("triangular", per="step", penalty_every=1)]).fit(module, loader())
    assert len(module.thetas) == 8 and type(module.net[0]) is SO2Linear  # ran to the end, projected


def test_a_failed_fit_and_a_second_fit_use_their_own_callback(tmp_path):
    # a fit that fails at start leaves no patch behind, and a later callback's run and settings count
    module = Module()
    rp.relax(module.net)
    epochs_none = pl.Trainer(max_epochs=-1, max_steps=-1, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=tmp_path,
                             callbacks=[RelaxationCallback(per="epoch")])
    with pytest.raises(ValueError, match="finite max_epochs"):
        epochs_none.fit(module, loader())
    assert "training_step" not in vars(module) and "_relax_plugins_patched" not in vars(module)
    first = RelaxationCallback(penalty_every=1)
    trainer(tmp_path / "first", 1, [first]).fit(module, loader())
    assert first.run.penalty_calls == 4  # 32 samples, batches of 8
    assert "training_step" not in vars(module)  # unpatched at teardown
    rp.relax(module.net)  # the first fit projected it at its end
    second = RelaxationCallback(penalty_every=1)
    trainer(tmp_path / "second", 1, [second]).fit(module, loader())
    assert second.run.penalty_calls == 4 and first.run.penalty_calls == 4


@pytest.mark.parametrize("bad", [0, 2.5, True, -1])
def test_callback_checks_penalty_every_at_construction(bad):
    with pytest.raises((TypeError, ValueError), match="penalty_every"):
        RelaxationCallback(penalty_every=bad)
