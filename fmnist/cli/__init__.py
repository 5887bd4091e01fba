"""The ``fmnist`` click group, its errors and exit codes; the commands (``training``,
``inspection``) import their flow only when they run, so ``--help`` needs no torch or mlflow.
"""

from __future__ import annotations

import atexit
import errno
import importlib
import logging
import os
import signal
import sys
import tempfile
import traceback

import click

from fmnist.config import DEFAULT_TRACKING_URI, redact_uri
from fmnist.errors import FmnistError, NoSpace

UNEXPECTED_EXIT_CODE = 1  # FmnistError.exit_code (2) and click's usage errors (2) are the others
SIGNAL_EXIT_BASE = 128  # the shell's code for a process signal N stopped: 128 + N

# name -> ("module:attribute" of its click command, its line in `fmnist --help`), in the order of
# the work (the pipeline, which runs the others, last): the group's help imports no command.
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("fmnist.cli.inspection:info", "Check the dataset: sizes, per-class counts, digest."),
    "eda": ("fmnist.cli.inspection:eda", "Class counts, samples, PCA and t-SNE, with numbers."),
    "dnn-search": ("fmnist.cli.training:dnn_search", "Grid-search the study's dense network."),
    "cnn": ("fmnist.cli.training:cnn", "Train a CNN recipe, log it to MLflow and register it."),
    "cnn-search": ("fmnist.cli.training:cnn_search", "Search CNN hyperparameters (TPE)."),
    "evaluate": ("fmnist.cli.inspection:evaluate", "Test metrics, calibration, robustness."),
    "compare": ("fmnist.cli.inspection:compare", "Compare the dense network with every CNN."),
    "predict": ("fmnist.cli.inspection:predict", "Classify images with a registered model."),
    "pipeline": ("fmnist.cli.training:pipeline", "Run the whole study, one child run a step."),
    "runs": (
        "fmnist.cli.inspection:runs",
        "List RUNNING runs; --clean ends those of dead processes.",
    ),
}
RECEIVED: dict[str, int | None] = {"signal": None}  # the first signal: it decides the exit code
EXIT: dict[str, int | str | None] = {"code": 0}  # the command's, for the last exit handler


