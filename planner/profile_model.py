"""Model profiling without allocating: parameter bytes from a meta-device model, activation bytes from
fake-tensor traces of a shallow copy of the model.

Why shallow: a decoder is one block repeated L times, so three blocks at full width (the first, a
representative middle one, the last) plus embedding and head carry everything the planner needs; the
simulator composes the other L-3 blocks from the middle one. Nothing here allocates real storage, so a
70B-wide block traces on a laptop CPU in well under a second. Traces, and the full model's structure,
are kept on disk by planner/trace_cache.py: a repeated plan neither traces nor builds the model.

Memory is measured as the live bytes of every storage created during the step (activations, gradients
of activations, parameter gradients before the executor's hook moves them into its fp32 window buffer,
temporaries). Parameters and buffers exist before the trace and are not counted here.

Attention: the trace runs on the CPU fake device, so "sdpa" goes through PyTorch's CPU flash kernel
(memory linear in the sequence, like CUDA flash/mem-efficient kernels; it saves output + logsumexp), and
"eager" materialises the B*heads*S*S scores as it would on a GPU.

Value-dependent branches: Hugging Face decides from the *values* of the batch whether sdpa needs a mask
(an unpadded, unpacked causal batch needs none: `is_causal=True`, and grouped-query K/V stay un-repeated
via `enable_gqa`). A fake tensor has no values, so Hugging Face takes the conservative branch: it
materialises a B*S*S mask and repeats K and V to all heads, which a real step never does (+2 hidden
states saved per block on a GQA model, +5.5% on tiny-llama). The trace therefore states the resolution
up front: for the batches the executor feeds (causal-LM text windows: unpadded) it runs sdpa through a
registered attention function (`UNPADDED_SDPA`, transformers' documented AttentionInterface) that
Hugging Face creates no mask for, i.e. exactly the real path. The decision depends only on padding,
sequence length and the attention pattern (sliding windows), never on the model's width, so it holds for
a 70B model as for a tiny one. Padded batches (classification rows) keep the standard masked path, which
is also what a real padded step runs.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from chunkft.chunks import DTYPE_BYTES, ParamSpec, param_specs
from chunkft.executor.slicegrad import SliceGradients, foreign_uses

if TYPE_CHECKING:
    from chunkft.planner.trace_cache import Entry

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

Task = Literal["causal-lm", "sequence-classification"]

# How a block takes part in the backward pass of a ChunkFT step:
# "full": its weights are in the active window and so is something below it (weight and input gradients);
# "first": the lowest block of a window that does not reach the embedding: weight gradients, but its
#   input needs none, so autograd records less (e.g. the input norm saves its output, not its input and
#   statistics, and the block input is dropped after the forward);
# "input": above the window (frozen weights, input gradient only so the window below gets its gradient);
# "none": below the window (forward only, nothing saved, no backward).
BlockMode = Literal["full", "first", "input", "none"]
# A block at the edge of a window that holds only some of its tensors: ("edge", tensors of the block
# before the window, tensors after it, whether the block's input needs a gradient). The tensors outside
# the window change what autograd saves (a frozen Linear keeps no input), so each pattern is traced (the
# block alone) into the activation table before solving: the patterns a candidate needs follow from its
# windows (planner.simulator.edge_patterns). Whole-block patterns are the BlockModes above.
EdgeMode = tuple[Literal["edge"], int, int, bool]
# An edge pattern as the table files it: (skip_before, skip_after, input_grad).
EdgeKey = tuple[int, int, bool]
# The head (final norm, LM/classifier head, loss): "full" when the window touches the head and a block
# below it, "input" when the window is below the head, "weight" when the window is only in the head.
HeadMode = Literal["full", "input", "weight"]

TRACE_LAYERS = 3  # first, representative middle, last
_REPRESENTATIVE = 1


class ProfilingError(ValueError):
    """The model cannot be profiled (unsupported architecture or settings); one clear line."""


@dataclass(frozen=True)
class Segment:
    """Memory of one piece of the step, relative to the live bytes when it starts.

    delta_bytes: live bytes at the end minus at the start (what it keeps, e.g. saved activations);
    excursion_bytes: the highest live bytes inside it minus at the start (>= max(0, delta_bytes)).
    """

    delta_bytes: int
    excursion_bytes: int
    grad_bytes: int = 0  # fp32 window-gradient buffers created inside it (part of delta_bytes)


ZERO_SEGMENT = Segment(0, 0)


@dataclass(frozen=True)
class BlockMemory:
    """Forward and backward segments of one representative block in one mode."""

    fwd: Segment
    bwd: Segment  # ZERO_SEGMENT in mode "none"


class IncompleteTableError(ProfilingError):
    """A window needs an edge pattern its activation table was not built with (a planner bug: tables
    are completed for the candidates' windows before solving)."""


@dataclass(frozen=True)
class ActivationProfile:
    """The activation table of one micro-batch (sequences of seq_len tokens) at one dtype: every
    segment the simulator composes a step from, traced before solving, so that the simulator is a pure
    function of (table, candidate) and a test can hand it a made-up table."""

    micro_batch: int
    seq_len: int
    dtype: str
    attn_implementation: str
    embed_fwd: Segment  # embedding, position embeddings, masks: up to the first block
    embed_bwd_trainable: Segment  # the embedding's backward when it is in the window
    blocks: tuple[tuple[str, BlockMemory], ...]  # (mode, memory): modes, and ckpt-<mode> but none
    head_fwd: tuple[tuple[str, Segment], ...]  # by HeadMode: last block output -> loss
    head_bwd: tuple[tuple[str, Segment], ...]  # by HeadMode: loss.backward() -> first block gradient
    hidden_bytes: int  # one block input/output, B*S*H in the compute dtype (what goes between GPUs)
    chunk_tokens: int | None = None  # the loss as chunked cross-entropy in pieces of this many tokens
    # The representative block traced alone, by edge pattern, with (0, 0, input_grad) for each
    # input_grad present: an edge is the whole block's step segments moved by their difference.
    edges: tuple[tuple[EdgeKey, BlockMemory], ...] = ()
    chunked_loss_supported: bool = False  # the executor has chunked cross-entropy for this model
    # What the decoder makes once and hands to every block (attention masks, one per layer type, the
    # position embeddings and ids): (layer types whose blocks take it, bytes). The step's traces free
    # it when the decoder returns, as it is without checkpointing; a checkpointed block keeps its
    # arguments until its backward, so the simulator keeps each until the lowest checkpointed block
    # taking it has run backward (planner.simulator.kept_inputs). block_types: the full model's layer
    # type per block (all "" when the config has no layer_types).
    kept_inputs: tuple[tuple[tuple[str, ...], int], ...] = ()
    block_types: tuple[str, ...] = ()

    def block(
        self,
        mode: BlockMode | EdgeMode,
        checkpointed: bool = False,
        last: bool = False,
        head_only: bool = False,
    ) -> BlockMemory:
        """`last`: the top block below the head. Below the window ("none") its input is dropped after
        the head's forward began (where the head segment, traced after it, already counts the free),
        so its own segment ends at its output rather than at the next block's input.
        `head_only` (block 0 when the window is only the head): the decoder holds the embedding output
        until it returns, and the head segment of that trace counts the free, so block 0 keeps it."""
        if isinstance(mode, tuple):
            _, skip_before, skip_after, input_grad = mode
            whole = self.block("full" if input_grad else "first", checkpointed)
            return edge_block(
                whole,
                self._edge((skip_before, skip_after, input_grad)),
                self._edge((0, 0, input_grad)),
                checkpointed,
            )
        if head_only and mode == "none":
            return self._blocks["first-none"]
        if last and mode == "none":
            return self._blocks["last-none"]
        key = f"ckpt-{mode}" if checkpointed and mode != "none" else mode
        return self._blocks[key]

    def head(self, mode: HeadMode) -> tuple[Segment, Segment]:
        return self._heads[mode]

    def edge_keys(self) -> frozenset[EdgeKey]:
        return frozenset(self._edges)

    def _edge(self, key: EdgeKey) -> BlockMemory:
        hit = self._edges.get(key)
        if hit is None:
            raise IncompleteTableError(
                f"the activation table has no trace of window edge {key}; build it with that pattern "
                "in edges (planner.simulator.edge_patterns of the candidate's windows)"
            )
        return hit

    @functools.cached_property
    def _edges(self) -> dict[EdgeKey, BlockMemory]:
        return dict(self.edges)

    @functools.cached_property
    def _blocks(self) -> dict[str, BlockMemory]:
        return dict(self.blocks)

    @functools.cached_property
    def _heads(self) -> dict[str, tuple[Segment, Segment]]:
        bwd = dict(self.head_bwd)
        return {m: (f, bwd[m]) for m, f in self.head_fwd}


def with_full_edges(edges: Iterable[EdgeKey]) -> frozenset[EdgeKey]:
    """The patterns plus the whole block alone for each input_grad among them (what block() offsets by)."""
    keys = frozenset(edges)
    return keys | {(0, 0, ig) for _, _, ig in keys}


def edge_block(whole: BlockMemory, part: BlockMemory, full: BlockMemory, checkpointed: bool) -> BlockMemory:
    """The representative block with only some of its tensors in the window (see EdgeMode).

    `whole`: the same block with all its tensors in the window (mode "full" when its input needs a
    gradient, else "first"), traced in the 3-block step; `part` and `full`: the block alone with the
    pattern's tensors and with all of them trainable (a few hundred ops instead of a whole step). The
    edge is `whole` plus their difference: what the surrounding step adds to the block's segments does
    not depend on which of its tensors train.
    """
    if checkpointed:
        # A checkpointed block saves its inputs whatever trains; its backward recomputes the forward
        # (keeping what the pattern saves) and then runs the pattern's backward.
        return BlockMemory(whole.fwd, _shift(whole.bwd, _recompute(part), _recompute(full)))
    return BlockMemory(_shift(whole.fwd, part.fwd, full.fwd), _shift(whole.bwd, part.bwd, full.bwd))


@dataclass(frozen=True)
class ModelStructure:
    """What the planner needs to know about a model besides activations: parameters by position."""

    model_type: str
    task: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    num_attention_heads: int
    head_dim: int
    layers_prefix: str  # e.g. "model.layers." (parameter names of block i start with prefix + "i.")
    specs: tuple[ParamSpec, ...]  # trainable tensors in stream (forward) order, at the weight dtype
    spec_layer: tuple[int, ...]  # per spec: -1 embedding side, 0..L-1 block, L head side
    tied_embeddings: bool
    # tensors whose module the executor cannot slice (executor.slicegrad SliceGradients.unsliceable):
    # windows never cut them, so a written plan is one chunkft-run accepts
    unsliceable: tuple[str, ...] = ()

    @property
    def num_params(self) -> int:
        return sum(s.numel for s in self.specs)

    def layer_numel(self, layer: int) -> int:
        return sum(s.numel for s, li in zip(self.specs, self.spec_layer, strict=True) if li == layer)

    def linear_numel(self, layer: int) -> int:
        """Elements of the 2-D weights of a group (what matmul FLOPs scale with)."""
        pairs = zip(self.specs, self.spec_layer, strict=True)
        return sum(s.numel for s, li in pairs if li == layer and len(s.shape) == 2)


@functools.lru_cache(maxsize=64)
def group_positions(structure: ModelStructure) -> tuple[int, ...]:
    """Per spec: its position among the specs of its group (the same in every block)."""
    seen: dict[int, int] = {}
    out = []
    for g in structure.spec_layer:
        out.append(seen.get(g, 0))
        seen[g] = out[-1] + 1
    return tuple(out)


# ------------------------------------------------------------------------------------------ structure


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList holding the repeated blocks: the longest one (ties: the first registered)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (best is None or len(mod) > len(best[1])):
            best = (name, mod)
    if best is None:
        raise ProfilingError(f"{type(model).__name__} has no list of repeated blocks; cannot profile it")
    return best


def structure_of(model: nn.Module, task: str) -> ModelStructure:
    """Parameter specs and their positions from a (meta-device) model; nothing is allocated."""
    cfg = model.config  # type: ignore[attr-defined]
    prefix, layers = _decoder_layers(model)
    prefix = prefix + "."
    specs = param_specs(model)
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    num_layers = len(layers)
    spec_layer: list[int] = []
    seen_block = False
    for s in specs:
        m = pattern.match(s.name)
        if m:
            spec_layer.append(int(m.group(1)))
            seen_block = True
        else:
            spec_layer.append(num_layers if seen_block else -1)
    hidden = int(cfg.hidden_size)
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
    tied = bool(getattr(cfg, "tie_word_embeddings", False)) and task == "causal-lm"
    return ModelStructure(
        model_type=str(getattr(cfg, "model_type", type(model).__name__)),
        task=task,
        num_layers=num_layers,
        hidden_size=hidden,
        vocab_size=int(cfg.vocab_size),
        num_attention_heads=heads,
        head_dim=head_dim,
        layers_prefix=prefix,
        specs=tuple(specs),
        spec_layer=tuple(spec_layer),
        tied_embeddings=tied,
        unsliceable=tuple(sorted(SliceGradients(model).unsliceable())),
    )


def _shallow_forward(config: object, task: str, dtype: str) -> tuple[nn.Module, Callable[[], object]]:
    """A TRACE_LAYERS-block copy of the model under FakeTensorMode (nothing allocated; a meta model
    would fail on the masks' .item()) and one training forward of a short batch through it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cfg = _shallow_config(config, TRACE_LAYERS)
    cfg._attn_implementation = "eager"  # type: ignore[attr-defined]  # every model has it; reads are the same
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        model = build_from_config(cfg, task, "cpu", TORCH_DTYPES[dtype]).train()
    batch = example_batch(task, int(cfg.vocab_size), 1, 8)  # type: ignore[attr-defined]

    def forward() -> object:
        with mode:
            return model(**batch)

    return model, forward


def read_outside_owner(
    structure: ModelStructure, shallow: nn.Module, forward: Callable[[], object]
) -> set[str]:
    """The full model's tensors some module reads outside its owner's forward (executor.slicegrad
    foreign_uses: DeBERTa-v2's non-legacy MLM head multiplying by the embedding weight), found on the
    shallow copy: the executor refuses a cut through them, so the planner keeps them whole. A read
    inside block i of the copy stands for the same tensor of every block (the blocks share their code).
    A forward that does not run this way finds nothing, and the executor's own check still refuses."""
    try:
        found = foreign_uses(shallow, forward)
    except Exception:  # noqa: BLE001 - best effort ahead of the executor's check, never a planning failure
        return set()
    prefix = structure.layers_prefix
    block = re.compile(re.escape(prefix) + r"\d+\.(.+)")
    names = {s.name for s in structure.specs}
    in_block = {n: m[1] for n in names if (m := block.match(n))}  # full-model name -> name within its block
    out = set()
    for name in found:
        m = block.match(name)
        out |= {name} if m is None else {n for n, rest in in_block.items() if rest == m[1]}
    return out & names


def build_from_config(config: object, task: str, device: str, dtype: torch.dtype) -> nn.Module:
    """An unmodified Hugging Face model from a config (what profiles.build_model does for a preset)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    if device == "meta":
        with torch.device("meta"):
            model = auto.from_config(config, dtype=dtype)
    else:
        model = auto.from_config(config, dtype=dtype)
    return model


def _model_class(config: object, task: str) -> type | None:
    """The Hugging Face class `build_from_config` instantiates; None when the auto classes do not map
    the config (remote code), where Hugging Face's own checks are all there is."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    try:
        cls = auto._model_mapping[type(config)]  # type: ignore[attr-defined]
    except (KeyError, ValueError):
        return None
    if isinstance(cls, (list, tuple)):
        cls = cls[0]
    return cls if isinstance(cls, type) else None


def supported_attention(config: object, task: str) -> tuple[str, ...]:
    """The plannable attention implementations (chunkft-plan's --attn choices) the model's class
    supports: "eager" always, "sdpa" unless the class has no sdpa path (Gemma-2: transformers refuses
    it when the model is built). Cached on disk (planner/trace_cache.py): the class's module is heavy."""
    from chunkft.planner import trace_cache as tc

    entry = tc.open_model(config, task)
    return tc.cached(
        entry, "class", "attention", tc.decode_attention, lambda: _supported_attention(config, task), list
    )


def _supported_attention(config: object, task: str) -> tuple[str, ...]:
    cls = _model_class(config, task)
    if cls is not None and not getattr(cls, "_supports_sdpa", True):
        return ("eager",)
    return ("sdpa", "eager")


def check_attention(config: object, task: str, attn: str) -> None:
    """Refuse an unsupported attention in chunkft's words: transformers' own error suggests a Python
    argument (attn_implementation=...), and chunkft-run builds the model with the plan's attention, so
    a silent fallback here would only move the failure to the run."""
    if "sdpa" in attn and "sdpa" not in supported_attention(config, task):  # also UNPADDED_SDPA
        cls = _model_class(config, task)
        name = cls.__name__ if cls is not None else type(config).__name__
        raise ProfilingError(
            f"{name} has no sdpa attention in transformers (it supports eager only); "
            "plan it with --attn eager, which chunkft-run then uses too"
        )


@dataclass(frozen=True)
class ModelIdentity:
    """What a plan records of the model it was made for (its class, size and parameter specs)."""

    architecture: str  # the Hugging Face class name
    num_params: int  # distinct parameters (a tied head counted once)
    specs: tuple[ParamSpec, ...]  # param_specs of the model as built for training


def model_structure(config: object, task: str, dtype: str) -> ModelStructure:
    """Structure of the full-depth model, built on the meta device (or read from the model cache)."""
    return _model_facts(config, task, dtype, "structure")  # type: ignore[return-value]


def model_identity(config: object, task: str, dtype: str) -> ModelIdentity:
    """The model's class, parameter count and specs, from the same meta-device build (or the cache)."""
    return _model_facts(config, task, dtype, "identity")  # type: ignore[return-value]


def _model_facts(config: object, task: str, dtype: str, which: str) -> ModelStructure | ModelIdentity:
    """Structure or identity of the full-depth model: one meta build computes (and caches) both."""
    from chunkft.planner import trace_cache as tc

    entry = tc.open_model(config, task)
    decode = tc.decode_structure if which == "structure" else tc.decode_identity
    hit = entry.get(which, dtype, decode) if entry is not None else None
    if hit is not None:
        return hit
    model = build_from_config(config, task, "meta", TORCH_DTYPES[dtype])
    structure = structure_of(model, task)
    keep = set(structure.unsliceable) | read_outside_owner(structure, *_shallow_forward(config, task, dtype))
    structure = replace(structure, unsliceable=tuple(sorted(keep)))
    identity = ModelIdentity(
        type(model).__name__, sum(p.numel() for p in model.parameters()), tuple(param_specs(model))
    )
    if entry is not None:
        entry.put("structure", dtype, tc.encode_structure(structure))
        entry.put("identity", dtype, tc.encode_identity(identity))
    return structure if which == "structure" else identity


# ------------------------------------------------------------------------------------- live bytes


def _tensors(obj: object) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)


class _Counter:
    """Live and peak bytes above the model's own (executor.measure.MemoryTracker, the one tracker)."""

    def __init__(self, tracker: object) -> None:
        self.tracker = tracker
        self.base = 0

    @property
    def live(self) -> int:
        return self.tracker.live_bytes() - self.base  # type: ignore[attr-defined]

    @property
    def peak(self) -> int:
        return self.tracker.peak_bytes() - self.base  # type: ignore[attr-defined]

    def reset_peak(self) -> None:
        self.tracker.reset_peak()  # type: ignore[attr-defined]


class _Timeline:
    """Markers (name, live bytes) and the peak between consecutive markers."""

    def __init__(self, counter: _Counter) -> None:
        self.counter = counter
        self.grad_bytes = 0  # fp32 gradient buffers adopted so far
        # (name, live at mark, peak since previous mark, gradient buffer bytes so far)
        self.marks: list[tuple[str, int, int, int]] = []

    def mark(self, name: str) -> None:
        self.marks.append((name, self.counter.live, self.counter.peak, self.grad_bytes))
        self.counter.reset_peak()

    def index(self, name: str, after: int = 0) -> int:
        for i in range(after, len(self.marks)):
            if self.marks[i][0] == name:
                return i
        raise ProfilingError(f"trace marker {name!r} missing; the model's forward does not run as expected")

    def segment(self, a: int, b: int) -> Segment:
        start = self.marks[a][1]
        top = max([start] + [self.marks[i][2] for i in range(a + 1, b + 1)])
        return Segment(self.marks[b][1] - start, top - start, self.marks[b][3] - self.marks[a][3])


# ------------------------------------------------------------------------------------------ tracing


def enable_layer_checkpointing(model: nn.Module, layer_indices: Sequence[int]) -> None:
    """Checkpoint exactly these blocks (non-reentrant torch.utils.checkpoint), per instance.

    Hugging Face blocks (GradientCheckpointingLayer) read `gradient_checkpointing` and
    `_gradient_checkpointing_func` from the instance, so setting them on chosen blocks checkpoints those
    blocks only; the profiler and the executor must use this same mechanism for the numbers to agree.
    """
    from torch.utils.checkpoint import checkpoint

    _, layers = _decoder_layers(model)
    chosen = set(layer_indices)
    for i, layer in enumerate(layers):
        on = i in chosen
        if (
            on
            and not hasattr(layer, "_gradient_checkpointing_func")
            and not hasattr(type(layer), "gradient_checkpointing")
        ):
            raise ProfilingError(f"{type(layer).__name__} cannot checkpoint single layers")
        layer.gradient_checkpointing = on
        if on:
            layer._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
    if chosen and hasattr(model, "config"):
        model.config.use_cache = False  # type: ignore[attr-defined]


def move_grads_hook(
    buffers: dict[torch.Tensor, torch.Tensor], on_new: Callable[[int], None] | None = None
) -> Callable[[torch.Tensor], None]:
    """What the executor (executor/slicegrad.py) does after a parameter's gradient is accumulated: the
    first gradient, upcast to fp32 (no copy when it already is), becomes the window buffer; later ones
    are added into it; `.grad` is dropped, so no parameter holds a gradient across the backward."""

    def hook(p: torch.Tensor) -> None:
        grad = p.grad
        p.grad = None
        assert grad is not None
        if p in buffers:
            buffers[p].add_(grad)
        else:
            buffers[p] = grad.to(torch.float32).contiguous()
            if on_new is not None:
                on_new(buffers[p].numel() * 4)

    return hook


def default_padded(task: str) -> bool:
    """Whether the executor's batches for a task carry padding: causal-LM text windows are full rows;
    classification rows (SST-2) are padded to the sequence length."""
    return task != "causal-lm"


def example_batch(
    task: str, vocab_size: int, micro_batch: int, seq_len: int, padded: bool | None = None
) -> dict[str, torch.Tensor]:
    """Inputs and labels of one micro-batch, shaped like the executor's (executor/data.py): token ids, an
    attention mask (all ones, or the last position padded), labels (class labels for classification)."""
    padded = default_padded(task) if padded is None else padded
    ids = torch.randint(0, vocab_size, (micro_batch, seq_len))
    mask = torch.ones((micro_batch, seq_len), dtype=torch.long)
    if padded and seq_len > 1:
        mask[:, -1] = 0
    if task == "causal-lm":
        return {"input_ids": ids, "attention_mask": mask, "labels": ids}
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (micro_batch,))}


