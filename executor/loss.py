"""The causal-LM loss of a training step, optionally as chunked cross-entropy.

Why chunk: the logits of a micro-batch are B x S x V. For Llama-3 (V = 128,256) one 1024-token sequence
has 0.5 GB of fp32 logits, and training keeps two more tensors of that size (the log-softmax saved for
backward and the gradient flowing into it), plus the bf16 logits under bf16 weights: a large share of a
24 GB card. Chunked cross-entropy runs the decoder as usual, flattens the final hidden states to
(B*S, H) tokens and cuts them into pieces of `chunk_tokens` tokens; each piece's head (lm_head) and
cross-entropy run under non-reentrant activation checkpointing, so only one piece's logits exist at a
time, in forward and in backward (the price: the head's forward runs twice, a few percent of a step).

The value is Hugging Face's (transformers 5.x `ForCausalLMLoss`) to rounding: labels are shifted left by
one (position t predicts label t+1; the last position and every -100 label are ignored), the logits are
upcast to fp32 before the softmax, and the summed token losses are divided by the number of target
tokens of the whole micro-batch (or by `num_items_in_batch` when the batch passes one, as HF does).

The head is called as a module (`head(hidden)`), never through its weight, so an instance-level forward
installed by executor/slicegrad.py (a straddling lm_head or a tied embedding) computes the window's exact
slice gradient. Only architectures whose forward is verified to be `logits = lm_head(base_model(...)
.last_hidden_state)` followed by ForCausalLMLoss are accepted; others (logit soft-capping, logit scales)
would silently train on a different loss, so they are refused by class name.

Memory note for the planner: when the head's weight is in the active window, each piece's backward
makes one head-weight-sized gradient that is added to the accumulated one, so backward holds up to one extra
V x H gradient (fp32 window buffer + the piece's gradient) that the unchunked path does not.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "DEFAULT_CHUNK_TOKENS",
    "IGNORE_INDEX",
    "UnsupportedArchitectureError",
    "causal_lm_loss",
    "causal_lm_parts",
    "piece_logit_bytes",
]

# 256 tokens: at Llama-3's vocabulary a piece's fp32 logits are 256 x 128,256 x 4 B = 131 MB (about
# 330 MB with the bf16 logits and the gradient), against 0.5 GB per sequence unchunked; a 256-row matmul
# still fills a GPU's tensor cores, and the recomputation costs one extra head forward whatever the size.
DEFAULT_CHUNK_TOKENS = 256
IGNORE_INDEX = -100  # Hugging Face's ignore_index for labels

# Classes whose forward is exactly `lm_head(base_model(**kwargs).last_hidden_state)` + ForCausalLMLoss in
# transformers 5.x (read and tested in tests/test_chunked_ce.py); exact types, not subclasses, because a
# subclass may override forward.
_VERIFIED_CLASSES = (
    ("transformers.models.llama.modeling_llama", "LlamaForCausalLM"),
    ("transformers.models.mistral.modeling_mistral", "MistralForCausalLM"),
    ("transformers.models.qwen2.modeling_qwen2", "Qwen2ForCausalLM"),
    ("transformers.models.qwen3.modeling_qwen3", "Qwen3ForCausalLM"),
    ("transformers.models.gpt2.modeling_gpt2", "GPT2LMHeadModel"),
)


class UnsupportedArchitectureError(ValueError):
    """Chunked cross-entropy cannot reproduce this model's loss; str() names the class and what to do."""


def _model_class(model: nn.Module) -> type:
    """The model's own class: FSDP2's fully_shard swaps in a subclass named FSDP<name> (the forward and
    loss are the original class's)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def _verified(model: nn.Module) -> bool:
    cls = _model_class(model)
    return (cls.__module__, cls.__name__) in _VERIFIED_CLASSES


def causal_lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(decoder, head) of a verified *ForCausalLM model, found through transformers' own accessors
    (`base_model`, `get_output_embeddings()`); anything else raises UnsupportedArchitectureError."""
    name = _model_class(model).__name__
    supported = ", ".join(n for _, n in _VERIFIED_CLASSES)
    if not _verified(model):
        raise UnsupportedArchitectureError(
            f"chunked cross-entropy does not support {name} (verified: {supported}); plan without "
            "chunked cross-entropy"
        )
    decoder = getattr(model, "base_model", None)
    head = model.get_output_embeddings()
    if not isinstance(decoder, nn.Module) or decoder is model or not isinstance(head, nn.Linear):
        raise UnsupportedArchitectureError(
            f"chunked cross-entropy found no decoder and linear lm_head in {name}; plan without chunked "
            "cross-entropy"
        )
    from transformers.loss.loss_utils import ForCausalLMLoss

    if model.loss_function is not ForCausalLMLoss:
        raise UnsupportedArchitectureError(
            f"{name} uses a custom loss_function ({getattr(model.loss_function, '__name__', '?')}), which "
            "chunked cross-entropy does not reproduce; plan without chunked cross-entropy"
        )
    return decoder, head


