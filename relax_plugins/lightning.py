"""PyTorch Lightning integration (optional dependency ``pytorch-lightning`` or ``lightning``).

:class:`RelaxationCallback` steps θ, adds the penalty to the loss returned by ``training_step``,
logs ``relax/theta`` and ``relax/penalty``, projects the model when fitting ends, and makes every
checkpoint's ``state_dict`` the *projected* model's (original keys, exactly equivariant, loadable
without this library); the relaxed state rides along under ``checkpoint["relax_plugins"]`` so that
``trainer.fit(..., ckpt_path=...)`` resumes mid-schedule.
"""

from __future__ import annotations

import math
from typing import Any

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone distribution
    import pytorch_lightning as pl

from ._checks import check_bool, check_choice, check_int
from .api import check_penalty_args, projected_state_dict, relaxed_modules
from .schedules import Schedule, as_schedule
from .training import OPTIONAL_STATE_KEYS, STATE_KEYS, RelaxedTraining

__all__ = ["RelaxationCallback"]

_KEY = "relax_plugins"
#: the LightningModule methods a fit patches, and where it keeps what they were (restored at teardown)
_PATCHED = ("training_step", "on_load_checkpoint")
_PATCH_KEY = "_relax_plugins_patched"
_ABSENT = object()


def _unpatch(pl_module: pl.LightningModule) -> None:
    """Give ``pl_module`` back the methods :meth:`RelaxationCallback.setup` replaced (no-op if none)."""
    saved = pl_module.__dict__.pop(_PATCH_KEY, None)
    if not isinstance(saved, dict):
        return
    for name, value in saved.items():
        if value is _ABSENT:
            pl_module.__dict__.pop(name, None)  # the class's method shows through again
        else:
            pl_module.__dict__[name] = value


