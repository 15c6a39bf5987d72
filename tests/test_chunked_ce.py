"""Chunked cross-entropy (executor/loss.py) against Hugging Face's own loss and dense autograd, on real tiny
models: the value, every gradient, ChunkFT's slice gradients, memory under the project's tracker, and a
chunkft-run of a plan that asks for it."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tiny_models import VOCAB, tiny_llama
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from chunkft.chunks import Chunk, ParamSlice, param_specs, partition
from chunkft.executor.chunkft import AdamWHparams, ChunkFT, RotationSpec, ScheduleSpec
from chunkft.executor.loss import (
    DEFAULT_CHUNK_TOKENS,
    IGNORE_INDEX,
    UnsupportedArchitectureError,
    causal_lm_loss,
    piece_logit_bytes,
)
from chunkft.executor.measure import MemoryTracker, driver_tensors
from chunkft.executor.slicegrad import SliceGradients

BATCH, SEQ = 3, 10  # 30 tokens
CHUNKS = [1, 6, 7, 10, 64]  # one token; divides 30; does not; one row per piece; more than the batch


# ----------------------------------------------------------------------------------------------
# Tiny real models and a padded batch with ignored labels


def _small(cls, cfg) -> nn.Module:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return cls(cfg).train()


ARCHS = {
    "llama": lambda: tiny_llama(),
    "llama_tied": lambda: tiny_llama(tied=True),
    "mistral": lambda: _small(MistralForCausalLM, MistralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)),
    "qwen2": lambda: _small(Qwen2ForCausalLM, Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=True)),
    "qwen3": lambda: _small(Qwen3ForCausalLM, Qwen3Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, max_position_embeddings=64)),
    "gpt2": lambda: _small(GPT2LMHeadModel, GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=32, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)),
}  # fmt: skip


def padded_batch(vocab: int = VOCAB, seed: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded rows (mask 0, label -100) and a prompt span of ignored labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    mask[1, 6:] = 0
    labels[1, 6:] = IGNORE_INDEX
    mask[2, 8:] = 0
    labels[2, 8:] = IGNORE_INDEX
    labels[0, :4] = IGNORE_INDEX  # a prompt: only the response is learned
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def grads(model: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    """Plain autograd with every parameter trainable."""
    loss.backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


def checkpointed(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.disable_input_require_grads()
    return model


# ----------------------------------------------------------------------------------------------
# Value and gradients


@pytest.mark.parametrize("arch", list(ARCHS))
def test_loss_equals_hugging_face_loss(arch: str) -> None:
    model = ARCHS[arch]()
    batch = padded_batch()
    ref = model(**batch).loss
    assert torch.equal(causal_lm_loss(model, batch, None), ref)  # None: the model's own loss, bit for bit
    for chunk in CHUNKS:
        torch.testing.assert_close(causal_lm_loss(model, batch, chunk), ref, rtol=1e-6, atol=0)
    # Hugging Face's num_items_in_batch (a divisor across micro-batches) is honoured the same way
    ref = model(**batch, num_items_in_batch=torch.tensor(50)).loss
    got = causal_lm_loss(model, {**batch, "num_items_in_batch": torch.tensor(50)}, 7)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
    # control: a loss without the shift (position t scored against label t) is far from HF's
    with torch.no_grad():
        logits = model(**batch).logits.float()
    unshifted = nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
    assert abs(float(unshifted) - float(ref.detach())) > 1e-3


@pytest.mark.parametrize("arch", ["llama", "llama_tied", "gpt2"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_every_gradient_equals_dense_autograd(arch: str, ckpt: bool) -> None:
    model = ARCHS[arch]()
    if ckpt:
        checkpointed(model)
    batch = padded_batch()
    dense = grads(model, model(**batch).loss)
    for chunk in (6, 7):
        got = grads(model, causal_lm_loss(model, batch, chunk))
        assert got.keys() == dense.keys()
        for name in dense:
            torch.testing.assert_close(got[name], dense[name], rtol=1e-5, atol=1e-7, msg=name)
    assert any(float(g.abs().max()) > 0 for g in dense.values())


def _llama(tied: bool = False, vocab: int = 96) -> nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=64, tie_word_embeddings=tied,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).train()


def _windows(model: nn.Module, tied: bool) -> list[Chunk]:
    """The planner's partition plus hand-cut windows: lm_head rows (untied) or embedding rows that the tied
    head reads (tied), with a straddled block tensor and the final norm."""
    head = "model.embed_tokens.weight" if tied else "lm_head.weight"
    hand = [
        Chunk(10, (ParamSlice(head, 5, 40),)),
        Chunk(
            11,
            (
                ParamSlice("model.layers.1.mlp.down_proj.weight", 3, 20),
                ParamSlice("model.norm.weight", 0, 32),
                ParamSlice(head, 0, 17),
            ),
        ),
    ]
    return [*partition(param_specs(model), num_chunks=3), *hand]


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("ckpt", [False, True])
def test_window_slice_gradients_equal_dense_rows(tied: bool, ckpt: bool) -> None:
    model = _llama(tied)
    if ckpt:
        checkpointed(model)
    batch = padded_batch(96)
    dense = grads(model, model(**batch).loss)
    sg = SliceGradients(model)
    chunks = _windows(model, tied)
    assert any(sl.name in ("lm_head.weight", "model.embed_tokens.weight") and sl.row_end - sl.row_start < 96
               for c in chunks for sl in c.slices)  # fmt: skip  # the head really is cut somewhere
    for chunk in chunks:
        sg.activate(chunk)
        causal_lm_loss(model, batch, 7).backward()
        got = sg.window_grads()
        assert all(p.grad is None for p in model.parameters())
        for sl in chunk.slices:
            ref = dense[sl.name][sl.row_start : sl.row_end]
            torch.testing.assert_close(got[sl.name], ref, rtol=1e-5, atol=1e-7, msg=f"{chunk.index} {sl}")
        sg.deactivate()


def test_bf16_weights_and_autocast_match_hugging_face() -> None:
    """HF computes bf16 logits and upcasts them for the loss; so does every piece."""
    batch = padded_batch()
    model = tiny_llama(torch.bfloat16)
    ref = model(**batch).loss
    got = causal_lm_loss(model, batch, 7)
    assert ref.dtype == got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)  # fp32 sums of the same bf16 logits
    dense = grads(model, model(**batch).loss)
    chunked = grads(model, causal_lm_loss(model, batch, 7))
    for name in dense:  # bf16 gradients: sums in another order round differently
        diff = (chunked[name].float() - dense[name].float()).abs().max()
        assert diff <= 0.02 * dense[name].float().abs().max(), name

    model = tiny_llama()  # fp32 weights under bf16 autocast (a plan's compute_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(**batch).loss
        got = causal_lm_loss(model, batch, 7)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------------------------
# Memory: the project's tracker over one rotation of ChunkFT steps


def _rotation_peak(chunk_tokens: int | None, vocab: int, batch: int, seq: int) -> int:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=seq,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).train()
    driver = ChunkFT(
        model,
        partition(param_specs(model), num_chunks=2, state_bytes_per_element=8),
        hparams=AdamWHparams(lr=1e-3),
        schedule=ScheduleSpec("constant", 0, 10),
        rotation=RotationSpec("bottom-up"),
    )
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(3)]

    def step(ids: torch.Tensor, tracker: MemoryTracker | None) -> None:
        def phase(name: str) -> contextlib.AbstractContextManager[None]:
            return tracker.phase(name) if tracker is not None else contextlib.nullcontext()

        with phase("forward"):
            loss = causal_lm_loss(model, {"input_ids": ids, "labels": ids}, chunk_tokens)
        with phase("backward"):
            driver.backward(loss)
        del loss
        with phase("optimizer"):
            driver.step()

    step(batches[0], None)  # warm-up, as chunkft-run measures: the state slots exist afterwards
    persistent, host = driver_tensors(driver)
    tracker = MemoryTracker(model, persistent=persistent, exclude=host)
    tracker.start()
    for ids in batches[1:]:  # both windows; the second holds lm_head
        step(ids, tracker)
    tracker.stop()
    driver.close()
    return tracker.peak_bytes()


def test_chunked_peak_is_lower_by_the_logits_it_never_holds() -> None:
    vocab, batch, seq, chunk = 2048, 2, 64, 16  # vocab 128 x hidden: the logits dominate the step
    dense = _rotation_peak(None, vocab, batch, seq)
    chunked = _rotation_peak(chunk, vocab, batch, seq)
    full = piece_logit_bytes(batch, seq, None, vocab, torch.float32)
    piece = piece_logit_bytes(batch, seq, chunk, vocab, torch.float32)
    assert full == batch * seq * vocab * 4 and piece == chunk * vocab * 4
    # Unchunked, backward holds at least two full fp32 logit-sized tensors at once (the log-softmax saved
    # for backward and the gradient flowing into it); chunked, two pieces' worth.
    assert dense - chunked >= 2 * (full - piece), (dense, chunked, full, piece)


def test_piece_logit_bytes() -> None:
    # the issue's figure: Llama-3's vocabulary, one 1024-token sequence, fp32: 0.5 GB unchunked
    assert piece_logit_bytes(1, 1024, None, 128_256, "float32") == 1024 * 128_256 * 4 == 525_336_576
    assert piece_logit_bytes(1, 1024, DEFAULT_CHUNK_TOKENS, 128_256, "float32") == 256 * 128_256 * 4
    assert piece_logit_bytes(2, 1024, 300, 128_256, torch.bfloat16) == 300 * 128_256 * 2
    assert piece_logit_bytes(1, 100, 256, 512, "float32") == 100 * 512 * 4  # the piece is never larger
    for args in [(0, 8, None, 4, "float32"), (1, 8, 0, 4, "float32"), (1, 8, 2, 4, "nope")]:
        with pytest.raises(ValueError):
            piece_logit_bytes(*args)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# Refusals


def test_other_architectures_and_bad_input_are_refused() -> None:
    class MyLlama(LlamaForCausalLM):  # a subclass may change forward: not verified
        pass

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
    )
    bert = BertForSequenceClassification(cfg)
    mine = MyLlama(tiny_llama().config)
    batch = padded_batch()
    for model, name in ((bert, "BertForSequenceClassification"), (mine, "MyLlama")):
        with pytest.raises(UnsupportedArchitectureError, match=rf"does not support {name} \(verified: Llama"):
            causal_lm_loss(model, batch, 8)
    model = tiny_llama()
    model.loss_function = lambda **kw: torch.zeros(())
    with pytest.raises(UnsupportedArchitectureError, match="custom loss_function"):
        causal_lm_loss(model, batch, 8)
    model = tiny_llama()
    for chunk, match in ((0, "positive int"), (True, "positive int"), (2.5, "positive int")):
        with pytest.raises(ValueError, match=match):
            causal_lm_loss(model, batch, chunk)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs 'labels'"):
        causal_lm_loss(model, {"input_ids": batch["input_ids"]}, 8)


# ----------------------------------------------------------------------------------------------
# chunkft-run of a plan with run.chunked_cross_entropy


def _replaced(
    plan_path: Path, out: Path, run: dict[str, object], model: dict[str, object] | None = None
) -> Path:
    """A plan a test already builds, with fields of its run (and model) replaced."""
    from chunkft.plan_format import load_plan, save_plan

    plan = load_plan(plan_path)
    plan = dataclasses.replace(
        plan,
        run=dataclasses.replace(plan.run, **run),  # type: ignore[arg-type]
        model=dataclasses.replace(plan.model, **(model or {})),  # type: ignore[arg-type]
    )
    save_plan(plan, out)
    return out


def test_chunkft_run_with_chunked_cross_entropy(tmp_path: Path) -> None:
    from test_run_e2e import _plan, _text

    from chunkft.executor.cli import main as run_main
    from chunkft.executor.train import RunOptions, train

    # chunkft-plan's tiny Llama (4 windows, 2 micro-batches of 2 rows), at 160 tokens a row so that a
    # micro-batch's 320 tokens make two pieces of DEFAULT_CHUNK_TOKENS (256 + 64)
    base = _replaced(_plan(tmp_path, steps=4), tmp_path / "base.json", {"seq_len": 160})
    data = _text(tmp_path, 20_000)
    plain = train(RunOptions(base, data, tmp_path / "plain", progress=False))
    chunked_plan = _replaced(base, tmp_path / "chunked.json", {"chunked_cross_entropy": True})
    chunked = train(RunOptions(chunked_plan, data, tmp_path / "chunked", progress=False))
    assert chunked.steps == 4 and chunked.skipped_steps == 0
    assert DEFAULT_CHUNK_TOKENS < 2 * 160 < 2 * DEFAULT_CHUNK_TOKENS
    # the same loss on the same first batch; later steps follow the same trajectory to rounding
    assert abs(chunked.train_losses[0] - plain.train_losses[0]) <= 1e-6 * plain.train_losses[0]
    torch.testing.assert_close(
        torch.tensor(chunked.train_losses), torch.tensor(plain.train_losses), rtol=1e-4, atol=0
    )
    assert chunked.evals[-1][1] == pytest.approx(plain.evals[-1][1], rel=1e-4)
    assert chunked.memory is not None and plain.memory is not None
    # this model's peak is in its layers, not at its 512-token head: chunking must not raise it
    assert 0 < chunked.memory.peak_bytes <= plain.memory.peak_bytes

    # a classification plan asking for it is refused with one line before anything is written
    bad = _replaced(base, tmp_path / "bad.json", {"chunked_cross_entropy": True},
                    {"task": "sequence-classification", "num_labels": 2})  # fmt: skip
    out = tmp_path / "refused"
    res = CliRunner().invoke(run_main, [str(bad), "--data", str(data), "--output", str(out), "--quiet"])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and "only applies to causal-LM" in lines[0], res.output
    assert not out.exists()
