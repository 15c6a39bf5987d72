"""The streaming safetensors writer: the reference format byte for byte, tied tensors stored once the way
safetensors.torch.load_model expects, and a save that adds one tensor of host memory, not the model."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from tiny_models import tiny_llama

from chunkft.executor import safetensors_stream
from chunkft.executor.safetensors_stream import (
    DTYPES,
    hf_tied_names,
    model_tensors_for_save,
    save_safetensors_streaming,
)

REPO = Path(__file__).parents[1]


def _sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Distinct bytes in every element, for any dtype (float8 and unsigned types included)."""
    g = torch.Generator().manual_seed(seed)
    n = int(torch.tensor(shape).prod()) if shape else 1
    raw = torch.randint(0, 256, (n * torch.empty((), dtype=dtype).element_size(),), generator=g)
    t = raw.to(torch.uint8).view(dtype).reshape(shape)
    if dtype == torch.bool:
        return t.to(torch.uint8).remainder(2).bool()  # a bool must be 0 or 1
    return t


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _every_dtype() -> dict[str, torch.Tensor]:
    tensors = {f"{str(d).removeprefix('torch.')}": _sample(d, (3, 5), i) for i, d in enumerate(DTYPES)}
    tensors["bf16_scalar"] = _sample(torch.bfloat16, ())
    tensors["f32_scalar"] = torch.tensor(2.5)
    tensors["empty"] = torch.zeros(0, 4, dtype=torch.bfloat16)
    tensors["empty_i64"] = torch.zeros(2, 0, dtype=torch.int64)
    tensors["transposed"] = _sample(torch.float32, (4, 6)).t()  # not contiguous: written as its values
    tensors["slice"] = _sample(torch.int16, (10,))[3:7]  # a view with a storage offset
    return tensors