class LazyGroup(click.Group):
    """A click group that imports a command's module only when that command is used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module_name, attribute = COMMANDS[name][0].split(":")
        return getattr(importlib.import_module(module_name), attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, COMMANDS[name][1]) for name in self.list_commands(ctx)])

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort):
            raise  # --help, --version, a command's own exit code
        except click.ClickException as exc:
            fail_mlflow_run(exc.format_message())
            raise  # a usage error: click prints it with the usage line and exits 2
        except KeyboardInterrupt:
            code = exit_code(SIGNAL_EXIT_BASE + signal.SIGINT)  # SIGINT: raised some other way
            click.echo(f"Interrupted ({signal.Signals(code - SIGNAL_EXIT_BASE).name}).", err=True)
            ctx.exit(code)
        except FmnistError as exc:
            report(str(exc))
            ctx.exit(exc.exit_code)
        except Exception as exc:  # noqa: BLE001 - the user gets one paragraph, never a traceback
            known = unreachable_server(exc) or locked_store(exc) or disk_full(exc)
            if known is not None:
                report(str(known))
                ctx.exit(known.exit_code)
            report_unexpected(exc, debug=bool((ctx.obj or {}).get("debug")))
            ctx.exit(UNEXPECTED_EXIT_CODE)


# Words of the connection errors MLflow's REST client wraps in an MlflowException.
UNREACHABLE_MARKERS = (
    "Max retries exceeded",
    "Failed to establish a new connection",
    "Connection refused",
    "Read timed out",
    "Name or service not known",
)


def store_uri() -> str:
    return redact_uri(os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)


def unreachable_server(exc: Exception) -> FmnistError | None:
    """A tracking server that cannot be reached, as one message instead of a traceback."""
    # looked up, not imported: an MlflowException comes only from an mlflow already imported
    exceptions = sys.modules.get("mlflow.exceptions")
    if exceptions is None or not isinstance(exc, exceptions.MlflowException):
        return None
    reason = next((m for m in UNREACHABLE_MARKERS if m in str(exc)), None)
    if reason is None:
        return None
    return FmnistError(
        f"Cannot reach the MLflow tracking server at {store_uri()} ({reason}). "
        "Start it, or fix MLFLOW_TRACKING_URI (unset: the embedded sqlite:///mlflow.db)."
    )


def locked_store(exc: Exception) -> FmnistError | None:
    """A SQLite store locked past its busy timeout, as the message naming the fix; else None."""
    if "database is locked" not in "".join(traceback.format_exception(exc)):
        return None
    # only on this path, where the failed write has imported mlflow already
    from fmnist.tracking.store import locked_store_message

    message = locked_store_message(exc, store_uri())
    return FmnistError(message) if message else None


def disk_full(exc: Exception) -> FmnistError | None:
    """A write that found its disk full, as one paragraph naming the file (when it is known)."""
    error: BaseException | None = exc
    while error is not None:
        if getattr(error, "errno", None) == errno.ENOSPC or "disk is full" in str(error):
            path = getattr(error, "filename", None) or "the tracking store or temporary folder"
            return NoSpace(str(path))
        error = error.__cause__ or error.__context__
    return None


def report(message: str) -> None:
    click.echo(f"Error: {message}", err=True)
    fail_mlflow_run(message)


def report_unexpected(exc: Exception, debug: bool) -> None:
    """One paragraph for an unforeseen error; its trace goes to a file (--debug: to stderr)."""
    trace = "".join(traceback.format_exception(exc))
    first_line = (str(exc).strip().splitlines() or [""])[0][:500]
    what = f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__
    if debug or os.environ.get("FMNIST_DEBUG", "").strip() not in ("", "0"):
        click.echo(trace, err=True, nl=False)
        where = "printed above"
    else:
        handle, path = tempfile.mkstemp(prefix="fmnist-error-", suffix=".txt")
        with os.fdopen(handle, "w") as file:
            file.write(trace)
        where = f"in {path} (run again with --debug, or FMNIST_DEBUG=1, to print it)"
    report(
        f"The command failed unexpectedly with {what}. This is a bug or an unforeseen "
        f"condition, not a problem with your options; the full trace is {where}."
    )


def fail_mlflow_run(message: str) -> None:
    """Under ``mlflow run``, end the run it created FAILED with ``message`` recorded."""
    if not os.environ.get("MLFLOW_RUN_ID"):
        return  # no run to end: mlflow need not load to print a message
    from fmnist.tracking import fail_pending_run  # mlflow loads only on this path

    fail_pending_run(message)


@click.group(
    cls=LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="\b\nExamples:\n  fmnist info\n  fmnist pipeline --quick\n  mlflow run . -P quick=true",
)
@click.version_option(package_name="fmnist")
@click.option(
    "--debug", is_flag=True, help="Print the full trace of an unexpected error (FMNIST_DEBUG=1)."
)
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Fashion-MNIST: the study's EDA, dense network and CNN, tracked in MLflow.

    Data comes from --data-dir or FMNIST_DATA_DIR (default ./data); runs go to
    MLFLOW_TRACKING_URI or the embedded store sqlite:///mlflow.db.

    A boolean option is a flag: --x turns it on, --no-x off, and --x=true|false gives its value
    (the form the MLproject uses). Exit codes: 0 done, 1 unexpected error, 2 usage, data or
    config error, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
    """
    ctx.obj = {"debug": debug}


def raise_interrupt(signum: int, frame) -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt (open runs end KILLED); the first decides."""
    RECEIVED["signal"] = RECEIVED["signal"] or signum
    raise KeyboardInterrupt(f"signal {signum}")


def exit_code(code: int | str | None) -> int:
    """128 + the interrupting signal once one came, else the command's (a message is 1)."""
    if RECEIVED["signal"] is not None:
        return SIGNAL_EXIT_BASE + RECEIVED["signal"]
    return code if isinstance(code, int) else int(bool(code))


def main() -> None:
    # registered first, so it runs last: the process ends without tearing down torch, MLflow
    # and SQLAlchemy object by object (seconds after the command's last line)
    atexit.register(end_without_teardown)
    signal.signal(signal.SIGTERM, raise_interrupt)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when ignored (&)
        signal.signal(signal.SIGINT, raise_interrupt)
    try:
        cli.main(prog_name="fmnist", standalone_mode=True)
    except SystemExit as exc:  # click's standalone mode always ends with one
        EXIT["code"] = exit_code(exc.code)
        sys.exit(EXIT["code"])


def end_without_teardown() -> None:
    """The last exit handler: flush the output and end with the command's (or signal's) code."""
    code = exit_code(EXIT["code"])
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed pipe: nothing more can reach it
    os._exit(code)


if __name__ == "__main__":
    main()