UNPADDED_SDPA = "chunkft_unpadded_sdpa"


def _unpadded_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Hugging Face's own sdpa attention, called without a mask: what it runs for an unpadded batch."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, None, **kwargs)  # type: ignore[arg-type]


def traced_attention(config: object, task: str, attn: str, seq_len: int, padded: bool) -> str:
    """The attention implementation a fake trace must use to run what a real step runs (see the module
    docstring): `UNPADDED_SDPA` where Hugging Face would drop the mask on real values, else `attn`."""
    if attn != "sdpa" or padded or task != "causal-lm" or not getattr(config, "is_causal", True):
        return attn
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) and window is not None and seq_len >= int(window):
        return attn  # a sliding-window mask is needed at this length, real or fake
    from transformers import AttentionInterface

    AttentionInterface.register(UNPADDED_SDPA, _unpadded_sdpa)  # idempotent: a name -> function mapping
    return UNPADDED_SDPA


# Config entries that hold one value per block (transformers' names), besides "*layer_types" and
# "*_per_layer" entries; an int `intermediate_size` is left alone, a per-layer list one (Gemma-3n) is not.
_PER_LAYER_KEYS = frozenset(
    {
        "activation_sparsity_pattern",
        "indexer_types",
        "intermediate_size",
        "kv_sharing_modes",
        "layers_block_type",
        "layers_num_experts",
        "no_rope_layers",
        "num_attention_heads_per_layer",
        "num_key_value_heads_per_layer",
        "per_layer_config",
        "rope_types",
        "sliding_windows",
        "swiglu_limits",
        "swiglu_limits_shared",
    }
)


