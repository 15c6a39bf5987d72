"""GPU and model profiles: the figures the planner plans with, each traceable to a source.

GPU profiles and model presets are JSON data files shipped inside the package (read through
importlib.resources, so a wheel install works the same as a checkout). A model may also be a local
Hugging Face directory or a hub id. Everything is integer bytes, FLOP/s and bytes/s; units appear only
when a caller displays them.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

if __name__ != "chunkft.profiles":  # this folder imported by its bare name from a checkout
    raise ImportError(f"import chunkft.profiles, not {__name__} (chunkft's packages are chunkft.*)")

__all__ = [
    "FLOP_DTYPES",
    "TASKS",
    "FrozenMap",
    "GpuProfile",
    "ModelPreset",
    "ProfileError",
    "build_model",
    "count_params",
    "list_gpus",
    "list_models",
    "load_gpu",
    "load_model",
]

Task = Literal["causal-lm", "sequence-classification"]
TASKS: tuple[str, ...] = ("causal-lm", "sequence-classification")
# The dtypes every GPU profile gives a dense FLOP/s figure for.
FLOP_DTYPES: tuple[str, ...] = ("bfloat16", "float16", "float32")
# Figures a GPU file must carry a source for ("pcie" covers generation and lanes).
_GPU_FIGURES: tuple[str, ...] = (
    "memory_total_bytes",
    "memory_bandwidth_bytes_per_s",
    *(f"flops_per_s.{d}" for d in FLOP_DTYPES),
    "pcie",
    "h2d_bytes_per_s",
    "d2h_bytes_per_s",
    "interconnect_bytes_per_s",
)
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")

V = TypeVar("V")


class ProfileError(Exception):
    """A profile or model that cannot be found or read; the message is one line: what is wrong, what to do."""


class FrozenMap(Mapping[str, V]):
    """A read-only, hashable str-keyed mapping, so that frozen profiles stay frozen all the way down."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, V] | Iterable[tuple[str, V]] = ()) -> None:
        self._items: dict[str, V] = dict(items)

    def __getitem__(self, key: str) -> V:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._items.items())))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._items) == dict(other.items())

    def __repr__(self) -> str:
        return f"FrozenMap({self._items!r})"


# ---------------------------------------------------------------------------------------------- GPUs


@dataclass(frozen=True, kw_only=True)
class GpuProfile:
    """One GPU model's figures. memory_free_bytes is None unless the profile came from probing a real card."""

    key: str
    name: str  # as NVML reports it
    memory_total_bytes: int
    memory_free_bytes: int | None
    memory_bandwidth_bytes_per_s: int
    flops_per_s: FrozenMap[int]  # dtype name -> dense FLOP/s (matmul on tensor cores; float32 without TF32)
    pcie_gen: int | None  # None for the host itself ("cpu")
    pcie_lanes: int | None
    h2d_bytes_per_s: int  # pinned, achievable (not the link's raw rate)
    d2h_bytes_per_s: int
    interconnect_bytes_per_s: int  # GPU to GPU, per direction (NVLink or PCIe)
    sources: FrozenMap[str]  # figure name -> where it comes from
    aliases: tuple[str, ...]
    notes: str = ""


def _norm(name: str) -> str:
    """Alias matching ignores case, spaces, dashes and underscores."""
    return re.sub(r"[\s_\-]+", "", name.strip().lower())


def _loose(normed: str) -> str:
    """A second chance for vendor prefixes: 'GeForce RTX 4090' and 'NVIDIA RTX 4090' mean rtx-4090."""
    return re.sub(r"^(nvidia)?(geforce)?", "", normed)


