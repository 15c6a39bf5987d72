"""Profiling without allocating: parameter counts from meta models, activation segments from fake traces."""

import profiles
from planner.profile_model import activation_profile, model_structure


def test_llama3_8b_parameter_count_matches_published() -> None:
    preset = profiles.load_model("llama-3-8b")
    st = model_structure(preset.config, preset.task, "bfloat16")
    assert st.num_params == 8_030_261_248
    assert st.num_layers == 32
    # stream order: embedding first, blocks in order, head last
    assert st.spec_layer[0] == -1 and st.spec_layer[-1] == 32
    assert list(st.spec_layer) == sorted(st.spec_layer)


def test_tiny_presets_counts() -> None:
    for key in ("tiny-llama", "tiny-bert"):
        preset = profiles.load_model(key)
        st = model_structure(preset.config, preset.task, "float32")
        assert st.num_params == preset.published_num_params


def test_block_modes_order_saved_bytes() -> None:
    preset = profiles.load_model("tiny-llama")
    act = activation_profile(preset.config, preset.task, 2, 128, "float32")
    full, inp, none = act.block("full"), act.block("input"), act.block("none")
    ck_full = act.block("full", checkpointed=True)
    # below the window nothing is kept for backward: the input is replaced by the output
    assert abs(none.fwd.delta_bytes) <= act.hidden_bytes
    assert none.bwd.excursion_bytes == 0
    # frozen weights save less than trainable ones, checkpointing keeps about one block input
    assert full.fwd.delta_bytes > inp.fwd.delta_bytes > 0
    assert 0 <= ck_full.fwd.delta_bytes <= 2 * act.hidden_bytes < full.fwd.delta_bytes
    # the backward frees what the forward kept (up to the fp32 gradient buffers it creates)
    assert full.bwd.delta_bytes - full.bwd.grad_bytes == -full.fwd.delta_bytes
    assert full.bwd.grad_bytes == 4 * sum(
        s.numel for s, g in zip(act_structure().specs, act_structure().spec_layer, strict=True) if g == 1
    )


def act_structure():  # type: ignore[no-untyped-def]
    preset = profiles.load_model("tiny-llama")
    return model_structure(preset.config, preset.task, "float32")


def test_activations_scale_with_batch() -> None:
    preset = profiles.load_model("tiny-llama")
    a1 = activation_profile(preset.config, preset.task, 1, 128, "float32")
    a2 = activation_profile(preset.config, preset.task, 2, 128, "float32")
    d1, d2 = a1.block("full").fwd.delta_bytes, a2.block("full").fwd.delta_bytes
    assert 1.9 * d1 <= d2 <= 2.1 * d1
