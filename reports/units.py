"""Display units: everything inside chunkft is integer bytes and float seconds; reports convert here only."""

from __future__ import annotations

GIB = 1 << 30
MIB = 1 << 20


def gib(num_bytes: int | float) -> float:
    """Bytes as GiB (what torch.cuda.memory_allocated reports, divided by 2**30)."""
    return num_bytes / GIB


def ms(seconds: float) -> float:
    return seconds * 1e3


def fmt_bytes(num_bytes: int | float) -> str:
    """Human-readable size: GiB above 1 GiB, MiB below (tiny test models are kilobytes)."""
    if abs(num_bytes) >= GIB:
        return f"{num_bytes / GIB:.2f} GiB"
    if abs(num_bytes) >= MIB:
        return f"{num_bytes / MIB:.1f} MiB"
    return f"{num_bytes / 1024:.1f} KiB"


def fmt_seconds(seconds: float) -> str:
    if seconds >= 10:
        return f"{seconds:.1f} s"
    return f"{seconds * 1e3:.1f} ms"


def byte_scale(max_bytes: int | float) -> tuple[int, str]:
    """(divisor, unit) for an axis: GiB for real models, MiB or KiB so tiny test models stay readable."""
    if max_bytes >= GIB // 2:
        return GIB, "GiB"
    if max_bytes >= MIB // 2:
        return MIB, "MiB"
    return 1024, "KiB"
