"""The chunked optimizer: AdamW and SGD with momentum, updating only the active window's rows.

Per (chunk, slice) it keeps a step count and the optimizer states; the active window's states and fp32
master rows are on the device in fp32 during the update, the others wherever the TransferEngine stores
them (host fp32 by default, host bf16 as a lossy option, or dropped at rotation: "reset", BAdam-style).
When the model's weights are not fp32, an fp32 master copy of every chunk is kept and the update is done
on it and then rounded into the weights: tiny updates accumulate in the master instead of being lost to
bf16 rounding. When the weights are fp32 they are their own master.

The per-tensor update math is torch.optim.AdamW / torch.optim.SGD's single-tensor path, operation for
operation, so K=1 reproduces them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from chunkft.chunks import Chunk, ParamSlice
from chunkft.executor import distributed as dist_
from chunkft.executor.distributed import FlatShard, ReadShards, World
from chunkft.executor.state_files import DiskTier
from chunkft.executor.streams import Streams
from chunkft.executor.transfer import KindSpec, TransferEngine

HostStateDtype = Literal["float32", "bfloat16", "reset"]
StatesOn = Literal["host", "gpu"]
HOST_STATE_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "reset")
STATES_ON: tuple[str, ...] = ("host", "gpu")
# "window": decoupled weight decay on the active window only, so each parameter decays 1/K as often as in
# dense training; "compensated": the active window decays K steps' worth per update ((1 - lr*wd)**K),
# so over one rotation every parameter decays as much as under dense AdamW at a constant lr.
WeightDecayMode = Literal["window", "compensated"]
WEIGHT_DECAY_MODES: tuple[str, ...] = ("window", "compensated")


def check_weight_decay_mode(mode: str) -> None:
    if mode not in WEIGHT_DECAY_MODES:
        raise ValueError(f"weight_decay_mode {mode!r} is unknown; use one of {', '.join(WEIGHT_DECAY_MODES)}")


@dataclass(frozen=True)
class AdamWHparams:
    """torch.optim.AdamW's hyper-parameters (decoupled weight decay)."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if not self.lr >= 0.0:
            raise ValueError(f"AdamW lr must be >= 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"AdamW betas must be two numbers in [0, 1), got {self.betas}")
        if not self.eps > 0.0:
            raise ValueError(f"AdamW eps must be > 0, got {self.eps}")
        if not self.weight_decay >= 0.0:
            raise ValueError(f"AdamW weight_decay must be >= 0, got {self.weight_decay}")


@dataclass(frozen=True)
class SGDHparams:
    """torch.optim.SGD's hyper-parameters (no dampening)."""

    lr: float
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False

    def __post_init__(self) -> None:
        if not self.lr >= 0.0:
            raise ValueError(f"SGD lr must be >= 0, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"SGD momentum must be in [0, 1), got {self.momentum}")
        if not self.weight_decay >= 0.0:
            raise ValueError(f"SGD weight_decay must be >= 0, got {self.weight_decay}")
        if self.nesterov and self.momentum == 0.0:
            raise ValueError("SGD nesterov needs momentum > 0; set momentum or nesterov=False")


Hparams = AdamWHparams | SGDHparams


def state_kinds(hparams: Hparams) -> tuple[str, ...]:
    """Names of the per-element optimizer states, in the order they are stored."""
    if isinstance(hparams, AdamWHparams):
        return ("exp_avg", "exp_avg_sq")
    return ("momentum_buffer",) if hparams.momentum != 0.0 else ()


def adamw_update_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    step: int,
    lr: float,
    hp: AdamWHparams,
    decay_steps: int = 1,
) -> None:
    """One AdamW update in place; `step` is this tensor's update count including this one (>= 1).
    decay_steps > 1 applies that many steps' decoupled weight decay (WeightDecayMode "compensated")."""
    beta1, beta2 = hp.betas
    if hp.weight_decay != 0:
        param.mul_((1 - lr * hp.weight_decay) ** decay_steps)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(hp.eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


def sgd_update_(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor | None,
    *,
    lr: float,
    hp: SGDHparams,
) -> None:
    """One SGD update in place. A zero momentum buffer gives exactly torch's first step (buf = grad)."""
    if hp.weight_decay != 0:
        grad = grad.add(param, alpha=hp.weight_decay)
    if momentum_buffer is not None:
        momentum_buffer.mul_(hp.momentum).add_(grad)
        grad = grad.add(momentum_buffer, alpha=hp.momentum) if hp.nesterov else momentum_buffer
    param.add_(grad, alpha=-lr)


def grad_norm(grads: Sequence[Tensor]) -> Tensor:
    """The 2-norm of all gradients together, as torch.nn.utils.clip_grad_norm_ computes it."""
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, 2.0) for g in grads]), 2.0)


