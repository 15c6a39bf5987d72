"""Full-size architectures beyond Llama: chunkft-plan's composed per-window peak against the executor's own
traced step (planner.profile_model.reference_step_peak under FakeTensor, nothing allocated), a few windows
each (issue 15 item 6; the tiny-model checks are tests/test_arch_accuracy.py and tests/test_arch_measured.py).

    python bench/bench_arch_accuracy.py gemma-2-2b --chunks 8 --seq-len 1024 --windows 0,4,7 [--ckpt 0,1,2,3]
"""

from __future__ import annotations

import argparse
import time

from chunkft import profiles
from chunkft.chunks import partition
from chunkft.planner.costs import cost_model
from chunkft.planner.profile_model import (
    activation_profile,
    model_structure,
    reference_step_peak,
    supported_attention,
)
from chunkft.planner.simulator import Candidate, edge_patterns, window_peaks, windows_of
from chunkft.planner.solver import make_setup


def main() -> None:
    doc = (__doc__ or "").splitlines()[0]
    ap = argparse.ArgumentParser(prog="python bench/bench_arch_accuracy.py", description=doc)
    ap.add_argument("model")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--windows", default="0", help="comma-separated window indices to trace")
    ap.add_argument("--ckpt", default="", help="comma-separated checkpointed blocks")
    ap.add_argument("--dtype", default="bfloat16")
    a = ap.parse_args()
    ckpt = tuple(int(x) for x in a.ckpt.split(",") if x)
    preset = profiles.load_model(a.model)
    attn = supported_attention(preset.config, preset.task)[0]
    st = model_structure(preset.config, preset.task, a.dtype)
    setup = make_setup(st, cost_model(profiles.load_gpu("cpu"), a.dtype), weight_dtype=a.dtype,
                       optimizer="adamw", sgd_momentum=False, seq_len=a.seq_len, on_gpu=False)  # fmt: skip
    chunks = partition(list(st.specs), num_chunks=a.chunks, policy="rows", state_bytes_per_element=8,
                       keep_whole=frozenset(st.unsliceable))  # fmt: skip
    windows = windows_of(st, st.specs, chunks)
    act = activation_profile(preset.config, preset.task, 1, a.seq_len, a.dtype, attn,
                             edges=edge_patterns(windows, st.num_layers))  # fmt: skip
    cand = Candidate(windows, tuple(range(a.chunks)), ckpt, 1, 1, "host", "float32", True)
    predicted = window_peaks(setup, cand, act)
    print("model  attn  K  seq  checkpointed  window  predicted B  traced B  error  trace s")
    for w in (int(x) for x in a.windows.split(",")):
        t0 = time.perf_counter()
        traced = reference_step_peak(preset.config, preset.task, chunks, w, micro_batch=1, grad_accum=1,
                                     seq_len=a.seq_len, dtype=a.dtype, attn_implementation=attn,
                                     checkpoint_layers=ckpt, state_slots=2)[0]  # fmt: skip
        err = (predicted[w] - traced) / traced
        print(f"{a.model}  {attn}  {a.chunks}  {a.seq_len}  {ckpt or '-'}  {w}  {predicted[w]:,}  "
              f"{traced:,}  {err:+.2%}  {time.perf_counter() - t0:.0f}", flush=True)


if __name__ == "__main__":
    main()
