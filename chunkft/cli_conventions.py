"""What the three commands (chunkft-plan, chunkft-run, chunkft-report) share: exit codes, one-line errors.

Every failure is one line on stderr, `PROG: error: WHAT; WHAT TO DO`, and one of these exit codes; with
--debug the Python traceback is printed first and the exit code stays the same (scripts that branch on
it behave alike with and without --debug). The README's failure table lists the cases.
"""

from __future__ import annotations

import sys
import traceback
from typing import Any, NoReturn

import click

EXIT_OK = 0
EXIT_FAILED = 1  # failed while working (disk full, out of memory, internal error); what was written stays
EXIT_BAD_INPUT = 2  # refused before anything was written: a bad option, file, plan, data or checkpoint
EXIT_NO_FIT = 3  # chunkft-plan: nothing fits the budget (the line says the smallest budget that would)
EXIT_REPORT_FAILED = 4  # chunkft-plan --report: the plan is written, its report is not
# 128 + the signal's number when a run stops on a signal after checkpointing: 130 SIGINT, 143 SIGTERM


def fail(prog: str, message: str, code: int = EXIT_BAD_INPUT, *, debug: bool = False) -> NoReturn:
    """Print `PROG: error: MESSAGE` on one line and exit with `code`; with debug, the traceback of the
    exception being handled first (if any)."""
    if debug and sys.exc_info()[0] is not None:
        traceback.print_exc()
    click.echo(f"{prog}: error: {' '.join(str(message).split())}", err=True)
    sys.exit(code)


class OneLineErrors(click.Command):
    """A click command whose every error is one line `PROG: error: ...` on stderr and a chosen exit code.

    click wraps a usage error in the usage text and a 'Try --help' line, and turns Ctrl-C into 'Aborted!'
    with exit 1; a user scanning a log needs the one line. Only the standalone (console-script) path is
    changed: callers that pass standalone_mode=False (bench/) still get click's exceptions.
    """

    def __init__(self, *args: Any, usage_exit_code: int = EXIT_BAD_INPUT, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.usage_exit_code = usage_exit_code

    def main(  # type: ignore[override]
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        prog = prog_name or self.name or "chunkft"
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort:  # Ctrl-C outside a training loop: nothing was being written
            click.echo(f"{prog}: interrupted", err=True)
            sys.exit(130)
        except click.ClickException as e:
            message = " ".join(e.format_message().split())
            click.echo(f"{prog}: error: {message}", err=True)
            sys.exit(self.usage_exit_code if isinstance(e, click.UsageError) else e.exit_code)
        sys.exit(code if isinstance(code, int) else 0)
