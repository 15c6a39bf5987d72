"""ChunkFT behind torch.optim.Optimizer's face, so LR schedulers and Trainer-style loops can drive it.

torch.optim.lr_scheduler needs an Optimizer instance (it checks isinstance), whose param_groups hold "lr"
(and "initial_lr", which the scheduler adds and which must survive a resume), and whose step() it wraps.
Trainer-style loops call loss.backward(), optimizer.step(), scheduler.step(), optimizer.zero_grad().

Who owns the learning rate (the choice, so the two schedules never fight): the param group. step() trains
the driver's active window and always-active tensors at param_groups[0]["lr"], whatever set it (a
scheduler, the caller), and the driver's own schedule is bypassed; a driver whose schedule is not constant
without warm-up is therefore refused (two schedules would multiply). Only "lr" is read from the group: the
other hyper-parameters are the driver's (shown in the group for schedulers that read them, e.g. OneCycleLR
cycling betas, which has no effect here). One param group; add_param_group() is refused.

Gradients: backward() may be the caller's own loss.backward() (driver.backward is the same); they never
sit in `.grad` (the driver moves them to its fp32 buffers), so clip with the driver's max_grad_norm, not
torch.nn.utils.clip_grad_norm_ on model.parameters() (it would see no gradients).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from chunkft.executor.chunkft import ChunkFT, StepStats


class ChunkFTOptimizer(torch.optim.Optimizer):
    """A torch.optim.Optimizer whose step() is one ChunkFT step at the param group's lr (module docstring)."""

    def __init__(self, driver: ChunkFT) -> None:
        s = driver.schedule
        if s.kind != "constant" or s.warmup_steps != 0:
            raise ValueError(
                f"the driver already schedules the learning rate ({s.kind}, {s.warmup_steps} warm-up steps); "
                "build it with ScheduleSpec('constant', 0, total_steps) and let the torch scheduler own it"
            )
        named = dict(driver.model.named_parameters())
        names = [sl.name for c in driver.chunks for sl in c.slices] + list(driver.always_active)
        params = [named[n] for n in dict.fromkeys(names)]
        defaults = asdict(driver.hparams)
        self._sealed = False
        super().__init__(params, defaults)
        self._sealed = True
        self.driver = driver
        self.last_stats: StepStats | None = None  # what the last step() did (window, norm, skipped)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_sealed", False):
            raise ValueError("ChunkFTOptimizer has one param group (the driver's parameters); build another "
                             "driver for other parameters")
        super().add_param_group(param_group)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One ChunkFT step at param_groups[0]["lr"]; with a closure, call it first (it runs backward) and
        return its loss, like torch optimizers."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.last_stats = self.driver.step(lr=float(self.param_groups[0]["lr"]))
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients accumulated since the last step (either way: the driver's buffers are
        re-created by the next backward, which is what zeros would give)."""
        self.driver.discard_grads()

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The driver's state_dict() and the param group's values ("lr", "initial_lr", ...): with the
        scheduler's own state_dict(), everything to resume exactly."""
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        return {"driver": self.driver.state_dict(), "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        groups = state_dict["param_groups"]
        if len(groups) != 1:
            raise ValueError(f"optimizer state has {len(groups)} param groups; ChunkFTOptimizer has one")
        self.driver.load_state_dict(state_dict["driver"])
        self.param_groups[0].update(groups[0])
