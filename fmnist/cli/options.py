"""The options several commands share (defaults from ``fmnist.config``), and two kinds click
lacks: ``Switch`` (``--x``, ``--no-x``, ``--x=true|false``) and ``AutoNumber`` (number|auto).
"""

from __future__ import annotations

import click

from fmnist.config import CommonConfig, SearchOptions

AUTO = "auto"
COMMON_KEYS = ("data_dir", "seed", "split_seed", "device", "experiment_name", "quiet")
SEARCH_KEYS = ("storage", "study_name", "n_jobs", "ray")
DEVICES = ("auto", "cpu", "cuda")
NEGATED = "fmnist.negated"  # ctx.meta: the names of the switches a --no-x turned off
NAME_OR_PATH = "NAME|PATH"  # an experiment definition: a name in experiments/ or a YAML file


class Switch(click.Option):
    """``--x`` alone true, ``--x true|false`` a value, ``--no-x`` (hidden, eager) false."""

    def __init__(self, param_decls, **attrs) -> None:
        attrs.update(type=click.BOOL, is_flag=False, flag_value=True, callback=unless_negated)
        super().__init__(param_decls, **attrs)

    def get_help_record(self, ctx: click.Context) -> tuple[str, str]:
        name = self.opts[0][2:]
        state = name if self.default else f"no-{name}"
        return f"--{name} / --no-{name}", f"{self.help}  [default: {state}]"


def record_negation(ctx: click.Context, param: click.Parameter, given: bool) -> None:
    if given:
        ctx.meta.setdefault(NEGATED, set()).add(param.name.removeprefix("no_"))


def unless_negated(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    return False if param.name in ctx.meta.get(NEGATED, ()) else value


def switch(name: str, default: bool, help: str):
    """The boolean option ``--name`` (a ``Switch``) and its ``--no-name``."""
    hidden = {"is_flag": True, "is_eager": True, "hidden": True, "expose_value": False}
    return stack(
        click.option(f"--{name}", cls=Switch, default=default, help=help),
        click.option(f"--no-{name}", callback=record_negation, **hidden),
    )


class AutoNumber(click.ParamType):
    """A number of ``kind`` (int or float), or ``auto`` (or nothing) for None."""

    name = f"number|{AUTO}"

    def __init__(self, kind: type) -> None:
        self.kind = kind

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return f"{'INTEGER' if self.kind is int else 'FLOAT'}|{AUTO}"

    def convert(self, value, param, ctx) -> int | float | None:
        if value is None or isinstance(value, self.kind):
            return value
        text = str(value).strip()
        if text.lower() in {"", AUTO}:
            return None
        try:
            number = float(text)
        except ValueError:
            self.fail(f"{text!r} is not a number or {AUTO!r}.", param, ctx)
        if self.kind is int and not number.is_integer():
            self.fail(f"{text!r} is not a whole number or {AUTO!r}.", param, ctx)
        return self.kind(number)


def option(name: str, default, help: str, *dest: str, **attrs):
    """``--name`` (``dest``: its parameter's name) with its default, shown in --help."""
    return click.option(f"--{name}", *dest, default=default, show_default=True, help=help, **attrs)


def auto_option(name: str, kind: type, help: str):
    """``--name`` taking a number of ``kind`` or ``auto`` (the default), which means None."""
    return option(name, AUTO, help, type=AutoNumber(kind))


def examples(*lines: str) -> str:
    """A command's epilog: its examples, kept as written (click rewraps other paragraphs)."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


def pairs(result: dict) -> str:
    """A command's result as one ``key=value, ...`` line."""
    return ", ".join(f"{key}={value}" for key, value in result.items())


def stack(*options):
    """One decorator applying ``options`` in the order listed (the order --help shows)."""

    def decorate(function):
        for add in reversed(options):
            function = add(function)
        return function

    return decorate


COMMON, SEARCH = CommonConfig(), SearchOptions()
common_options = stack(
    option(
        "data-dir",
        COMMON.data_dir,
        "Folder holding FashionMNIST/raw (empty: $FMNIST_DATA_DIR, else ./data).",
        metavar="DIR",
    ),
    option("seed", COMMON.seed, "Training seed (python, numpy, torch)."),
    option(
        "split-seed",
        COMMON.split_seed,
        "random_state of the study's stratified 80/20 train/validation split.",
    ),
    option("device", COMMON.device, "auto picks CUDA when available.", type=click.Choice(DEVICES)),
    option(
        "experiment-name",
        COMMON.experiment_name,
        "MLflow experiment (ignored under `mlflow run`, which sets it).",
        metavar="NAME",
    ),
    switch("quiet", COMMON.quiet, "No progress bars."),
)


def search_options(study_name_help: str, n_jobs_help: str):
    """``--storage``, ``--study-name``, ``--n-jobs`` and ``--ray``, shared by the searches."""
    return stack(
        option(
            "storage",
            SEARCH.storage,
            "Optuna storage URL (e.g. postgresql://...) or journal file (empty: "
            "optuna-journal.log next to the tracking store).",
            metavar="URL|FILE",
        ),
        option("study-name", SEARCH.study_name, study_name_help, metavar="NAME"),
        option("n-jobs", SEARCH.n_jobs, n_jobs_help),
        option(
            "ray",
            SEARCH.ray,
            "Run the workers as Ray tasks: `auto` joins the running cluster, HOST:PORT that one, "
            "`local` starts Ray on this machine (empty: no Ray). One CPU a task, one GPU with "
            "--device cuda; share the store and --storage (an RDB) with every node.",
            metavar="ADDRESS|auto|local",
        ),
    )


def pop_common(kwargs: dict) -> CommonConfig:
    """Remove the shared options from a command's kwargs and return them as a config."""
    return CommonConfig(**{key: kwargs.pop(key) for key in COMMON_KEYS})


def pop_search(kwargs: dict) -> SearchOptions:
    """Remove the search options from a command's kwargs and return them as a config."""
    return SearchOptions(**{key: kwargs.pop(key) for key in SEARCH_KEYS})
