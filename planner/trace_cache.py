"""On-disk cache of what planning derives from a model alone (fake-tensor traces, the parameter
structure), so that a repeated "will it fit" question neither traces nor builds the model again.

Why: tracing is most of a cold plan's time (7 step traces per activation profile, 3 more per
chunked-loss head, one block trace per window-edge pattern the solver meets), and building a model,
even on the meta device, imports its Hugging Face modeling code (about a second). None of it depends on
the GPU, the budget or the search, and the values stored are the integers computed, so a cached plan is
byte-identical to an uncached one.

Where: `$CHUNKFT_CACHE_DIR`, else `$XDG_CACHE_HOME/chunkft`, else `~/.cache/chunkft`: `traces/` holds one
JSON file per activation profile, `models/` one per (config, task). `CHUNKFT_CACHE_DIR=off` (or `none`,
`0`, `false`, `no`, any case) disables the cache: nothing is read or written. An empty value is unset.

Keys (a file is named by its key's SHA-256 and repeats the key; it is used only if that matches): the
model config (`to_dict()` without `_name_or_path` and `dtype`: where the config was read from, and the
dtype Hugging Face writes back into it when a model is built, change nothing traced; the dtype that is
traced is a key of its own), the task, the torch, transformers and Python versions, TRACE_FORMAT, and a
digest of the source files that compute the values (an edited tracer never reads old numbers); a trace
file adds micro-batch, sequence length, dtype, attention, padding, the traced depth and representative
block. Inside a file, values are filed by what else they depend on: chunked-loss heads by chunk size,
window edges by pattern, structures by dtype; each is added when first computed.

Robustness: a file is written to a temporary file and moved into place (os.replace), merged with what
another process added meanwhile; a missing, corrupt, unreadable or mismatching file, or a value that does
not decode, is ignored (computed again and rewritten), and a cache that cannot be written only costs the
time, never an error.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from chunkft.chunks import ParamSpec
from chunkft.files import honour_umask
from chunkft.planner.profile_model import (
    _REPRESENTATIVE,
    TRACE_LAYERS,
    ActivationProfile,
    BlockMemory,
    ModelIdentity,
    ModelStructure,
    Segment,
)

TRACE_FORMAT = 2  # bump when what a file holds, or how it is read, changes
ENV = "CHUNKFT_CACHE_DIR"
OFF = frozenset({"off", "none", "0", "false", "no"})
# What computes the cached values: an edit to any of these invalidates every entry (part of the key).
_SOURCES = (
    "chunkft.planner.profile_model",
    "chunkft.planner.trace_cache",
    "chunkft.executor.measure",
    "chunkft.executor.loss",
    "chunkft.chunks",
)
_IGNORED_CONFIG = ("_name_or_path", "dtype", "torch_dtype")

T = TypeVar("T")
NamedSegments = tuple[tuple[str, Segment], ...]


def cache_dir() -> Path | None:
    """The cache directory, or None when the cache is off."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() in OFF:
        return None
    if value:
        return Path(value).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg) if xdg else Path.home() / ".cache") / "chunkft"


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    """SHA-256 over the computing modules' sources (their names where a source cannot be read)."""
    h = hashlib.sha256()
    for name in _SOURCES:
        try:  # located, not imported: executor.measure alone imports half a second of torch
            spec = importlib.util.find_spec(name)
            path = spec.origin if spec is not None else None
            h.update(Path(path).read_bytes() if path else name.encode())
        except (OSError, ImportError, ValueError):
            h.update(name.encode())
    return h.hexdigest()


def _model_key(config: object, task: str) -> dict[str, Any]:
    import torch
    import transformers

    cfg = json.loads(json.dumps(config.to_dict(), sort_keys=True, default=str))  # type: ignore[attr-defined]
    for name in _IGNORED_CONFIG:
        cfg.pop(name, None)
    return {
        "format": TRACE_FORMAT,
        "config": cfg,
        "task": task,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
        "code": _code_digest(),
    }


def trace_key(
    config: object, task: str, micro_batch: int, seq_len: int, dtype: str, attn: str, padded: bool
) -> dict[str, Any]:
    """Everything an activation profile's traces depend on, as plain JSON values."""
    return {
        **_model_key(config, task),
        "micro_batch": micro_batch,
        "seq_len": seq_len,
        "dtype": dtype,
        "attn": attn,
        "padded": padded,
        "trace_layers": TRACE_LAYERS,
        "representative": _REPRESENTATIVE,
    }


def _canonical(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical(key).encode()).hexdigest()


