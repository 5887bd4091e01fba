#!/usr/bin/env bash
# Prepare what a GPU machine without MLflow and Optuna needs to run the tracked commands: the
# wheels it lacks in .whl/ and the real data, gzipped, in .gpu/fmnist-data.tgz (both ignored by
# git; a device call carries them with `carry: [".whl", ".gpu"]` and bench/gpu_session.sh
# installs and unpacks them there). The GPU image (Python 3.12, x86_64) already holds torch,
# numpy, pandas, pyarrow, scikit-learn, scipy, matplotlib, click, PyYAML, tqdm, requests,
# protobuf and the other names in IMAGE_HAS below, so only the rest travel: mlflow-skinny (all of
# MLflow's Python code: the `mlflow` wheel is the same code plus the 7.5 MB web UI, and
# mlflow-tracing a subset of it), optuna and their dependencies that the image lacks, one pinned
# version each (the versions pip resolved for mlflow==3.17.2 optuna==5.0.0, 2026-12). Left out
# on purpose, to stay well under the 64 MiB a device call carries: the MLflow server's stack
# (flask, graphene, gunicorn, huey, docker, skops) and cryptography (only google-auth's
# Databricks login needs it). That the commands need none of them is expected from what they
# import, not yet seen on the GPU image: its first call's session.log says. After downloading,
# every wheel's requirements are checked against the wheels and IMAGE_HAS, and the total size
# is printed.
#
#   bench/gpu_wheels.sh                       # wheels, and the data from $FMNIST_DATA_DIR
#   FMNIST_DATA_DIR=../shared/data bench/gpu_wheels.sh
#   FMNIST_WHEEL_PYTHON=3.11 FMNIST_WHEEL_DIR=/tmp/w bench/gpu_wheels.sh   # for a CPU rehearsal
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=${FMNIST_WHEEL_DIR:-.whl}
PYVERSION=${FMNIST_WHEEL_PYTHON:-3.12}
PACK=${FMNIST_GPU_DIR:-.gpu}
PY=python3
[[ -x .venv/bin/python ]] && PY=.venv/bin/python

PACKAGES=(
  mlflow-skinny==3.17.2 optuna==5.0.0
  alembic==1.20.1 Mako==1.4.3 SQLAlchemy==2.1.9 colorlog==6.12.0
  cachetools==7.3.3 databricks-sdk==0.162.0 google-auth==2.63.0 pyasn1==0.6.5
  pyasn1_modules==0.4.2 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0
  GitPython==3.2.1 gitdb==4.0.12 smmap==5.0.3 importlib_metadata==9.1.0
  opentelemetry-api==1.45.2 opentelemetry-proto==1.45.2 opentelemetry-sdk==1.45.2
  opentelemetry-semantic-conventions==0.66b2
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  python-dotenv==1.2.4 sqlparse==0.6.1
  # in the image too, but pydantic needs typing_extensions>=4.16 and its version there is unknown
  typing_extensions==4.16.0
)
# The image's packages that the wheels above require (KINDS.md of the device machine lists them).
IMAGE_HAS="anyio annotated-doc certifi click cloudpickle h11 markupsafe numpy packaging protobuf
  pyyaml requests tqdm typing-extensions urllib3 zipp"
# Required by a wheel above but not needed by the commands (see the paragraph at the top).
LEFT_OUT="cryptography"

rm -rf "$WHEELS"
mkdir -p "$WHEELS"
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
requirements=()
for package in "${PACKAGES[@]}"; do requirements+=("$package"); done
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version "$PYVERSION" --implementation cp "${platforms[@]}" -d "$WHEELS" \
  "${requirements[@]}"

# Each wheel's requirements (markers evaluated for Linux and $PYVERSION, extras skipped) must be
# a wheel here, a package of the image or a deliberate omission; one version of each wheel.
"$PY" - "$WHEELS" "$PYVERSION" "$IMAGE_HAS" "$LEFT_OUT" <<'EOF'
import re, sys, zipfile
from pathlib import Path
from packaging.requirements import Requirement

folder, version, image, left_out = sys.argv[1:]
def norm(name): return re.sub(r"[-_.]+", "-", name).lower()
wheels = sorted(Path(folder).glob("*.whl"))
names = [norm(w.name.split("-")[0]) for w in wheels]
assert len(names) == len(set(names)), f"two versions of one package in {folder}: {names}"
known = set(names) | {norm(n) for n in image.split()} | {norm(n) for n in left_out.split()}
env = {"python_version": version, "python_full_version": version + ".0", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython"}
missing = []
for wheel in wheels:
    with zipfile.ZipFile(wheel) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(meta).decode().splitlines()
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
            continue
        if norm(req.name) not in known:
            missing.append(f"{wheel.name} needs {req}")
if missing:
    sys.exit("requirements neither carried nor in the image:\n  " + "\n  ".join(missing))
print(f"{len(wheels)} wheels, requirements closed over the image's packages")
EOF

# The real data, gzipped (the GPU machine has no network and no copy of it).
DATA=${FMNIST_DATA_DIR:-}
if [[ -n "$DATA" && -f "$DATA/FashionMNIST/raw/train-images-idx3-ubyte" ]]; then
  mkdir -p "$PACK"
  tar czf "$PACK/fmnist-data.tgz" -C "$DATA" FashionMNIST/raw
else
  echo "FMNIST_DATA_DIR unset or without FashionMNIST/raw: no $PACK/fmnist-data.tgz written"
fi

ls -l "$WHEELS" | awk 'NR > 1 {printf "%10d  %s\n", $5, $9}'
du -cb "$WHEELS"/*.whl | tail -1 | awk '{printf "wheels: %.1f MiB\n", $1 / 1048576}'
[[ -f "$PACK/fmnist-data.tgz" ]] &&
  du -b "$PACK/fmnist-data.tgz" | awk '{printf "data: %.1f MiB\n", $1 / 1048576}'
du -cb "$WHEELS" "$PACK" 2>/dev/null | tail -1 |
  awk '{printf "carried in all: %.1f MiB (a device call carries at most 64 MiB)\n", $1 / 1048576}'