def _piece_loss_sum(head: nn.Module, hidden: Tensor, targets: Tensor) -> Tensor:
    """Summed cross-entropy of one piece: (n, H) hidden states, (n,) shifted labels. Logits upcast to fp32
    like ForCausalLMLoss."""
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def _pieces_loss_sum(head: nn.Module, flat: Tensor, targets: Tensor, chunk_tokens: int) -> Tensor:
    """The pieces' summed loss; each piece's logits exist only inside its own checkpointed call."""
    total = flat.new_zeros((), dtype=torch.float32)
    for h, t in zip(flat.split(chunk_tokens), targets.split(chunk_tokens), strict=True):
        if torch.is_grad_enabled():
            total = total + checkpoint(_piece_loss_sum, head, h, t, use_reentrant=False)
        else:  # evaluation: nothing is saved for backward, so nothing to recompute
            total = total + _piece_loss_sum(head, h, t)
    return total


def _no_kv_cache(model: nn.Module) -> dict[str, bool]:
    """use_cache=False for a model that generates (the others take no such argument): a training step
    reads no cache, yet a config saying use_cache=True, the default of most, made GPT-2 build one, and
    its step's memory was then not the planned one (tests/test_arch_measured.py)."""
    can_generate = getattr(model, "can_generate", None)
    return {"use_cache": False} if callable(can_generate) and can_generate() else {}


def causal_lm_loss(model: nn.Module, batch: Mapping[str, Any], chunk_tokens: int | None) -> Tensor:
    """The step's loss. None: `model(**batch).loss`, without a KV cache. An int: the same value (Hugging
    Face's mean over target tokens, to rounding) without materialising the full logits (see the module
    doc)."""
    if chunk_tokens is None:
        return model(**{**batch, **_no_kv_cache(model)}).loss
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive int or None, got {chunk_tokens!r}")
    decoder, head = causal_lm_parts(model)
    inputs = dict(batch)
    labels = inputs.pop("labels", None)
    if labels is None:
        raise ValueError("chunked cross-entropy needs 'labels' in the batch (causal-LM targets)")
    for key in ("shift_labels", "logits_to_keep"):
        if key in inputs:
            raise ValueError(f"chunked cross-entropy does not take {key!r}; pass plain causal-LM labels")
    # what the *ForCausalLM forward passes to its decoder: every keyword but labels (HF passes
    # num_items_in_batch on to both the decoder and the loss)
    hidden = decoder(**inputs, **_no_kv_cache(model)).last_hidden_state
    tokens = hidden.shape[0] * hidden.shape[1]
    flat = hidden.reshape(tokens, hidden.shape[-1])
    # HF: pad one ignored label on the right, drop the first: position t is scored against label t+1
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(tokens).to(flat.device)
    total = _pieces_loss_sum(head, flat, targets, chunk_tokens)
    divisor = inputs.get("num_items_in_batch")
    if divisor is None:
        divisor = (targets != IGNORE_INDEX).sum()
    elif torch.is_tensor(divisor):
        divisor = divisor.to(total.device)
    return total / divisor


def piece_logit_bytes(
    micro_batch: int, seq_len: int, chunk_tokens: int | None, vocab: int, dtype: torch.dtype | str
) -> int:
    """Bytes of the largest piece's logits in `dtype` (None: the whole micro-batch's logits). For the
    planner: training holds about three such tensors at the head at once (the fp32 logits or the
    log-softmax saved for backward, the gradient into it, the gradient into the logits), plus the head
    dtype's logits when it is not fp32."""
    for what, v in (("micro_batch", micro_batch), ("seq_len", seq_len), ("vocab", vocab)):
        if v < 1:
            raise ValueError(f"{what} must be >= 1, got {v}")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1 or None, got {chunk_tokens}")
    dt = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype name")
    tokens = micro_batch * seq_len
    piece = tokens if chunk_tokens is None else min(chunk_tokens, tokens)
    return piece * vocab * dt.itemsize
