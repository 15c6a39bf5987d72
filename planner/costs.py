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
