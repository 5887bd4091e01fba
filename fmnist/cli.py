"""The ``fmnist`` command line: a click group whose commands live in ``fmnist.commands``.

Commands are imported lazily (``fmnist --help`` stays fast) from the ``COMMANDS`` table, so a new
entry point is one module plus one line here. Every command shares the options defined by
``common_options``. A user-fixable error (``FmnistError``) prints one paragraph and exits with
code 2; under ``mlflow run`` it also ends the run FAILED with the message.
"""

from __future__ import annotations

import importlib
import signal
import sys

import click

from fmnist.errors import FmnistError

# command name -> "module:attribute" of its click command.
COMMANDS: dict[str, str] = {
    "eda": "fmnist.commands.eda:eda",
    "compare": "fmnist.commands.compare:compare",
    "cnn": "fmnist.commands.cnn:cnn",
    "cnn-search": "fmnist.commands.cnn_search:cnn_search",
    "dnn-search": "fmnist.commands.dnn_search:dnn_search",
    "info": "fmnist.commands.info:info",
    "pipeline": "fmnist.commands.pipeline:pipeline",
    "predict": "fmnist.commands.predict:predict",
}


class LazyGroup(click.Group):
    """A click group that imports a command's module only when that command is used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module_name, attribute = target.split(":")
        return getattr(importlib.import_module(module_name), attribute)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FmnistError as exc:
            report_error(exc)
            ctx.exit(exc.exit_code)
        except Exception as exc:
            unreachable = unreachable_server(exc)
            if unreachable is None:
                raise
            report_error(unreachable)
            ctx.exit(unreachable.exit_code)


# Words of the connection errors MLflow's REST client wraps in an MlflowException.
UNREACHABLE_MARKERS = (
    "Max retries exceeded",
    "Failed to establish a new connection",
    "Connection refused",
    "Read timed out",
    "Name or service not known",
)


def unreachable_server(exc: Exception) -> FmnistError | None:
    """A tracking server that cannot be reached, as one message instead of a traceback."""
    from mlflow.exceptions import MlflowException

    from fmnist.tracking import redact_uri, tracking_uri

    text = str(exc)
    if not isinstance(exc, MlflowException) or not any(m in text for m in UNREACHABLE_MARKERS):
        return None
    reason = next(m for m in UNREACHABLE_MARKERS if m in text)
    return FmnistError(
        f"Cannot reach the MLflow tracking server at {redact_uri(tracking_uri())} ({reason}). "
        "Start it, or fix MLFLOW_TRACKING_URI (unset: the embedded sqlite:///mlflow.db)."
    )


def report_error(exc: FmnistError) -> None:
    from fmnist.tracking import fail_pending_run

    click.echo(f"Error: {exc}", err=True)
    fail_pending_run(str(exc))


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fmnist")
def cli() -> None:
    """Fashion-MNIST: the study's EDA, dense network and CNN, tracked in MLflow.

    Data comes from --data-dir or FMNIST_DATA_DIR (default ./data); runs go to
    MLFLOW_TRACKING_URI or the embedded store sqlite:///mlflow.db.
    """


def raise_interrupt(signum, frame) -> None:
    """SIGTERM behaves like Ctrl-C: open runs end KILLED and trials are marked interrupted."""
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    signal.signal(signal.SIGTERM, raise_interrupt)
    cli.main(prog_name="fmnist", standalone_mode=True)


if __name__ == "__main__":
    main()
    sys.exit(0)