def _is_per_layer(key: str) -> bool:
    return key in _PER_LAYER_KEYS or key.endswith("layer_types") or key.endswith("_per_layer")


def _shallow_config(config: object, layers: int) -> object:
    """The config of the `layers`-block profiling copy, its per-layer lists (`layer_types`, ...) kept
    as long as num_hidden_layers: Hugging Face indexes them by block and raises IndexError past the end.
    Block i of the copy takes the per-layer settings of block min(i, L-1) of the model (the first blocks
    of a deep model, a 1- or 2-block model's last block repeated), except block 0, which takes the
    representative block's: a block below it of the same layer type. Why: with activation checkpointing
    a block keeps its layer type's attention mask alive until its backward, and the lowest block of a
    type frees it; were the representative the lowest of its type (Gemma-2 alternates sliding and full
    attention), every composed block would free a mask (measured: -4.5% on a checkpointed Gemma-2)."""
    cfg = copy.deepcopy(config)
    depth = int(getattr(config, "num_hidden_layers", layers) or layers)
    source = [min(i, depth - 1) for i in range(layers)]
    if layers > _REPRESENTATIVE:
        source[0] = source[_REPRESENTATIVE]
    for key, value in config.to_dict().items():  # type: ignore[attr-defined]
        if _is_per_layer(key) and isinstance(value, (list, tuple)) and len(value) == depth:
            setattr(cfg, key, [copy.deepcopy(value[j]) for j in source])
    cfg.num_hidden_layers = layers  # type: ignore[attr-defined]
    cfg.use_cache = False  # type: ignore[attr-defined]
    return cfg


