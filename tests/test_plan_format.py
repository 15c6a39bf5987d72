"""Plan format v1: exact round trip, every validation problem at once, golden file, model fingerprint."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from chunkft.chunks import ParamSpec, param_specs, partition
from chunkft.plan_format import (
    SCHEMA_VERSION,
    Alternative,
    Checkpointing,
    ChunkTable,
    Hardware,
    ModelIdentity,
    OptimizerSettings,
    Placement,
    Plan,
    PlanError,
    Predictions,
    PrefetchOp,
    Rotation,
    RunSettings,
    ScheduleSettings,
    check_model,
    fingerprint,
    load_plan,
    plan_from_json,
    plan_to_dict,
    plan_to_json,
    save_plan,
    validate,
    validate_plan_dict,
)

GOLDEN = Path(__file__).parent / "golden" / "plan_v1.json"


def tiny_llama_specs(layers: int = 2, dtype: torch.dtype = torch.bfloat16) -> list[ParamSpec]:
    """The real HF Llama the golden plan was made for (built on meta: no storage, fast)."""
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return param_specs(model)


@pytest.fixture(scope="module")
def specs() -> list[ParamSpec]:
    return tiny_llama_specs()


def make_plan(specs: list[ParamSpec], k: int = 3) -> Plan:
    """A valid plan built from the real partition of the tiny model, with awkward floats."""
    chunks = partition(specs, num_chunks=k, state_bytes_per_element=8)
    cats = (("weights", 213_632), ("activations", 1_000_000), ("gradients", 142_592), ("master", 142_592))
    return Plan(
        schema_version=SCHEMA_VERSION,
        created_by="chunkft 0.1.0",
        model=ModelIdentity(
            "tiny",
            "hf-dir",
            "models/tiny",
            "causal-lm",
            None,
            "LlamaForCausalLM",
            106_816,
            fingerprint(specs),
        ),
        hardware=Hardware(
            "rtx4090", "NVIDIA GeForce RTX 4090", 1, 25_757_220_864, 20 * 2**30, 2**30, 2**35, 3 * 2**20
        ),
        run=RunSettings(
            seq_len=128,
            micro_batch_size=1,
            grad_accum_steps=3,
            total_steps=7,
            seed=11,
            weight_dtype="bfloat16",
            compute_dtype="bfloat16",
            master_dtype="float32",
            attn_implementation="eager",
            chunked_cross_entropy=False,
            optimizer=OptimizerSettings(
                "adamw", 3e-4, (0.9, 0.999), 1e-8, 0.1, 0.0, False, None, "compensated"
            ),
            schedule=ScheduleSettings("linear", 2, 7, 0.0),
            eval_every=0,
            checkpoint_every=0,
            cuda_alloc_conf="expandable_segments:True,garbage_collection_threshold:0.8",
        ),
        chunk_table=ChunkTable("rows", 8, tuple(specs), chunks),
        rotation=Rotation("random", 5, 2, tuple(reversed(range(k)))),
        placement=Placement("host", "bfloat16", "resident", True, (0, 0)),
        checkpointing=Checkpointing("selected", (1,)),
        prefetch=(PrefetchOp(1, "step start", "update chunk 1", 285_184),),
        predictions=Predictions(
            sum(b for _, b in cats), cats, "bwd layers.1", 2**30, 10**6, 0.1, 1 / 3, 0.1 + 0.2, 10**6 + 7
        ),
        alternatives=(Alternative("K=2", 2, "none", "states gpu", 9, 2.5e-05, 1e300, False),),
    )


def problems_of(data: dict) -> list[str]:
    with pytest.raises(PlanError) as err:
        plan_from_json(json.dumps(data), source="plan.json")
    assert str(err.value) == (
        f"plan.json is invalid: {len(err.value.problems)} problem"
        f"{'s' if len(err.value.problems) != 1 else ''}: " + "; ".join(err.value.problems)
    )
    assert validate_plan_dict(data) == err.value.problems
    return err.value.problems


# --- golden file --------------------------------------------------------------------------------------


def test_golden_v1_loads_validates_and_round_trips_byte_for_byte() -> None:
    text = GOLDEN.read_text(encoding="utf-8")
    plan = load_plan(GOLDEN)
    assert plan.schema_version == 1
    assert validate(plan) == []
    assert plan_to_json(plan) == text
    assert plan_to_json(plan_from_json(text)) == text
    assert plan.chunk_table.num_chunks == 3
    assert plan.run.tokens_per_step == 256 * 2 * 4
    assert plan.run.optimizer.lr == 3e-4 and plan.run.optimizer.eps == 1e-8
    assert plan.predictions.peak_by_category[0] == ("weights", 213_632)


def test_golden_fingerprint_is_stable_and_matches_the_real_tiny_llama() -> None:
    plan = load_plan(GOLDEN)
    # Pins the fingerprint definition: the golden table lists every parameter of its model.
    assert fingerprint(plan.chunk_table.params) == plan.model.fingerprint
    real = tiny_llama_specs()
    assert tuple(real) == plan.chunk_table.params
    check_model(plan, real)  # does not raise
    assert sum(s.numel for s in real) == plan.model.num_params


# --- round trip, immutability, format -----------------------------------------------------------------


def test_round_trip_is_exact_including_floats(specs: list[ParamSpec]) -> None:
    plan = make_plan(specs)
    text = plan_to_json(plan)
    back = plan_from_json(text)
    assert back == plan and hash(back) == hash(plan)
    assert plan_to_json(back) == text
    assert back.run.optimizer.lr == 3e-4 and back.run.optimizer.max_grad_norm is None
    assert back.predictions.compute_efficiency == 0.1 + 0.2  # 0.30000000000000004, not 0.3
    assert back.predictions.tokens_per_second == 1 / 3
    assert back.alternatives[0].step_seconds == 2.5e-05 and back.alternatives[0].tokens_per_second == 1e300
    assert back.run.optimizer.betas == (0.9, 0.999) and isinstance(back.run.optimizer.betas, tuple)
    assert isinstance(back.chunk_table.chunks[0].slices, tuple)


def test_round_trip_of_sgd_classification_plan(specs: list[ParamSpec]) -> None:
    plan = make_plan(specs, k=5)
    plan = dataclasses.replace(
        plan,
        model=dataclasses.replace(plan.model, task="sequence-classification", num_labels=2),
        run=dataclasses.replace(
            plan.run, optimizer=OptimizerSettings("sgd", 0.1, (0.0, 0.0), 1e-8, 0.0, 0.9, True, 1.0)
        ),
        rotation=Rotation("top-down", 0, 1, (4, 3, 2, 1, 0)),
        placement=Placement("gpu", "reset", "streamed", False, ()),
        prefetch=(),
        alternatives=(),
    )
    assert plan_from_json(plan_to_json(plan)) == plan


def test_ints_given_for_floats_are_read_as_floats(specs: list[ParamSpec]) -> None:
    data = plan_to_dict(make_plan(specs))
    data["run"]["optimizer"]["weight_decay"] = 0
    plan = plan_from_json(json.dumps(data))
    assert plan.run.optimizer.weight_decay == 0.0 and isinstance(plan.run.optimizer.weight_decay, float)


def test_plan_is_immutable(specs: list[ParamSpec]) -> None:
    plan = make_plan(specs)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.run.seq_len = 4096  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.chunk_table = plan.chunk_table  # type: ignore[misc]
    with pytest.raises(TypeError):
        plan.chunk_table.chunks[0].slices[0] = None  # type: ignore[index]
    assert len({plan, make_plan(specs)}) == 1


def test_json_is_readable_with_stable_key_order(specs: list[ParamSpec]) -> None:
    plan = make_plan(specs)
    text = plan_to_json(plan)
    assert list(json.loads(text)) == [f.name for f in dataclasses.fields(Plan)]
    assert text.endswith("}\n") and '\n  "run": {\n    "seq_len": 128,\n' in text
    # Table rows stay on one line each; the category breakdown is a JSON object.
    assert '      {"name": "model.embed_tokens.weight", "shape": [256, 64], "dtype": "bfloat16"},\n' in text
    assert '{"name": "model.embed_tokens.weight", "row_start": 0, "row_end": 256}' in text
    assert json.loads(text)["predictions"]["peak_by_category"] == {
        "weights": 213_632,
        "activations": 1_000_000,
        "gradients": 142_592,
        "master": 142_592,
    }


def test_plan_to_json_refuses_an_invalid_or_mistyped_plan(specs: list[ParamSpec]) -> None:
    plan = make_plan(specs)
    with pytest.raises(PlanError, match=r"run\.seq_len must be >= 1, got 0"):
        plan_to_json(dataclasses.replace(plan, run=dataclasses.replace(plan.run, seq_len=0)))
    listed = dataclasses.replace(plan, rotation=dataclasses.replace(plan.rotation, sequence=[2, 1, 0]))
    with pytest.raises(PlanError, match="do not match the v1 field types"):
        plan_to_json(listed)  # a list where the schema has a tuple would not read back equal
    with pytest.raises(PlanError, match="do not have the v1 structure"):
        plan_to_json(dataclasses.replace(plan, prefetch=None))


# --- save / load --------------------------------------------------------------------------------------


def test_save_is_atomic_and_load_reads_it_back(specs: list[ParamSpec], tmp_path: Path) -> None:
    plan = make_plan(specs)
    path = tmp_path / "plan.json"
    save_plan(plan, path)
    assert load_plan(path) == plan
    before = path.read_bytes()
    bad = dataclasses.replace(plan, hardware=dataclasses.replace(plan.hardware, num_gpus=0))
    with pytest.raises(PlanError):
        save_plan(bad, path)
    assert path.read_bytes() == before  # the old plan is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]  # no temp file left behind


def test_load_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(PlanError) as err:
        load_plan(missing)
    assert str(err.value) == (
        f"{missing}: cannot read it (No such file or directory): "
        "check the path or run chunkft-plan to make one"
    )
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"\x80\x81")
    with pytest.raises(PlanError, match=f"^{binary} is not UTF-8 text"):
        load_plan(binary)
    path = tmp_path / "p.json"
    path.write_text('{"schema_version": 1}', encoding="utf-8")
    with pytest.raises(PlanError, match=f"^{path} is invalid: 11 problems: created_by is missing; model is"):
        load_plan(path)


# --- validation ---------------------------------------------------------------------------------------


def test_every_structural_problem_is_reported_at_once(specs: list[ParamSpec]) -> None:
    data = plan_to_dict(make_plan(specs))
    data["run"]["seq_length"] = data["run"].pop("seq_len")  # a typo in a hand edit
    data["run"]["micro_batch_size"] = "2"
    data["run"]["grad_accum_steps"] = True
    data["hardware"]["num_gpus"] = 1.5
    data["placement"]["optimizer_states"] = "cpu"
    data["run"]["optimizer"]["betas"] = [0.9]
    data["checkpointing"]["layers"] = [1, "2"]
    data["predictions"]["peak_by_category"] = [1, 2]
    data["alternatives"][0]["feasible"] = "yes"
    assert problems_of(data) == [
        "hardware.num_gpus must be an integer, got 1.5",
        "run.seq_length is not a known field (known: seq_len, micro_batch_size, grad_accum_steps, "
        "total_steps, seed, weight_dtype, compute_dtype, master_dtype, attn_implementation, "
        "chunked_cross_entropy, optimizer, schedule, eval_every, checkpoint_every, cuda_alloc_conf, "
        "padded_batches, cross_entropy)",
        "run.seq_len is missing",
        'run.micro_batch_size must be an integer, got "2"',
        "run.grad_accum_steps must be an integer, got true",
        "run.optimizer.betas must be a list of 2 values, got 1",
        "placement.optimizer_states must be one of 'gpu', 'host', got \"cpu\"",
        'checkpointing.layers[1] must be an integer, got "2"',
        "predictions.peak_by_category must be an object, got a list",
        'alternatives[0].feasible must be true or false, got "yes"',
    ]


def test_chunk_table_problems_are_reported_with_paths(specs: list[ParamSpec]) -> None:
    data = plan_to_dict(make_plan(specs))
    chunks = data["chunk_table"]["chunks"]
    assert chunks[0]["slices"][0] == {"name": "model.embed_tokens.weight", "row_start": 0, "row_end": 256}
    chunks[0]["slices"][0]["row_end"] = 300  # beyond the embedding's 256 rows
    chunks[1]["slices"][1]["row_start"] = 100  # drops rows 0:100 of up_proj
    last = chunks[2]["slices"]
    assert last[-1]["name"] == "lm_head.weight"
    last[-1]["row_start"] = 200  # drops rows 0:200 of lm_head ...
    chunks[1]["slices"].append({"name": "lm_head.weight", "row_start": 0, "row_end": 210})  # ... and overlaps
    chunks[2]["slices"].append({"name": "lm_head.wieght", "row_start": 0, "row_end": 1})
    chunks[2]["index"] = 7
    up = "model.layers.0.mlp.up_proj.weight"
    assert problems_of(data) == [
        "chunk_table.chunks[0].slices[0].row_end must be <= 256 (rows of model.embed_tokens.weight), got 300",
        "chunk_table.chunks[2].index must be 2 (chunks are listed in stream order), got 7",
        'chunk_table.chunks[2].slices[7].name "lm_head.wieght" is not in chunk_table.params',
        f"rows 0:100 of {up} are in no chunk",
        "chunk_table.chunks[2].slices[6] rows 200:210 of lm_head.weight are also in "
        "chunk_table.chunks[1].slices[10]",
    ]


def test_stream_order_whole_policy_and_empty_slices(specs: list[ParamSpec]) -> None:
    data = plan_to_dict(make_plan(specs))
    chunks = data["chunk_table"]["chunks"]
    chunks[0]["slices"][0], chunks[0]["slices"][1] = chunks[0]["slices"][1], chunks[0]["slices"][0]
    assert problems_of(data) == [
        "chunk_table.chunks[0].slices[0] (model.layers.0.self_attn.q_proj.weight rows 0:64) is out of "
        "stream order: expected model.embed_tokens.weight from row 0"
    ]
    data = plan_to_dict(make_plan(specs))
    data["chunk_table"]["policy"] = "whole"
    chunks = data["chunk_table"]["chunks"]
    chunks[0]["slices"].append({"name": "model.norm.weight", "row_start": 3, "row_end": 3})
    chunks[1]["slices"] = []
    problems = problems_of(data)
    assert problems[0] == (
        "chunk_table.chunks[0].slices[5] takes rows 0:108 of model.layers.0.mlp.gate_proj.weight (128 rows) "
        "but chunk_table.policy is 'whole'"
    )
    assert "chunk_table.chunks[0].slices[6] is empty: row_start 3 must be < row_end 3" in problems
    assert "chunk_table.chunks[1].slices must not be empty" in problems
    assert "rows 108:128 of model.layers.0.mlp.gate_proj.weight are in no chunk" in problems
    assert "model.layers.0.mlp.up_proj.weight is in no chunk" in problems


def test_semantic_and_cross_section_problems(specs: list[ParamSpec]) -> None:
    data = plan_to_dict(make_plan(specs))
    data["rotation"]["sequence"] = [0, 0, 5]
    data["hardware"]["budget_bytes"] = 10**12
    data["predictions"]["peak_by_category"]["weights"] += 1
    data["run"]["schedule"]["total_steps"] = 70
    data["run"]["optimizer"]["lr"] = -1
    data["prefetch"][0]["chunk"] = 3
    data["placement"]["layer_gpu"] = [0, 1]
    data["checkpointing"]["mode"] = "all"
    data["model"]["fingerprint"] = "abc"
    assert problems_of(data) == [
        'model.fingerprint must be 64 lowercase hex digits (sha256), got "abc"',
        "hardware.budget_bytes must be <= memory_total_bytes = 25757220864 (the budget is per GPU), "
        "got 1000000000000",
        "run.optimizer.lr must be > 0, got -1.0",
        "run.schedule.total_steps must equal run.total_steps = 7, got 70",
        "checkpointing.layers must be empty when mode is 'all'",
        "predictions.peak_by_category must sum to peak_bytes = 1498816, sums to 1498817",
        "rotation.sequence must list each chunk index 0..2 once (missing 1, 2; out of range 5; repeated 0)",
        "placement.layer_gpu[1] must be in 0..0 (hardware.num_gpus), got 1",
        "prefetch[0].chunk must be in 0..2, got 3",
    ]


def test_plan_that_does_not_fit_its_budget_is_refused(specs: list[ParamSpec]) -> None:
    data = plan_to_dict(make_plan(specs))
    data["hardware"]["budget_bytes"] = 2**30 + 4 * 2**20  # room for reserve + headroom, not the peak too
    data["placement"]["prefetch"] = False
    data["rotation"]["order"] = "bottom-up"
    assert problems_of(data) == [
        "rotation.sequence must be 0..2 in order for 'bottom-up'",
        "prefetch lists 1 copies but placement.prefetch is false",
        f"predictions.peak_bytes + reserve_bytes + hardware.headroom_bytes = {1_498_816 + 2**30 + 3 * 2**20} "
        f"must be <= hardware.budget_bytes = {2**30 + 4 * 2**20}: the plan does not fit; re-plan",
    ]


def test_non_finite_numbers_and_repeated_keys_are_problems(specs: list[ParamSpec]) -> None:
    text = plan_to_json(make_plan(specs))
    text = text.replace('"step_seconds": 0.1', '"step_seconds": NaN', 1)
    text = text.replace('"seed": 11,', '"seed": 11, "seed": 12,', 1)
    with pytest.raises(PlanError) as err:
        plan_from_json(text)
    assert err.value.problems == [
        "run.seed is given more than once",
        "predictions.step_seconds must be a finite number, got NaN",
    ]


def test_missing_schema_version_is_a_problem_among_others(specs: list[ParamSpec]) -> None:
    data = plan_to_dict(make_plan(specs))
    del data["schema_version"]
    data["created_by"] = ""
    assert problems_of(data) == ["schema_version is missing", "created_by must not be empty"]
    data["schema_version"] = 0
    data["created_by"] = "x"
    assert problems_of(data) == ["schema_version must be 1, got 0"]


def test_newer_schema_is_refused_with_upgrade_advice(specs: list[ParamSpec]) -> None:
    data = plan_to_dict(make_plan(specs))
    data["schema_version"] = 2
    data["brand_new_v2_section"] = {}  # a newer plan is not judged by v1 rules
    with pytest.raises(PlanError) as err:
        plan_from_json(json.dumps(data), source="plan.json")
    assert str(err.value) == (
        "plan.json was written by a newer chunkft (schema 2; this one reads 1): upgrade chunkft or re-plan"
    )


def test_truncated_or_malformed_json_reports_line_and_column() -> None:
    text = GOLDEN.read_text(encoding="utf-8")
    cut = text[: text.index('"rotation": ') + len('"rotation": ')]  # the file ends mid-value
    with pytest.raises(PlanError) as err:
        plan_from_json(cut, source="plan.json")
    line, column = cut.count("\n") + 1, len(cut.rsplit("\n", 1)[1]) + 1
    assert (line, column) == (130, 15)  # the golden file grew (hardware.parallel, reserve/headroom_given)
    assert str(err.value).startswith(
        f"plan.json is not valid JSON (Expecting value at line {line} column {column})"
    )
    assert str(err.value).endswith("the file may be truncated or mis-edited: fix it or re-plan")
    with pytest.raises(
        PlanError, match=r"^plan is invalid: 1 problem: the plan must be a JSON object, got a list$"
    ):
        plan_from_json("[]")


def test_valid_plan_has_no_problems_and_validation_does_not_mutate(specs: list[ParamSpec]) -> None:
    data = plan_to_dict(make_plan(specs))
    snapshot = copy.deepcopy(data)
    assert validate_plan_dict(data) == []
    assert data == snapshot


# --- model fingerprint --------------------------------------------------------------------------------


def test_fingerprint_changes_with_name_shape_dtype_and_order(specs: list[ParamSpec]) -> None:
    base = fingerprint(specs)
    assert len(base) == 64 and fingerprint(list(specs)) == base
    first = specs[0]
    variants = [
        [ParamSpec(first.name + "x", first.shape, first.dtype), *specs[1:]],
        [ParamSpec(first.name, (first.shape[0] + 1, *first.shape[1:]), first.dtype), *specs[1:]],
        [ParamSpec(first.name, first.shape, "float32"), *specs[1:]],
        [specs[1], specs[0], *specs[2:]],
        specs[:-1],
    ]
    assert len({base, *(fingerprint(v) for v in variants)}) == len(variants) + 1


def test_plan_for_another_model_is_refused(specs: list[ParamSpec]) -> None:
    plan = make_plan(specs)
    check_model(plan, specs)
    three_layers = tiny_llama_specs(layers=3)
    with pytest.raises(PlanError) as err:
        check_model(plan, three_layers, source="plan.json", model_name="models/tiny3")
    msg = str(err.value)
    assert msg.startswith(
        f"plan.json was made for a different model (tiny: fingerprint {fingerprint(specs)[:12]}… != "
    )
    assert "first difference at parameter 19: plan has model.norm.weight (64,) bfloat16, model has " in msg
    assert msg.endswith("): re-plan with chunkft-plan models/tiny3")
    with pytest.raises(PlanError, match="made for a different model .*float32"):
        check_model(plan, tiny_llama_specs(dtype=torch.float32))


# --- fields added to v1 later --------------------------------------------------------------------------

ADDED_LATER = (
    ',\n    "measured_flops_per_s": 0,\n    "measured_memory_bytes_per_s": 0,\n    "parallel": "none",\n'
    '    "reserve_given": false,\n    "headroom_given": ""\n',
    ',\n    "headroom_bytes": 0\n',
    ',\n      "weight_decay_mode": "window"\n',
    '\n    "cuda_alloc_conf": "",',
    ',\n    "cross_entropy": "auto"\n',
    ',\n    "host_peak_bytes": 1424896\n',
    ',\n    "state_store": "host"\n',
)


def test_a_plan_written_before_the_added_fields_loads_with_what_it_meant(tmp_path: Path) -> None:
    text = GOLDEN.read_text(encoding="utf-8")
    old = text
    for spelled in ADDED_LATER:
        assert spelled in old, spelled
        old = old.replace(spelled, "\n" if spelled.endswith("\n") else "")
    added = (
        "headroom_bytes", "measured_flops_per_s", "weight_decay_mode", "cuda_alloc_conf", "host_peak_bytes",
        "cross_entropy", "parallel", "reserve_given", "headroom_given", "state_store",
    )
    for name in added:
        assert f"\"{name}\"" not in old
    path = tmp_path / "old.json"
    path.write_text(old, encoding="utf-8")
    plan = load_plan(path)
    assert plan == load_plan(GOLDEN)
    assert plan.hardware.headroom_bytes == 0 and plan.run.cuda_alloc_conf == ""
    assert plan.run.optimizer.weight_decay_mode == "window" and plan.run.cross_entropy == "auto"
    assert plan.predictions.host_peak_bytes == plan.predictions.host_bytes == 1424896
    assert plan.hardware.parallel == "none"  # layers split across num_gpus, as before the field
    assert plan.hardware.reserve_given is False and plan.hardware.headroom_given == ""  # the defaults
    assert plan.placement.state_store == "host"  # pinned host memory, as before the disk tier
    assert plan_to_json(plan) == text  # rewritten with the fields spelled out


def test_plan_digest_is_the_same_before_and_after_a_field_is_added() -> None:
    """run.json and checkpoints name their plan by plan_digest: a plan read by a chunkft that added a
    field digests as the file without it, so its earlier runs and checkpoints still match; a field that
    holds anything but what its absence means is part of the digest."""
    from chunkft.plan_format import plan_digest, plan_digests

    data = json.loads(GOLDEN.read_text(encoding="utf-8"))
    for section, key in (("hardware", "measured_flops_per_s"), ("hardware", "measured_memory_bytes_per_s"),
                         ("hardware", "headroom_bytes"), ("hardware", "parallel"),
                         ("hardware", "reserve_given"), ("hardware", "headroom_given"),
                         ("run", "cuda_alloc_conf"), ("run", "padded_batches"), ("run", "cross_entropy"),
                         ("predictions", "host_peak_bytes"), ("placement", "state_store")):
        del data[section][key]
    del data["run"]["optimizer"]["weight_decay_mode"]
    plan = load_plan(GOLDEN)
    assert plan_digest(plan) == hashlib.sha256(json.dumps(data, separators=(",", ":")).encode()).hexdigest()
    assert plan_digests(plan)[1] == hashlib.sha256(GOLDEN.read_bytes()).hexdigest()  # what was recorded
    forced = dataclasses.replace(plan, run=dataclasses.replace(plan.run, cross_entropy="chunked"))
    assert plan.run.chunked_cross_entropy and plan_digest(forced) != plan_digest(plan)


def test_an_old_file_keeps_its_repeated_key_problems_while_fields_are_filled(specs: list[ParamSpec]) -> None:
    data = plan_to_dict(make_plan(specs))
    del data["run"]["optimizer"]["weight_decay_mode"], data["hardware"]["headroom_bytes"]
    text = json.dumps(data).replace('"eps": 1e-08,', '"eps": 1e-08, "eps": 1e-07,', 1)
    with pytest.raises(PlanError) as err:
        plan_from_json(text)
    assert err.value.problems == ["run.optimizer.eps is given more than once"]


def test_added_fields_are_validated_with_their_paths(specs: list[ParamSpec]) -> None:
    data = plan_to_dict(make_plan(specs))
    data["hardware"]["headroom_bytes"] = -1
    data["run"]["cuda_alloc_conf"] = "expandable_segments True"
    data["run"]["optimizer"]["weight_decay_mode"] = "dense"
    data["predictions"]["host_peak_bytes"] = 10**6 - 1  # less than host_bytes
    assert problems_of(data) == [
        "hardware.headroom_bytes must be >= 0, got -1",
        "run.optimizer.weight_decay_mode must be one of 'window', 'compensated', got \"dense\"",
        "predictions.host_peak_bytes must be >= host_bytes = 1000000 (it adds what a checkpoint holds), "
        "got 999999",
    ]
    data["run"]["optimizer"]["weight_decay_mode"] = "compensated"
    data["predictions"]["host_peak_bytes"] = 2**35 + 1  # more than the host budget
    data["hardware"]["headroom_bytes"] = 20 * 2**30 - 2**30  # with the reserve: all of the budget
    assert problems_of(data) == [
        f"hardware.reserve_bytes + headroom_bytes must be < budget_bytes = {20 * 2**30}, got {20 * 2**30}",
        'run.cuda_alloc_conf must be empty or comma-separated key:value settings (e.g. '
        '"expandable_segments:True"), got "expandable_segments True"',
        "predictions.peak_bytes + reserve_bytes + hardware.headroom_bytes = "
        f"{1_498_816 + 20 * 2**30} must be <= hardware.budget_bytes = {20 * 2**30}: the plan does not fit; "
        "re-plan",
        f"predictions.host_peak_bytes = {2**35 + 1} must be <= hardware.host_budget_bytes = {2**35}",
    ]


def test_a_forced_cross_entropy_must_be_the_loss_the_plan_runs(specs: list[ParamSpec]) -> None:
    """run.cross_entropy records what the user forced; a plan that says it forced one loss and runs the
    other was hand-edited inconsistently."""
    data = plan_to_dict(make_plan(specs))
    assert data["run"]["chunked_cross_entropy"] is False
    data["run"]["cross_entropy"] = "chunked"
    assert problems_of(data) == [
        'run.chunked_cross_entropy must be true when run.cross_entropy is "chunked"'
    ]
    data["run"]["cross_entropy"] = "full"
    assert validate_plan_dict(data) == []
    data["run"]["cross_entropy"] = "fast"
    assert problems_of(data) == [
        "run.cross_entropy must be one of 'auto', 'full', 'chunked', got \"fast\""
    ]


def test_compensated_weight_decay_needs_adamw_and_a_positive_factor(specs: list[ParamSpec]) -> None:
    data = plan_to_dict(make_plan(specs))
    assert data["run"]["optimizer"]["weight_decay_mode"] == "compensated"
    data["run"]["optimizer"]["weight_decay"] = 4000.0  # lr 3e-4: lr * wd = 1.2
    assert problems_of(data) == [
        "run.optimizer.weight_decay_mode 'compensated' needs lr * weight_decay < 1 (the factor "
        "(1 - lr * weight_decay) ** K must stay positive), got 1.2",
    ]
    data["run"]["optimizer"].update(name="sgd", weight_decay=0.1, momentum=0.9)
    data["chunk_table"]["state_bytes_per_element"] = 4
    assert problems_of(data) == ["run.optimizer.weight_decay_mode 'compensated' needs optimizer 'adamw'"]
    data["run"]["optimizer"]["weight_decay_mode"] = "window"
    assert validate_plan_dict(data) == []


def test_the_disk_state_store_round_trips_and_needs_host_states() -> None:
    """placement.state_store "disk" (issue 16): part of the plan's digest, not of its trajectory (a host
    run's checkpoint continues on the disk tier), and only for states the host tier holds."""
    from chunkft.plan_format import plan_digest, trajectory_digest

    plan = load_plan(GOLDEN)
    disk = dataclasses.replace(plan, placement=dataclasses.replace(plan.placement, state_store="disk"))
    assert plan_from_json(plan_to_json(disk)) == disk
    assert plan_digest(disk) != plan_digest(plan) and trajectory_digest(disk) == trajectory_digest(plan)
    on_gpu = dataclasses.replace(disk, placement=dataclasses.replace(disk.placement, optimizer_states="gpu"))
    assert any("placement.state_store" in p and "optimizer_states" in p for p in validate(on_gpu))
