"""Exact row-slice gradients for one ChunkFT window, on an unmodified model.

A window is whole tensors plus row ranges of the tensors at its edges. Whole tensors simply train:
they get requires_grad=True and a post-accumulate-grad hook that moves `.grad` into an fp32 window
buffer. A straddling tensor stays frozen (so no dense gradient can exist for it) and each module that
owns it gets an instance-level forward whose autograd Function returns the full input gradient but
writes only the window's rows of the weight gradient, straight into the fp32 buffer. Everything
outside the window is frozen, so autograd stops below the lowest active parameter.

Rows are dim 0 of the parameter. Sliceable owners: nn.Linear, nn.Embedding (padding_idx and
scale_grad_by_freq honoured, max_norm refused), the Gemma-family scaled embedding (`embedding * embed_scale`,
Gemma/Gemma-2/Gemma-3), nn.LayerNorm, RMSNorm of the Llama/Mistral/Qwen2 kind (`w * x_hat`) and of the
Gemma kind (`x_hat * (1 + w)` in fp32), and transformers' GPT-2 Conv1D. The duck-typed ones (scaled
embedding, both RMSNorms) are verified bit for bit against the module's own forward on random probe
weights, so a look-alike with another formula is refused. Anything else that owns a straddling tensor is
refused by name before training starts.

Activation checkpointing must be non-reentrant (`gradient_checkpointing_enable(
gradient_checkpointing_kwargs={"use_reentrant": False})`): reentrant checkpointing drops parameter
gradients unless the layer inputs require grad, which is exactly the back-propagation below the
window that ChunkFT avoids. The instance forwards accumulate only in backward, so recomputation is
harmless. Under autocast the sliced Linear/Conv1D cast like F.linear/addmm do; gradients accumulate
in fp32.

A straddling weight read by other code (e.g. `F.linear(h, self.embed.weight)`, DeBERTa-v2's non-legacy
MLM head) would get no gradient through that use. The first grad-enabled step after activating a window
with not-yet-checked straddling tensors therefore runs under a dispatch-level watch (every op of every
module call of the model) and raises UnsupportedModuleError naming the tensor and the reading module.
`foreign_uses(model, forward)` runs the same watch over all tensors for the planner, so a plan never cuts
such a tensor. Limit: a read outside every module call of the model (e.g. in the loss code) is not seen.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from chunkft.chunks import Chunk, ParamSlice

__all__ = ["SliceGradients", "UnsupportedModuleError", "SUPPORTED_MODULES", "foreign_uses"]

SUPPORTED_MODULES = (
    "nn.Linear, nn.Embedding, Gemma-style scaled embedding, nn.LayerNorm, Llama/Mistral/Qwen2-style and "
    "Gemma-style RMSNorm, transformers Conv1D"
)


class UnsupportedModuleError(ValueError):
    """A straddling parameter is owned by a module whose slice gradient chunkft cannot compute."""


@dataclass(frozen=True)
class _Rows:
    """The window's rows [start, end) of one parameter, and the buffer name they accumulate into."""

    name: str
    start: int
    end: int


@dataclass(frozen=True)
class _Owner:
    """One module that holds a parameter as its attribute `attr`."""

    path: str
    module: nn.Module
    attr: str


# ----------------------------------------------------------------------------------------------
# What can be sliced


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency, but keep the module importable without it
        return None
    return Conv1D


def _rms_normed(x: Tensor, eps: float) -> Tensor:
    """x_hat in fp32, op for op as Llama and Gemma compute it (the sliced forwards reuse it)."""
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    return h * torch.rsqrt(variance + eps)


def _rms_scale(normed: Tensor, weight: Tensor, offset: bool) -> Tensor:
    """The last op: Gemma's `x_hat * (1 + w)` in fp32 (offset) or Llama's `w * x_hat`."""
    return normed * (1.0 + weight.float()) if offset else weight * normed


def _rms_reference(weight: Tensor, eps: float, x: Tensor, offset: bool) -> Tensor:
    """The Llama-style (offset=False) or Gemma-style (offset=True) RMSNorm forward, op for op."""
    h = _rms_normed(x, eps)
    if offset:
        return _rms_scale(h, weight, True).type_as(x)
    return _rms_scale(h.to(x.dtype), weight, False)


def _rms_eps_attr(module: nn.Module) -> str | None:
    """Llama keeps eps as `variance_epsilon`, Gemma as `eps`; the sliced forward reads the same one."""
    for attr in ("variance_epsilon", "eps"):
        if isinstance(getattr(module, attr, None), float):
            return attr
    return None


def _probe_device(t: Tensor) -> torch.device:
    """Where probes run: the tensor's device, or the CPU for meta and fake tensors (no data there)."""
    return torch.device("cpu") if t.device.type == "meta" or is_fake(t) else t.device