def _trace(
    model: nn.Module,
    task: str,
    vocab_size: int,
    micro_batch: int,
    seq_len: int,
    trainable: Callable[[int, int], bool],
    structure: ModelStructure,
    checkpoint_layers: Sequence[int],
    padded: bool,
    embedding_output_grad: bool = False,
    chunk_tokens: int | None = None,
) -> _Timeline:
    """One forward+backward of the shallow model under the live-bytes counter, with block markers.
    embedding_output_grad: the blocks' input needs a gradient although no embedding tensor is trainable
    (how a window above a tied embedding sees the step: the head's weight is the embedding's).
    chunk_tokens: the loss as chunked cross-entropy in pieces of that many tokens (executor/loss.py)."""
    from torch.distributed._tools.mod_tracker import ModTracker

    from chunkft.executor.loss import causal_lm_loss
    from chunkft.executor.measure import MemoryTracker

    params = dict(model.named_parameters())
    buffers: dict[torch.Tensor, torch.Tensor] = {}
    batch = example_batch(task, vocab_size, micro_batch, seq_len, padded)
    counter = _Counter(MemoryTracker(model, exclude=list(batch.values())))
    timeline = _Timeline(counter)

    def on_new(nbytes: int) -> None:
        timeline.grad_bytes += nbytes

    handles = []
    positions = group_positions(structure)
    for spec, layer, pos in zip(structure.specs, structure.spec_layer, positions, strict=True):
        p = params[spec.name]
        p.requires_grad_(trainable(layer, pos))
        if p.requires_grad:
            handles.append(p.register_post_accumulate_grad_hook(move_grads_hook(buffers, on_new)))
    enable_layer_checkpointing(model, checkpoint_layers)
    if embedding_output_grad:
        embed = model.get_input_embeddings()  # type: ignore[operator]
        handles.append(embed.register_forward_hook(lambda _m, _a, out: out.detach().requires_grad_(True)))
    _, layers = _decoder_layers(model)
    block_index = {id(layer): i for i, layer in enumerate(layers)}
    tracker = ModTracker()

    def hook(kind: str) -> Callable[..., None]:
        def fn(mod: nn.Module, *args: object) -> None:
            i = block_index.get(id(mod))
            if i is not None:
                timeline.mark(f"{kind} {i}")

        return fn

    tracker.register_user_hooks(hook("pre_fw"), hook("post_fw"), hook("pre_bw"), hook("post_bw"))
    try:
        counter.tracker.start()
        with tracker:
            counter.base = counter.tracker.live_bytes()  # parameters and buffers: not part of a segment
            timeline.mark("start")
            with counter.tracker.phase("forward"):
                loss = causal_lm_loss(model, batch, chunk_tokens)
            timeline.mark("fwd_end")
            with counter.tracker.phase("backward"):
                loss.backward()
            del loss
            timeline.mark("bwd_end")
            buffers.clear()
    finally:
        counter.tracker.stop()
        for h in handles:
            h.remove()
        enable_layer_checkpointing(model, [])
    return timeline


