"""Write .safetensors files piece by piece, so a checkpoint never holds a second copy of the model.

`safetensors.torch.save_file` moves every non-CPU tensor to the host and keeps all of those copies
alive until the file is written (and `save_model` / `save_pretrained` first make a contiguous copy of
every tensor): for Llama-3-8B in bf16 that is ~16 GiB of host memory on top of the pinned optimizer
states. Here tensors are written one after another; a tensor that must be copied to be written (on a
GPU, or not contiguous) goes through one reused host buffer of PIECE_BYTES (64 MiB), so the host memory
a save adds is one piece, not the model. Contiguous CPU tensors are written from their own memory.

The file is the standard format (https://github.com/huggingface/safetensors#format): an 8-byte
little-endian header length N, N bytes of compact JSON (`__metadata__` first, then each tensor's
dtype, shape and data_offsets) padded with spaces so the data starts 8-byte aligned, then the raw
bytes. Tensors are laid out in the order the reference writer uses (widest dtype first, then by name),
which keeps each tensor aligned to its element size, so the output is byte-identical to `save_file`'s.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import sys
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, BinaryIO

import torch
from safetensors import safe_open

ALIGN = 8  # the data section starts at a multiple of this (the header is padded with spaces)
PIECE_BYTES = 64 << 20  # the most bytes copied to the host, or handed to one write(), at a time


def _dtype_table() -> dict[torch.dtype, str]:
    """torch dtype -> safetensors name, in the reference writer's layout order (narrowest first)."""
    names = [
        ("bool", "BOOL"),
        ("uint8", "U8"),
        ("int8", "I8"),
        ("float8_e5m2", "F8_E5M2"),
        ("float8_e4m3fn", "F8_E4M3"),
        ("float8_e4m3fnuz", "F8_E4M3FNUZ"),
        ("float8_e5m2fnuz", "F8_E5M2FNUZ"),
        ("int16", "I16"),
        ("uint16", "U16"),
        ("float16", "F16"),
        ("bfloat16", "BF16"),
        ("int32", "I32"),
        ("uint32", "U32"),
        ("float32", "F32"),
        ("complex64", "C64"),
        ("float64", "F64"),
        ("int64", "I64"),
        ("uint64", "U64"),
    ]
    return {getattr(torch, t): s for t, s in names if hasattr(torch, t)}  # older torch lacks some


DTYPES = _dtype_table()
_RANK = {d: i for i, d in enumerate(DTYPES)}


