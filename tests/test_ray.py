"""Searches whose workers are Ray tasks (``--ray``), on a Ray cluster the test starts itself.

Each cluster lives in a network and PID namespace of its own (``unshare``): only the loopback
exists there, so its nodes (``ray start``, one CPU and one temp folder each) meet on 127.0.0.1,
and every process they start dies with the namespace. The tracking store is a SQLite file and the
study a journal in the test's folder, which the namespace shares. On two nodes, a dense grid's
points and a 2-trial CNN search train as tasks on both, each trial a child run with the params,
metrics and artifacts a search on one machine logs; a node killed in the middle of a trial (its
raylet and every process of it) has its task retried by Ray on the other node, which fails the
trial, ends its run FAILED and trains its point once; a search whose whole cluster went away
resumes where its study stands when its command runs again. They skip, saying why, without
``ray`` or the right to make namespaces. The default tests check what a task is given
(``tests/test_layers.py`` that only a search run with ``--ray`` imports Ray).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from click.testing import CliRunner
from optuna.trial import TrialState

from fmnist.cli import cli
from fmnist.search import cluster
from fmnist.search import study as studies
from fmnist.search.driver import start_workers
from fmnist.search.spec import SamplerSpec, SearchData, SearchSpec
from fmnist.search.workers import Work
from tests.helpers import PROJECT_ROOT
from tests.test_cnn_search import write_space
from tests.test_distributed_search import (
    GRID,
    POINTS,
    STUDY,
    check_grid_done_once,
    point_name,
    worker_command,
)

BIN = Path(sys.executable).parent
NODE = "--node-ip-address 127.0.0.1 --num-cpus 1 --object-store-memory 78643200"
# Ray marks a silent node dead in about 3 s (its default: 30 s), then retries its tasks.
FAST_DEATH = "RAY_health_check_period_ms=500 RAY_health_check_timeout_ms=500"
FAST_DEATH += " RAY_health_check_failure_threshold=2"
# Test only: every epoch of the engine sleeps $TEST_EPOCH_SLEEP seconds, in any process that has
# this folder on its path (a Ray node's workers take its environment), so that a kill lands in
# the middle of a trial.
SLOW_EPOCHS = """\
import importlib.abc, importlib.util, os, sys, time


