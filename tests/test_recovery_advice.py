"""Every piece of advice a chunkft-run error prints is a command that works (issue 17 item 2, issue 15 item
13): each recovery case below provokes the error, collects the commands in its one line, runs them
in-process and checks that they succeed. Also: --resume falls back to the newest intact checkpoint when
`latest` is missing, dangling or corrupt; --resume-from picks one."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import signal
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from tiny_runs import PLAN_ARGS, SHAKESPEARE, plan_file, plan_tiny, shakespeare_text

import chunkft.executor.train
from chunkft.executor.checkpoint import CheckpointDiskFull, latest_checkpoint, read_meta
from chunkft.executor.cli import main as run_main
from chunkft.plan_format import Plan, load_plan
from chunkft.planner.cli import main as plan_main

pytestmark = pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="needs ../shared/data")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Plan:
    """The tiny Llama planned once (constant schedule); tests set steps and checkpoint cadence."""
    return plan_tiny(tmp_path_factory.mktemp("plan"), steps=4)


def run(*args: str) -> Result:
    return CliRunner().invoke(run_main, [*args, "--quiet"])


def error_line(res: Result) -> str:
    lines = [ln for ln in res.output.splitlines() if ln.startswith("chunkft-run: error: ")]
    assert len(lines) == 1, res.output
    return lines[0]


_COMMAND = re.compile(r"(?:^|: |&& )(chunkft-(?:run|plan) )")
_COMMAND_END = re.compile(r", or | && | \(|$")


def commands_in(line: str) -> list[list[str]]:
    """Each command in an error line: from `chunkft-run`/`chunkft-plan` after a colon (or &&) to the
    next `, or `, ` && `, ` (` or the end of the line."""
    found = []
    for m in _COMMAND.finditer(line):
        rest = line[m.start(1) :]
        found.append(shlex.split(rest[: _COMMAND_END.search(rest).start()]))
    assert found, f"no command in: {line}"
    return found


def run_command(argv: list[str]) -> Result:
    """One printed command, in-process (the console scripts' own entry points)."""
    main = {"chunkft-run": run_main, "chunkft-plan": plan_main}[argv[0]]
    extra = ["--quiet"] if argv[0] == "chunkft-run" else []
    res = CliRunner().invoke(main, [*argv[1:], *extra])
    assert res.exit_code == 0, f"{shlex.join(argv)}\n{res.output}"
    return res


def steps_logged(out: Path) -> list[int]:
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return [r["step"] for r in records if "loss" in r]


def corrupt(checkpoint: Path) -> None:
    weights = checkpoint / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-5] ^= 0xFF
    weights.write_bytes(bytes(blob))


# ------------------------------------------------------------------------------ latest missing/corrupt


@pytest.fixture
def two_checkpoints(tmp_path: Path, base: Plan) -> tuple[Path, Path, Path]:
    """A run stopped at step 4 of 6 with checkpoints at 2 and 4 (plan, data, output)."""
    plan, data, out = (
        plan_file(tmp_path, base, steps=6, checkpoint_every=2),
        shakespeare_text(tmp_path),
        tmp_path / "run",
    )
    res = run(str(plan), "--data", str(data), "--output", str(out), "--max-steps", "4")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-000002", "step-000004"]
    return plan, data, out


def test_latest_missing_resume_uses_the_newest_intact_and_a_fresh_run_says_resume(two_checkpoints) -> None:
    plan, data, out = two_checkpoints
    (out / "checkpoints" / "latest").unlink()
    args = [str(plan), "--data", str(data), "--output", str(out)]
    line = error_line(run(*args))  # a fresh run into it: the advice is to resume, or start elsewhere
    assert "already holds a run (checkpoint step-000004)" in line, line
    resume, elsewhere = commands_in(line)
    assert resume[-1] == "--resume" and elsewhere[elsewhere.index("--output") + 1] == f"{out}-2"
    res = run_command(resume)
    assert (
        "chunkft-run: note: checkpoints/latest is missing; resuming from step-000004, the newest intact "
        "checkpoint"
    ) in res.output
    assert steps_logged(out) == [1, 2, 3, 4, 5, 6]
    run_command(elsewhere)
    assert steps_logged(Path(f"{out}-2")) == [1, 2, 3, 4, 5, 6]