# ------------------------------------------------------------------------------------------- entry


class Entry:
    """One cache file: sections of named JSON values, read once and rewritten as values are added."""

    def __init__(self, key: dict[str, Any], path: Path) -> None:
        self.key = key
        self.path = path
        self.sections: dict[str, dict[str, Any]] = self._read()

    def _read(self) -> dict[str, dict[str, Any]]:
        """The file's sections if it is this key's and parses, else none (never raises)."""
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            if _canonical(raw["key"]) != _canonical(self.key):
                return {}
            return {name: dict(values) for name, values in raw["sections"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}

    def get(self, section: str, name: str, decode: Callable[[Any], T]) -> T | None:
        """The value decoded, or None when absent or undecodable (then it is computed again)."""
        try:
            return decode(self.sections[section][name])
        except (KeyError, ValueError, TypeError, IndexError, AttributeError):
            return None

    def put(self, section: str, name: str, value: Any) -> None:
        self.sections.setdefault(section, {})[name] = value
        self._save()

    def _save(self) -> None:
        """Merge with the file as it is now (another process may have added values), then replace it
        atomically; a failure to write is ignored (the next run computes the values again)."""
        for section, values in self._read().items():
            self.sections[section] = {**values, **self.sections.get(section, {})}
        text = json.dumps({"key": self.key, "sections": self.sections}, sort_keys=True, indent=1) + "\n"
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            honour_umask(tmp)  # like every file chunkft writes (chunkft/files.py), not mkstemp's 0600
            os.replace(tmp, self.path)
            tmp = None
        except OSError:
            pass
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass


def _open(kind: str, key: dict[str, Any]) -> Entry | None:
    root = cache_dir()
    return None if root is None else Entry(key, root / kind / f"{key_digest(key)}.json")


def open_traces(
    config: object, task: str, micro_batch: int, seq_len: int, dtype: str, attn: str, padded: bool
) -> Entry | None:
    """One activation profile's traces (sections "profile", "heads", "edges", "facts"), or None when
    the cache is off."""
    return _open("traces", trace_key(config, task, micro_batch, seq_len, dtype, attn, padded))


def open_model(config: object, task: str) -> Entry | None:
    """What a (config, task) builds to (sections "class", "structure", "identity"), or None when off."""
    return _open("models", _model_key(config, task))


# ------------------------------------------------------------------------------------------- codec


def _int(v: object) -> int:
    if type(v) is not int:
        raise ValueError(f"not an integer: {v!r}")
    return v


def _str(v: object) -> str:
    if not isinstance(v, str):
        raise ValueError(f"not a string: {v!r}")
    return v


def _bool(v: object) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"not a boolean: {v!r}")
    return v


def encode_segment(s: Segment) -> list[int]:
    return [int(s.delta_bytes), int(s.excursion_bytes), int(s.grad_bytes)]


def decode_segment(v: object) -> Segment:
    if not (isinstance(v, list) and len(v) == 3):
        raise ValueError(f"not a segment: {v!r}")
    return Segment(_int(v[0]), _int(v[1]), _int(v[2]))


def encode_named(items: NamedSegments) -> list[list[Any]]:
    return [[m, encode_segment(s)] for m, s in items]


def decode_named(v: object) -> NamedSegments:
    if not isinstance(v, list):
        raise ValueError("not a list of named segments")
    return tuple((_str(m), decode_segment(s)) for m, s in v)


def encode_block(b: BlockMemory) -> list[list[int]]:
    return [encode_segment(b.fwd), encode_segment(b.bwd)]


def decode_block(v: object) -> BlockMemory:
    if not (isinstance(v, list) and len(v) == 2):
        raise ValueError(f"not a block: {v!r}")
    return BlockMemory(decode_segment(v[0]), decode_segment(v[1]))


def encode_heads(heads: tuple[NamedSegments, NamedSegments]) -> dict[str, Any]:
    return {"fwd": encode_named(heads[0]), "bwd": encode_named(heads[1])}


def decode_heads(v: object) -> tuple[NamedSegments, NamedSegments]:
    if not isinstance(v, dict):
        raise ValueError("not head segments")
    return decode_named(v["fwd"]), decode_named(v["bwd"])


