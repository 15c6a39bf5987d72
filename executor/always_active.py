"""Always-active parameters: whole tensors trained on every step beside the rotating window.

Why: a window is trained 1/K of the time, and that includes tensors that cost almost nothing to keep
trainable but matter every step (a freshly initialised task head, norms, biases; BAdam and LISA keep the
head active too). These tensors get their own fp32 AdamW/SGD states (and an fp32 master when the weights
are not fp32), resident on the compute device for the whole run: they are small by construction, so no
transfer engine is involved. Their gradients are moved into fp32 buffers by a post-accumulate-grad hook,
like the window's, so no parameter ever holds a `.grad` between steps.

The update math is the window's (optimizer.adamw_update_ / sgd_update_, torch.optim's single-tensor path),
with the same learning rate and weight decay; "compensated" weight decay does not apply to them (they are
updated every step, so they already decay as under dense AdamW), nor does "reset" (their states are never
stored away).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from chunkft.executor.optimizer import AdamWHparams, Hparams, adamw_update_, sgd_update_, state_kinds


class AlwaysActive:
    """fp32 states, step counts and gradient buffers of the always-active tensors (see module docstring)."""

    def __init__(
        self, params: Mapping[str, nn.Parameter], names: Sequence[str], hparams: Hparams, device: torch.device
    ) -> None:
        self.names = tuple(names)
        self.hparams = hparams
        self._params = {n: params[n] for n in self.names}
        kinds = state_kinds(hparams)
        self.states = {
            n: {k: torch.zeros(p.shape, dtype=torch.float32, device=device) for k in kinds}
            for n, p in self._params.items()
        }
        self.master = {
            n: p.detach().to(device=device, dtype=torch.float32, copy=True)
            for n, p in self._params.items()
            if p.dtype != torch.float32
        }
        self.steps = dict.fromkeys(self.names, 0)
        self._grads: dict[str, Tensor] = {}
        self._hooks = [p.register_post_accumulate_grad_hook(self._hook(n)) for n, p in self._params.items()]

    def _hook(self, name: str) -> Callable[[Tensor], None]:
        def hook(p: Tensor) -> None:
            grad = p.grad
            p.grad = None
            if grad is None:
                return
            buf = self._grads.get(name)
            if buf is None:  # a fresh fp32 gradient is adopted: no zero fill, no copy
                self._grads[name] = grad.to(torch.float32).contiguous()
            else:
                buf.add_(grad)

        return hook

    def arm(self) -> None:
        """Make every always-active tensor trainable again (a window's activation freezes all others)."""
        for p in self._params.values():
            p.requires_grad_(True)

    def grads(self) -> dict[str, Tensor]:
        """name -> fp32 gradient summed since the last zero_grad(); tensors backward never reached are
        absent (left alone by update(), like a torch parameter whose .grad is None)."""
        return dict(self._grads)

    def zero_grad(self) -> None:
        self._grads = {}

    def update(self, grads: Mapping[str, Tensor], lr: float) -> None:
        """One optimizer step of every tensor with a gradient in `grads` (already clipped)."""
        for name, grad in grads.items():
            p = self._params[name]
            target = self.master.get(name, p.data)
            self.steps[name] += 1
            s = self.states[name]
            if isinstance(self.hparams, AdamWHparams):
                adamw_update_(
                    target, grad, s["exp_avg"], s["exp_avg_sq"], step=self.steps[name], lr=lr, hp=self.hparams
                )
            else:
                sgd_update_(target, grad, s.get("momentum_buffer"), lr=lr, hp=self.hparams)
            if name in self.master:
                p.data.copy_(target)

    def device_bytes(self) -> int:
        """Bytes of the fp32 states and masters kept on the compute device."""
        tensors = [t for s in self.states.values() for t in s.values()] + list(self.master.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    def close(self) -> None:
        """Remove the gradient hooks (the driver's close() restores the requires_grad flags)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ----- resume --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Names, step counts, states and fp32 masters as CPU tensors (loads with weights_only=True)."""
        return {
            "names": list(self.names),
            "steps": [self.steps[n] for n in self.names],
            "states": {
                n: {k: t.detach().cpu().clone() for k, t in s.items()} for n, s in self.states.items()
            },
            "master": {n: t.detach().cpu().clone() for n, t in self.master.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        names = [str(n) for n in state["names"]]
        if names != list(self.names):
            raise ValueError(
                f"driver state was saved with always_active {names}, this driver has {list(self.names)}; "
                "resume with the same always_active names"
            )
        for n in self.names:
            for k, t in self.states[n].items():
                t.copy_(state["states"][n][k])
            if n in self.master:
                self.master[n].copy_(state["master"][n])
        self.steps = {n: int(x) for n, x in zip(self.names, state["steps"], strict=True)}