@contextlib.contextmanager
def _swapped(module: nn.Module, **tensors: Tensor) -> Iterator[None]:
    """Probe tensors in place of the module's parameters/buffers (works for meta and fake modules)."""
    saved = {}
    for name, t in tensors.items():
        store = module._parameters if name in module._parameters else module._buffers
        saved[name] = (store, store[name])
        store[name] = t
    try:
        yield
    finally:
        for name, (store, old) in saved.items():
            store[name] = old


def _real_probe(fn: Callable[..., bool]) -> Callable[..., bool]:
    """Run a probe on real tensors without autograd, even inside the planner's FakeTensorMode trace."""

    @functools.wraps(fn)
    def probe(*args: object) -> bool:
        with unset_fake_temporarily(), torch.no_grad():
            return fn(*args)

    return probe


@_real_probe
def _rms_matches(module: nn.Module, eps_attr: str, offset: bool) -> bool:
    """Whether the module's own forward equals the formula bit for bit on random probe weights.

    Duck typing alone would accept look-alikes with other casts (T5) or offsets; probes with fp32 and
    bf16 weights and inputs (normal and tiny magnitudes, so eps matters) tell them apart. The weights are
    random, not the module's, so an init of ones or zeros cannot hide a formula.
    """
    n, eps = module.weight.shape[0], getattr(module, eps_attr)
    dev = _probe_device(module.weight)
    gen = torch.Generator(device="cpu").manual_seed(1234)
    for wdtype in (torch.float32, torch.bfloat16):
        w = (torch.randn(n, generator=gen) * 0.5 + 0.25).to(dev, wdtype)
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(4, n, generator=gen) * torch.tensor([[3.0], [1.0], [1e-3], [3e-4]]) + 0.01
            x = x.to(dev, dtype)
            with _swapped(module, weight=w):
                try:
                    theirs = type(module).forward(module, x)
                except Exception:  # a forward that cannot take (rows, features) input is no RMSNorm
                    return False
                ours = _rms_reference(w, eps, x, offset)
            if not isinstance(theirs, Tensor) or theirs.dtype != ours.dtype or not torch.equal(theirs, ours):
                return False
    return True


@_real_probe
def _scaled_embedding_matches(module: nn.Embedding) -> bool:
    """Whether the module's forward is Gemma's `F.embedding(ids, w) * embed_scale.to(w.dtype)`, bit for
    bit, on random probe weights and a probe scale (a look-alike scaling otherwise is refused)."""
    scale = module._buffers.get("embed_scale")
    if not isinstance(scale, Tensor) or scale.dim() != 0 or not scale.is_floating_point():
        return False
    pad = module.padding_idx
    rows = max(16, (pad or 0) + 1)
    dev = _probe_device(module.weight)
    gen = torch.Generator(device="cpu").manual_seed(1234)
    ids = torch.randint(0, rows, (2, 7), generator=gen)
    if pad is not None:
        ids[0, 0] = pad
    ids = ids.to(dev)
    for wdtype in (torch.float32, torch.bfloat16):
        w = torch.randn(rows, 8, generator=gen).to(dev, wdtype)
        s = torch.tensor(54.77, dtype=scale.dtype, device=dev)  # not a bf16 value: casts show
        with _swapped(module, weight=w, embed_scale=s):
            try:
                theirs = type(module).forward(module, ids)
            except Exception:  # e.g. a forward with other arguments
                return False
            ours = F.embedding(ids, w, pad) * s.to(w.dtype)
        if not isinstance(theirs, Tensor) or theirs.dtype != ours.dtype or not torch.equal(theirs, ours):
            return False
    return True