def encode_profile(p: ActivationProfile) -> dict[str, Any]:
    """The traced numbers of a plain-loss profile (its shape is the key's; the tracer stays out)."""
    return {
        "embed_fwd": encode_segment(p.embed_fwd),
        "embed_bwd_trainable": encode_segment(p.embed_bwd_trainable),
        "blocks": [[m, *encode_block(b)] for m, b in p.blocks],
        "head_fwd": encode_named(p.head_fwd),
        "head_bwd": encode_named(p.head_bwd),
        "hidden_bytes": int(p.hidden_bytes),
        "kept_inputs": [[list(types), int(n)] for types, n in p.kept_inputs],
        "block_types": list(p.block_types),
    }


def profile_decoder(key: dict[str, Any]) -> Callable[[Any], ActivationProfile]:
    def decode(d: Any) -> ActivationProfile:
        return ActivationProfile(
            micro_batch=key["micro_batch"],
            seq_len=key["seq_len"],
            dtype=key["dtype"],
            attn_implementation=key["attn"],
            embed_fwd=decode_segment(d["embed_fwd"]),
            embed_bwd_trainable=decode_segment(d["embed_bwd_trainable"]),
            blocks=tuple((_str(m), decode_block([f, b])) for m, f, b in d["blocks"]),
            head_fwd=decode_named(d["head_fwd"]),
            head_bwd=decode_named(d["head_bwd"]),
            hidden_bytes=_int(d["hidden_bytes"]),
            kept_inputs=tuple((tuple(_str(t) for t in ts), _int(n)) for ts, n in d["kept_inputs"]),
            block_types=tuple(_str(t) for t in d["block_types"]),
        )

    return decode


def edge_name(skip_before: int, skip_after: int, input_grad: bool) -> str:
    return f"{skip_before},{skip_after},{int(input_grad)}"


def _encode_specs(specs: tuple[ParamSpec, ...]) -> list[list[Any]]:
    return [[s.name, list(s.shape), s.dtype] for s in specs]


def _decode_specs(v: object) -> tuple[ParamSpec, ...]:
    if not isinstance(v, list):
        raise ValueError("not a list of parameter specs")
    return tuple(ParamSpec(_str(n), tuple(_int(d) for d in shape), _str(dt)) for n, shape, dt in v)


def encode_structure(st: ModelStructure) -> dict[str, Any]:
    return {
        "model_type": st.model_type,
        "task": st.task,
        "num_layers": st.num_layers,
        "hidden_size": st.hidden_size,
        "vocab_size": st.vocab_size,
        "num_attention_heads": st.num_attention_heads,
        "head_dim": st.head_dim,
        "layers_prefix": st.layers_prefix,
        "specs": _encode_specs(st.specs),
        "spec_layer": list(st.spec_layer),
        "tied_embeddings": st.tied_embeddings,
        "unsliceable": list(st.unsliceable),
    }


def decode_structure(d: Any) -> ModelStructure:
    specs = _decode_specs(d["specs"])
    spec_layer = tuple(_int(x) for x in d["spec_layer"])
    if len(spec_layer) != len(specs):
        raise ValueError("spec_layer does not match the specs")
    return ModelStructure(
        model_type=_str(d["model_type"]),
        task=_str(d["task"]),
        num_layers=_int(d["num_layers"]),
        hidden_size=_int(d["hidden_size"]),
        vocab_size=_int(d["vocab_size"]),
        num_attention_heads=_int(d["num_attention_heads"]),
        head_dim=_int(d["head_dim"]),
        layers_prefix=_str(d["layers_prefix"]),
        specs=specs,
        spec_layer=spec_layer,
        tied_embeddings=_bool(d["tied_embeddings"]),
        unsliceable=tuple(_str(n) for n in d["unsliceable"]),
    )


def encode_identity(m: ModelIdentity) -> dict[str, Any]:
    return {"architecture": m.architecture, "num_params": m.num_params, "specs": _encode_specs(m.specs)}


def decode_identity(d: Any) -> ModelIdentity:
    return ModelIdentity(_str(d["architecture"]), _int(d["num_params"]), _decode_specs(d["specs"]))


def decode_attention(v: object) -> tuple[str, ...]:
    if not (isinstance(v, list) and v):
        raise ValueError(f"not a list of attention implementations: {v!r}")
    return tuple(_str(a) for a in v)


def cached(
    entry: Entry | None,
    section: str,
    name: str,
    decode: Callable[[Any], T],
    compute: Callable[[], T],
    encode: Callable[[T], Any],
) -> T:
    """entry's value if it has one that decodes, else compute() (stored in entry when there is one)."""
    hit = entry.get(section, name, decode) if entry is not None else None
    if hit is not None:
        return hit
    value = compute()
    if entry is not None:
        entry.put(section, name, encode(value))
    return value


def decode_bool(v: object) -> bool:
    return _bool(v)