def _header(path: Path) -> tuple[int, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, raw[8 : 8 + n]


def test_round_trip_every_dtype(tmp_path: Path) -> None:
    tensors = _every_dtype()
    assert {"BF16", "F16", "F32", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL"} <= set(DTYPES.values())
    save_safetensors_streaming(tensors, tmp_path / "m.safetensors")
    loaded = load_file(tmp_path / "m.safetensors")
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape, name
        assert _bytes(loaded[name]) == _bytes(t), name


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt"}])
def test_file_is_byte_identical_to_save_file(tmp_path: Path, metadata: dict[str, str] | None) -> None:
    tensors = {k: v.contiguous() for k, v in _every_dtype().items()}  # save_file refuses non-contiguous
    save_file(tensors, tmp_path / "ref.safetensors", metadata=metadata)
    save_safetensors_streaming(tensors, tmp_path / "new.safetensors", metadata)
    assert (tmp_path / "new.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_header_is_aligned_padded_and_read_like_the_reference(tmp_path: Path) -> None:
    """Several metadata keys (the reference orders them arbitrarily, so compare what safe_open reads)."""
    tensors = _every_dtype()
    metadata = {"format": "pt", "z": "last", "a": "first", "ünï": 'quote " and \\ and \n'}
    save_safetensors_streaming(tensors, tmp_path / "new.safetensors", metadata)
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "ref.safetensors", metadata)
    n, header = _header(tmp_path / "new.safetensors")
    assert (8 + n) % 8 == 0 and header == header.rstrip(b" ") + b" " * (len(header) - len(header.rstrip()))
    entries = json.loads(header)
    assert entries == json.loads(_header(tmp_path / "ref.safetensors")[1])
    end = 0
    for name, e in sorted(
        ((k, v) for k, v in entries.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"]
    ):
        start, stop = e["data_offsets"]
        assert start == end and start % tensors[name].element_size() == 0, name  # packed and aligned
        end = stop
    assert (tmp_path / "new.safetensors").stat().st_size == 8 + n + end
    with (
        safe_open(tmp_path / "new.safetensors", "pt") as new,
        safe_open(tmp_path / "ref.safetensors", "pt") as ref,
    ):
        assert new.metadata() == ref.metadata() == metadata
        assert sorted(new.keys()) == sorted(ref.keys())


def test_large_tensors_are_written_in_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(safetensors_stream, "PIECE_BYTES", 7)  # forces many partial writes per tensor
    tensors = _every_dtype()
    save_safetensors_streaming(tensors, tmp_path / "m.safetensors")
    loaded = load_file(tmp_path / "m.safetensors")
    assert all(_bytes(loaded[k]) == _bytes(v) for k, v in tensors.items())


def test_tied_llama_is_stored_once_and_loads_with_load_model(tmp_path: Path) -> None:
    model = tiny_llama(torch.bfloat16, tied=True)
    tensors, metadata = model_tensors_for_save(model)
    save_safetensors_streaming(tensors, tmp_path / "new.safetensors", metadata)
    save_model(model, str(tmp_path / "ref.safetensors"))
    with (
        safe_open(tmp_path / "new.safetensors", "pt") as new,
        safe_open(tmp_path / "ref.safetensors", "pt") as ref,
    ):
        assert sorted(new.keys()) == sorted(ref.keys())  # the same name kept, the tied one dropped
        assert new.metadata() == {"format": "pt", **ref.metadata()}
    assert "lm_head.weight" in tensors and "model.embed_tokens.weight" not in tensors
    fresh = tiny_llama(torch.bfloat16, tied=True)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    load_model(fresh, tmp_path / "new.safetensors")  # strict: every name restored
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_hugging_face_keeps_the_name_from_pretrained_expects() -> None:
    model = tiny_llama(tied=True)
    assert hf_tied_names(model) == ["lm_head.weight"]
    tensors, metadata = model_tensors_for_save(model, discard_names=hf_tied_names(model))
    assert "model.embed_tokens.weight" in tensors and "lm_head.weight" not in tensors
    assert metadata == {"format": "pt", "lm_head.weight": "model.embed_tokens.weight"}


class _Views(torch.nn.Module):
    """Buffers that share one storage in the ways load_model tells apart."""

    def __init__(self) -> None:
        super().__init__()
        whole = torch.arange(12.0)
        self.register_buffer("whole", whole)
        self.register_buffer("head", whole[:6])  # inside `whole`: dropped, `whole` kept
        self.register_buffer("tail", whole[6:])
        self.register_buffer("alone", torch.ones(3))
        self.register_buffer("twin", self.alone)  # the same tensor under two names


def test_shared_storage_is_grouped_like_load_model(tmp_path: Path) -> None:
    module = _Views()
    tensors, metadata = model_tensors_for_save(module)
    save_model(module, str(tmp_path / "ref.safetensors"))
    with safe_open(tmp_path / "ref.safetensors", "pt") as ref:
        assert sorted(tensors) == sorted(ref.keys()) == ["alone", "whole"]
        assert metadata == {"format": "pt", **ref.metadata()}
    save_safetensors_streaming(tensors, tmp_path / "new.safetensors", metadata)
    fresh = _Views()
    for b in fresh.buffers():
        b.zero_()
    load_model(fresh, tmp_path / "new.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(module.buffers(), fresh.buffers(), strict=True))


def test_refuses_what_it_cannot_store(tmp_path: Path) -> None:
    overlap = torch.nn.Module()
    base = torch.arange(10.0)
    overlap.register_buffer("a", base[:6])
    overlap.register_buffer("b", base[4:])  # overlapping, neither the whole storage
    part = torch.nn.Module()
    part.register_buffer("left", base[:5])  # a view of part of a storage, alone in it
    for module in (overlap, part):
        with pytest.raises(ValueError, match="do not cover their whole storage"):
            model_tensors_for_save(module)
        with pytest.raises(RuntimeError, match="None is covering the entire storage"):
            save_model(module, str(tmp_path / "ref.safetensors"))  # the reference refuses them too
    path = tmp_path / "x.safetensors"
    for bad, match in [
        ({"m": torch.empty(3, device="meta")}, "meta device"),
        ({"s": torch.eye(3).to_sparse()}, "dense"),
        ({"n": [1, 2]}, "expected a torch.Tensor"),
    ]:
        with pytest.raises(ValueError, match=match):
            save_safetensors_streaming(bad, path)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="metadata must map str to str"):
        save_safetensors_streaming({"x": torch.ones(1)}, path, {"step": 3})  # type: ignore[dict-item]


# ------------------------------------------------------------------------------------ host memory

MEMORY = textwrap.dedent(
    """
    import sys, torch
    from safetensors.torch import save_file, save_model
    from chunkft.executor import safetensors_stream
    from chunkft.executor.safetensors_stream import model_tensors_for_save, save_safetensors_streaming

    how, path, rows, piece = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    safetensors_stream.PIECE_BYTES = piece
    model = torch.nn.Module()
    for i in range(8):  # 8 tensors of rows x 4096 fp32
        w = torch.full((rows, 4096), float(i))
        if how != "old-file":
            w = w.t()  # must be copied to be written, as every tensor on a GPU must be
        model.register_parameter(f"w{i}", torch.nn.Parameter(w))
    def peak():
        # VmHWM, this process's peak RSS in KiB: ru_maxrss would also count the forking parent's (pytest's)
        # RSS, which getrusage carries across exec, and hide anything below it
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])

    before = peak()
    if how == "old-file":
        save_file(model.state_dict(), path)
    elif how == "old":
        save_model(model, path)  # what save_checkpoint did
    else:
        tensors, metadata = model_tensors_for_save(model)
        save_safetensors_streaming(tensors, path, metadata)
    print((peak() - before) * 1024)
    """
)


def _peak_increase(tmp_path: Path, rows: int, piece: int, hows: tuple[str, ...]) -> dict[str, int]:
    """Each way of saving in its own fresh process, run side by side; the peak RSS each save added."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("needs Linux /proc to read a process's peak RSS")
    script = tmp_path / "memory.py"
    script.write_text(MEMORY)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = {
        how: subprocess.Popen(
            [sys.executable, str(script), how, str(tmp_path / f"{how}.safetensors"), str(rows), str(piece)],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        for how in hows
    }
    out = {}
    for how, proc in procs.items():
        stdout, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, how
        out[how] = int(stdout.strip())
    print({k: f"{v / 2**20:.1f} MiB" for k, v in out.items()}, f"of {8 * rows * 4096 * 4 / 2**20:.0f} MiB")
    return out


@pytest.mark.parametrize(
    "rows, piece",
    [(512, 2 << 20), pytest.param(3200, 64 << 20, marks=pytest.mark.slow)],  # ~4 s, ~20 s
)
def test_streaming_adds_one_piece_of_host_memory_not_the_model(tmp_path: Path, rows: int, piece: int) -> None:
    """save_model makes a contiguous host copy of every tensor before writing (and save_file moves every
    GPU tensor to the host and keeps them all until the end); the streaming writer copies one piece at a
    time into one reused buffer. Transposed parameters stand in for GPU ones: both need a host copy to
    be written. (Contiguous CPU tensors are written in place by save_file too, since safetensors 0.5:
    the slow 400 MiB case shows old-file adding nothing.)"""
    tensor_bytes, total = rows * 4096 * 4, 8 * rows * 4096 * 4
    hows = ("old", "new", "old-file") if rows > 512 else ("old", "new")
    increase = _peak_increase(tmp_path, rows, piece, hows)
    assert increase["old"] > 0.8 * total  # the whole model copied at once
    assert increase["new"] < min(2 * tensor_bytes, piece + tensor_bytes // 2)  # one piece at a time
    if "old-file" in increase:
        assert increase["old-file"] < 2 * tensor_bytes
    new, ref = load_file(tmp_path / "new.safetensors"), load_file(tmp_path / "old.safetensors")
    assert set(new) == set(ref) and all(torch.equal(new[k], ref[k]) for k in ref)
