"""What a pipeline run again after a kill reuses: the pipeline run is tagged with the key of its
inputs (``fmnist.pipeline_key``: options and data digest) and, as each step returns, its result
(``fmnist.step.<name>``), each step's runs with the step's key (``fmnist.step_key``). The same
pipeline again reopens the unfinished run with that key (under ``mlflow run``, ``adopt`` moves
its step runs under the new run) and skips the finished steps."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import mlflow

PIPELINE_KEY = "fmnist.pipeline_key"
STEP_KEY = "fmnist.step_key"
STEP_RESULT = "fmnist.step."  # + the step's name: its result, as JSON
CHILD_TAGS: dict[str, dict[str, str]] = {}  # parent run id -> tags of the runs opened under it


@contextmanager
def child_tags(parent_run_id: str, tags: Mapping[str, str]) -> Iterator[None]:
    """Tag every run ``tracking.start_run`` opens under ``parent_run_id`` in the block."""
    CHILD_TAGS[parent_run_id] = dict(tags)
    try:
        yield
    finally:
        CHILD_TAGS.pop(parent_run_id, None)


def search_store(filter_string: str, **kwargs) -> list:
    """The runs of every experiment of the store that match ``filter_string`` (1000 at most)."""
    kwargs.update(max_results=1000, output_format="list", search_all_experiments=True)
    return mlflow.search_runs(filter_string=filter_string, **kwargs)


def runs_tagged(key: str, value: str) -> list:
    return search_store(f"tags.`{key}` = '{value}'", order_by=["attributes.start_time DESC"])


def unfinished_pipeline(key: str) -> Any | None:
    """The newest ended pipeline run with these inputs if killed or failed (not FINISHED)."""
    for run in runs_tagged(PIPELINE_KEY, key):
        # a finished pipeline is not resumed: the same command runs it again
        if run.info.status in ("KILLED", "FAILED", "FINISHED"):
            return None if run.info.status == "FINISHED" else run
    return None


def step_results(run) -> dict[str, dict]:
    """The results of the steps a pipeline run finished, by step name."""
    return {
        key.removeprefix(STEP_RESULT): json.loads(value)
        for key, value in run.data.tags.items()
        if key.startswith(STEP_RESULT)
    }


def record_step(run_id: str, name: str, result: Mapping[str, Any]) -> None:
    mlflow.MlflowClient().set_tag(run_id, STEP_RESULT + name, json.dumps(result, default=str))


def adopt(old_run_id: str, new_run_id: str) -> None:
    """Move ``old_run_id``'s step runs under ``new_run_id`` (``mlflow run``'s), linked by a tag."""
    client = mlflow.MlflowClient()
    client.set_tag(new_run_id, "fmnist.resumed_from", old_run_id)
    for run in runs_tagged("mlflow.parentRunId", old_run_id):
        client.set_tag(run.info.run_id, "mlflow.parentRunId", new_run_id)


def resumable_step_run(step_key: str) -> str | None:
    """The newest killed or failed run of a step with a complete checkpoint, to go on from."""
    for run in runs_tagged(STEP_KEY, step_key):
        if run.info.status in ("KILLED", "FAILED") and run.data.tags.get("checkpoint"):
            return run.info.run_id
    return None