def _data_files(folder: str) -> list[tuple[str, Any]]:
    """(stem, parsed JSON) of every file in profiles/<folder>, via importlib.resources."""
    out = []
    for entry in sorted(resources.files("chunkft.profiles").joinpath(folder).iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            try:
                out.append((entry.name[: -len(".json")], json.loads(entry.read_text(encoding="utf-8"))))
            except json.JSONDecodeError as exc:
                origin = f"profiles/{folder}/{entry.name}"
                raise ProfileError(f"{origin} is not valid JSON ({exc}); fix the file") from None
    return out


def _positive_int(data: Mapping[str, Any], field: str, origin: str, *, optional: bool = False) -> int | None:
    value = data.get(field)
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ProfileError(f"{origin}: {field} must be a positive integer, got {value!r}; fix the file")
    return value


def _gpu_from_dict(data: Mapping[str, Any], origin: str) -> GpuProfile:
    """Validate one GPU file: every figure present, integer, and with a source."""
    allowed = {
        "key", "name", "aliases", "memory_total_bytes", "memory_bandwidth_bytes_per_s", "flops_per_s",
        "pcie_gen", "pcie_lanes", "h2d_bytes_per_s", "d2h_bytes_per_s", "interconnect_bytes_per_s",
        "sources", "notes",
    }
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ProfileError(f"{origin}: unknown field(s) {', '.join(unknown)}; fix the file")
    flops = data.get("flops_per_s")
    if not isinstance(flops, Mapping) or sorted(flops) != sorted(FLOP_DTYPES):
        raise ProfileError(f"{origin}: flops_per_s must give exactly {', '.join(FLOP_DTYPES)}; fix the file")
    sources = data.get("sources")
    if not isinstance(sources, Mapping):
        raise ProfileError(f"{origin}: sources must map each figure to its source; fix the file")
    missing = [f for f in _GPU_FIGURES if not str(sources.get(f, "")).strip()]
    if missing:
        raise ProfileError(f"{origin}: no source for {', '.join(missing)}; add one to 'sources'")
    optional_link = data.get("pcie_gen") is None
    return GpuProfile(
        key=str(data["key"]),
        name=str(data["name"]),
        memory_total_bytes=_positive_int(data, "memory_total_bytes", origin),
        memory_free_bytes=None,
        memory_bandwidth_bytes_per_s=_positive_int(data, "memory_bandwidth_bytes_per_s", origin),
        flops_per_s=FrozenMap({d: _positive_int(flops, d, f"{origin} flops_per_s") for d in FLOP_DTYPES}),
        pcie_gen=_positive_int(data, "pcie_gen", origin, optional=True),
        pcie_lanes=_positive_int(data, "pcie_lanes", origin, optional=optional_link),
        h2d_bytes_per_s=_positive_int(data, "h2d_bytes_per_s", origin),
        d2h_bytes_per_s=_positive_int(data, "d2h_bytes_per_s", origin),
        interconnect_bytes_per_s=_positive_int(data, "interconnect_bytes_per_s", origin),
        sources=FrozenMap({str(k): str(v) for k, v in sources.items()}),
        aliases=tuple(str(a) for a in data.get("aliases", ())),
        notes=str(data.get("notes", "")),
    )


def _alias_index(entries: Iterable[tuple[str, Iterable[str]]], kind: str) -> dict[str, str]:
    """Normalised alias -> key, strict forms first then prefix-stripped ones; a clash is a data error."""
    index: dict[str, str] = {}
    loose: dict[str, str] = {}
    for key, aliases in entries:
        for alias in (key, *aliases):
            for table, form in ((index, _norm(alias)), (loose, _loose(_norm(alias)))):
                if form and table.setdefault(form, key) != key:
                    clash = f"{kind} alias '{alias}' names both {table[form]} and {key}"
                    raise ProfileError(f"{clash}; fix the data files")
    for form, key in loose.items():
        index.setdefault(form, key)
    return index


@lru_cache(maxsize=1)
def _gpus() -> dict[str, GpuProfile]:
    profiles = {}
    for stem, data in _data_files("gpus"):
        origin = f"profiles/gpus/{stem}.json"
        if not isinstance(data, Mapping) or data.get("key") != stem:
            raise ProfileError(f"{origin}: 'key' must equal the file name '{stem}'; fix the file")
        profiles[stem] = _gpu_from_dict(data, origin)
    return profiles


@lru_cache(maxsize=1)
def _gpu_index() -> dict[str, str]:
    return _alias_index(((p.key, (p.name, *p.aliases)) for p in _gpus().values()), "GPU")


def _closest(query: str, index: Mapping[str, str], limit: int = 2) -> list[str]:
    """Keys whose aliases look most like the query, best first (difflib ratio)."""
    keys: list[str] = []
    for form in difflib.get_close_matches(_norm(query), list(index), n=20, cutoff=0.6):
        if index[form] not in keys:
            keys.append(index[form])
    return keys[:limit]


def _unknown(kind: str, query: str, index: Mapping[str, str], listing: str, extra: str = "") -> ProfileError:
    close = _closest(query, index)
    hint = f"closest: {', '.join(close)}" if close else f"known: {', '.join(sorted(set(index.values())))}"
    return ProfileError(f"unknown {kind} '{query}'; {hint} (see `{listing}`){extra}")


def _lookup(query: str, index: Mapping[str, str]) -> str | None:
    normed = _norm(query)
    return index.get(normed) or index.get(_loose(normed))


def list_gpus() -> list[GpuProfile]:
    """Every shipped GPU profile, sorted by key."""
    return [_gpus()[k] for k in sorted(_gpus())]


def load_gpu(name: str) -> GpuProfile:
    """A profile key or alias ('4090', 'RTX 4090', 'NVIDIA GeForce RTX 4090'), or 'auto' to probe NVML."""
    if _norm(name) == "auto":
        return _probe_gpu()
    key = _lookup(name, _gpu_index())
    if key is None:
        raise _unknown("GPU", name, _gpu_index(), "chunkft-plan --list-gpus")
    return _gpus()[key]


def _probe_gpu() -> GpuProfile:
    """The first NVML device's profile, with its measured total and free memory instead of the nominal."""
    from chunkft.profiles import nvml

    device = nvml.probe()
    key = _lookup(device.name, _gpu_index())
    if key is None:
        close = _closest(device.name, _gpu_index())
        nearest = f"closest: {', '.join(close)}; " if close else ""
        raise ProfileError(
            f"the GPU NVML reports, '{device.name}', has no profile; "
            f"{nearest}pass --gpu NAME for the nearest card"
        )
    profile = _gpus()[key]
    measured = f"measured through NVML on device {device.index} ('{device.name}')"
    return replace(
        profile,
        memory_total_bytes=device.memory_total_bytes,
        memory_free_bytes=device.memory_free_bytes,
        sources=FrozenMap({**profile.sources, "memory_total_bytes": measured, "memory_free_bytes": measured}),
    )


# -------------------------------------------------------------------------------------------- models


@dataclass(frozen=True, kw_only=True, eq=False)
class ModelPreset:
    """An architecture to plan or train: a HF config plus where it came from.

    Compared and hashed by identity: the config is a mutable Hugging Face object, and load_model gives
    every caller a fresh one so that nobody's edits leak into another's preset.
    """

    key: str  # preset key, absolute directory, or hub id
    config: PretrainedConfig
    task: Task
    published_num_params: int | None  # for the preset's own task; None for directories, hub ids, overrides
    # "hf-config": a directory's config trained from a random initialisation (chunkft-plan --random-init)
    source: Literal["preset", "hf-dir", "hf-config", "hub"]
    path: str | None  # the directory for "hf-dir" and "hf-config"
    has_weights: bool
    sources: FrozenMap[str]
    aliases: tuple[str, ...] = ()


@lru_cache(maxsize=1)
def _model_files() -> dict[str, dict[str, Any]]:
    files = {}
    for stem, data in _data_files("models"):
        origin = f"profiles/models/{stem}.json"
        if not isinstance(data, Mapping) or data.get("key") != stem:
            raise ProfileError(f"{origin}: 'key' must equal the file name '{stem}'; fix the file")
        if data.get("task") not in TASKS:
            raise ProfileError(f"{origin}: task must be one of {', '.join(TASKS)}; fix the file")
        if not isinstance(data.get("config"), Mapping) or "model_type" not in data["config"]:
            raise ProfileError(f"{origin}: 'config' must be a HF config dict with model_type; fix the file")
        files[stem] = data
    return files


@lru_cache(maxsize=1)
def _model_index() -> dict[str, str]:
    return _alias_index(((k, d.get("aliases", ())) for k, d in _model_files().items()), "model")


def _check_task(task: str | None) -> None:
    if task is not None and task not in TASKS:
        raise ProfileError(f"unknown task '{task}'; pass one of {', '.join(TASKS)}")


def _infer_task(config: PretrainedConfig, what: str) -> Task:
    """The head a directory or hub config implies: its architectures, else its model family."""
    for arch in getattr(config, "architectures", None) or ():
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal-lm"
        if arch.endswith("ForSequenceClassification"):
            return "sequence-classification"
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:  # an encoder (BERT-like): classify
        return "sequence-classification"
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal-lm"
    raise ProfileError(f"cannot tell the task of {what} (model_type {config.model_type}); pass task=")


def _preset(key: str, task: str | None) -> ModelPreset:
    from transformers import AutoConfig

    data = _model_files()[key]
    config_dict = dict(data["config"])
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    overridden = task is not None and task != data["task"]
    published = data.get("published_num_params")
    return ModelPreset(
        key=key,
        config=config,
        task=task if task is not None else data["task"],
        published_num_params=None if overridden or published is None else int(published),
        source="preset",
        path=None,
        has_weights=False,
        sources=FrozenMap({str(k): str(v) for k, v in data.get("sources", {}).items()}),
        aliases=tuple(data.get("aliases", ())),
    )


def _hf_dir(path: str, task: str | None) -> ModelPreset:
    from transformers import AutoConfig

    path = os.path.abspath(path)
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ProfileError(f"directory '{path}' has no config.json; pass a HF model directory or a preset")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ProfileError(f"cannot read '{config_path}' ({first}); fix or replace the file") from None
    return ModelPreset(
        key=path,
        config=config,
        task=task if task is not None else _infer_task(config, f"'{path}'"),
        published_num_params=None,
        source="hf-dir",
        path=path,
        has_weights=any(os.path.isfile(os.path.join(path, f)) for f in _WEIGHT_FILES),
        sources=FrozenMap({"config": config_path}),
    )


def _hub_resolves() -> bool:
    """Whether the hub's host name resolves (or a proxy is set): offline, huggingface_hub would retry
    for about 20 s with log noise before failing, and a CLI should say "offline" at once."""
    import socket
    import urllib.parse
    import urllib.request

    from huggingface_hub import constants

    if urllib.request.getproxies():
        return True
    host = urllib.parse.urlparse(constants.ENDPOINT).hostname or ""
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _hub(repo_id: str, task: str | None) -> ModelPreset:
    from transformers import AutoConfig

    fail = f"cannot fetch '{repo_id}' from the hub (offline?{{}}); pass a local directory with config.json"
    try:
        config = AutoConfig.from_pretrained(repo_id, local_files_only=True)  # the local HF cache first
    except Exception:  # not cached (or unreadable): go to the network
        if not _hub_resolves():
            raise ProfileError(fail.format("")) from None
        try:
            config = AutoConfig.from_pretrained(repo_id)
        except Exception as exc:  # any hub, network or parsing failure reads the same to the user
            raise ProfileError(fail.format(f" {type(exc).__name__}")) from None
    return ModelPreset(
        key=repo_id,
        config=config,
        task=task if task is not None else _infer_task(config, f"'{repo_id}'"),
        published_num_params=None,
        source="hub",
        path=None,
        has_weights=False,
        sources=FrozenMap({"config": f"Hugging Face hub: {repo_id}/config.json"}),
    )


def list_models() -> list[ModelPreset]:
    """Every shipped preset, sorted by key."""
    return [_preset(k, None) for k in sorted(_model_files())]


def load_model(name_or_path: str, task: str | None = None) -> ModelPreset:
    """A local HF directory (if one exists at that path), else a preset key/alias, else a hub id ('org/name').

    task overrides the preset's or the inferred head, e.g. a bare encoder directory used for classification.
    """
    _check_task(task)
    expanded = os.path.expanduser(name_or_path)
    if os.path.isdir(expanded):
        return _hf_dir(expanded, task)
    key = _lookup(name_or_path, _model_index())
    if key is not None:
        return _preset(key, task)
    if os.path.exists(expanded):
        raise ProfileError(f"'{name_or_path}' is a file; pass the directory that holds config.json")
    if name_or_path.startswith((".", "/", "~")):
        raise ProfileError(f"no such directory '{name_or_path}'; pass a HF model directory or a preset")
    if "/" in name_or_path:
        return _hub(name_or_path, task)
    raise _unknown("model", name_or_path, _model_index(), "chunkft-plan --list-models",
                   "; or pass a local directory with config.json")


def build_model(
    preset: ModelPreset,
    device: str | torch.device = "meta",
    dtype: torch.dtype = torch.float32,
    *,
    load_weights: bool = False,
) -> PreTrainedModel:
    """An unmodified Hugging Face model for the preset's task, built inside torch.device(device).

    On "meta" nothing is allocated, so planning a 70B model costs no memory. load_weights=True reads
    the weights of a local directory (from_pretrained) instead of initialising at random.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if preset.task == "causal-lm" else AutoModelForSequenceClassification
    config = copy.deepcopy(preset.config)  # HF may write to the config; the preset stays as loaded
    if not load_weights:
        with torch.device(device):
            return auto.from_config(config, dtype=dtype)
    if preset.source != "hf-dir" or not preset.has_weights:
        raise ProfileError(
            f"'{preset.key}' has no local weights to load (*.safetensors, pytorch_model.bin); copy the "
            "weights in, or plan it with chunkft-plan --random-init to train from a random initialisation"
        )
    if torch.device(device).type == "meta":
        raise ProfileError("load_weights needs a real device (cpu or cuda), not meta")
    model = auto.from_pretrained(preset.path, config=config, dtype=dtype)
    return model.to(device)


def count_params(preset: ModelPreset) -> int:
    """Parameters of the built model, counted on the meta device; tied weights count once."""
    return sum(p.numel() for p in build_model(preset, "meta").parameters())