def test_latest_dangling_or_corrupt_resume_falls_back_with_a_note(two_checkpoints) -> None:
    plan, data, out = two_checkpoints
    args = [str(plan), "--data", str(data), "--output", str(out)]
    (out / "checkpoints" / "latest").write_text("step-000009\n")
    res = run(*args, "--resume", "--max-steps", "5")
    assert res.exit_code == 0, res.output
    assert "checkpoints/latest points at 'step-000009', which is not a checkpoint directory; resuming " in (
        res.output
    )
    assert steps_logged(out) == [1, 2, 3, 4, 5]
    corrupt(latest_checkpoint(out))  # step-000005 now
    res = run(*args, "--resume")
    assert res.exit_code == 0, res.output
    note = [ln for ln in res.output.splitlines() if ln.startswith("chunkft-run: note: ")]
    assert note == [
        "chunkft-run: note: checkpoints/step-000005 (the latest) is corrupt (model.safetensors: missing or "
        "does not match its recorded size/sha256); resuming from step-000004, the newest intact checkpoint"
    ], res.output
    assert steps_logged(out) == [1, 2, 3, 4, 5, 6]  # step 5 retrained from step 4's state


def test_resume_from_picks_a_checkpoint_and_a_wrong_choice_names_one_that_works(two_checkpoints) -> None:
    plan, data, out = two_checkpoints
    args = [str(plan), "--data", str(data), "--output", str(out)]
    line = error_line(run(*args, "--resume-from", "step-3"))
    assert "--resume-from step-3: " in line and "is not a checkpoint" in line, line
    (command,) = commands_in(line)
    assert command[-2:] == ["--resume-from", "step-000004"]
    run_command(command)
    assert steps_logged(out) == [1, 2, 3, 4, 5, 6]
    res = run(*args, "--resume-from", str(out / "checkpoints" / "step-000006"), "--max-steps", "7")
    assert res.exit_code == 0, res.output  # a path works too (a constant schedule goes on past the plan)


def test_every_checkpoint_corrupt_says_start_over_elsewhere(tmp_path: Path, base: Plan) -> None:
    plan, data, out = plan_file(tmp_path, base, steps=2), shakespeare_text(tmp_path), tmp_path / "run"
    args = [str(plan), "--data", str(data), "--output", str(out)]
    assert run(*args).exit_code == 0
    corrupt(latest_checkpoint(out))
    res = run(*args, "--resume", "--max-steps", "3")
    assert res.exit_code == 2
    line = error_line(res)
    assert "holds no intact checkpoint" in line and "does not match its recorded size/sha256" in line, line
    (command,) = commands_in(line)
    run_command(command)
    assert steps_logged(Path(f"{out}-2")) == [1, 2, 3]


# --------------------------------------------------------------------- finished run, no checkpoints


def test_a_finished_run_says_where_its_model_is_and_how_to_train_on(tmp_path: Path, base: Plan) -> None:
    plan, data, out = plan_file(tmp_path, base, steps=2), shakespeare_text(tmp_path), tmp_path / "run"
    args = [str(plan), "--data", str(data), "--output", str(out)]
    assert run(*args).exit_code == 0
    line = error_line(run(*args))
    assert f"already holds a run, finished at step 2 (its model is in {out / 'model'})" in line, line
    (elsewhere,) = commands_in(line)
    run_command(elsewhere)
    line = error_line(run(*args, "--resume"))  # constant schedule: more steps at the same rate
    assert "the run is complete" in line, line
    (more,) = commands_in(line)
    assert more[-3:] == ["--max-steps", "4", "--resume"]
    run_command(more)
    assert steps_logged(out) == [1, 2, 3, 4]


