"""The one place that says which device a run uses and whether two devices are the same.

`torch.device("cuda")` has no index while every CUDA tensor reports one (`cuda:0`), and
`torch.device("cuda") == torch.device("cuda", 0)` is False; likewise `cpu` and `cpu:0`. Every device the
executor is given goes through `resolve_device`, and every comparison through `same_device`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import TextIO

import torch


class DeviceError(ValueError):
    """A device that does not exist on this machine; one line (what is wrong, what to do)."""


@dataclass(frozen=True)
class CudaInfo:
    """What this machine has, as resolve_device needs it (injectable, so the CPU tests can say "2 GPUs")."""

    available: bool
    count: int
    current: int

    @staticmethod
    def probe() -> CudaInfo:
        if not torch.cuda.is_available():
            return CudaInfo(False, 0, 0)
        # current_device() would start CUDA, and the allocator's settings (configure_allocator) are read
        # when it starts: before that the current device is 0 (set_device starts CUDA itself).
        current = torch.cuda.current_device() if torch.cuda.is_initialized() else 0
        return CudaInfo(True, torch.cuda.device_count(), current)


def resolve_device(spec: str | torch.device | None, cuda: CudaInfo | None = None) -> torch.device:
    """The run's device with its index: None -> the current GPU if there is one, else the CPU;
    "cuda" -> "cuda:<current>"; "cuda:N" as given (checked); "cpu" -> "cpu"."""
    info = cuda if cuda is not None else CudaInfo.probe()
    if spec is None:
        return torch.device("cuda", info.current) if info.available else torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise DeviceError(f"device {spec!r} is not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise DeviceError(f"device {spec!r}: chunkft runs on cpu or cuda, not {device.type}")
    if not info.available:
        raise DeviceError(
            f"device {spec!r}: this machine has no CUDA GPU that torch can use; use --device cpu for a "
            "dry run on the CPU, or run on a machine with a GPU"
        )
    index = info.current if device.index is None else device.index
    if not 0 <= index < info.count:
        raise DeviceError(
            f"device {spec!r}: this machine has {info.count} GPU(s) (cuda:0..cuda:{info.count - 1}); "
            "choose one of them"
        )
    return torch.device("cuda", index)


def same_device(a: torch.device, b: torch.device, cuda: CudaInfo | None = None) -> bool:
    """Whether two devices are the same, with a missing index read as the current one."""
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True  # cpu, cpu:0 and meta have one device each
    if a.index is not None and b.index is not None:
        return a.index == b.index
    current = (cuda if cuda is not None else CudaInfo.probe()).current
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


ALLOC_CONF_ENV = "PYTORCH_CUDA_ALLOC_CONF"


def configure_allocator(
    conf: str,
    device: torch.device,
    log: TextIO,
    *,
    environ: MutableMapping[str, str] | None = None,
    apply: Callable[[str], None] | None = None,
) -> bool:
    """Apply the plan's CUDA caching-allocator settings (e.g. expandable_segments:True, which keeps the
    fragmentation the plan's reserve allows for small) unless the user set PYTORCH_CUDA_ALLOC_CONF, which
    wins. Returns whether the plan's settings were applied. `environ`/`apply` stand in for os.environ and
    torch's setter in the CPU tests."""
    env = os.environ if environ is None else environ
    if not conf or device.type != "cuda":
        return False
    if ALLOC_CONF_ENV in env:
        if env[ALLOC_CONF_ENV] != conf:
            log.write(
                f"chunkft-run: note: {ALLOC_CONF_ENV}={env[ALLOC_CONF_ENV]} is set, the plan recommends "
                f"{conf}; keeping yours\n"
            )
        return False
    if apply is None:
        # Takes effect for memory the allocator reserves from now on, so before the model is built.
        apply = torch.cuda.memory._set_allocator_settings
    apply(conf)
    env[ALLOC_CONF_ENV] = conf  # what a process started from this one (a data loader worker) would use
    return True