def _slice_kind(owner: _Owner, parents: dict[int, nn.Module]) -> tuple[str | None, str]:
    """(kind, "") when the owner's use of the parameter can be sliced, else (None, reason)."""
    m = owner.module
    cls = type(m)
    if "forward" in m.__dict__:
        return None, "its instance forward is already replaced (e.g. by an accelerate hook)"
    if isinstance(m, nn.Linear):
        if cls.forward is not nn.Linear.forward:
            return None, f"{cls.__name__} overrides nn.Linear.forward"
        if isinstance(parents.get(id(m)), nn.MultiheadAttention):
            return None, "nn.MultiheadAttention reads its out_proj weights directly"
        return "linear", ""
    if isinstance(m, nn.Embedding):
        if m.max_norm is not None:
            return None, "max_norm renormalizes the weight in place during forward"
        if cls.forward is nn.Embedding.forward:
            return "embedding", ""
        if owner.attr == "weight" and _scaled_embedding_matches(m):
            return "scaled_embedding", ""
        return None, (
            f"{cls.__name__} overrides nn.Embedding.forward and is not the Gemma-style scaled embedding "
            "(F.embedding(ids, w) * embed_scale.to(w.dtype))"
        )
    if isinstance(m, nn.LayerNorm):
        if cls.forward is not nn.LayerNorm.forward:
            return None, f"{cls.__name__} overrides nn.LayerNorm.forward"
        return "layernorm", ""
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(m, conv1d):
        if cls.forward is not conv1d.forward:
            return None, f"{cls.__name__} overrides Conv1D.forward"
        return "conv1d", ""
    params = dict(m.named_parameters(recurse=False))
    eps_attr = _rms_eps_attr(m)
    if (
        set(params) == {"weight"}
        and params["weight"].dim() == 1
        and eps_attr is not None
        and getattr(m, "bias", None) is None
    ):
        for kind, offset in (("rmsnorm", False), ("rmsnorm_offset", True)):
            if _rms_matches(m, eps_attr, offset):
                return kind, ""
        return None, (
            "its forward differs from the Llama-style RMSNorm formula (w * x_hat) and from the "
            "Gemma-style one (x_hat * (1 + w) in fp32)"
        )
    return None, "no sliced gradient is implemented for this module type"


# ----------------------------------------------------------------------------------------------
# Autocast: the sliced paths must cast exactly as the replaced ops would


def _matmul_cast(device_type: str, *tensors: Tensor | None) -> list[Tensor | None]:
    """Cast like autocast casts F.linear / addmm (lower-precision list on every device)."""
    if not torch.is_autocast_enabled(device_type):
        return list(tensors)
    dtype = torch.get_autocast_dtype(device_type)
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return list(tensors)
    return [t if t is None or not t.is_floating_point() else t.to(dtype) for t in tensors]


@functools.lru_cache(maxsize=16)
def _layer_norm_upcasts(device_type: str, ac_dtype: torch.dtype) -> bool:
    """Whether autocast runs layer_norm in fp32 on this device (CUDA does, CPU does not): probed once."""
    with torch.autocast(device_type, dtype=ac_dtype):
        out = F.layer_norm(torch.ones(1, 2, dtype=ac_dtype, device=torch.device(device_type)), (2,))
    return out.dtype == torch.float32


def _layer_norm_cast(device_type: str, *tensors: Tensor | None) -> list[Tensor | None]:
    """Cast like autocast casts F.layer_norm: every floating argument to fp32 where it upcasts."""
    if not torch.is_autocast_enabled(device_type):
        return list(tensors)
    if not _layer_norm_upcasts(device_type, torch.get_autocast_dtype(device_type)):
        return list(tensors)
    return [t if t is None or not t.is_floating_point() else t.float() for t in tensors]


# ----------------------------------------------------------------------------------------------
# The sliced autograd Functions. Each takes a grad-requiring `anchor` so its backward runs even
# when neither the input nor any parameter requires grad (the lowest active parameter straddles),
# returns ordinary gradients for whole-tensor inputs and writes slice gradients into `sink`.

_Sink = Callable[[str, Tensor], None]


class _SlicedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, x, weight, bias, w_rows, b_rows, sink):  # type: ignore[override]
        need_x_saved = w_rows is not None or ctx.needs_input_grad[2]
        ctx.save_for_backward(x if need_x_saved else None, weight)
        ctx.rows = (w_rows, b_rows)
        ctx.sink = sink
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, go):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        w_rows, b_rows = ctx.rows
        _, need_x, need_w, need_b = ctx.needs_input_grad[:4]
        gx = gw = gb = None
        if need_x:
            gx = go.matmul(weight)
        go2 = go.reshape(-1, go.shape[-1])
        if need_w or w_rows is not None:
            x2 = x.reshape(-1, x.shape[-1])
            if need_w:
                gw = go2.t().mm(x2)
            else:
                ctx.sink(w_rows.name, go2[:, w_rows.start : w_rows.end].t().mm(x2))
        if need_b:
            gb = go2.sum(0)
        elif b_rows is not None:
            ctx.sink(b_rows.name, go2[:, b_rows.start : b_rows.end].sum(0))
        return None, gx, gw, gb, None, None, None