class SlowEpochs(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "fmnist.train.engine":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            fit = module.fit

            def slow_fit(*args, on_epoch_end, **kwargs):
                def hook(epoch, metrics):
                    time.sleep(float(os.environ["TEST_EPOCH_SLEEP"]))
                    on_epoch_end(epoch, metrics)

                return fit(*args, on_epoch_end=hook, **kwargs)

            module.fit = slow_fit

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("TEST_EPOCH_SLEEP"):
    sys.meta_path.insert(0, SlowEpochs())
"""


def why_no_cluster() -> str:
    if importlib.util.find_spec("ray") is None:
        return "ray is not installed (pip install -e '.[ray]')"
    if not shutil.which("unshare") or not shutil.which("ip"):
        return "no unshare or ip command (util-linux, iproute2) to make the cluster's namespace"
    probe = ["unshare", "-n", "-p", "-f", "--mount-proc", "ip", "link", "set", "lo", "up"]
    if subprocess.run(probe, capture_output=True, check=False).returncode != 0:
        return "no permission to make network and PID namespaces (unshare -n -p)"
    return ""


WHY_NOT = why_no_cluster()
needs_cluster = pytest.mark.skipif(bool(WHY_NOT), reason=WHY_NOT or "a cluster can start")


@pytest.fixture()
def ray_dir():
    """Ray's folders: a short path (its socket paths must stay under 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture()
def folder(tmp_path) -> Path:
    """The test's store, journal, grid and logs; its Python path makes epochs slow on demand."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SLOW_EPOCHS)
    (tmp_path / "grid4.yaml").write_text(GRID)
    return tmp_path


def fmnist(*args: str) -> str:
    return shlex.join([sys.executable, "-m", "fmnist", *args])


def script(ray_dir: Path, commands: list[str], nodes: dict[str, str]) -> str:
    """Bash that starts a node per ``nodes`` entry (name: its extra environment; the first is
    the head) and runs ``commands`` (set -e: the first failure is the exit code)."""
    lines = ["set -e", "ip link set lo up", f"export {FAST_DEATH}"]
    head = "--head --port 6379 --include-dashboard false"
    for name, env in nodes.items():
        where = head if name == next(iter(nodes)) else "--address 127.0.0.1:6379"
        start = f"{BIN / 'ray'} start {where} {NODE} --temp-dir {ray_dir / name}"
        lines.append(f"{env} {start} --disable-usage-stats >{ray_dir}/{name}.log 2>&1")
    # bash, not the last command, stays the namespace's first process: it reaps the processes
    # of a killed node, whose pids must be free before the study may release their trials
    return "\n".join([*lines, *commands, "echo commands-done"])


def start(text: str, folder: Path, log: str, ray_dir: Path) -> subprocess.Popen:
    """The script in a new namespace (killing this process kills it all)."""
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
        "FMNIST_OFFLINE": "1",
        "PYTHONPATH": f"{folder / 'site'}:{PROJECT_ROOT}",
        "RAY_ADDRESS": "127.0.0.1:6379",
        "RAY_TMPDIR": str(ray_dir),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
    }
    for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "TEST_EPOCH_SLEEP"):
        env.pop(key, None)
    namespace = ["unshare", "-n", "-p", "-f", "--kill-child", "--mount-proc", "bash", "-c"]
    with open(folder / log, "w") as output:
        return subprocess.Popen(
            [*namespace, text], cwd=folder, env=env, stdout=output, stderr=subprocess.STDOUT
        )


def finish(process: subprocess.Popen, folder: Path, log: str, timeout: float = 400) -> str:
    try:
        process.wait(timeout=timeout)
    finally:
        process.kill()
    text = (folder / log).read_text()
    assert process.returncode == 0, text[-5000:]
    assert "commands-done" in text
    return text


def dense_args(data_dir: Path, folder: Path, epochs: int, ray: str) -> list[str]:
    args = worker_command(data_dir, folder / "grid4.yaml", str(folder / "journal.log"), epochs)
    args[args.index("--n-jobs") + 1] = "2"
    return [*args, "--ray", ray]


def trials_of(folder: Path) -> list:
    try:
        storage = studies.make_storage(str(folder / "journal.log"))
        return optuna.load_study(study_name=STUDY, storage=storage).trials
    except KeyError:
        return []


def node_logs(ray_dir: Path, node: str) -> str:
    logs = (ray_dir / node).glob("session_*/logs/worker-*.out")
    return "".join(path.read_text() for path in logs)


def run_files(client, run_id: str, path: str = "") -> list[str]:
    found = []
    for item in client.list_artifacts(run_id, path):
        found += run_files(client, run_id, item.path) if item.is_dir else [item.path]
    return sorted(found)


def child_runs(tracking_uri: str, experiment: str = "tests") -> dict[str, object]:
    client = mlflow.MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return {r.info.run_name: r for r in runs if "mlflow.parentRunId" in r.data.tags}


# --- by default: what a task gets (tests/test_layers.py: only --ray imports Ray) ----------------


def test_a_task_gets_absolute_stores_and_the_settings_but_no_secret(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cluster.absolute_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path}/mlflow.db"
    assert cluster.absolute_uri("sqlite:////srv/mlflow.db") == "sqlite:////srv/mlflow.db"
    assert cluster.absolute_uri("journal.log") == str(tmp_path / "journal.log")
    for uri in ("http://mlflow:5000", "postgresql://u@db/optuna"):
        assert cluster.absolute_uri(uri) == uri
    environ = {
        "FMNIST_HEARTBEAT_SECONDS": "5",
        "FMNIST_WORKER_HOST": "head-pod",  # each node names itself
        "MLFLOW_TRACKING_USERNAME": "worker",
        "MLFLOW_TRACKING_PASSWORD": "s3cret",  # each node has its own, from a secret
        "MLFLOW_TRACKING_TOKEN": "t0ken",
        "MLFLOW_RUN_ID": "abc",  # mlflow run's own run: not a task's
        "MLFLOW_EXPERIMENT_ID": "1",
        "HOME": "/root",
    }
    assert cluster.task_env(environ, "sqlite:///mlflow.db") == {
        "FMNIST_HEARTBEAT_SECONDS": "5",
        "MLFLOW_TRACKING_USERNAME": "worker",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
    }


class FakeRay:
    """What ``RayWorkers`` asks of Ray, recorded: its ``init``, each task's options and args."""

    class RayError(Exception):
        pass

    class RayTaskError(RayError):
        pass

    exceptions = types.SimpleNamespace(RayError=RayError, RayTaskError=RayTaskError)

    def __init__(self, resources: dict[str, float]) -> None:
        self.resources, self.tasks, self.options, self.init_kwargs = resources, [], {}, {}

    def init(self, **kwargs) -> None:
        self.init_kwargs = kwargs

    def cluster_resources(self) -> dict[str, float]:
        return self.resources

    def remote(self, function):
        fake = self

        class Task:
            def options(self, **options):
                fake.options = options
                return self

            def remote(self, *args):
                fake.tasks.append((function.__name__, *args))
                return len(fake.tasks)

        return Task()

    def put(self, value):
        return value

    def get(self, ref: int) -> str:
        return f"node:{ref}:1"

    def is_initialized(self) -> bool:
        return True

    def shutdown(self) -> None:
        pass


@pytest.mark.parametrize(("device", "resources"), [("cpu", {"CPU": 3.0}), ("cuda", {"GPU": 2.0})])
def test_ray_places_a_task_per_cpu_or_gpu_with_retries_and_the_env(
    tmp_path, monkeypatch, device, resources
):
    fake = FakeRay({"CPU": 16.0, **resources})
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret")
    monkeypatch.chdir(tmp_path)
    sampler = SamplerSpec("grid", choices={"x": (1, 2, 3, 4)})
    grid = tuple({"x": x} for x in (1, 2, 3, 4))
    spec = SearchSpec("dnn", "dnn_search", None, sampler, 1, grid=grid, device=device)
    ref = studies.StudyRef(str(tmp_path / "journal.log"), "s")
    study, _ = studies.open_study(ref, sampler, False, create=True)
    studies.queue_points(study, grid)
    job = Work(ref, spec, SearchData(None, None), make_objective=None)
    workers = start_workers(job, "auto", n_jobs=0, pending=4)
    count = int(resources["GPU" if device == "cuda" else "CPU"])  # 0: one per CPU (GPU)
    assert isinstance(workers, cluster.RayWorkers) and workers.n == count
    assert fake.init_kwargs["address"] == "auto"
    env = fake.init_kwargs["runtime_env"]["env_vars"]
    assert env["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path}/mlflow.db"
    assert "MLFLOW_TRACKING_PASSWORD" not in env
    workers.join("parent-run")
    gpus = 1 if device == "cuda" else 0
    assert fake.options == {"num_cpus": 1, "num_gpus": gpus, "max_retries": cluster.RETRIES}
    # the fake trained nothing: points are left, so one more task runs (as after a dead task)
    assert [task[2:] for task in fake.tasks] == [(w, "parent-run") for w in range(count + 1)]
    assert {task[0] for task in fake.tasks} == {"run_task"}
    assert workers.ids == [f"node:{n}:1" for n in range(1, count + 2)]


def test_a_cuda_search_on_ray_that_retrains_here_needs_a_gpu_here(tmp_path):
    if importlib.util.find_spec("torch") and __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU: the retraining may run here")
    result = CliRunner().invoke(
        cli, ["cnn-search", "--ray", "auto", "--device", "cuda", "--data-dir", str(tmp_path)]
    )
    assert result.exit_code == 2, result.output
    assert "--no-retrain-best" in result.output and "GPU node" in result.output


DOCS = PROJECT_ROOT / "docs"
SECRET_ENV = {"MLFLOW_TRACKING_PASSWORD", "PGPASSWORD"}


def search_options(command: str) -> dict:
    """The options ``fmnist dnn-search ...`` (a line of the docs) hands the CLI."""
    words = shlex.split(command)
    assert words[:2] == ["fmnist", "dnn-search"], command
    return cli.get_command(None, "dnn-search").make_context("dnn-search", words[2:]).params


def test_the_kuberay_job_runs_the_search_on_the_project_image_with_its_env():
    job = yaml.safe_load((DOCS / "ray" / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    options = search_options(spec["entrypoint"])
    assert options["ray"] == "auto" and options["storage"].startswith("postgresql://")
    assert ":" not in options["storage"].split("//")[1].split("@")[0]  # no password in the URL
    assert spec["backoffLimit"] >= 1  # a cluster gone: the command again, on a new one
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"].startswith("2.")
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    for group in (cluster["headGroupSpec"], *groups.values()):
        (container,) = group["template"]["spec"]["containers"]
        assert container["image"].startswith("registry.example.com/fmnist:")
        resources = container["resources"]
        assert resources["requests"] == resources["limits"] and "cpu" in resources["limits"]
        env = {e["name"]: e for e in container["env"]}
        assert {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", *SECRET_ENV} <= set(env)
        for name in SECRET_ENV:  # from a Secret, never written here
            assert "value" not in env[name] and env[name]["valueFrom"]["secretKeyRef"]["name"]
    assert (
        groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        == 1
    )
    assert "nvidia.com/gpu" not in groups["cpu"]["template"]["spec"]["containers"][0]["resources"]


def test_the_cluster_launcher_file_and_the_page_name_the_command_and_the_services():
    config = yaml.safe_load((DOCS / "ray" / "cluster.yaml").read_text())
    job = yaml.safe_load((DOCS / "ray" / "rayjob.yaml").read_text())
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert config["docker"]["image"] == head["image"]
    types = config["available_node_types"]
    assert config["head_node_type"] in types and types["head"]["resources"]["CPU"] == 0
    assert types["gpu"]["resources"]["GPU"] == 1 and types["cpu"]["resources"]["CPU"] > 0
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert any("--address=$RAY_HEAD_IP:6379" in c for c in config["worker_start_ray_commands"])
    page = (DOCS / "distributed.md").read_text()
    command = page.split("```bash\n", 1)[1].split("\n", 1)[0]  # the one command, first
    assert search_options(command)["ray"] == "auto"
    for needed in (
        "ray/rayjob.yaml",
        "ray/cluster.yaml",
        'ray exec docs/ray/cluster.yaml "fmnist dnn-search --ray auto',
        "mlflow server --app-name basic-auth",
        "--backend-store-uri postgresql",
        "--artifacts-destination s3://",
        "MLFLOW_TRACKING_USERNAME",
        "?workflowType=machine_learning",
        "8265",
        head["image"],
    ):
        assert needed in page, needed


# --- on a two-node cluster in a namespace -------------------------------------------------------


# 65-150 s on 2 shared cores: two `ray start`, a grid and a CNN search on Ray, the grid alone
@pytest.mark.slow
@pytest.mark.fault
@needs_cluster
def test_a_grid_and_a_cnn_search_train_on_both_nodes_as_on_one_machine(
    synthetic_data_dir, folder, ray_dir
):
    space = write_space(folder)
    cnn = ["cnn-search", "--search-space", str(space), "--n-trials", "2", "--epochs", "1"]
    cnn += ["--no-retrain-best", "--seed", "0", "--n-jobs", "2", "--ray", "auto"]
    cnn += ["--data-dir", str(synthetic_data_dir), "--experiment-name", "cnn"]
    commands = [fmnist(*dense_args(synthetic_data_dir, folder, 2, "auto")), fmnist(*cnn)]
    nodes = {"head": "TEST_EPOCH_SLEEP=0.5", "n2": "TEST_EPOCH_SLEEP=0.5"}
    log = finish(
        start(script(ray_dir, commands, nodes), folder, "ray.log", ray_dir), folder, "ray.log"
    )
    tracking_uri = f"sqlite:///{folder / 'mlflow.db'}"
    check_grid_done_once([(0, log, "")], tracking_uri, str(folder / "journal.log"))
    assert "trained_now=4" in log
    for node in ("head", "n2"):  # Ray placed a task on each node: both trained points
        assert "trial " in node_logs(ray_dir, node), node

    # the same grid on one machine, without Ray: the same child runs
    local = folder / "local"
    local.mkdir()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{local / 'mlflow.db'}"}
    env.pop("MLFLOW_RUN_ID", None)
    args = dense_args(synthetic_data_dir, folder, 2, "")
    args[args.index("--storage") + 1] = str(local / "journal.log")
    done = subprocess.run(
        [sys.executable, "-m", "fmnist", *args],
        env=env,
        cwd=local,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    on_ray, alone = child_runs(tracking_uri), child_runs(env["MLFLOW_TRACKING_URI"])
    assert sorted(on_ray) == sorted(alone) == sorted(POINTS)
    client, here = (
        mlflow.MlflowClient(tracking_uri),
        mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]),
    )
    for name, run in on_ray.items():
        other = alone[name]
        assert run.data.params == other.data.params, name
        assert set(run.data.metrics) == set(other.data.metrics), name
        assert run.data.metrics["best_val_accuracy"] == other.data.metrics["best_val_accuracy"]
        assert set(run.data.tags) == set(other.data.tags), name
        assert run_files(client, run.info.run_id) == run_files(here, other.info.run_id), name

    # the CNN search: two trials, as tasks, children of its parent run
    cnn_runs = child_runs(tracking_uri, "cnn")
    assert len(cnn_runs) == 2 and {r.info.status for r in cnn_runs.values()} == {"FINISHED"}
    for run in cnn_runs.values():
        assert run.data.tags["optuna_state"] == "COMPLETE"
        assert "checkpoint/model_spec.json" in run_files(client, run.info.run_id)
    parents = {r.data.tags["mlflow.parentRunId"] for r in cnn_runs.values()}
    (parent,) = parents
    assert "search/table.json" in run_files(client, parent, "search")


def processes() -> dict[int, tuple[int, str]]:
    """This machine's processes: pid -> (parent pid, command line)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        found[int(entry.name)] = (parent, command)
    return found


def namespace_pid(pid: int) -> int:
    """A process's pid in its own PID namespace (the one its trial records)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    return pid


def node_processes(ray_dir: Path, node: str) -> tuple[set[int], set[int]]:
    """A node's processes (its raylet, agents, log monitor and the raylet's children: its Ray
    workers), and the namespace pids of those workers."""
    table = processes()
    roots = {pid for pid, (_, command) in table.items() if f"{ray_dir / node}/" in command}
    raylets = {pid for pid in roots if "raylet" in table[pid][1].split()[0]}
    workers = {pid for pid, (parent, _) in table.items() if parent in raylets}
    return roots | workers, {namespace_pid(pid) for pid in workers}


def wait_for(condition, process: subprocess.Popen, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert process.poll() is None, f"the cluster's script ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return found


# ~60 s: two `ray start`, the grid with slow epochs, node 2 killed mid-trial
@pytest.mark.slow
@pytest.mark.fault
@needs_cluster
def test_a_node_killed_mid_trial_has_its_task_retried_and_its_point_trained_once(
    synthetic_data_dir, folder, ray_dir
):
    """The head trains three points fast and its task ends; node 2, slow, is killed in the
    middle of the fourth (its raylet and every process of it, as when a machine dies). Ray marks
    it dead and retries its task on the head, which releases the dead worker's trial (FAIL, its
    run FAILED), trains the point and the search finishes: each point complete once."""
    commands = [fmnist(*dense_args(synthetic_data_dir, folder, 3, "auto"))]
    nodes = {"head": "TEST_EPOCH_SLEEP=0.3", "n2": "TEST_EPOCH_SLEEP=6"}
    process = start(script(ray_dir, commands, nodes), folder, "ray.log", ray_dir)
    try:

        def node2_mid_trial_alone():
            trials = trials_of(folder)
            if sum(t.state == TrialState.COMPLETE for t in trials) != 3:
                return None
            victims, workers = node_processes(ray_dir, "n2")
            on_node2 = [
                t
                for t in trials
                if t.state == TrialState.RUNNING
                and t.intermediate_values
                and int(t.user_attrs[studies.WORKER].split(":")[1]) in workers
            ]
            return (victims, on_node2[0]) if on_node2 else None

        victims, dead = wait_for(node2_mid_trial_alone, process, 300, "node 2 alone in a trial")
        time.sleep(1)  # the head's task finds nothing left and returns
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        killed_at = time.time()
    finally:
        log = finish(process, folder, "ray.log")

    assert "will be retried" in log  # Ray's own word: the task of the dead node runs again
    trials = trials_of(folder)
    (failed,) = [t for t in trials if t.state == TrialState.FAIL]
    assert failed.number == dead.number
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(point_name(t) for t in complete) == sorted(POINTS)
    (again,) = [t for t in complete if point_name(t) == point_name(failed)]
    assert again.datetime_start.timestamp() > killed_at
    assert len(trials) == len(POINTS) + 1  # nothing trained twice
    tracking_uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert "RUNNING" not in {r.info.status for r in runs}
    dead_run = client.get_run(failed.user_attrs[studies.RUN_ID])
    assert dead_run.info.status == "FAILED" and "released" in dead_run.data.tags["error"]
    assert len(client.search_model_versions("name='fmnist-dnn'")) == 1
    assert "model: models:/fmnist-dnn/1" in log


# 50-120 s: a search on a one-machine Ray (--ray local) killed with its namespace, run again
@pytest.mark.slow
@pytest.mark.fault
@needs_cluster
def test_a_search_whose_cluster_went_away_resumes_when_run_again(
    synthetic_data_dir, folder, ray_dir
):
    command = fmnist(*dense_args(synthetic_data_dir, folder, 3, "local"))
    slow = start(script(ray_dir, [f"TEST_EPOCH_SLEEP=2 {command}"], {}), folder, "1.log", ray_dir)
    try:

        def done_and_mid_trial_with_no_point_left_to_take():
            # With a point still queued, a worker that finishes could pop it just before the
            # kill and die before naming its trial: a run at once would then rightly leave that
            # point alone for UNNAMED_SECONDS (tests/test_dnn_search.py covers that case).
            trials = trials_of(folder)
            states = [t.state for t in trials]
            running = [t for t in trials if t.state == TrialState.RUNNING]
            return (
                TrialState.COMPLETE in states
                and TrialState.WAITING not in states
                and running
                and all(t.intermediate_values and studies.WORKER in t.user_attrs for t in running)
            )

        wait_for(done_and_mid_trial_with_no_point_left_to_take, slow, 300, "trials mid-way")
    finally:
        slow.kill()  # unshare's child, the namespace's first process, dies: so does all of it
        slow.wait()
    before = trials_of(folder)
    done = {point_name(t) for t in before if t.state == TrialState.COMPLETE}
    cut = [t for t in before if t.state == TrialState.RUNNING]
    assert cut and len(done) < len(POINTS)

    log = finish(start(script(ray_dir, [command], {}), folder, "2.log", ray_dir), folder, "2.log")
    assert f"trained_now={len(POINTS) - len(done)}" in log
    trials = trials_of(folder)
    complete = [point_name(t) for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(complete) == sorted(POINTS)  # each once: the done ones were not trained again
    assert {t.number for t in trials if t.state == TrialState.FAIL} == {t.number for t in cut}
    tracking_uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert "RUNNING" not in {r.info.status for r in runs}
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the same parent, resumed
    for trial in cut:  # a trial killed before its run began has none
        if trial.intermediate_values or studies.RUN_ID in trial.user_attrs:
            assert client.get_run(trial.user_attrs[studies.RUN_ID]).info.status == "FAILED"
    table = client.download_artifacts(parents[0].info.run_id, "search/table.json")
    assert len(json.loads(Path(table).read_text())["data"]) == len(POINTS)