def activation_profile(
    config: object,
    task: str,
    micro_batch: int,
    seq_len: int,
    dtype: str,
    attn_implementation: str = "sdpa",
    padded: bool | None = None,
    chunk_tokens: int | None = None,
    edges: Iterable[EdgeKey] = (),
) -> ActivationProfile:
    """The activation table of one micro-batch, complete for the window-edge patterns `edges`
    (planner.simulator.edge_patterns of the windows to simulate); the same object for the same request.

    `padded`: whether the batches carry padding (None: the executor's data for the task,
    `default_padded`). `chunk_tokens`: the loss as chunked cross-entropy (executor/loss.py); only the
    head's segments change, so they are traced again and everything else is shared. Every piece is
    traced once per process (a tracer per configuration) and kept on disk by planner/trace_cache.py."""
    pad = default_padded(task) if padded is None else padded
    text = json.dumps(config.to_dict(), sort_keys=True, default=str)  # type: ignore[attr-defined]
    base = (text, task, micro_batch, seq_len, dtype, attn_implementation, pad)
    want = with_full_edges(edges)
    key = (base, chunk_tokens, want)
    if key not in _CACHE:
        tracer = _TRACERS.get(base)
        if tracer is None:
            if micro_batch < 1 or seq_len < 1:
                raise ProfilingError(
                    f"micro-batch and sequence length must be >= 1, got {micro_batch} and {seq_len}"
                )
            tracer = _TRACERS[base] = _ShallowTracer(
                config, task, micro_batch, seq_len, dtype, attn_implementation, pad
            )
        _CACHE[key] = tracer.table(chunk_tokens, want)
    return _CACHE[key]


def tables_for(
    config: object,
    task: str,
    seq_len: int,
    dtype: str,
    attn_implementation: str = "sdpa",
    padded: bool | None = None,
) -> Callable[[int, int | None, frozenset[EdgeKey]], ActivationProfile]:
    """The solver's tables (planner.solver.Tables) of one model at one sequence length: activation_profile
    by (micro-batch, chunk_tokens, edges)."""

    def table(micro_batch: int, chunk_tokens: int | None, edges: frozenset[EdgeKey]) -> ActivationProfile:
        return activation_profile(
            config, task, micro_batch, seq_len, dtype, attn_implementation, padded, chunk_tokens, edges
        )

    return table


_TRACERS: dict[tuple, _ShallowTracer] = {}  # by configuration: its traces, in memory and on disk
_CACHE: dict[tuple, ActivationProfile] = {}  # by (configuration, chunk_tokens, edges): complete tables


def _chunked_heads(
    tracer: _ShallowTracer, chunk_tokens: int
) -> tuple[tuple[tuple[str, Segment], ...], tuple[tuple[str, Segment], ...]]:
    """The head's (forward, backward) segments by HeadMode under chunked cross-entropy: 3 step traces."""
    L = TRACE_LAYERS
    traces = {
        "full": tracer.run(lambda _l, _p: True, False, chunk_tokens=chunk_tokens),
        "input": tracer.run(lambda _l, _p: False, False, True, chunk_tokens=chunk_tokens),
        "weight": tracer.run(lambda layer, _p: layer == L, False, chunk_tokens=chunk_tokens),
    }
    heads = {m: _head_segments(tl, L) for m, tl in traces.items()}
    return tuple((m, f) for m, (f, _) in heads.items()), tuple((m, b) for m, (_, b) in heads.items())


def _head_segments(tl: _Timeline, num_layers: int) -> tuple[Segment, Segment]:
    """The head's forward (top block's output to the loss) and backward (loss.backward() to the top
    block's gradient, or to the end of backward when no block needs one)."""
    a = tl.index(f"post_fw {num_layers - 1}")
    b = tl.index("fwd_end", a)
    fwd = tl.segment(a, b)
    d = (
        tl.index(f"pre_bw {num_layers - 1}", b)
        if any(m[0] == f"pre_bw {num_layers - 1}" for m in tl.marks)
        else len(tl.marks) - 1
    )
    return fwd, tl.segment(b, d)


