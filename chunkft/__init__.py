"""chunkft: full-parameter fine-tuning on the GPU you have (ChunkFT), as a Python API.

    import chunkft

    plan = chunkft.plan("llama-3-8b", gpu="4090", seq_len=1024)   # a Plan; nothing written
    plan = chunkft.plan("tiny-llama", gpu="cpu", seq_len=128, chunks=4, output="runs/tiny/plan.json")
    result = chunkft.run("runs/tiny/plan.json", data="input.txt", output="runs/tiny/run")

The command-line tools are thin wrappers over the same functions: chunkft-plan (chunkft.planner.cli),
chunkft-run (chunkft.executor.cli), chunkft-report (chunkft.reports.cli). The packages:

    chunkft.plan_format   the plan file, the contract the planner writes and the executor replays
    chunkft.chunks        parameter specs and their partition into chunks (part of the contract)
    chunkft.profiles      GPU profiles, model presets and this machine's memory
    chunkft.planner       profile -> table -> simulator -> solver -> plan
    chunkft.executor      replays a plan: the ChunkFT driver, transfers, checkpoints, the training loop
    chunkft.reports       figures, report.html and traces of a plan or a finished run
"""

from chunkft.api import plan, run
from chunkft.plan_format import Plan, PlanError, load_plan, save_plan

__all__ = ["Plan", "PlanError", "load_plan", "plan", "run", "save_plan"]