class RelaxationCallback(pl.Callback):
    """Relaxation schedule, penalty, logging and projection for a ``LightningModule``.

    Relax the module's network before handing it to the trainer (``rp.relax(module)`` or on a
    submodule). ``training_step`` may return a loss tensor, a dict with ``"loss"``, or None (Lightning
    skips the batch; no penalty is added).

    Args:
        schedule: name, :class:`~relax_plugins.schedules.Schedule` or callable of t ∈ [0, 1].
        per: "epoch" (total = ``max_epochs``) or "step" (total = ``estimated_stepping_batches``, the
            optimiser steps: with ``accumulate_grad_batches=k``, θ moves once every k batches).
        lie: λ_LD. norm: λ_N. form: see :func:`relax_plugins.penalty`.
        merge: fold θ·P(W) into base weights when projecting (checkpoints and fit end).
        penalty_every: compute the penalty every k-th training step, k-fold (see
            :class:`~relax_plugins.RelaxedTraining`; None: its default, 4); 1 computes it every step.

    Example:
        >>> cb = RelaxationCallback("triangular", per="epoch")
        >>> cb.per
        'epoch'
    """

    def __init__(
        self,
        schedule: Schedule | str = "triangular",
        per: str = "epoch",
        lie: float = 1e-2,
        norm: float = 1e-2,
        form: str = "sqrt",
        merge: bool = False,
        penalty_every: int | None = None,
    ) -> None:
        per = check_choice(per, "per", ("epoch", "step"))
        if not (isinstance(schedule, (str, Schedule)) or callable(schedule)):
            raise TypeError(f"schedule must be a name, a Schedule or a callable of t, got {type(schedule).__name__}")
        if isinstance(schedule, str):
            as_schedule(schedule, total=1)  # an unknown name fails here, not at fit start
        lie, norm, form, _ = check_penalty_args(lie, norm, form, 1e-12)
        merge = check_bool(merge, "merge")
        penalty_every = check_int(penalty_every, "penalty_every", minimum=1, none_ok=True)
        self.schedule, self.per = schedule, per
        self.lie, self.norm, self.form, self.merge = lie, norm, form, merge
        self.penalty_every = penalty_every
        self.run: RelaxedTraining | None = None
        self._pending_state: dict[str, Any] | None = None

    # set-up ---------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not any(True for _ in relaxed_modules(pl_module)):
            raise RuntimeError("RelaxationCallback: the LightningModule holds no relaxed layer; call rp.relax first")
        # a fit that ended without teardown (an error before training) may have left another
        # callback's patch: this fit's callback replaces it, its own run and settings then count
        _unpatch(pl_module)
        saved = {name: pl_module.__dict__.get(name, _ABSENT) for name in _PATCHED}
        original_step = pl_module.training_step
        original_load = pl_module.on_load_checkpoint

        def training_step(*args: Any, **kwargs: Any) -> Any:
            out = original_step(*args, **kwargs)
            if out is None:  # Lightning's way to skip a batch: no loss, so no penalty either
                return None
            pen = self.run.penalty()
            pl_module.log("relax/penalty", pen.detach(), on_step=True, on_epoch=True)
            pl_module.log("relax/theta", float(self.run.theta), on_step=True, on_epoch=True)
            if isinstance(out, dict):
                return {**out, "loss": out["loss"] + pen}
            return out + pen

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            # the top-level state_dict is the projected model; resume from the relaxed one
            if _KEY in checkpoint:
                checkpoint["state_dict"] = checkpoint[_KEY]["state_dict"]
            original_load(checkpoint)

        pl_module.training_step = training_step
        pl_module.on_load_checkpoint = on_load_checkpoint
        pl_module.__dict__[_PATCH_KEY] = saved

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            _unpatch(pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        _unpatch(pl_module)  # Lightning skips teardown after an error: the module must not keep the patch

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if isinstance(self.schedule, Schedule):
            total = None  # a Schedule carries its own total (e.g. a run resumed or stopped early)
        else:
            if self.per == "epoch":
                total = trainer.max_epochs
            else:
                steps = trainer.estimated_stepping_batches
                total = int(steps) if math.isfinite(steps) else None
            if total is None or total < 1:
                raise ValueError(
                    "RelaxationCallback needs a finite max_epochs (per='epoch') or max_steps (per='step')"
                )
        self.run = RelaxedTraining(
            pl_module, self.schedule, total=total, lie=self.lie, norm=self.norm, form=self.form,
            penalty_every=self.penalty_every,
        )
        if self._pending_state is not None:
            self.run.load_state_dict(self._pending_state)
            self._pending_state = None

    # schedule -------------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.per == "epoch":
            self.run.advance()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # θ moves once per optimiser step, as estimated_stepping_batches counts them: with gradient
        # accumulation over k batches, on the first batch of each window (batch_idx restarts every
        # epoch, where Lightning also closes a short last window)
        if self.per == "step" and batch_idx % max(int(trainer.accumulate_grad_batches), 1) == 0:
            self.run.advance()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if any(True for _ in relaxed_modules(pl_module)):
            self.run.finish(merge=self.merge)

    # checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if not any(True for _ in relaxed_modules(pl_module)):
            return
        checkpoint[_KEY] = {"state_dict": checkpoint["state_dict"]}
        checkpoint["state_dict"] = projected_state_dict(pl_module, merge=self.merge)

    def state_dict(self) -> dict[str, Any]:
        return self.run.state_dict() if self.run is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # a RelaxedTraining state without a learned policy (the callback runs schedules only)
        optional = OPTIONAL_STATE_KEYS - {"policy"}
        if not isinstance(state_dict, dict) or (state_dict and set(state_dict) - optional != STATE_KEYS):
            got = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(f"not a RelaxationCallback state: expected keys ['history', 'position', 'schedule'], "
                             f"got {got}")
        if state_dict:
            self._pending_state = state_dict
            if self.run is not None:
                self.run.load_state_dict(state_dict)
                self._pending_state = None