class _SlicedConv1D(torch.autograd.Function):
    """GPT-2 Conv1D: y = x @ W + b with W (in, out); weight rows are input features."""

    @staticmethod
    def forward(ctx, anchor, x, weight, bias, w_rows, b_rows, sink):  # type: ignore[override]
        need_x_saved = w_rows is not None or ctx.needs_input_grad[2]
        ctx.save_for_backward(x if need_x_saved else None, weight)
        ctx.rows = (w_rows, b_rows)
        ctx.sink = sink
        ctx.x_shape = x.shape
        size_out = x.shape[:-1] + (weight.shape[1],)
        return torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight).view(size_out)

    @staticmethod
    def backward(ctx, go):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        w_rows, b_rows = ctx.rows
        _, need_x, need_w, need_b = ctx.needs_input_grad[:4]
        gx = gw = gb = None
        go2 = go.reshape(-1, go.shape[-1])
        if need_x:
            gx = go2.mm(weight.t()).view(ctx.x_shape)
        if need_w or w_rows is not None:
            x2 = x.reshape(-1, x.shape[-1])
            if need_w:
                gw = x2.t().mm(go2)
            else:
                ctx.sink(w_rows.name, x2[:, w_rows.start : w_rows.end].t().mm(go2))
        if need_b:
            gb = go2.sum(0)
        elif b_rows is not None:
            ctx.sink(b_rows.name, go2[:, b_rows.start : b_rows.end].sum(0))
        return None, gx, gw, gb, None, None, None


class _SlicedEmbedding(torch.autograd.Function):
    """Rows are token ids: the slice gradient is an index_add of the output gradient of ids in range."""

    @staticmethod
    def forward(ctx, anchor, ids, weight, padding_idx, scale_grad_by_freq, rows, sink):  # type: ignore[override]
        ctx.save_for_backward(ids)
        ctx.args = (padding_idx, scale_grad_by_freq, rows, sink, weight.shape)
        return F.embedding(ids, weight, padding_idx, None, 2.0, scale_grad_by_freq, False)

    @staticmethod
    def backward(ctx, go):  # type: ignore[override]
        (ids,) = ctx.saved_tensors
        padding_idx, scale_grad_by_freq, rows, sink, shape = ctx.args
        n = rows.end - rows.start
        flat = ids.reshape(-1)
        keep = (flat >= rows.start) & (flat < rows.end)
        if padding_idx is not None:
            keep &= flat != padding_idx
        # Masking instead of boolean indexing keeps the GPU free of a host sync.
        local = torch.where(keep, flat - rows.start, 0)
        vals = go.reshape(-1, go.shape[-1]).to(torch.float32) * keep.unsqueeze(1)
        if scale_grad_by_freq:
            counts = torch.zeros(n, dtype=torch.float32, device=flat.device)
            counts.index_add_(0, local, keep.to(torch.float32))
            vals = vals / counts[local].clamp_min(1.0).unsqueeze(1)
        grad = torch.zeros((n, *shape[1:]), dtype=torch.float32, device=go.device)
        grad.index_add_(0, local, vals)
        sink(rows.name, grad)
        return None, None, None, None, None, None, None