class _ShallowTracer:
    """The shallow fake model of one profile configuration and its traces: what builds the activation
    tables (activation_profile) before anything is simulated."""

    def __init__(
        self, config: object, task: str, micro_batch: int, seq_len: int, dtype: str, attn: str, padded: bool
    ) -> None:
        check_attention(config, task, attn)
        self._config, self.attn, self.dtype = config, attn, dtype
        self.task, self.micro_batch, self.seq_len, self.padded = task, micro_batch, seq_len, padded
        self._block_inputs: tuple[tuple, dict] | None = None
        from chunkft.planner import trace_cache as tc

        # the on-disk traces of this configuration (planner/trace_cache.py); None when the cache is off
        self.store: Entry | None = tc.open_traces(config, task, micro_batch, seq_len, dtype, attn, padded)

    @functools.cached_property
    def _built(self) -> tuple[Any, nn.Module, ModelStructure]:
        """(fake mode, shallow model, its structure), built on first use: a profile read from the trace
        cache needs no model, and building one imports the model's modeling code."""
        from torch._subclasses.fake_tensor import FakeTensorMode

        cfg = _shallow_config(self._config, TRACE_LAYERS)
        cfg._attn_implementation = traced_attention(cfg, self.task, self.attn, self.seq_len, self.padded)  # type: ignore[attr-defined]
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode:
            model = build_from_config(cfg, self.task, "cpu", TORCH_DTYPES[self.dtype])
            model.train()
            structure = structure_of(model, self.task)
        return mode, model, structure

    @property
    def mode(self) -> Any:
        return self._built[0]

    @property
    def model(self) -> nn.Module:
        return self._built[1]

    @property
    def structure(self) -> ModelStructure:
        return self._built[2]

    def run(
        self,
        trainable: Callable[[int, int], bool],
        ckpt: bool,
        embedding_output_grad: bool = False,
        chunk_tokens: int | None = None,
    ) -> _Timeline:
        """One traced step; trainable(layer, position in layer) says which tensors are in the window."""
        layers = range(TRACE_LAYERS) if ckpt else []
        with self.mode:
            return _trace(
                self.model,
                self.task,
                self.structure.vocab_size,
                self.micro_batch,
                self.seq_len,
                trainable,
                self.structure,
                layers,
                self.padded,
                embedding_output_grad,
                chunk_tokens,
            )

    def table(self, chunk_tokens: int | None, edges: frozenset[EdgeKey]) -> ActivationProfile:
        """The plain profile, with the chunked-loss heads when chunk_tokens is set, and every pattern
        of `edges` traced alone."""
        table = self.plain
        if chunk_tokens is not None:
            if self.task != "causal-lm":
                raise ProfilingError("chunked cross-entropy applies to causal-LM models only")
            head_fwd, head_bwd = self.chunked_heads(chunk_tokens)
            table = replace(table, head_fwd=head_fwd, head_bwd=head_bwd, chunk_tokens=chunk_tokens)
        return replace(
            table,
            edges=tuple((k, self.block_alone(*k)) for k in sorted(edges)),
            chunked_loss_supported=self.chunked_loss_supported,
        )

    @functools.cached_property
    def plain(self) -> ActivationProfile:
        """The seven step traces of the plain-loss profile, from the trace cache when it has them."""
        from chunkft.planner import trace_cache as tc

        if self.store is None:
            return _traced_profile(self)
        return tc.cached(
            self.store,
            "profile",
            "plain",
            tc.profile_decoder(self.store.key),
            lambda: _traced_profile(self),
            tc.encode_profile,
        )

    @functools.cache  # noqa: B019 - one tracer per configuration, kept for the process
    def chunked_heads(self, chunk_tokens: int) -> tuple[tuple[tuple[str, Segment], ...], ...]:
        from chunkft.planner import trace_cache as tc

        return tc.cached(
            self.store,
            "heads",
            str(chunk_tokens),
            tc.decode_heads,
            lambda: _chunked_heads(self, chunk_tokens),
            tc.encode_heads,
        )

    @functools.cached_property
    def chunked_loss_supported(self) -> bool:
        """Whether the executor can run this model with chunked cross-entropy (executor/loss.py
        accepts only verified causal-LM classes)."""
        if self.task != "causal-lm":
            return False
        from chunkft.executor.loss import UnsupportedArchitectureError, causal_lm_parts
        from chunkft.planner import trace_cache as tc

        def supported() -> bool:
            try:
                causal_lm_parts(self.model)
            except UnsupportedArchitectureError:
                return False
            return True

        return tc.cached(self.store, "facts", "chunked_loss_supported", tc.decode_bool, supported, bool)

    @functools.cache  # noqa: B019 - one tracer per configuration, kept for the process
    def block_alone(self, skip_before: int, skip_after: int, input_grad: bool) -> BlockMemory:
        """Forward and backward of the representative block by itself, with the inputs it gets in the
        step (captured once), tensors [skip_before, n - skip_after) of it trainable; from the trace
        cache when this pattern was traced before."""
        from chunkft.planner import trace_cache as tc

        return tc.cached(
            self.store,
            "edges",
            tc.edge_name(skip_before, skip_after, input_grad),
            tc.decode_block,
            lambda: self._trace_block_alone(skip_before, skip_after, input_grad),
            tc.encode_block,
        )

    def _trace_block_alone(self, skip_before: int, skip_after: int, input_grad: bool) -> BlockMemory:
        from chunkft.executor.measure import MemoryTracker

        r = _REPRESENTATIVE
        _, layers = _decoder_layers(self.model)
        block = layers[r]
        if self._block_inputs is None:
            self._block_inputs = self._capture_inputs(block)
        args, kwargs = self._block_inputs
        prefix = f"{self.structure.layers_prefix}{r}."
        pos = {
            s.name[len(prefix) :]: p
            for s, g, p in zip(
                self.structure.specs, self.structure.spec_layer, group_positions(self.structure), strict=True
            )
            if g == r
        }
        n = len(pos)
        with self.mode:
            for name, prm in block.named_parameters():
                prm.requires_grad_(skip_before <= pos.get(name, -1) < n - skip_after)
            x = torch.empty_like(args[0]).requires_grad_(input_grad)
            captured = [t for t in _tensors([args, list(kwargs.values())]) if isinstance(t, torch.Tensor)]
            counter = _Counter(MemoryTracker(block, exclude=[x, *captured]))
            tl = _Timeline(counter)
            buffers: dict[torch.Tensor, torch.Tensor] = {}

            def on_new(nbytes: int) -> None:
                tl.grad_bytes += nbytes

            handles = [
                p.register_post_accumulate_grad_hook(move_grads_hook(buffers, on_new))
                for p in block.parameters()
                if p.requires_grad
            ]
            try:
                counter.tracker.start()
                counter.base = counter.tracker.live_bytes()
                tl.mark("start")
                out = block(x, *args[1:], **kwargs)
                h = out[0] if isinstance(out, tuple) else out
                tl.mark("fwd_end")
                g = torch.ones_like(h)
                tl.mark("bwd_start")
                h.backward(g)
                del out, h, g
                tl.mark("bwd_end")
                buffers.clear()
            finally:
                counter.tracker.stop()
                for hd in handles:
                    hd.remove()
        return BlockMemory(tl.segment(0, 1), tl.segment(2, 3))

    def _capture_inputs(self, block: nn.Module) -> tuple[tuple, dict]:
        """The representative block's call arguments in a forward of the shallow model."""
        seen: list[tuple[tuple, dict]] = []
        handle = block.register_forward_pre_hook(lambda _m, a, k: seen.append((a, dict(k))), with_kwargs=True)
        try:
            with self.mode, torch.no_grad():
                batch = example_batch(
                    self.task, self.structure.vocab_size, self.micro_batch, self.seq_len, self.padded
                )
                self.model(**batch)
        finally:
            handle.remove()
        if not seen or not seen[0][0]:
            raise ProfilingError(
                f"{type(block).__name__} takes no positional hidden states; cannot profile it"
            )
        return seen[0]