def clip_(grads: Sequence[Tensor], total_norm: Tensor, max_norm: float) -> None:
    """Scale gradients in place like clip_grad_norm_ (coefficient max_norm/(norm+1e-6), at most 1)."""
    coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.device))


@dataclass(frozen=True)
class SliceLayout:
    """Where one slice of a chunk sits in the chunk's flat state tensors and in its parameter."""

    slice: ParamSlice
    offset: int  # element offset in the chunk's flat tensors
    numel: int
    param_offset: int  # element offset of row_start in the flattened parameter


def chunk_layout(chunk: Chunk, params: Mapping[str, nn.Parameter]) -> tuple[SliceLayout, ...]:
    """The flat layout of a chunk's slices, in slice order."""
    out, offset = [], 0
    for sl in chunk.slices:
        p = params[sl.name]
        row_numel = p.numel() // (p.shape[0] if p.dim() else 1)
        n = sl.num_rows * row_numel
        out.append(SliceLayout(sl, offset, n, sl.row_start * row_numel))
        offset += n
    return tuple(out)


class ChunkedOptimizer:
    """Per-(chunk, slice) AdamW or SGD state; updates one chunk's rows from its window gradients."""

    def __init__(
        self,
        params: Mapping[str, nn.Parameter],
        chunks: Sequence[Chunk],
        hparams: Hparams,
        *,
        host_state_dtype: HostStateDtype = "float32",
        states_on: StatesOn = "host",
        device: torch.device,
        state_slots: int = 1,
        decay_steps: int = 1,
        streams: Streams | None = None,
        world: World | None = None,
        disk: DiskTier | None = None,  # the host-tier kinds live in files there instead (the disk tier)
    ) -> None:
        if not isinstance(hparams, AdamWHparams | SGDHparams):
            raise TypeError(f"hparams must be AdamWHparams or SGDHparams, got {type(hparams).__name__}")
        if host_state_dtype not in HOST_STATE_DTYPES:
            raise ValueError(
                f"host_state_dtype {host_state_dtype!r} is unknown; use one of {', '.join(HOST_STATE_DTYPES)}"
            )
        if states_on not in STATES_ON:
            raise ValueError(f"states_on {states_on!r} is unknown; use one of {', '.join(STATES_ON)}")
        if decay_steps < 1:
            raise ValueError(f"decay_steps must be >= 1, got {decay_steps}")
        if decay_steps > 1 and not isinstance(hparams, AdamWHparams):
            # SGD's weight decay is an L2 term in the gradient, not a decoupled decay to compensate
            raise ValueError("compensated weight decay needs AdamW; SGD's weight decay is in its gradient")
        self.hparams = hparams
        self.host_state_dtype = host_state_dtype
        self.decay_steps = decay_steps
        self._params = params
        self.layouts = [chunk_layout(c, params) for c in chunks]
        # data parallel: this rank keeps master and states only for its 1/N of each window's flat elements
        self.world = world if world is not None else World.single()
        self.numels = [sum(s.numel for s in lay) for lay in self.layouts]
        self.bounds = [dist_.shard_bounds(n, self.world) for n in self.numels]
        used = [params[sl.name] for c in chunks for sl in c.slices]
        # Weights sharded by FSDP2 (fully_shard: DTensors, this rank's dim-0 rows) are written from an
        # fp32 master whatever their dtype: the update runs on the window's flat shard, not on their rows.
        self.sharded = any(isinstance(p, DTensor) for p in used)
        if self.sharded and not self.world.parallel:
            raise ValueError("the model's parameters are sharded (FSDP2) but the world has one rank")
        self.needs_master = self.sharded or any(p.dtype != torch.float32 for p in used)
        location = "host" if states_on == "host" else "device"
        location = "disk" if disk is not None and location == "host" else location
        kinds = []
        if self.needs_master:
            kinds.append(KindSpec("master", location, torch.float32))
        store_dtype = torch.bfloat16 if host_state_dtype == "bfloat16" else torch.float32
        for name in state_kinds(hparams):
            kinds.append(KindSpec(name, "none" if host_state_dtype == "reset" else location, store_dtype))
        self.engine = TransferEngine(
            [b[2] for b in self.bounds] if self.world.parallel else self.numels,
            kinds,
            device=device,
            max_slots=state_slots,
            streams=streams,
            disk=disk,
        )
        self.steps = [[0] * len(lay) for lay in self.layouts]
        if self.needs_master:
            for c, lay in enumerate(self.layouts):
                master = self.engine.store(c, "master")
                if self.world.parallel:
                    lo, hi, _ = self.bounds[c]
                    # every rank reads every slice (for sharded weights a collective, in the same order)
                    rows = {sl.slice.name: self._read_rows(sl) for sl in lay}
                    for s, a, b in self._pieces(c):
                        master[a - lo : b - lo].copy_(rows[s.slice.name][a - s.offset : b - s.offset])
                    continue
                for s in lay:
                    master[s.offset : s.offset + s.numel].copy_(self._rows(s))

    def _rows(self, s: SliceLayout) -> Tensor:
        """The slice's rows of its parameter as a flat view (no autograd, no version bump)."""
        return self._params[s.slice.name].data.view(-1)[s.param_offset : s.param_offset + s.numel]

    def _read_rows(self, s: SliceLayout) -> Tensor:
        """The slice's rows, flat; of a sharded weight gathered from every rank (a collective)."""
        p = self._params[s.slice.name]
        if not isinstance(p, DTensor):
            return self._rows(s)
        return p.full_tensor().detach().reshape(-1)[s.param_offset : s.param_offset + s.numel]

    def _write_rows(self, s: SliceLayout, values: Tensor) -> None:
        """Set the slice's rows to `values` (flat, the whole slice); a sharded weight takes the rows its
        local shard holds (FSDP2 splits dim 0 as torch.chunk does, which is shard_bounds')."""
        p = self._params[s.slice.name]
        if not isinstance(p, DTensor):
            self._rows(s).copy_(values)
            return
        try:  # this rank's rows of the parameter, the storage FSDP2 gathers from
            local, r0, r1 = dist_.local_rows(p, self.world)
        except ValueError as e:
            raise ValueError(f"{s.slice.name}: {e}") from None
        a, b = max(s.slice.row_start, r0), min(s.slice.row_end, r1)
        if a < b:
            rows = values.view(s.slice.num_rows, -1)[a - s.slice.row_start : b - s.slice.row_start]
            local.detach()[a - r0 : b - r0].copy_(rows.view(local[a - r0 : b - r0].shape))

    def begin_window(self, chunk: int) -> None:
        """The rotation moved to `chunk` from another window: with "reset", its bias correction restarts."""
        if self.host_state_dtype == "reset":
            self.steps[chunk] = [0] * len(self.steps[chunk])

    def update(self, chunk: int, grads: Mapping[str, Tensor], lr: float) -> float:
        """Update the chunk's rows with its (already clipped) window gradients; returns seconds waited.

        A slice without a gradient entry is skipped like a parameter whose .grad is None in torch.
        """
        fetched = self.engine.wait(chunk)
        t = fetched.tensors
        for i, s in enumerate(self.layouts[chunk]):
            grad = grads.get(s.slice.name)
            if grad is None:
                continue
            grad = grad.reshape(-1)
            master = t["master"][s.offset : s.offset + s.numel] if self.needs_master else self._rows(s)
            self.steps[chunk][i] += 1
            if isinstance(self.hparams, AdamWHparams):
                adamw_update_(
                    master,
                    grad,
                    t["exp_avg"][s.offset : s.offset + s.numel],
                    t["exp_avg_sq"][s.offset : s.offset + s.numel],
                    step=self.steps[chunk][i],
                    lr=lr,
                    hp=self.hparams,
                    decay_steps=self.decay_steps,
                )
            else:
                buf = t["momentum_buffer"][s.offset : s.offset + s.numel] if "momentum_buffer" in t else None
                sgd_update_(master, grad, buf, lr=lr, hp=self.hparams)
            if self.needs_master:
                self._rows(s).copy_(master)
        return fetched.wait_s

    # ----- data parallel ---------------------------------------------------------------------------------
    def _pieces(self, chunk: int) -> list[tuple[SliceLayout, int, int]]:
        """(slice, a, b): the part [a, b) of each slice's flat range that lies in this rank's shard."""
        lo, hi, _ = self.bounds[chunk]
        out = []
        for s in self.layouts[chunk]:
            a, b = max(lo, s.offset), min(hi, s.offset + s.numel)
            if a < b:
                out.append((s, a, b))
        return out

    def update_shard(self, chunk: int, shard: Tensor, present: Sequence[bool], lr: float) -> float:
        """Data parallel: update this rank's shard of the chunk from its reduced (and clipped) flat
        gradient shard, then all-gather the updated rows into every rank's weights. `present[i]`: slice i
        got a gradient on some rank (the others are left alone, as update() leaves a missing entry).
        AdamW and SGD are elementwise, so a flat shard updates exactly as the whole window would."""
        fetched = self.engine.wait(chunk)
        t = fetched.tensors
        lo, _, per = self.bounds[chunk]
        for i, _s in enumerate(self.layouts[chunk]):
            if present[i]:
                self.steps[chunk][i] += 1  # identical on every rank, whether or not the slice is in its shard
        index = {s.slice.name: i for i, s in enumerate(self.layouts[chunk])}
        for s, a, b in self._pieces(chunk):
            i = index[s.slice.name]
            if not present[i]:
                continue
            grad = shard[a - lo : b - lo]
            master = self._master_piece(t, s, a, b, lo)
            if isinstance(self.hparams, AdamWHparams):
                adamw_update_(
                    master,
                    grad,
                    t["exp_avg"][a - lo : b - lo],
                    t["exp_avg_sq"][a - lo : b - lo],
                    step=self.steps[chunk][i],
                    lr=lr,
                    hp=self.hparams,
                    decay_steps=self.decay_steps,
                )
            else:
                buf = t["momentum_buffer"][a - lo : b - lo] if "momentum_buffer" in t else None
                sgd_update_(master, grad, buf, lr=lr, hp=self.hparams)
        self._gather_rows(chunk, t)
        return fetched.wait_s

    def _master_piece(self, t: Mapping[str, Tensor], s: SliceLayout, a: int, b: int, lo: int) -> Tensor:
        """The fp32 values updated in place for flat elements [a, b) of slice s (shard starts at lo)."""
        if self.needs_master:
            return t["master"][a - lo : b - lo]
        return self._rows(s)[a - s.offset : b - s.offset]

    def _gather_rows(self, chunk: int, t: Mapping[str, Tensor]) -> None:
        """All-gather the updated rows into the weights, in the weights' dtype when the window has one
        (bf16 rows travel as bf16: rounding the fp32 master before or after the gather is the same)."""
        lo, _, per = self.bounds[chunk]
        dtypes = {self._params[s.slice.name].dtype for s in self.layouts[chunk]}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        device = self.engine.device
        mine = torch.zeros(per, dtype=dtype, device=device)
        for s, a, b in self._pieces(chunk):
            mine[a - lo : b - lo].copy_(self._master_piece(t, s, a, b, lo))
        full = dist_.all_gather_flat(mine, self.world)
        for s in self.layouts[chunk]:
            self._write_rows(s, full[s.offset : s.offset + s.numel])
        dist_.release(mine, full)  # not left to the backend's thread to free (see release)

    def _full_engine_state(self) -> dict | None:
        """The engine state as one rank would have it (whole windows), on rank 0; None elsewhere."""
        state = self.engine.state_dict()
        stores = []
        for c, s in enumerate(state["stores"]):
            full = {k: dist_.gather_flat_to_main(v, self.numels[c], self.world) for k, v in s.items()}
            stores.append(full)
        live = []
        for entry in state["live_slots"]:  # the same chunks on every rank: the rotation is the same
            c = int(entry["chunk"])
            n = self.numels[c]
            tensors = {k: dist_.gather_flat_to_main(v, n, self.world) for k, v in entry["tensors"].items()}
            live.append({"chunk": c, "tensors": tensors})
        return {"stores": stores, "live_slots": live} if self.world.is_main else None

    def _my_engine_state(self, state: dict) -> dict:
        """This rank's shard of a whole-window engine state (saved on any number of ranks)."""

        def cut(c: int, v: Tensor) -> Tensor:
            lo, hi, per = self.bounds[c]
            out = torch.zeros(per, dtype=v.dtype)
            out[: hi - lo].copy_(v[lo:hi])
            return out

        stores = [{k: cut(c, v) for k, v in s.items()} for c, s in enumerate(state["stores"])]
        live = []
        for e in state["live_slots"]:
            c = int(e["chunk"])
            live.append({"chunk": c, "tensors": {k: cut(c, v) for k, v in e["tensors"].items()}})
        return {"stores": stores, "live_slots": live}

    def state_dict(self) -> dict:
        """Whole windows whatever the world size (data parallel gathers the shards to rank 0; the other
        ranks get None for the engine), so a checkpoint does not depend on the rank count."""
        engine = self._full_engine_state() if self.world.parallel else self.engine.state_dict()
        return {"steps": [list(s) for s in self.steps], "engine": engine}

    def sharded_state_dict(self) -> tuple[dict, dict[str, FlatShard]]:
        """(the small part, this rank's rows of every flat state by key) for a distributed checkpoint:
        each rank saves only its own 1/N and no rank gathers the whole (executor/checkpoint.py)."""
        state = self.engine.state_dict()
        live = [int(e["chunk"]) for e in state["live_slots"]]
        small = {"steps": [list(s) for s in self.steps], "engine": {"sharded": True, "live_chunks": live}}
        return small, self._shards_of(state)

    def _shards_of(self, engine_state: dict) -> dict[str, FlatShard]:
        """Every flat tensor of an engine state (stores, and slots not written back) as this rank's rows,
        by key; a padded shard's zero tail is not part of them."""

        def shard(c: int, v: Tensor) -> FlatShard:
            lo, hi, _ = self.bounds[c]
            return FlatShard(v[: hi - lo], self.numels[c], lo)

        out = {}
        for c, store in enumerate(engine_state["stores"]):
            out.update({f"store.{c}.{k}": shard(c, v) for k, v in store.items()})
        for e in engine_state["live_slots"]:
            c = int(e["chunk"])
            out.update({f"live.{c}.{k}": shard(c, v) for k, v in e["tensors"].items()})
        return out

    def load_sharded_state_dict(self, state: dict, read: ReadShards) -> None:
        """Continue from sharded_state_dict() saved on any rank count: `read` fills this rank's rows of
        every key (in place in the host stores)."""
        self._check_steps(state["steps"])
        targets = self.engine.load_targets([int(c) for c in state["engine"]["live_chunks"]])
        read(self._shards_of(targets))
        self.engine.load_state_dict(targets)
        self.steps = [[int(x) for x in s] for s in state["steps"]]

    def _check_steps(self, steps: list) -> None:
        if [len(s) for s in steps] != [len(s) for s in self.steps]:
            raise ValueError("optimizer state step counts do not match this run's chunk layout")

    def load_state_dict(self, state: dict) -> None:
        steps = state["steps"]
        self._check_steps(steps)
        engine = state["engine"]
        if self.world.parallel:
            engine = self._my_engine_state(engine)
        self.engine.load_state_dict(engine)
        self.steps = [[int(x) for x in s] for s in steps]


def bytes_per_element(hparams: Hparams) -> int:
    """fp32 optimizer-state bytes per parameter element (for partition's state_bytes_per_element)."""
    return 4 * len(state_kinds(hparams))