class _SlicedLayerNorm(torch.autograd.Function):
    """Input gradient from the native kernel (bit-identical to dense); affine slices from x-hat rows."""

    @staticmethod
    def forward(ctx, anchor, x, weight, bias, shape, eps, w_rows, b_rows, sink):  # type: ignore[override]
        out, mean, rstd = torch.ops.aten.native_layer_norm(x, shape, weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.args = (shape, w_rows, b_rows, sink)
        return out

    @staticmethod
    def backward(ctx, go):  # type: ignore[override]
        x, weight, bias, mean, rstd = ctx.saved_tensors
        shape, w_rows, b_rows, sink = ctx.args
        _, need_x, need_w, need_b = ctx.needs_input_grad[:4]
        gx = gw = gb = None
        if need_x or need_w or need_b:
            gx, gw, gb = torch.ops.aten.native_layer_norm_backward(
                go, x, shape, mean, rstd, weight, bias, [need_x, need_w, need_b]
            )
        lead = x.dim() - len(shape)
        dims = tuple(range(lead))
        if w_rows is not None and not need_w:
            n = w_rows.end - w_rows.start
            xs = x.narrow(lead, w_rows.start, n).to(torch.float32)
            xhat = (xs - mean.to(torch.float32)) * rstd.to(torch.float32)
            gs = go.narrow(lead, w_rows.start, n).to(torch.float32)
            sink(w_rows.name, (gs * xhat).sum(dims) if dims else gs * xhat)
        if b_rows is not None and not need_b:
            gs = go.narrow(lead, b_rows.start, b_rows.end - b_rows.start).to(torch.float32)
            sink(b_rows.name, gs.sum(dims) if dims else gs.clone())  # the sink may adopt it
        return None, gx, gw, gb, None, None, None, None, None


class _SlicedScale(torch.autograd.Function):
    """The last op of an RMSNorm (`_rms_scale`: Llama's w * x_hat, or Gemma's x_hat * (1 + w) with
    offset); weight rows are hidden features."""

    @staticmethod
    def forward(ctx, anchor, normed, weight, rows, sink, offset):  # type: ignore[override]
        ctx.save_for_backward(normed, weight)
        ctx.args = (rows, sink, offset)
        return _rms_scale(normed, weight, offset)

    @staticmethod
    def backward(ctx, go):  # type: ignore[override]
        normed, weight = ctx.saved_tensors
        rows, sink, offset = ctx.args
        gn = None
        if ctx.needs_input_grad[1]:
            gn = (go * (1.0 + weight.float() if offset else weight)).to(normed.dtype)
        n = rows.end - rows.start
        gs = go[..., rows.start : rows.end].to(torch.float32)
        ns = normed[..., rows.start : rows.end].to(torch.float32)
        sink(rows.name, (gs * ns).reshape(-1, n).sum(0))
        return None, gn, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Instance forwards (closures over the module; installed as `module.forward`, removed on deactivate)


def _linear_forward(m: nn.Linear, rows: dict[str, _Rows], anchor: Callable, sink: _Sink) -> Callable:
    w_rows, b_rows = rows.get("weight"), rows.get("bias")

    def forward(input: Tensor) -> Tensor:
        x, w, b = _matmul_cast(input.device.type, input, m.weight, m.bias)
        return _SlicedLinear.apply(anchor(input.device), x, w, b, w_rows, b_rows, sink)

    return forward


def _conv1d_forward(m: nn.Module, rows: dict[str, _Rows], anchor: Callable, sink: _Sink) -> Callable:
    w_rows, b_rows = rows.get("weight"), rows.get("bias")

    def forward(x: Tensor) -> Tensor:
        xc, w, b = _matmul_cast(x.device.type, x, m.weight, m.bias)
        return _SlicedConv1D.apply(anchor(x.device), xc, w, b, w_rows, b_rows, sink)

    return forward


def _embedding_forward(m: nn.Embedding, rows: dict[str, _Rows], anchor: Callable, sink: _Sink) -> Callable:
    w_rows = rows["weight"]

    def forward(input: Tensor) -> Tensor:
        return _SlicedEmbedding.apply(
            anchor(input.device), input, m.weight, m.padding_idx, m.scale_grad_by_freq, w_rows, sink
        )

    return forward


def _layernorm_forward(m: nn.LayerNorm, rows: dict[str, _Rows], anchor: Callable, sink: _Sink) -> Callable:
    w_rows, b_rows = rows.get("weight"), rows.get("bias")
    shape = list(m.normalized_shape)

    def forward(input: Tensor) -> Tensor:
        x, w, b = _layer_norm_cast(input.device.type, input, m.weight, m.bias)
        return _SlicedLayerNorm.apply(anchor(input.device), x, w, b, shape, m.eps, w_rows, b_rows, sink)

    return forward


def _scaled_embedding_forward(
    m: nn.Embedding, rows: dict[str, _Rows], anchor: Callable, sink: _Sink
) -> Callable:
    w_rows = rows["weight"]

    def forward(input_ids: Tensor) -> Tensor:
        # Gemma's own scaling op (verified in _scaled_embedding_matches): autograd's own gradient
        out = _SlicedEmbedding.apply(
            anchor(input_ids.device), input_ids, m.weight, m.padding_idx, m.scale_grad_by_freq, w_rows, sink
        )
        return out * m.embed_scale.to(m.weight.dtype)

    return forward


def _rmsnorm_forward(
    m: nn.Module, rows: dict[str, _Rows], anchor: Callable, sink: _Sink, offset: bool = False
) -> Callable:
    w_rows = rows["weight"]
    eps_attr = _rms_eps_attr(m)
    assert eps_attr is not None  # _slice_kind checked it

    def forward(hidden_states: Tensor) -> Tensor:
        # The same ops as the module's own forward, so the input gradient is autograd's own.
        h = _rms_normed(hidden_states, getattr(m, eps_attr))
        a = anchor(hidden_states.device)
        if offset:
            return _SlicedScale.apply(a, h, m.weight, w_rows, sink, True).type_as(hidden_states)
        return _SlicedScale.apply(a, h.to(hidden_states.dtype), m.weight, w_rows, sink, False)

    return forward


_FORWARDS = {
    "linear": _linear_forward,
    "conv1d": _conv1d_forward,
    "embedding": _embedding_forward,
    "scaled_embedding": _scaled_embedding_forward,
    "layernorm": _layernorm_forward,
    "rmsnorm": _rmsnorm_forward,
    "rmsnorm_offset": functools.partial(_rmsnorm_forward, offset=True),
}


# ----------------------------------------------------------------------------------------------
# Foreign uses: an op reading a row-cut weight outside the forward of a module that owns it

# ops that read only metadata or cut the tensor off autograd (no gradient can be lost through them)
_METADATA_OPS = frozenset(
    {"detach", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size"}
)

_Found = Callable[[str, "nn.Module | None", str], None]


class _WatchMode(TorchDispatchMode):
    """Pushed for one outermost module call: hands every op's tensor arguments to the watch."""

    def __init__(self, watch: _UseWatch) -> None:
        super().__init__()
        self._watch = watch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func.namespace != "prim" and func._opname not in _METADATA_OPS:
            self._watch.check(func, args, kwargs)
        return func(*args, **kwargs)


class _UseWatch:
    """Module hooks keep the stack of running modules; during each grad-enabled outermost call a dispatch
    mode sees every op. An op reading a watched tensor while the innermost running module is not one of
    its owners is a foreign use, reported to `found(name, module, op)`: autograd does not route that use
    through the sliced forwards, so the window gradient would miss it."""

    def __init__(
        self, model: nn.Module, watched: dict[int, str], owners: dict[str, frozenset[int]], found: _Found
    ) -> None:
        self._watched, self._owners, self._found = watched, owners, found
        self._stack: list[nn.Module] = []
        self._mode: _WatchMode | None = None
        self.ran = False  # a checked outermost call completed
        self._handles = []
        for m in model.modules():
            self._handles.append(m.register_forward_pre_hook(self._pre, prepend=True))
            self._handles.append(m.register_forward_hook(self._post, always_call=True))

    def _pre(self, module: nn.Module, args: object) -> None:
        if not self._stack:
            if not torch.is_grad_enabled():
                return  # no gradient, nothing can be wrong
            self._mode = _WatchMode(self)
            self._mode.__enter__()
        self._stack.append(module)

    def _post(self, module: nn.Module, args: object, output: object) -> None:
        if not self._stack or self._stack[-1] is not module:
            return
        self._stack.pop()
        if not self._stack and self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)
            self.ran = True

    def check(self, func: object, args: object, kwargs: object) -> None:
        for t in tree_leaves((args, kwargs)):
            name = self._watched.get(id(t)) if isinstance(t, Tensor) else None
            if name is None:
                continue
            inner = self._stack[-1] if self._stack else None
            if inner is None or id(inner) not in self._owners[name]:
                self._found(name, inner, str(func))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._mode is not None:  # only if a forward is interrupted from outside
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)
        self._stack = []