def save_safetensors_streaming(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> None:
    """Write `tensors` to `path` as a .safetensors file, adding at most one piece of host memory.

    Contiguous CPU tensors are written from their own memory; others (on a GPU, or strided) are copied
    to one reused host buffer PIECE_BYTES at a time and written from there. Tensors that share memory
    are written as separate copies (use model_tensors_for_save to store tied ones once). The file is
    written in place: atomicity is the caller's job.
    """
    if sys.byteorder != "little":
        raise NotImplementedError(
            "safetensors files are little-endian; this writer needs a little-endian host"
        )
    order = _layout_order(tensors)
    with open(path, "wb") as f:
        _write_header(f, tensors, order, metadata)
        staging = _Staging()
        for name in order:
            _write_tensor(f, tensors[name], staging)


def save_safetensors_gathered(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: dict[str, str] | None,
    write: bool,
) -> None:
    """save_safetensors_streaming for weights sharded by FSDP2 (DTensors): every rank calls it, each
    DTensor is gathered whole one at a time (a collective, in the same order on every rank), and the
    rank with `write` writes it. Adds one whole tensor at a time to each rank."""
    from torch.distributed.tensor import DTensor  # here: the planner imports this module for PIECE_BYTES

    order = _layout_order(tensors)
    with open(path, "wb") if write else contextlib.nullcontext() as f:
        if f is not None:
            _write_header(f, tensors, order, metadata)
        staging = _Staging()
        for name in order:
            t = tensors[name]
            whole = t.full_tensor() if isinstance(t, DTensor) else t
            if f is not None:
                _write_tensor(f, whole, staging)
            del whole


def sharded_tensors_for_save(
    model: torch.nn.Module, discard_names: Iterable[str] = ()
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """model_tensors_for_save for a model sharded by FSDP2: tied names are the same parameter object
    (its local shard is a view into FSDP's padded storage, so the storage rule does not apply)."""
    state = model.state_dict()
    discard = set(discard_names)
    metadata: dict[str, str] = {"format": "pt"}
    groups: dict[int, list[str]] = defaultdict(list)
    for name, t in state.items():
        groups[id(t)].append(name)
    for names in groups.values():
        names.sort()
        keep = next((n for n in names if n not in discard), names[0])
        for name in names:
            if name != keep:
                metadata.setdefault(name, keep)
                del state[name]
    return state, metadata


def load_sharded_rows(
    model: torch.nn.Module, paths: Sequence[str | os.PathLike[str]], rank: int, size: int
) -> list[str]:
    """Fill a model sharded by FSDP2 from .safetensors files written whole (one, or a Hugging Face
    directory's shards), each rank reading only the dim-0 rows of its shards (safetensors reads slices):
    the whole model is never in one rank's memory. A name no file holds is found under the one a file's
    metadata maps it to (a tied tensor stored once), or is skipped when it is the same parameter as a
    name already loaded (Hugging Face files omit a tied head). Returns the names still missing."""
    from torch.distributed.tensor import DTensor

    from chunkft.executor.distributed import World, local_rows

    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(safe_open(str(p), framework="pt")) for p in paths]
        sources, missing = _sources(model.state_dict(), files)
        for name, t, f, src in sources:
            if not isinstance(t, DTensor):
                t.detach().copy_(f.get_tensor(src))
            else:
                try:
                    local, r0, r1 = local_rows(t, World(rank, size))
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from None
                if r1 > r0:
                    local.detach().copy_(f.get_slice(src)[r0:r1])
    return missing


def missing_weights(model: torch.nn.Module, paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """The model's names load_sharded_rows would find in none of the files (headers only are read)."""
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(safe_open(str(p), framework="pt")) for p in paths]
        return _sources(model.state_dict(), files)[1]


def _sources(state: Mapping[str, torch.Tensor], files: Sequence[Any]) -> tuple[list[tuple], list[str]]:
    """([(name, tensor, file, name in the file)], missing names): a name the files lack is looked up
    under the name a file's metadata maps it to, and skipped when its tensor (a tied parameter) is
    loaded under another name."""
    where = {k: f for f in files for k in f.keys()}
    aliases = {k: v for f in files for k, v in (f.metadata() or {}).items()}
    found, missing, done = [], [], set()
    for name in sorted(state, key=lambda n: n not in where):  # names the files hold first
        t = state[name]
        src = name if name in where else aliases.get(name)
        if src in where:
            found.append((name, t, where[src], src))
            done.add(id(t))
        elif id(t) not in done:
            missing.append(name)
    return found, missing


def model_tensors_for_save(
    model: torch.nn.Module, discard_names: Iterable[str] = ()
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's state_dict with tied tensors stored once, and the file metadata, as save_model does.

    Names are grouped the way `safetensors.torch.load_model` groups them on load, so that function finds
    every tensor the file lacks under a name it keeps. Of each group the alphabetically first name that
    covers the whole storage is kept, preferring names outside `discard_names` (pass Hugging Face's
    tied keys to keep the name `from_pretrained` expects); each dropped name is recorded in the
    metadata as `dropped -> kept`, and `format: pt` marks the file as PyTorch's (transformers reads it).
    Nothing is copied: the values are the state_dict's own tensors, on whatever device they are.
    """
    state = model.state_dict()
    discard = set(discard_names)
    metadata: dict[str, str] = {"format": "pt"}
    for group in _shared_groups(state):
        complete = sorted(n for n in group if _covers_storage(state[n]))
        if not complete:  # save_model refuses these too, and load_model could not restore them
            raise ValueError(
                f"tensors {sorted(group)} are views that do not cover their whole storage; clone them "
                "or save the tensor they are views of"
            )
        keep = next((n for n in complete if n not in discard), complete[0])
        for name in sorted(group - {keep}):
            metadata.setdefault(name, keep)
            del state[name]
    return state, metadata


def hf_tied_names(model: torch.nn.Module) -> list[str]:
    """The names Hugging Face's save_pretrained drops from tied groups (its `_tied_weights_keys`).

    Keeping the other name of each group (e.g. model.embed_tokens.weight, not lm_head.weight) writes the
    file save_pretrained would, so from_pretrained finds the weight under the name it loads first.
    """
    names = []
    for prefix, module in model.named_modules():
        tied = getattr(module, "_tied_weights_keys", None) or ()
        for key in tied.keys() if isinstance(tied, dict) else tied:
            names.append(f"{prefix}.{key}" if prefix else key)
    return names


# ------------------------------------------------------------------------------------------ helpers


def _layout_order(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Widest dtype first, then by name: every tensor starts at a multiple of its element size."""
    for name, t in tensors.items():
        _check_saveable(name, t)
    return sorted(tensors, key=lambda n: (-_RANK[tensors[n].dtype], n))


def _check_saveable(name: str, t: object) -> None:
    if not isinstance(name, str):
        raise ValueError(f"tensor name {name!r} is not a string")
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise ValueError(f"{name}: {t.layout} tensors cannot be saved; make it dense first")
    if t.dtype not in DTYPES:
        raise ValueError(f"{name}: dtype {t.dtype} has no safetensors equivalent")
    if t.device.type == "meta":
        raise ValueError(f"{name}: is on the meta device and has no data to save")


def _write_header(
    f: BinaryIO, tensors: Mapping[str, torch.Tensor], order: list[str], metadata: dict[str, str] | None
) -> None:
    header = _header(tensors, order, metadata)
    f.write(struct.pack("<Q", len(header)))
    f.write(header)


def _header(tensors: Mapping[str, torch.Tensor], order: list[str], metadata: dict[str, str] | None) -> bytes:
    """The JSON header, space-padded so that 8 + its length is a multiple of ALIGN."""
    entries: dict[str, object] = {}
    if metadata is not None:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise ValueError(f"metadata must map str to str; not so for {bad[:3]}")
        entries["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        entries[name] = {
            "dtype": DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    return raw + b" " * (-len(raw) % ALIGN)


class _Staging:
    """One host buffer, reused for every piece that must be copied, grown only when a piece is larger.

    Reusing it keeps the added host memory at one piece (PIECE_BYTES, or one row of a tensor that is
    not contiguous when that is larger) and avoids the heap growth that freeing and allocating a fresh
    aligned copy per tensor causes with glibc malloc.
    """

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None

    def like(self, piece: torch.Tensor) -> torch.Tensor:
        """A contiguous host tensor of the piece's shape and dtype, on the staging memory."""
        nbytes = piece.numel() * piece.element_size()
        if self._buf is None or self._buf.numel() < nbytes:
            self._buf = None  # drop the old buffer before allocating the larger one
            self._buf = torch.empty(nbytes, dtype=torch.uint8)
        return self._buf[:nbytes].view(piece.dtype).view(piece.shape)


def _write_tensor(f: BinaryIO, t: torch.Tensor, staging: _Staging) -> None:
    """Write one tensor's bytes in row-major order; copy to the host piece by piece only if it must."""
    t = t.detach()
    if t.numel() == 0:
        return
    if t.device.type == "cpu" and t.is_contiguous():
        _write_bytes(f, t)  # straight from the tensor's own memory
        return
    for piece in _pieces(t):
        host = staging.like(piece)
        host.copy_(piece)  # device -> host and/or strided -> contiguous, PIECE_BYTES at a time
        _write_bytes(f, host)


def _pieces(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """Consecutive views of t whose row-major bytes, concatenated, are t's (about PIECE_BYTES each)."""
    if t.is_contiguous():
        flat = t.reshape(-1)  # a view: no copy on any device
        step = max(1, PIECE_BYTES // t.element_size())
    else:  # blocks of whole rows: each block's row-major order is a stretch of t's
        flat = t
        step = max(1, PIECE_BYTES // (t[0].numel() * t.element_size()))
    for start in range(0, flat.shape[0], step):
        yield flat[start : start + step]


def _write_bytes(f: BinaryIO, t: torch.Tensor) -> None:
    """Write a contiguous CPU tensor's raw bytes (as uint8: numpy has no bf16 or float8)."""
    data = memoryview(t.reshape(-1).view(torch.uint8).numpy())
    for start in range(0, len(data), PIECE_BYTES):  # one write() may do less than asked above ~2 GiB
        f.write(data[start : start + PIECE_BYTES])


def _shared_groups(state: Mapping[str, torch.Tensor]) -> list[set[str]]:
    """Every name, grouped with those whose tensors overlap it in memory, as load_model groups them.

    Tensors on the same storage are swept in address order and a name joins the current group while it
    starts before the end of the *previous* tensor; that is load_model's rule, and matching it (rather
    than the stricter running maximum) is what lets load_model restore every name the file lacks.
    """
    by_storage: dict[tuple[torch.device, int, int], list[str]] = defaultdict(list)
    for name, t in state.items():
        if t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() != 0 and storage.nbytes() != 0:
            by_storage[(t.device, storage.data_ptr(), storage.nbytes())].append(name)
    groups: list[set[str]] = []
    for names in by_storage.values():
        areas = sorted((state[n].data_ptr(), _end_ptr(state[n]), n) for n in names)
        groups.append({areas[0][2]})
        last_stop = areas[0][1]
        for start, stop, name in areas[1:]:
            if start >= last_stop:
                groups.append({name})
            else:
                groups[-1].add(name)
            last_stop = stop
    return groups


def _end_ptr(t: torch.Tensor) -> int:
    """One past the last byte of the tensor's last element (its start when empty)."""
    if t.numel() == 0:
        return t.data_ptr()
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
    return t.data_ptr() + (last + 1) * t.element_size()


def _covers_storage(t: torch.Tensor) -> bool:
    """True when the tensor is its whole storage: keeping it keeps every byte of the group."""
    storage = t.untyped_storage()
    return t.data_ptr() == storage.data_ptr() and t.numel() * t.element_size() == storage.nbytes()