@pytest.mark.parametrize("case", ["fresh-output", "died-before-first-checkpoint"])
def test_resume_without_a_checkpoint_says_run_without_resume(tmp_path: Path, base: Plan, case: str) -> None:
    """Before: the run that died before its first checkpoint left checkpoints/ behind; --resume said
    'run without --resume' and that said 'add --resume'."""
    plan, data, out = plan_file(tmp_path, base, steps=2), shakespeare_text(tmp_path), tmp_path / "run"
    if case == "died-before-first-checkpoint":  # what SIGKILL during the first save leaves
        (out / "checkpoints" / f"step-000002.tmp-{os.getpid()}").mkdir(parents=True)
        (out / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0, "skipped": false}\n')
    line = error_line(run(str(plan), "--data", str(data), "--output", str(out), "--resume"))
    assert "has no checkpoints to resume from" in line, line
    (command,) = commands_in(line)
    assert "--resume" not in command
    run_command(command)
    assert steps_logged(out) == [1, 2]


# ------------------------------------------------------------------------- failures during a run


def test_interrupted_run_resume_command_works(tmp_path: Path, base: Plan) -> None:
    """SIGINT in-process (the loop's handler is the main thread's): the printed command finishes it."""
    plan, data, out = plan_file(tmp_path, base, steps=500), shakespeare_text(tmp_path), tmp_path / "run"
    metrics = out / "metrics.jsonl"

    def interrupt() -> None:
        deadline = time.time() + 120
        while time.time() < deadline:
            if metrics.exists() and '"loss"' in metrics.read_text():
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.01)

    threading.Thread(target=interrupt, daemon=True).start()
    res = run(str(plan), "--data", str(data), "--output", str(out), "--max-steps", "12")
    assert res.exit_code == 130, res.output
    line = res.output.strip().splitlines()[-1]
    assert line.startswith("resume with: chunkft-run ")
    run_command(shlex.split(line.removeprefix("resume with: ")))
    assert steps_logged(out) == list(range(1, 13))