def foreign_uses(model: nn.Module, forward: Callable[[], object]) -> dict[str, str]:
    """name -> "path (Class)" of the module that reads it, for every multi-row parameter that `forward()`
    reads outside the forward of a module owning it (DeBERTa-v2's non-legacy MLM head, `F.linear(x,
    other.weight)`).

    For the planner, before cutting: such a tensor must stay whole in every window, or the executor
    refuses the plan on its first step. `forward()` is run once with grad enabled (a fake or meta model
    works); only what it executes is seen.
    """
    sg = SliceGradients(model)
    watched = {id(p): n for n, p in sg._params.items() if p.dim() and p.shape[0] > 1}
    found: dict[str, str] = {}

    def record(name: str, module: nn.Module | None, op: str) -> None:
        found.setdefault(name, sg._describe(module))

    watch = _UseWatch(model, watched, sg._owner_ids, record)
    try:
        with torch.enable_grad():
            forward()
    finally:
        watch.remove()
    return found


# ----------------------------------------------------------------------------------------------


class SliceGradients:
    """Gives one window of the parameter stream its exact gradients, and nothing else.

    Usage per step: activate(chunk); forward + loss.backward() (any number of micro-batches);
    window_grads() -> fp32 buffers; then activate(next chunk) or deactivate(). The buffers returned
    by window_grads() are live: they are dropped (not overwritten) by zero_grad(), activate() and
    deactivate().
    """

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self._params: dict[str, nn.Parameter] = dict(model.named_parameters())
        name_of = {id(p): n for n, p in self._params.items()}
        self._owners: dict[str, list[_Owner]] = {n: [] for n in self._params}
        self._parents: dict[int, nn.Module] = {}
        seen: set[tuple[int, str]] = set()
        for path, module in model.named_modules(remove_duplicate=False):
            for child in module.children():
                self._parents.setdefault(id(child), module)
            for attr, p in module.named_parameters(recurse=False):
                if (id(module), attr) in seen or id(p) not in name_of:
                    continue
                seen.add((id(module), attr))
                self._owners[name_of[id(p)]].append(_Owner(path, module, attr))
        # modules that may checkpoint (transformers' layers carry the flag even while it is off)
        self._ckpt_modules = [
            (n, m) for n, m in model.named_modules() if hasattr(m, "gradient_checkpointing")
        ]
        self._owner_ids = {n: frozenset(id(o.module) for o in os) for n, os in self._owners.items()}
        self._paths = {id(m): path for path, m in model.named_modules()}
        self._use_checked: set[str] = set()  # straddled tensors seen used only by their owners
        self._watch: _UseWatch | None = None
        self._watch_names: set[str] = set()
        self._kind_cache: dict[tuple[int, str], tuple[str | None, str]] = {}
        self._anchors: dict[torch.device, Tensor] = {}
        self._active: Chunk | None = None
        self._buffers: dict[str, Tensor] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._saved_flags: dict[str, bool] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._patched: list[nn.Module] = []
        self._warned_input_grads = False

    # -- checks ----------------------------------------------------------------------------------

    def _kind(self, owner: _Owner) -> tuple[str | None, str]:
        key = (id(owner.module), owner.attr)
        if key not in self._kind_cache:
            self._kind_cache[key] = _slice_kind(owner, self._parents)
        return self._kind_cache[key]

    def _validated(self, chunk: Chunk) -> dict[str, ParamSlice]:
        slices: dict[str, ParamSlice] = {}
        for sl in chunk.slices:
            p = self._params.get(sl.name)
            if p is None:
                raise ValueError(
                    f"chunk {chunk.index} names parameter {sl.name!r}, which the model does not have "
                    "(tied weights appear once, under their first name); rebuild the plan for this model"
                )
            if sl.name in slices:
                raise ValueError(f"chunk {chunk.index} names parameter {sl.name!r} twice; merge its slices")
            rows = p.shape[0] if p.dim() else 1
            if not 0 <= sl.row_start < sl.row_end <= rows:
                raise ValueError(
                    f"chunk {chunk.index}: rows [{sl.row_start}, {sl.row_end}) of {sl.name!r} are outside "
                    f"its {rows} rows or empty; rebuild the plan for this model"
                )
            slices[sl.name] = sl
        return slices

    def _straddles(self, sl: ParamSlice) -> bool:
        p = self._params[sl.name]
        return p.dim() > 0 and (sl.row_start > 0 or sl.row_end < p.shape[0])

    def unsliceable(self) -> dict[str, str]:
        """name -> why, for every multi-row trainable parameter a window must not cut: one of its owners
        is no module this class can slice (the planner keeps these whole; check_supported refuses a
        plan that cuts one)."""
        out: dict[str, str] = {}
        for name, p in self._params.items():
            if not p.requires_grad or p.dim() == 0 or p.shape[0] < 2:
                continue
            for owner in self._owners[name]:
                kind, reason = self._kind(owner)
                if kind is None:
                    out[name] = f"{owner.path or '<root>'} ({type(owner.module).__name__}): {reason}"
                    break
        return out

    def check_supported(self, chunks: Sequence[Chunk]) -> None:
        """Refuse, before training, any straddling tensor whose owner cannot be sliced (names it)."""
        for chunk in chunks:
            for sl in self._validated(chunk).values():
                if not self._straddles(sl):
                    continue
                for owner in self._owners[sl.name]:
                    kind, reason = self._kind(owner)
                    if kind is None:
                        raise UnsupportedModuleError(
                            f"chunk {chunk.index} cuts {sl.name!r} at rows [{sl.row_start}, {sl.row_end}), "
                            f"but its owner {owner.path or '<root>'!r} ({type(owner.module).__name__}) "
                            f"cannot be sliced: {reason}. Sliceable: {SUPPORTED_MODULES}; a plan must "
                            "keep this tensor whole (cut the stream between tensors there)"
                        )

    def _describe(self, module: nn.Module | None) -> str:
        if module is None:
            return "code outside the model's modules"
        return f"module {self._paths.get(id(module), '?') or '<root>'!r} ({type(module).__name__})"

    def _arm_use_check(self, chunk: Chunk, straddled: dict[str, ParamSlice]) -> None:
        """Watch the next grad-enabled step for foreign reads of the window's unchecked cut tensors."""
        if not set(straddled) - self._use_checked:
            return

        def refuse(name: str, module: nn.Module | None, op: str) -> None:
            sl = straddled[name]
            owners = ", ".join(repr(o.path or "<root>") for o in self._owners[name])
            raise UnsupportedModuleError(
                f"chunk {chunk.index} cuts {name!r} at rows [{sl.row_start}, {sl.row_end}), but "
                f"{self._describe(module)} reads it ({op}) outside the forward of its owner {owners}, so "
                "that use would get no gradient; a plan must keep this tensor whole (see "
                "executor.slicegrad.foreign_uses)"
            )

        watched = {id(self._params[n]): n for n in straddled}
        self._watch = _UseWatch(self._model, watched, self._owner_ids, refuse)
        self._watch_names = set(straddled)

    def _disarm_use_check(self) -> None:
        if self._watch is None:
            return
        if self._watch.ran:
            self._use_checked |= self._watch_names
        self._watch.remove()
        self._watch = None

    def _check_checkpointing(self) -> None:
        for path, m in self._ckpt_modules:
            if getattr(m, "gradient_checkpointing", False) is not True:
                continue
            func = getattr(m, "_gradient_checkpointing_func", None)
            if isinstance(func, functools.partial) and func.keywords.get("use_reentrant") is not False:
                raise ValueError(
                    f"module {path or '<root>'!r} uses reentrant activation checkpointing, which drops "
                    "gradients of a window above frozen layers; enable it with gradient_checkpointing_kwargs="
                    "{'use_reentrant': False}"
                )
        if getattr(self._model, "_require_grads_hooks", None) and not self._warned_input_grads:
            self._warned_input_grads = True
            warnings.warn(
                "the model makes its input embeddings require grad (transformers does this in "
                "gradient_checkpointing_enable), so backward runs below the active window; call "
                "model.disable_input_require_grads() after enabling non-reentrant checkpointing",
                stacklevel=3,
            )

    # -- activation ------------------------------------------------------------------------------

    def _anchor(self, device: torch.device) -> Tensor:
        a = self._anchors.get(device)
        if a is None:
            a = self._anchors[device] = torch.zeros((), device=device, requires_grad=True)
        return a

    def activate(self, chunk: Chunk) -> None:
        """Make `chunk` the only trainable window (deactivating the previous one)."""
        self.deactivate()
        slices = self._validated(chunk)
        self.check_supported([chunk])
        self._check_checkpointing()
        self._saved_flags = {n: p.requires_grad for n, p in self._params.items()}
        try:
            for p in self._params.values():
                p.requires_grad_(False)
            per_module: dict[int, tuple[_Owner, str, dict[str, _Rows]]] = {}
            for name, sl in slices.items():
                p = self._params[name]
                self._shapes[name] = (sl.row_end - sl.row_start, *p.shape[1:]) if p.dim() else ()
                if not self._straddles(sl):
                    p.requires_grad_(True)
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._grad_hook(name)))
                    continue
                for owner in self._owners[name]:
                    kind, _ = self._kind(owner)
                    entry = per_module.setdefault(id(owner.module), (owner, kind or "", {}))
                    entry[2][owner.attr] = _Rows(name, sl.row_start, sl.row_end)
            for owner, kind, rows in per_module.values():
                owner.module.forward = _FORWARDS[kind](owner.module, rows, self._anchor, self._accumulate)
                self._patched.append(owner.module)
            self._arm_use_check(chunk, {n: sl for n, sl in slices.items() if self._straddles(sl)})
        except BaseException:
            self.deactivate()
            raise
        self._active = chunk

    def deactivate(self) -> None:
        """Restore every instance forward and requires_grad flag; drop hooks and buffers."""
        self._disarm_use_check()
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for m in self._patched:
            m.__dict__.pop("forward", None)
        self._patched = []
        for n, flag in self._saved_flags.items():
            self._params[n].requires_grad_(flag)
        self._saved_flags = {}
        self._buffers = {}
        self._shapes = {}
        self._active = None

    @property
    def active_chunk(self) -> Chunk | None:
        return self._active

    # -- gradients -------------------------------------------------------------------------------

    def _accumulate(self, name: str, grad: Tensor) -> None:
        buf = self._buffers.get(name)
        if buf is None:
            # A fresh fp32 gradient is adopted as the buffer: no zero fill, no copy.
            self._buffers[name] = grad.to(torch.float32).contiguous()
        else:
            buf.add_(grad)

    def _grad_hook(self, name: str) -> Callable[[Tensor], None]:
        def hook(p: Tensor) -> None:
            grad = p.grad
            p.grad = None
            if grad is not None:
                self._accumulate(name, grad)

        return hook

    def window_grads(self) -> dict[str, Tensor]:
        """name -> fp32 gradient of the window's rows, summed since the last zero_grad().

        A tensor the backward passes never reached has no entry, like a torch parameter whose .grad is
        None: the optimizer leaves it alone (no weight decay, no momentum step).
        """
        if self._active is None:
            raise RuntimeError("no window is active; call activate(chunk) first")
        self._disarm_use_check()  # the step's forwards and backwards are done
        return {name: buf for name, buf in self._buffers.items() if name in self._shapes}

    def zero_grad(self) -> None:
        """Forget the accumulated window gradients (buffers are re-created on the next backward)."""
        self._disarm_use_check()
        self._buffers = {}
