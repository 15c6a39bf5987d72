"""The one place that talks to the NVIDIA driver through NVML (pynvml).

`--gpu auto` needs the card's name (to pick its profile) and its real total and free memory (the
spec-sheet figure is not what a planner should fit into: a display or another process holds some, and
chunkft-plan budgets from what is free). pynvml is imported inside the functions so that the package
imports, and every other GPU name works, on machines without a driver.
"""

from __future__ import annotations

from dataclasses import dataclass

from chunkft.profiles import ProfileError

_HINT = "pass --gpu NAME, e.g. --gpu 4090"


@dataclass(frozen=True)
class NvmlDevice:
    """One GPU as NVML sees it. NVML indices follow PCI order and ignore CUDA_VISIBLE_DEVICES."""

    index: int
    name: str
    memory_total_bytes: int
    memory_free_bytes: int


def _text(value: str | bytes) -> str:
    """Older pynvml releases return bytes for names."""
    return value.decode() if isinstance(value, bytes) else value


def probe_all() -> list[NvmlDevice]:
    """Every GPU NVML reports, or ProfileError with one line saying why none could be read."""
    try:
        import pynvml
    except ImportError as exc:
        raise ProfileError(f"no NVIDIA GPU found through NVML (no pynvml: {exc}); {_HINT}") from None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise ProfileError(f"no NVIDIA GPU found through NVML ({exc}); {_HINT}") from None
    try:
        devices = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            # .free is the figure torch.cuda.mem_get_info() reports (cudaMemGetInfo: memory no process
            # holds), read without creating a CUDA context in the planner's process (which would itself
            # take a few hundred MiB of it, and needs torch built with CUDA).
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            devices.append(
                NvmlDevice(
                    index=index,
                    name=_text(pynvml.nvmlDeviceGetName(handle)),
                    memory_total_bytes=int(memory.total),
                    memory_free_bytes=int(memory.free),
                )
            )
    except pynvml.NVMLError as exc:
        raise ProfileError(f"no NVIDIA GPU found through NVML ({exc}); {_HINT}") from None
    finally:
        pynvml.nvmlShutdown()
    if not devices:
        raise ProfileError(f"no NVIDIA GPU found through NVML (the driver reports 0 devices); {_HINT}")
    return devices


def probe(index: int = 0) -> NvmlDevice:
    """The GPU with this NVML index (the first one by default)."""
    devices = probe_all()
    if not 0 <= index < len(devices):
        n, last = len(devices), len(devices) - 1
        raise ProfileError(f"NVML reports {n} GPU(s); index {index} is out of range; use 0..{last}")
    return devices[index]
