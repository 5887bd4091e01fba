"""Bad input and safe defaults: each case one clear message, a non-zero exit, nothing created.

The cases docs/errors.md lists that other test files do not cover already: the commands' option
checks through the CLI, an unreachable tracking server (a real process, timed), the finalization
lock of a shared study, and what logged params and tags may contain (no password, no home path,
checkpoints read with ``weights_only=True``, servers on 127.0.0.1).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from fmnist import tracking
from fmnist.cli import cli
from fmnist.search import study as search

PROJECT_ROOT = Path(__file__).resolve().parent.parent
GRID = """\
pca_variance: 0.95
hidden: [[16]]
optimizers: [adam]
batch_sizes: [32]
learning_rates: {adam: 0.003}
"""


def invoke(args: list[str]):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


@pytest.mark.parametrize(
    ("args", "grid", "message"),
    [
        (["--epochs", "0"], GRID, "--epochs must be positive, got 0"),
        (["--epochs", "-3"], GRID, "--epochs must be positive, got -3"),
        (["--n-jobs", "-1"], GRID, "--n-jobs"),
        ([], GRID.replace("[32]", "[0]"), "key 'batch_sizes'"),
        ([], GRID.replace("[adam]", "[lbfgs]"), "lbfgs"),
        ([], GRID.replace("optimizers: [adam]", "optimizers: []"), "key 'optimizers'"),
        ([], GRID.replace("hidden: [[16]]", "hidden: []"), "key 'hidden'"),
        ([], GRID + "bogus: 1\n", "bogus"),
        ([], "- not\n- a mapping\n", "grid.yaml"),
    ],
)
def test_dnn_search_rejects_bad_options_before_opening_a_store(
    tracking_store, tmp_path, args, grid, message
):
    path = tmp_path / "grid.yaml"
    path.write_text(grid)
    result = invoke(["dnn-search", "--grid", str(path), *args])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "mlflow.db").exists()  # no store opened: no run half-made


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--recipe", "nope"], "Unknown definition 'nope'"),
        (["--batch-size", "0"], "--batch-size 0: batch_size must be positive"),
        (["--epochs", "0"], "--epochs 0: epochs must be positive"),
        (["--epochs", "-1"], "--epochs -1: epochs must be positive"),
    ],
)
def test_cnn_rejects_bad_options(tracking_store, synthetic_data_dir, tmp_path, args, message):
    result = invoke(["cnn", *args, "--data-dir", str(synthetic_data_dir)])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "mlflow.db").exists()


def test_missing_data_folder_is_one_message(tracking_store, tmp_path):
    result = invoke(["info", "--data-dir", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "Error:" in result.output
    assert "Traceback" not in result.output


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_tracking_server_fails_fast_with_a_message(synthetic_data_dir, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID)
    uri = f"http://user:hunter2@127.0.0.1:{closed_port()}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "FMNIST_OFFLINE": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    done = subprocess.run(
        [sys.executable, "-m", "fmnist", "dnn-search", "--grid", str(grid), "--epochs", "1"]
        + ["--n-jobs", "1", "--data-dir", str(synthetic_data_dir)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,  # MLflow's own retries would take minutes: fail fast, or fail here
    )
    assert done.returncode == 2
    assert "Cannot reach the MLflow tracking server at http://user:***@127.0.0.1" in done.stderr
    assert "Traceback" not in done.stderr and "hunter2" not in done.stderr


def test_finalize_without_a_study_is_a_clear_error(tracking_store, synthetic_data_dir, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID)
    result = invoke(
        ["dnn-search", "--grid", str(grid), "--epochs", "1", "--finalize"]
        + ["--data-dir", str(synthetic_data_dir), "--storage", str(tmp_path / "journal.log")]
    )
    assert result.exit_code == 2
    assert "No study" in result.output and "run the search first" in result.output


# --- the finalization lock of a shared study ---------------------------------------------------


def test_one_election_wins_a_dead_holder_is_taken_over_and_force_takes_over(tmp_path):
    ref = search.StudyRef(str(tmp_path / "journal.log"), "s")
    assert search.elect(ref, "s:finalize")
    assert not search.elect(ref, "s:finalize")  # held by this (living) process
    storage = search.make_storage(ref.storage)
    lock = storage.get_study_id_from_name("s:finalize")
    storage.set_study_user_attr(lock, search.WORKER, f"{socket.gethostname()}:999999999:1")
    assert search.elect(ref, "s:finalize")  # its holder died: taken over
    assert not search.elect(ref, "s:finalize")
    assert search.elect(ref, "s:finalize", force=True)  # --finalize


def test_rdb_urls_name_the_installed_driver():
    assert search.sqlalchemy_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert search.sqlalchemy_url("sqlite:///x.db") == "sqlite:///x.db"


def test_an_unreachable_optuna_database_is_one_message_without_the_password():
    url = f"postgresql://bob:hunter2@127.0.0.1:{closed_port()}/optuna"
    with pytest.raises(search.FmnistError, match="Cannot open the Optuna storage") as info:
        search.make_storage(url)
    assert "hunter2" not in str(info.value) and "bob:***@" in str(info.value)


# --- what is logged, what is loaded, where servers listen --------------------------------------


def test_logged_values_carry_no_password_and_no_home_path():
    home = str(Path.home())
    assert tracking.safe_text("postgresql://bob:s3cret@db/x") == "postgresql://bob:***@db/x"
    assert tracking.safe_text(f"{home}/data/fmnist") == "~/data/fmnist"
    assert tracking.format_param(f"{home}/data") == "~/data"
    assert tracking.format_param("https://u:p@host/path") == "https://u:***@host/path"
    assert tracking.format_param(Path(home) / "grid.yaml") == "grid.yaml"
    assert tracking.format_param("/srv/data") == "/srv/data"  # not a home path: kept
    assert search.redact_storage("postgresql://a:b@h/o") == "postgresql://a:***@h/o"
    assert search.redact_storage(f"{home}/optuna-journal.log") == "optuna-journal.log"


def test_errors_recorded_on_runs_are_redacted(tracking_store):
    import mlflow

    home = str(Path.home())
    with pytest.raises(RuntimeError):
        with tracking.start_run("t") as run:
            raise RuntimeError(f"cannot open postgresql://u:s3cret@db/x or {home}/data")
    error = mlflow.get_run(run.info.run_id).data.tags["error"]
    assert "s3cret" not in error and home + "/" not in error and "~/data" in error


def test_every_checkpoint_the_project_loads_is_read_with_weights_only():
    calls = []
    for path in (PROJECT_ROOT / "fmnist").rglob("*.py"):
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(", text):
            end = text.find("\n\n", match.start())
            calls.append((path.name, text[match.start() : end]))
    assert calls
    unsafe = [name for name, call in calls if "weights_only=True" not in call]
    assert not unsafe, unsafe


def test_servers_and_the_ui_bind_localhost_by_default():
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    for line in makefile.splitlines():
        if not line.lstrip().startswith("#") and re.search(
            r"mlflow (ui|server|models serve)", line
        ):
            assert "--host 127.0.0.1" in line, line
    assert "0.0.0.0" not in makefile
    for path in (PROJECT_ROOT / "fmnist").rglob("*.py"):
        assert '"0.0.0.0"' not in path.read_text(), path