def test_disk_full_resume_command_works(tmp_path: Path, base: Plan, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills at the checkpoint of step 4 (simulated: tests/test_reliability.py does it for real on
    a tmpfs where it may mount one); after freeing space the printed command finishes the run."""
    plan, data, out = (
        plan_file(tmp_path, base, steps=6, checkpoint_every=2),
        shakespeare_text(tmp_path),
        tmp_path / "run",
    )
    real = chunkft.executor.train.save_checkpoint

    def full_at_4(output_dir, meta, *a, **kw):  # type: ignore[no-untyped-def]
        if meta.step == 4:
            raise CheckpointDiskFull(4, "step-000002", "No space left on device")
        return real(output_dir, meta, *a, **kw)

    monkeypatch.setattr(chunkft.executor.train, "save_checkpoint", full_at_4)
    res = run(str(plan), "--data", str(data), "--output", str(out))
    assert res.exit_code == 1, res.output
    line = error_line(res)
    assert "the previous checkpoint step-000002 is intact; free space and resume with: " in line, line
    monkeypatch.setattr(chunkft.executor.train, "save_checkpoint", real)
    (command,) = commands_in(line)
    run_command(command)
    assert steps_logged(out) == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------------------------- other data, schedule end, device


def test_resume_on_other_data_is_refused_and_allow_data_change_continues(tmp_path: Path, base: Plan) -> None:
    plan, data, out = (
        plan_file(tmp_path, base, steps=4, checkpoint_every=2),
        shakespeare_text(tmp_path),
        tmp_path / "run",
    )
    args = [str(plan), "--data", str(data), "--output", str(out)]
    assert run(*args, "--max-steps", "2").exit_code == 0
    other = shakespeare_text(tmp_path, name="other.txt", start=10_000)
    meta = read_meta(latest_checkpoint(out))
    assert meta.data_bytes == data.stat().st_size and meta.data_sha256 and len(meta.data_sha256) == 64
    res = run(str(plan), "--data", str(other), "--output", str(out), "--resume", "--max-steps", "3")
    assert res.exit_code == 2
    line = error_line(res)
    assert f"{other} (sha256 " in line and "is not the data checkpoint step-000002 was trained on" in line
    (allow,) = commands_in(line)
    assert allow[-1] == "--allow-data-change"
    res = run_command(allow)
    assert "; continuing on it (--allow-data-change)" in res.output
    assert read_meta(latest_checkpoint(out)).data_sha256 != meta.data_sha256  # the new data's, from now on


def test_a_checkpoint_without_a_data_fingerprint_resumes_with_a_note(tmp_path: Path, base: Plan) -> None:
    """Checkpoints written before the field existed: state.json without it loads (None) and resumes."""
    plan, data, out = plan_file(tmp_path, base, steps=3), shakespeare_text(tmp_path), tmp_path / "run"
    args = [str(plan), "--data", str(data), "--output", str(out)]
    assert run(*args, "--max-steps", "2").exit_code == 0
    state_path = latest_checkpoint(out) / "state.json"
    state = json.loads(state_path.read_text())
    del state["data_sha256"], state["data_bytes"]
    state_path.write_text(json.dumps(state))
    assert read_meta(latest_checkpoint(out)).data_sha256 is None
    res = run(*args, "--resume")
    assert res.exit_code == 0, res.output
    assert "checkpoint step-000002 predates data fingerprints" in res.output


def test_max_steps_past_a_decaying_schedule_is_refused_with_a_replan_that_works(
    tmp_path: Path, base: Plan
) -> None:
    """Before: steps past the end of a linear schedule trained at lr 0, silently."""
    plan, data, out = (
        plan_file(tmp_path, base, steps=2, schedule="linear"),
        shakespeare_text(tmp_path),
        tmp_path / "run",
    )
    res = run(str(plan), "--data", str(data), "--output", str(out), "--max-steps", "3")
    assert res.exit_code == 2
    line = error_line(res)
    assert "runs past the end of the plan's linear schedule (step 2), where the learning rate is 0" in line
    assert not out.exists()
    replan, again = commands_in(line)
    assert replan[replan.index("--steps") + 1] == "3" and replan[replan.index("--chunks") + 1] == "4"
    run_command(replan)
    assert load_plan(Path(replan[replan.index("-o") + 1])).run.schedule.total_steps == 3
    run_command(again)
    records = map(json.loads, Path(f"{out}-2", "metrics.jsonl").read_text().splitlines())
    lrs = [r["lr"] for r in records if "lr" in r]
    assert len(lrs) == 3 and all(lr > 0 for lr in lrs)


def test_a_gpu_plan_without_a_gpu_is_refused_before_building(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the GPU plan built the model on the CPU and trained there, nothing said."""
    from chunkft.executor.devices import CudaInfo

    path = tmp_path / "gpu.json"
    args = ["tiny-llama", "--gpu", "4090", "--seq-len", "32", "--batch-size", "2", "--chunks", "4"]
    res = CliRunner().invoke(plan_main, [*args, "--steps", "2", "--host-mem", "4GiB", "-o", str(path)])
    assert res.exit_code == 0, res.output
    monkeypatch.setattr(CudaInfo, "probe", staticmethod(lambda: CudaInfo(False, 0, 0)))
    real_build = chunkft.executor.train.build_model

    def no_build(*a, **kw):  # type: ignore[no-untyped-def]
        raise AssertionError("the model was built before the device was checked")

    monkeypatch.setattr(chunkft.executor.train, "build_model", no_build)
    data, out = shakespeare_text(tmp_path), tmp_path / "run"
    line = error_line(run(str(path), "--data", str(data), "--output", str(out)))
    assert f"{path} was made for 1 x NVIDIA GeForce RTX 4090 and this machine has no GPU" in line, line
    assert "GiB host memory" in line and not out.exists()
    (command,) = commands_in(line)
    assert command[command.index("--device") + 1] == "cpu"
    monkeypatch.setattr(chunkft.executor.train, "build_model", real_build)
    run_command(command)


def test_padded_data_replan_keeps_the_plans_choices_and_runs(tmp_path: Path) -> None:
    """Before: the printed chunkft-plan command dropped --chunks and the batch split."""
    plan = tmp_path / "plan.json"  # rows of 64: the prompt template alone is 34 bytes
    args = [a if a != "32" else "64" for a in PLAN_ARGS]
    assert CliRunner().invoke(plan_main, [*args, "--steps", "2", "-o", str(plan)]).exit_code == 0
    base = load_plan(plan)
    lines = [ln for ln in SHAKESPEARE.read_text().splitlines() if 0 < len(ln) <= 20][:80]
    data = tmp_path / "instructions.jsonl"
    records = [{"instruction": a, "output": b} for a, b in zip(lines[0::2], lines[1::2], strict=True)]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "run"
    line = error_line(run(str(plan), "--data", str(data), "--output", str(out)))
    assert "re-plan with --padded-batches: " in line, line
    (replan,) = commands_in(line)
    assert replan[replan.index("--chunks") + 1] == "4" and "--micro-batch" in replan
    run_command(replan)
    padded = load_plan(Path(replan[replan.index("-o") + 1]))
    assert padded.run.padded_batches
    assert len(padded.chunk_table.chunks) == len(base.chunk_table.chunks)
    assert (padded.run.micro_batch_size, padded.run.grad_accum_steps) == (
        base.run.micro_batch_size,
        base.run.grad_accum_steps,
    )
    assert padded.checkpointing.mode == base.checkpointing.mode
    assert padded.rotation.update_interval == base.rotation.update_interval
    run_command(["chunkft-run", replan[replan.index("-o") + 1], "--data", str(data), "--output", str(out)])


def test_too_little_host_memory_prints_a_replan_that_works(
    tmp_path: Path, base: Plan, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the printed chunkft-plan command had no -o (chunkft-plan refused it, exit 2)."""
    from chunkft.executor.train import host_bytes_needed

    plan, data, out = plan_file(tmp_path, base, steps=2), shakespeare_text(tmp_path), tmp_path / "run"
    need, _ = host_bytes_needed(base, chunkft.executor.train.torch.device("cpu"))
    monkeypatch.setattr(chunkft.executor.train, "available_host_bytes", lambda: need - 1)
    line = error_line(run(str(plan), "--data", str(data), "--output", str(out)))
    assert "this machine has 0.04 GiB available" in line and not out.exists(), line
    (replan,) = commands_in(line)
    assert replan[replan.index("--host-mem") + 1] == f"{(need - 1) >> 20}MiB"
    run_command(replan)
    replanned = load_plan(Path(replan[replan.index("-o") + 1]))
    assert replanned.predictions.host_peak_bytes <= replanned.hardware.host_budget_bytes < need


def test_a_seq_len_1_plan_prints_a_replan_that_works(tmp_path: Path, base: Plan) -> None:
    """Before: the advice was `chunkft-plan MODEL --seq-len 2 or more` (no --gpu, no -o: not a command)."""
    path = tmp_path / "plan.json"
    doc = json.loads(plan_file(tmp_path, base, steps=2).read_text())
    doc["run"]["seq_len"] = 1
    path.write_text(json.dumps(doc))
    line = error_line(
        run(str(path), "--data", str(shakespeare_text(tmp_path)), "--output", str(tmp_path / "run"))
    )
    (replan,) = commands_in(line)
    run_command(replan)
    replanned = load_plan(Path(replan[replan.index("-o") + 1]))
    assert replanned.run.seq_len == 512 and replanned.hardware.gpu == base.hardware.gpu


def test_a_replan_keeps_the_plans_numbers_exactly(tmp_path: Path, base: Plan) -> None:
    """Before: floats were printed with :g (6 digits), so lr 1.2345678e-05 re-planned as 1.23457e-05;
    the compute efficiency and --calibrate were dropped."""
    from chunkft.executor.replan import replan_command

    opt = dataclasses.replace(base.run.optimizer, lr=1.2345678e-05, weight_decay=0.0123456789)
    plan = dataclasses.replace(base, run=dataclasses.replace(base.run, optimizer=opt))
    predictions = dataclasses.replace(plan.predictions, compute_efficiency=0.3)
    plan = dataclasses.replace(plan, predictions=predictions)
    target = tmp_path / "again.json"
    run_command(shlex.split(replan_command(plan, plan.hardware.budget_bytes, target)))
    again = load_plan(target)
    assert (again.run.optimizer.lr, again.run.optimizer.weight_decay) == (1.2345678e-05, 0.0123456789)
    assert again.predictions.compute_efficiency == 0.3


def test_a_diverged_run_names_what_is_kept_and_prints_a_lower_lr_replan_that_works(
    tmp_path: Path, base: Plan, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: "lower the learning rate or check the data", no command, exit 2 after training had
    written metrics and checkpoints."""
    real_loss, calls = chunkft.executor.train.causal_lm_loss, []

    def nan_after_step_2(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss + float("nan") if len(calls) > 2 else loss

    monkeypatch.setattr(chunkft.executor.train, "causal_lm_loss", nan_after_step_2)
    plan, data, out = (
        plan_file(tmp_path, base, steps=20, checkpoint_every=2),
        shakespeare_text(tmp_path),
        tmp_path / "run",
    )
    res = run(str(plan), "--data", str(data), "--output", str(out))
    assert res.exit_code == 1
    line = error_line(res)
    assert "not finite for 5 steps in a row" in line
    assert f"checkpoint {latest_checkpoint(out).name} is intact" in line
    replan, again = commands_in(line)
    lr = base.run.optimizer.lr / 10
    assert float(replan[replan.index("--lr") + 1]) == lr and "--chunks" in replan
    monkeypatch.setattr(chunkft.executor.train, "causal_lm_loss", real_loss)
    run_command(replan)
    target = Path(replan[replan.index("-o") + 1])
    assert load_plan(target).run.optimizer.lr == lr
    assert again[1] == str(target) and again[again.index("--output") + 1] == f"{out}-2"
    run_command([*again, "--max-steps", "1"])


@pytest.mark.parametrize(
    ("flags", "reserve", "headroom"),
    [((), False, ""), (("--reserve", "0", "--headroom", "5%+1MiB"), True, "5%+1MiB")],
    ids=["defaults", "given"],
)
def test_a_replan_asks_for_the_reserve_and_headroom_the_user_gave(
    tmp_path: Path, flags: tuple[str, ...], reserve: bool, headroom: str
) -> None:
    """A re-plan command (after an OOM, for padded data, for more steps) is the user's request again:
    a --reserve or --headroom they gave stays; the defaults stay defaults. Before: both were dropped, so
    `--reserve 0 --headroom 0` (the paper's 13.72 GiB case) came back with the GPU defaults."""
    from chunkft.executor.replan import replan_command

    args = ["tiny-llama", "--gpu", "4090", "--seq-len", "64", "--host-mem", "4GiB", *flags]
    res = CliRunner().invoke(plan_main, [*args, "-o", str(tmp_path / "a.json")])
    assert res.exit_code == 0, res.output
    plan = load_plan(tmp_path / "a.json")
    assert (plan.hardware.reserve_given, plan.hardware.headroom_given) == (reserve, headroom)
    command = shlex.split(replan_command(plan, plan.hardware.budget_bytes, tmp_path / "b.json"))
    assert ("--reserve" in command, "--headroom" in command) == (reserve, bool(headroom))
    run_command(command)
    again = load_plan(tmp_path / "b.json")
    assert again.hardware.reserve_given == reserve and again.hardware.headroom_given == headroom
    assert again.hardware.reserve_bytes == plan.hardware.reserve_bytes
    assert again.hardware.headroom_bytes == plan.hardware.headroom_bytes
