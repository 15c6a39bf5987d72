"""FLOPs and bytes to seconds, from a GPU profile and one stated compute efficiency.

Why one efficiency: dense matmul throughput of a training step is a stable fraction of the datasheet
figure for a given card (kernels, launch gaps, norms and pointwise ops included); one number, printed with
every plan, is easier to check and correct than a per-op model. Transfers use the profile's measured
pinned host<->device bandwidth, the optimizer update the memory bandwidth (it is memory-bound).
"""

from __future__ import annotations

from dataclasses import dataclass

# Achieved / datasheet dense FLOP/s for a full training step of a decoder at seq 512-4096 (HF eager
# modules, no compile). Public full fine-tuning runs land at 0.35-0.55 of peak; the middle is taken.
DEFAULT_EFFICIENCY = 0.45

# Bytes the AdamW update touches per element: read grad (4), read+write master (8), exp_avg (8) and
# exp_avg_sq (8), two fp32 temporaries written and read (16), the weight write (weight bytes, added).
ADAMW_BYTES_PER_ELEMENT = 44
SGD_BYTES_PER_ELEMENT = 20  # grad, master r/w, momentum r/w


@dataclass(frozen=True)
class CostModel:
    """The rates one GPU (or the host CPU) runs at."""

    flops_per_s: int  # datasheet dense FLOP/s in the compute dtype
    efficiency: float  # achieved fraction of flops_per_s
    memory_bytes_per_s: int
    h2d_bytes_per_s: int
    d2h_bytes_per_s: int
    interconnect_bytes_per_s: int

    def __post_init__(self) -> None:
        if not 0.0 < self.efficiency <= 1.0:
            raise ValueError(f"compute efficiency must be in (0, 1], got {self.efficiency}")
        for name in ("flops_per_s", "memory_bytes_per_s", "h2d_bytes_per_s", "d2h_bytes_per_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    def compute_seconds(self, flops: int) -> float:
        return flops / (self.flops_per_s * self.efficiency)

    def h2d_seconds(self, nbytes: int) -> float:
        return nbytes / self.h2d_bytes_per_s

    def d2h_seconds(self, nbytes: int) -> float:
        return nbytes / self.d2h_bytes_per_s

    def peer_seconds(self, nbytes: int) -> float:
        return nbytes / max(self.interconnect_bytes_per_s, 1)

    def update_seconds(self, numel: int, optimizer: str, weight_bytes: int) -> float:
        """One optimizer update over numel elements (memory-bound)."""
        per = ADAMW_BYTES_PER_ELEMENT if optimizer == "adamw" else SGD_BYTES_PER_ELEMENT
        return numel * (per + weight_bytes) / self.memory_bytes_per_s


def cost_model(gpu: object, dtype: str, efficiency: float = DEFAULT_EFFICIENCY) -> CostModel:
    """A CostModel from a profiles.GpuProfile (duck-typed to keep this module import-light)."""
    flops = dict(gpu.flops_per_s)  # type: ignore[attr-defined]
    if dtype not in flops:
        raise ValueError(f"GPU profile {gpu.key} has no {dtype} throughput")  # type: ignore[attr-defined]
    return CostModel(
        flops_per_s=int(flops[dtype]),
        efficiency=efficiency,
        memory_bytes_per_s=int(gpu.memory_bandwidth_bytes_per_s),  # type: ignore[attr-defined]
        h2d_bytes_per_s=int(gpu.h2d_bytes_per_s),  # type: ignore[attr-defined]
        d2h_bytes_per_s=int(gpu.d2h_bytes_per_s),  # type: ignore[attr-defined]
        interconnect_bytes_per_s=int(gpu.interconnect_bytes_per_s or gpu.h2d_bytes_per_s),  # type: ignore[attr-defined]
    )


# --calibrate (--gpu cpu): two seconds of measuring instead of a generic CPU's figures. The measured
# matmul rate already holds the kernels' own shortfall from peak, but a training step is not all matmul:
# norms, softmax, pointwise ops, autograd's bookkeeping and the optimizer run far below it on a CPU. So
# the plan takes a step-level share of the measured rate, fitted on this project's 2-core container: the
# README CPU demo (tiny-llama, 8 x 128 tokens, K=4) ran at 0.42 of the probe's FLOP/s (planned at 0.45:
# 168.1 ms predicted, 178.4 ms measured; efficiency 1.0 would have predicted ~76 ms).
CALIBRATED_EFFICIENCY = 0.42
PROBE_SECONDS = 0.8  # per figure, after one warm-up: about 2 s in all
PROBE_MAX_ROWS = 2048  # tokens of the probe's matmul: enough to reach a steady rate, quick to repeat
PROBE_COPY_BYTES = 128 * 2**20  # well beyond the caches, so the copy runs at DRAM speed


@dataclass(frozen=True)
class MeasuredRates:
    """What --calibrate measured on this machine (integer FLOP/s and bytes/s)."""

    flops_per_s: int  # dense matmul in the plan's dtype at the model's shapes (median of repeats)
    memory_bytes_per_s: int  # a large tensor copy, bytes read + bytes written (as the update counts them)
    shape: tuple[int, int, int]  # (rows, inner, out) of the probe's matmul, for the summary


def _median_seconds(fn: object, budget: float) -> float:
    """Median wall time of fn() repeated for about `budget` seconds, after one warm-up call: the median
    because other work on a shared machine makes single runs noisy both ways."""
    import time

    fn()  # type: ignore[operator]
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget and len(times) < 200):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    times.sort()
    return max(times[len(times) // 2], 1e-9)


def probe_shape(structure: object, tokens: int) -> tuple[int, int, int]:
    """(rows, inner, out) of the model's largest block matmul, rows = the step's tokens (capped)."""
    shapes = [
        tuple(s.shape)
        for s, layer in zip(structure.specs, structure.spec_layer, strict=True)  # type: ignore[attr-defined]
        if layer == 0 and len(s.shape) == 2
    ]
    out, inner = max(shapes, key=lambda s: s[0] * s[1]) if shapes else (structure.hidden_size,) * 2  # type: ignore[attr-defined]
    return (max(1, min(tokens, PROBE_MAX_ROWS)), int(inner), int(out))


def measure_host_rates(dtype: str, shape: tuple[int, int, int]) -> MeasuredRates:
    """Time this machine's matmul (x @ w.T at `shape`, in `dtype`) and a large copy; ~2-3 s."""
    import torch

    rows, inner, out = shape
    dt = getattr(torch, dtype)
    x, w = torch.randn(rows, inner, dtype=dt), torch.randn(out, inner, dtype=dt)
    matmul_s = _median_seconds(lambda: x @ w.T, PROBE_SECONDS)
    src = torch.empty(PROBE_COPY_BYTES, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    copy_s = _median_seconds(lambda: dst.copy_(src), PROBE_SECONDS)
    return MeasuredRates(
        flops_per_s=max(1, int(2 * rows * inner * out / matmul_s)),
        memory_bytes_per_s=max(1, int(2 * PROBE_COPY_BYTES / copy_s)),
        shape=shape,
    )


def with_measured_rates(cost: CostModel, hardware: object) -> CostModel:
    """The cost model a plan was made with: its recorded --calibrate figures (chunkft.plan_format.Hardware
    measured_*; 0 means the profile's) in place of the profile's."""
    from dataclasses import replace

    flops = getattr(hardware, "measured_flops_per_s", 0) or cost.flops_per_s
    memory = getattr(hardware, "measured_memory_bytes_per_s", 0) or cost.memory_bytes_per_s
    return replace(cost, flops_per_s=int(flops), memory_bytes_per_s=int(memory))