def layer_types(config: object, num_layers: int) -> tuple[str, ...]:
    """Each block's layer type (`config.layer_types`, e.g. Gemma-2's sliding and full attention), all
    "" when the config has none: blocks of one type take the same attention mask."""
    types = getattr(config, "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) == num_layers:
        return tuple(str(t) for t in types)
    return ("",) * num_layers


def _kept_inputs(tracer: _ShallowTracer) -> tuple[tuple[tuple[str, ...], int], ...]:
    """The tensors the shallow model's decoder hands its blocks besides the hidden states, each with the
    layer types of the blocks taking it (ActivationProfile.kept_inputs): one training forward with a
    hook on every block. Left out: what the forward saves for backward anyway (e.g. the rotary cos and
    sin, which a plain block's products save): the traces already keep those until the blocks'
    backward."""
    _, layers = _decoder_layers(tracer.model)
    types = layer_types(tracer.model.config, len(layers))
    taken: dict[int, tuple[int, set[str]]] = {}  # storage -> (bytes, types)
    saved: set[int] = set()

    def key(t: torch.Tensor) -> int:
        return t.untyped_storage()._cdata

    def hook(i: int) -> Callable[..., None]:
        def record(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            for t in _tensors([list(args[1:]), list(kwargs.values())]):
                taken.setdefault(key(t), (t.untyped_storage().nbytes(), set()))[1].add(types[i])

        return record

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.add(key(t))
        return t

    handles = [b.register_forward_pre_hook(hook(i), with_kwargs=True) for i, b in enumerate(layers)]
    for prm in tracer.model.parameters():  # every run sets its own window again
        prm.requires_grad_(True)
    try:
        with tracer.mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            batch = example_batch(
                tracer.task, tracer.structure.vocab_size, tracer.micro_batch, tracer.seq_len, tracer.padded
            )
            tracer.model(**batch)
    finally:
        for h in handles:
            h.remove()
    kept = [(tuple(sorted(ts)), n) for k, (n, ts) in taken.items() if k not in saved]
    return tuple(sorted(kept))


def _recompute(b: BlockMemory) -> Segment:
    """A block's forward then backward as one segment (what a checkpointed block's backward runs)."""
    return Segment(
        b.fwd.delta_bytes + b.bwd.delta_bytes,
        max(b.fwd.excursion_bytes, b.fwd.delta_bytes + b.bwd.excursion_bytes),
        b.bwd.grad_bytes,
    )


def _shift(whole: Segment, part: Segment, full: Segment) -> Segment:
    """`whole` moved by the difference between a part of a block and the whole block, traced alone."""
    return Segment(
        whole.delta_bytes + part.delta_bytes - full.delta_bytes,
        max(0, whole.excursion_bytes + part.excursion_bytes - full.excursion_bytes),
        whole.grad_bytes + part.grad_bytes - full.grad_bytes,
    )


def _block_segments(tl: _Timeline, r: int, backward: bool) -> BlockMemory:
    """Block r's forward (its pre-forward to the next block's) and backward (its pre-backward to the
    block below's, or to the end of the backward for the lowest block) segments."""
    a = tl.index(f"pre_fw {r}")
    b = tl.index(f"pre_fw {r + 1}", a)
    fwd = tl.segment(a, b)
    if not backward:
        return BlockMemory(fwd, ZERO_SEGMENT)
    bwd_from = tl.index("fwd_end")
    c = tl.index(f"pre_bw {r}", bwd_from)
    below = [i for i in range(c, len(tl.marks)) if tl.marks[i][0] == f"pre_bw {r - 1}"]
    d = below[0] if below else tl.index("bwd_end", c)  # the lowest block: to the end of backward
    return BlockMemory(fwd, tl.segment(c, d))


def _traced_profile(tracer: _ShallowTracer) -> ActivationProfile:
    """The seven step traces of a plain-loss profile (what the trace cache stores)."""
    st = tracer.structure
    micro_batch, seq_len, dtype = tracer.micro_batch, tracer.seq_len, tracer.dtype
    L = TRACE_LAYERS
    r = _REPRESENTATIVE

    def run(trainable: Callable[[int], bool], ckpt: bool, embedding_output_grad: bool = False) -> _Timeline:
        return tracer.run(lambda layer, _pos: trainable(layer), ckpt, embedding_output_grad)

    blocks: dict[str, BlockMemory] = {}
    head_fwd: dict[str, Segment] = {}
    head_bwd: dict[str, Segment] = {}
    t_full = run(lambda layer: True, False)
    # Above the window: the blocks' input needs a gradient, no tensor of theirs or of the head does (a
    # trainable embedding would make a tied head's weight trainable too).
    t_input = run(lambda layer: False, False, embedding_output_grad=True)
    t_none = run(lambda layer: layer == L, False)
    t_ckpt_full = run(lambda layer: True, True)
    t_ckpt_input = run(lambda layer: False, True, embedding_output_grad=True)
    t_first = run(lambda layer: layer >= r, False)  # blocks below r: none; r: first; above: full
    t_ckpt_first = run(lambda layer: layer >= r, True)

    blocks["full"] = _block_segments(t_full, r, True)
    blocks["input"] = _block_segments(t_input, r, True)
    blocks["none"] = _block_segments(t_none, r, False)
    blocks["ckpt-full"] = _block_segments(t_ckpt_full, r, True)
    blocks["ckpt-input"] = _block_segments(t_ckpt_input, r, True)
    blocks["first"] = _block_segments(t_first, r, True)
    last_none = t_none.segment(t_none.index(f"pre_fw {L - 1}"), t_none.index(f"post_fw {L - 1}"))
    blocks["last-none"] = BlockMemory(last_none, ZERO_SEGMENT)
    first_none = t_none.segment(t_none.index("pre_fw 0"), t_none.index("pre_fw 1"))
    blocks["first-none"] = BlockMemory(first_none, ZERO_SEGMENT)
    blocks["ckpt-first"] = _block_segments(t_ckpt_first, r, True)
    head_fwd["full"], head_bwd["full"] = _head_segments(t_full, L)
    head_fwd["input"], head_bwd["input"] = _head_segments(t_input, L)
    head_fwd["weight"], head_bwd["weight"] = _head_segments(t_none, L)
    embed_fwd = t_full.segment(t_full.index("start"), t_full.index("pre_fw 0"))
    e0 = t_full.index("post_bw 0", t_full.index("fwd_end"))
    embed_bwd = t_full.segment(e0, t_full.index("bwd_end", e0))
    hidden = micro_batch * seq_len * st.hidden_size * DTYPE_BYTES[dtype]
    depth = int(getattr(tracer._config, "num_hidden_layers", 0) or 0)
    return ActivationProfile(
        micro_batch=micro_batch,
        seq_len=seq_len,
        dtype=dtype,
        attn_implementation=tracer.attn,
        embed_fwd=embed_fwd,
        embed_bwd_trainable=embed_bwd,
        blocks=tuple(blocks.items()),
        head_fwd=tuple(head_fwd.items()),
        head_bwd=tuple(head_bwd.items()),
        hidden_bytes=hidden,
        kept_inputs=_kept_inputs(tracer),
        block_types=layer_types(tracer._config, depth),
    )


# ------------------------------------------------------------------------------------------- FLOPs


@dataclass(frozen=True)
class BlockFlops:
    """Floating-point operations of one block for one micro-batch (causal attention counted half)."""

    forward: int
    backward_input: int  # gradient w.r.t. the block input only (frozen weights)
    backward_full: int  # input and weight gradients


def block_flops(st: ModelStructure, layer: int, micro_batch: int, seq_len: int) -> BlockFlops:
    """Matmul FLOPs 2*weights*tokens plus attention 4*B*S^2*heads*head_dim (half for causal)."""
    tokens = micro_batch * seq_len
    linear = 2 * st.linear_numel(layer) * tokens
    causal = 0.5 if st.task == "causal-lm" else 1.0
    attn = int(4 * micro_batch * seq_len * seq_len * st.num_attention_heads * st.head_dim * causal)
    # Backward: input gradient = one matmul per forward matmul; weight gradient = another one; attention
    # backward costs about 2.5 forward attention (flash backward recomputes the scores).
    return BlockFlops(
        forward=linear + attn,
        backward_input=linear + int(2.5 * attn),
        backward_full=2 * linear + int(2.5 * attn),
    )


def head_flops(st: ModelStructure, micro_batch: int, seq_len: int) -> int:
    """Forward FLOPs of the head (LM head over every token; a classifier only over the pooled token)."""
    tokens = micro_batch * seq_len if st.task == "causal-lm" else micro_batch
    return 2 * st.linear_numel(st.num_layers) * tokens + (
        2 * st.hidden_size * st.vocab_size * tokens if st.tied_embeddings else 0
    )


def param_bytes(specs: Sequence[ParamSpec]) -> int:
    return sum(s.numel * DTYPE_BYTES[s.dtype] for s in specs)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def gib(n: int) -> float:
    """Bytes as GiB, for display only."""
    return n / 2**30


__all__ = [
    "ActivationProfile",
    "BlockFlops",
    "BlockMemory",
    "EdgeKey",
    "IncompleteTableError",
    "ModelIdentity",
    "ModelStructure",
    "ProfilingError",
    "Segment",
    "activation_profile",
    "block_flops",
    "check_attention",
    "default_padded",
    "edge_block",
    "enable_layer_checkpointing",
    "example_batch",
    "head_flops",
    "model_identity",
    "model_structure",
    "reference_step_peak",
    "TORCH_DTYPES",
    "structure_of",
    "supported_attention",
    "tables_for",
    "traced_attention",
    "UNPADDED_SDPA",
    "with_full_edges",
    "ZERO_SEGMENT",
]


# ------------------------------------------------------------------------------- reference traces


def reference_step_peak(
    config: object,
    task: str,
    chunks: Sequence[object],
    window: int,
    *,
    micro_batch: int,
    grad_accum: int,
    seq_len: int,
    dtype: str,
    attn_implementation: str = "sdpa",
    checkpoint_layers: Sequence[int] = (),
    optimizer: str = "adamw",
    states_on: str = "host",
    host_state_dtype: str = "float32",
    state_slots: int = 2,
    fake: bool = True,
    padded: bool | None = None,
    chunk_tokens: int | None = None,
) -> tuple[int, dict[str, int]]:
    """Peak bytes of one full ChunkFT optimizer step of the full-depth model with chunks[window] active,
    traced under FakeTensorMode (nothing allocated) by executor.measure.MemoryTracker: what the planner's
    composed prediction is checked against.

    It runs the executor's own code, not a re-implementation: SliceGradients (row-sliced windows
    included), the ChunkedOptimizer with its TransferEngine slots, the gradient norm and the update, in
    the accounting of executor/measure.py (device tensors incl. state slots, host stores excluded).
    fake=False runs it for real (small models only, plain Hugging Face attention resolving the mask from
    the batch's values), to check the fake trace itself.
    Returns (peak, bytes by plan category at the peak)."""
    import contextlib

    from torch._subclasses.fake_tensor import FakeTensorMode

    from chunkft.executor.loss import causal_lm_loss
    from chunkft.executor.measure import MemoryTracker, driver_tensors
    from chunkft.executor.optimizer import AdamWHparams, ChunkedOptimizer, SGDHparams, grad_norm
    from chunkft.executor.slicegrad import SliceGradients

    check_attention(config, task, attn_implementation)
    cfg = copy.deepcopy(config)
    pad = default_padded(task) if padded is None else padded
    attn = traced_attention(cfg, task, attn_implementation, seq_len, pad) if fake else attn_implementation
    cfg._attn_implementation = attn  # type: ignore[attr-defined]
    cfg.use_cache = False  # type: ignore[attr-defined]
    torch_dtype = TORCH_DTYPES[dtype]
    hp = AdamWHparams(lr=1e-4) if optimizer == "adamw" else SGDHparams(lr=1e-4)
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    with mode:
        model = build_from_config(cfg, task, "cpu", torch_dtype)
        model.train()
        enable_layer_checkpointing(model, checkpoint_layers)
        params = dict(model.named_parameters())
        sg = SliceGradients(model)
        opt = ChunkedOptimizer(
            params,
            chunks,  # type: ignore[arg-type]
            hp,
            host_state_dtype=host_state_dtype,  # type: ignore[arg-type]
            states_on=states_on,  # type: ignore[arg-type]
            device=torch.device("cpu"),
            state_slots=state_slots,
        )
        sg.activate(chunks[window])  # type: ignore[arg-type]
        following = [(window + j) % len(chunks) for j in range(1, len(chunks))]
        opt.engine.prefetch(window, *following[: state_slots - 1])
        handle = _StepView(opt)
        persistent, host = driver_tensors(handle)
        batches = [
            example_batch(task, int(cfg.vocab_size), micro_batch, seq_len, pad)  # type: ignore[attr-defined]
            for _ in range(grad_accum)
        ]
        inputs = [t for b in batches for t in b.values()]
        tracker = MemoryTracker(model, persistent=persistent, exclude=[*host, *inputs])
        tracker.start()
        try:
            for batch in batches:
                with tracker.phase("forward"):
                    loss = causal_lm_loss(model, batch, chunk_tokens) / grad_accum
                with tracker.phase("backward"):
                    loss.backward()
                del loss
            with tracker.phase("optimizer"):
                grads = sg.window_grads()
                norm = grad_norm(list(grads.values()))
                opt.update(window, grads, 1e-4)
                del grads, norm
                sg.zero_grad()
                opt.engine.write_back(window)
        finally:
            tracker.stop()
            sg.deactivate()
    return tracker.peak_bytes(), tracker.breakdown()


class _StepView:
    """What executor.measure.driver_tensors reads from a driver: its transfer engine."""

    def __init__(self, optimizer: object) -> None:
        self.engine = optimizer.engine  # type: ignore[attr-defined]
