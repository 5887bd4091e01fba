"""Hostile files and unexpected errors (issue 17, docs/errors.md).

Every reader of a user's file refuses a hostile one with the project's own error before it
allocates memory for what the file claims: photos (``fmnist.inputs.load_image``), ``.npy`` arrays
and IDX files (``load_inputs``, ``fmnist.data.read_idx``), YAML definitions and search spaces
(``fmnist.definitions``), resume checkpoints (``fmnist.tracking.checkpoints``). Each case is
tested by name, then ``hypothesis`` fuzzes every reader with random bytes and with random
valid-looking headers: nothing may escape but ``DataError`` / ``ConfigError``. The fuzz tests are
bounded (``max_examples``, a deadline, no example database) and run in seconds.

The CLI turns any unexpected exception into one paragraph (type, message, the file holding the
trace), exit code 1; ``--debug`` or ``FMNIST_DEBUG=1`` prints the trace; under ``mlflow run``
the run ends FAILED.
"""

from __future__ import annotations

import io
import re
import struct
import tracemalloc
import zlib
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fmnist.cli import cli
from fmnist.data import read_idx
from fmnist.definitions import MAX_DEFINITION_BYTES, MAX_DEPTH, read_yaml
from fmnist.errors import ConfigError, DataError
from fmnist.inputs import MAX_IMAGE_PIXELS, load_inputs
from fmnist.tracking.checkpoints import load_checkpoint_file
from fmnist.train.recipes import load_grid, load_recipe, load_space
from tests.helpers import write_idx

FUZZ = settings(
    max_examples=60,
    deadline=2000,  # ms per example: a reader that starts decoding a huge claim fails this
    database=None,  # no .hypothesis folder in the repository
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def png_header(width: int, height: int, color_type: int = 0, depth: int = 8) -> bytes:
    """A PNG signature and a valid IHDR chunk claiming ``width`` x ``height``."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + crc(chunk)


def crc(data: bytes) -> bytes:
    return struct.pack(">I", zlib.crc32(data) & 0xFFFFFFFF)


def png_idat(raw: bytes) -> bytes:
    data = zlib.compress(raw)
    return struct.pack(">I", len(data)) + b"IDAT" + data + crc(b"IDAT" + data)


def png_end() -> bytes:
    return struct.pack(">I", 0) + b"IEND" + crc(b"IEND")


def image_bytes(fmt: str, size: tuple[int, int] = (32, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, size[::-1], np.uint8)).save(
        buffer, fmt
    )
    return buffer.getvalue()


def npy_bytes(header: dict, body: bytes) -> bytes:
    text = repr(header).encode()
    pad = 64 - (10 + len(text) + 1) % 64
    text += b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + body


def idx_bytes(dims: tuple[int, ...], body: bytes) -> bytes:
    return bytes([0, 0, 8, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + body


def write(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def refused_quickly(call, error: type[Exception], match: str) -> None:
    """``call`` refuses with ``error`` having allocated no more than 50 MB (traced by Python's
    tracemalloc): what the file claims was never decoded nor allocated."""
    tracemalloc.start()
    try:
        with pytest.raises(error, match=match):
            call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50 * 1024**2, f"{peak / 1024**2:.0f} MB allocated"


# --- photos ----------------------------------------------------------------------------------


def test_a_png_claiming_100000x100000_is_refused_before_decoding(tmp_path):
    raw = b"\x00" * 1000  # a compressed body that would inflate row by row for 10 GB
    path = write(tmp_path, "bomb.png", png_header(100_000, 100_000) + png_idat(raw) + png_end())
    refused_quickly(lambda: load_inputs(path), DataError, "too large an image.*at most")


def test_an_image_just_over_the_limit_is_refused_and_a_large_one_is_read(tmp_path):
    side = int(MAX_IMAGE_PIXELS**0.5) + 1
    path = write(tmp_path, "big.png", png_header(side, side) + png_end())
    refused_quickly(lambda: load_inputs(path), DataError, f"{side}x{side}")
    photo = write(tmp_path, "photo.jpg", image_bytes("JPEG", (640, 480)))
    names, batch = load_inputs(photo)
    assert names == [str(photo)] and batch.shape == (1, 28, 28)


@pytest.mark.parametrize("fmt,suffix", [("PNG", ".png"), ("JPEG", ".jpg"), ("GIF", ".gif")])
def test_truncated_and_empty_images_are_refused(tmp_path, fmt, suffix):
    content = image_bytes(fmt)
    for cut in (8, len(content) // 2):
        path = write(tmp_path, f"cut{cut}{suffix}", content[:cut])
        with pytest.raises(DataError, match="not a readable image"):
            load_inputs(path)
    with pytest.raises(DataError, match="empty"):
        load_inputs(write(tmp_path, f"empty{suffix}", b""))


def test_an_image_format_outside_the_list_is_not_decoded(tmp_path):
    buffer = io.BytesIO()
    Image.new("L", (28, 28)).save(buffer, "ICO")
    with pytest.raises(DataError, match="not a readable image"):
        load_inputs(write(tmp_path, "icon.png", buffer.getvalue()))


# --- .npy and IDX ----------------------------------------------------------------------------


def test_npy_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    refused_quickly(lambda: load_inputs(path), DataError, "pickle is off")


def test_npy_header_that_lies_about_its_size_is_refused_unread(tmp_path):
    huge = npy_bytes({"descr": "|u1", "fortran_order": False, "shape": (10**8, 28, 28)}, b"")
    path = write(tmp_path, "huge.npy", huge + b"\x00" * 784)
    refused_quickly(lambda: load_inputs(path), DataError, "at most")
    lying = npy_bytes({"descr": "|u1", "fortran_order": False, "shape": (5, 28, 28)}, b"")
    path = write(tmp_path, "short.npy", lying + b"\x00" * 784)
    refused_quickly(lambda: load_inputs(path), DataError, "truncated or corrupt")
    good = tmp_path / "good.npy"
    np.save(good, np.zeros((3, 28, 28), np.uint8))
    assert load_inputs(good)[1].shape == (3, 28, 28)


def test_npy_of_a_wrong_dtype_or_shape_is_refused(tmp_path):
    for name, array, match in (
        ("ints.npy", np.zeros((2, 28, 28), np.int64), "uint8 or float"),
        ("complex.npy", np.zeros((28, 28), np.complex64), "uint8 or float"),
        ("shape.npy", np.zeros((2, 28, 27), np.uint8), "expected shape"),
    ):
        np.save(tmp_path / name, array)
        with pytest.raises(DataError, match=match):
            load_inputs(tmp_path / name)


def test_idx_header_that_lies_about_its_size_is_refused_before_the_body_is_read(
    tmp_path, monkeypatch
):
    claims_a_billion = idx_bytes((1_000_000_000, 28, 28), b"\x00" * 784)
    path = write(tmp_path, "lies-idx3-ubyte", claims_a_billion)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("read the whole file"))
    refused_quickly(lambda: read_idx(path), DataError, "needs 784000000016")
    # three uint32 dimensions multiply past int64: still an honest size, still refused
    overflow = write(tmp_path, "overflow-idx3-ubyte", idx_bytes((2**32 - 1,) * 3, b""))
    refused_quickly(lambda: read_idx(overflow), DataError, "truncated or corrupt")
    for cut in (0, 3, 9):
        short = write(tmp_path, f"cut{cut}-idx3-ubyte", claims_a_billion[:cut])
        with pytest.raises(DataError):
            load_inputs(short)


def test_a_valid_idx_file_still_reads(tmp_path):
    path = tmp_path / "ok-idx3-ubyte"
    write_idx(path, np.full((2, 28, 28), 255, np.uint8))
    names, batch = load_inputs(path)
    assert len(names) == 2 and float(batch.max()) == 1.0


# --- YAML definitions ------------------------------------------------------------------------


def test_a_yaml_alias_bomb_is_refused(tmp_path):
    lines = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}] " for i in range(8)]
    path = write(tmp_path, "bomb.yaml", "\n".join(lines).encode())
    refused_quickly(lambda: read_yaml(path), ConfigError, "aliases")


def test_deep_huge_and_binary_yaml_is_refused(tmp_path):
    deep = write(tmp_path, "deep.yaml", b"a: " + b"[" * 50_000 + b"]" * 50_000)
    refused_quickly(lambda: read_yaml(deep), ConfigError, f"deeper than {MAX_DEPTH}")
    huge = write(tmp_path, "huge.yaml", b"a: 1\n" + b"#" * MAX_DEFINITION_BYTES)
    refused_quickly(lambda: read_yaml(huge), ConfigError, "at most")
    binary = write(tmp_path, "binary.yaml", b"a: \xff\xfe\x00")
    refused_quickly(lambda: read_yaml(binary), ConfigError, "not UTF-8")


GRID = {
    "hidden": [[16]],
    "optimizers": ["adam"],
    "batch_sizes": [32],
    "learning_rates": {"adam": 0.003},
}


@pytest.mark.parametrize(
    "change,match",
    [
        ({"hidden": [["a"]]}, "key 'hidden': expected an integer"),
        ({"optimizers": [["adam"]]}, "key 'optimizers': expected a string"),
        ({"hidden": 16}, "key 'hidden': expected a list"),
        ({"learning_rates": {"adam": "x"}}, "key 'learning_rates': expected a number"),
        ({"learning_rates": ["adam"]}, "key 'learning_rates': expected a mapping"),
        ({"pca_variance": 10**400}, "too large"),
    ],
)
def test_wrong_nested_types_in_a_grid_name_the_key(tmp_path, change, match):
    path = write(tmp_path, "grid.yaml", yaml.safe_dump({**GRID, **change}).encode())
    with pytest.raises(ConfigError, match=match):
        load_grid(str(path))
    assert load_grid(str(write(tmp_path, "good.yaml", yaml.safe_dump(GRID).encode())))


# --- checkpoints -----------------------------------------------------------------------------


class Payload:
    """A class torch.load(weights_only=True) must refuse to rebuild."""

    def __reduce__(self):
        return (print, ("pickled code ran",))


def saved(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def test_checkpoints_with_pickled_objects_or_wrong_contents_are_refused(tmp_path, capfd):
    cases = {
        "pickled.pt": saved({"settings": {}, "payload": Payload()}),
        "empty.pt": b"",
        "truncated.pt": saved({"settings": {}, "epoch": 1})[:100],
        "list.pt": saved([1, 2, 3]),
        "types.pt": saved({"settings": {"seed": "x"}, "epoch": "1"}),
        "random.pt": bytes(range(256)) * 4,
    }
    for name, content in cases.items():
        with pytest.raises(ConfigError, match="cannot be read|not an fmnist training checkpoint"):
            load_checkpoint_file(write(tmp_path, name, content), name)
    assert "pickled code ran" not in capfd.readouterr().out


# --- fuzzing ---------------------------------------------------------------------------------

SUFFIXES = [".png", ".jpg", ".gif", ".bmp", ".webp", ".tiff", ".npy", ".idx", ".dat"]


def accepted_batch(batch: np.ndarray) -> None:
    assert batch.dtype == np.float32 and batch.shape[1:] == (28, 28)
    assert float(batch.min()) >= 0.0 and float(batch.max()) <= 1.0


@FUZZ
@given(content=st.binary(max_size=2048), suffix=st.sampled_from(SUFFIXES))
def test_fuzz_inputs_random_bytes(tmp_path_factory, content, suffix):
    path = tmp_path_factory.mktemp("fuzz") / f"input{suffix}"
    path.write_bytes(content)
    try:
        accepted_batch(load_inputs(path)[1])
    except DataError:
        pass


@FUZZ
@given(
    width=st.integers(0, 2**31 - 1),
    height=st.integers(0, 2**31 - 1),
    color=st.sampled_from([0, 2, 3, 4, 6, 7]),
    depth=st.sampled_from([1, 2, 4, 8, 16, 3]),
    body=st.binary(max_size=512),
)
def test_fuzz_png_headers(tmp_path_factory, width, height, color, depth, body):
    path = tmp_path_factory.mktemp("fuzz") / "claim.png"
    path.write_bytes(png_header(width, height, color, depth) + png_idat(body) + png_end())
    try:
        accepted_batch(load_inputs(path)[1])
    except DataError:
        pass


JPEG = image_bytes("JPEG")
GIF = image_bytes("GIF")


@FUZZ
@given(
    source=st.sampled_from([JPEG, GIF]),
    cut=st.integers(0, 4000),
    flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=8),
)
def test_fuzz_damaged_jpeg_and_gif(tmp_path_factory, source, cut, flips):
    content = bytearray(source[: max(1, cut)])
    for position, value in flips:
        if position < len(content):
            content[position] = value
    path = tmp_path_factory.mktemp("fuzz") / ("photo.jpg" if source is JPEG else "photo.gif")
    path.write_bytes(bytes(content))
    try:
        accepted_batch(load_inputs(path)[1])
    except DataError:
        pass


@FUZZ
@given(
    descr=st.sampled_from(["|u1", "<f4", ">f8", "<i8", "|O", "<c8", "|b1", "<U3", "V8", "zz"]),
    shape=st.lists(st.integers(0, 2**40), max_size=4).map(tuple)
    | st.sampled_from([(28, 28), (1, 28, 28), (3, 28, 28), (10**9, 28, 28)]),
    fortran=st.booleans(),
    body=st.binary(max_size=4000),
)
def test_fuzz_npy_headers(tmp_path_factory, descr, shape, fortran, body):
    path = tmp_path_factory.mktemp("fuzz") / "array.npy"
    path.write_bytes(npy_bytes({"descr": descr, "fortran_order": fortran, "shape": shape}, body))
    try:
        accepted_batch(load_inputs(path)[1])
    except DataError:
        pass


@FUZZ
@given(
    dims=st.lists(st.integers(0, 2**32 - 1), min_size=0, max_size=4)
    | st.sampled_from([[1, 28, 28], [2, 28, 28], [5]]),
    code=st.sampled_from([8, 8, 9, 13]),
    body=st.binary(max_size=2000),
)
def test_fuzz_idx_headers(tmp_path_factory, dims, code, body):
    header = bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
    path = tmp_path_factory.mktemp("fuzz") / "images-idx3-ubyte"
    path.write_bytes(header + body)
    try:
        accepted_batch(load_inputs(path)[1])
    except DataError:
        pass


YAML_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**30), 10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)
GRID_KEYS = ["hidden", "optimizers", "batch_sizes", "learning_rates", "pca_variance"]
RECIPE_KEYS = ["model", "optimizer", "lr", "batch_size", "epochs", "schedule", "flip"]
SPACE_KEYS = ["recipe", "params", "startup_trials", "description"]


def fuzz_definition(keys: list[str]):
    return st.dictionaries(st.sampled_from(keys) | st.text(max_size=8), YAML_VALUES, max_size=6)


@FUZZ
@given(
    kind=st.sampled_from(["grid", "recipe", "space"]),
    document=st.one_of(
        fuzz_definition(GRID_KEYS), fuzz_definition(RECIPE_KEYS), fuzz_definition(SPACE_KEYS)
    ),
)
def test_fuzz_definitions_with_wrong_types(tmp_path_factory, kind, document):
    path = tmp_path_factory.mktemp("fuzz") / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(document))
    loader = {"grid": load_grid, "recipe": load_recipe, "space": load_space}[kind]
    try:
        loader(str(path))
    except ConfigError:
        pass


@FUZZ
@given(content=st.binary(max_size=1024) | st.text(max_size=400).map(str.encode))
def test_fuzz_yaml_random_bytes(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("fuzz") / "random.yaml"
    path.write_bytes(content)
    try:
        load_grid(str(path))
    except ConfigError:
        pass


CHECKPOINT = saved(
    {"settings": {"recipe_name": "fast", "seed": 0}, "epoch": 1, "model": {"w": torch.ones(3)}}
)


@FUZZ
@given(
    cut=st.integers(0, len(CHECKPOINT)),
    flips=st.lists(st.tuples(st.integers(0, len(CHECKPOINT)), st.integers(0, 255)), max_size=6),
)
def test_fuzz_damaged_checkpoints(tmp_path_factory, cut, flips):
    content = bytearray(CHECKPOINT[:cut])
    for position, value in flips:
        if position < len(content):
            content[position] = value
    path = tmp_path_factory.mktemp("fuzz") / "last.pt"
    path.write_bytes(bytes(content))
    with pytest.raises(ConfigError):  # damaged or not, it lacks what a resume needs
        load_checkpoint_file(path, "last.pt")


# --- unexpected errors in the CLI ------------------------------------------------------------


@pytest.fixture()
def broken_info(monkeypatch, synthetic_data_dir):
    """``fmnist info`` failing with an error the project did not foresee."""
    import fmnist.data

    def explode(*args, **kwargs):
        raise ZeroDivisionError("the divisor was zero in a place nobody expected")

    monkeypatch.setattr(fmnist.data, "make_splits", explode)
    return ["info", "--data-dir", str(synthetic_data_dir)]


def test_an_unexpected_error_is_one_paragraph_and_its_trace_is_in_a_file(broken_info):
    result = CliRunner().invoke(cli, broken_info)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    paragraphs = [p for p in result.stderr.strip().split("\n\n") if p.strip()]
    assert len(paragraphs) == 1
    text = paragraphs[0]
    assert text.startswith("Error: The command failed unexpectedly with ZeroDivisionError: ")
    assert "the divisor was zero" in text
    trace_file = Path(re.search(r"the full trace is in (\S+) ", text).group(1))
    trace = trace_file.read_text()
    assert "Traceback" in trace and "ZeroDivisionError" in trace
    trace_file.unlink()


@pytest.mark.parametrize("how", ["--debug", "FMNIST_DEBUG=1"])
def test_debug_prints_the_trace(broken_info, monkeypatch, how):
    args = broken_info
    if how == "--debug":
        args = ["--debug", *args]
    else:
        monkeypatch.setenv("FMNIST_DEBUG", "1")
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "the full trace is printed above" in result.stderr


def test_an_unexpected_error_under_mlflow_run_ends_the_run_failed(
    broken_info, tracking_store, monkeypatch
):
    mlflow.set_experiment("unexpected")
    run = mlflow.MlflowClient().create_run(
        mlflow.get_experiment_by_name("unexpected").experiment_id
    )
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    result = CliRunner().invoke(cli, broken_info)
    assert result.exit_code == 1
    ended = mlflow.MlflowClient().get_run(run.info.run_id)
    assert ended.info.status == "FAILED"
    assert "ZeroDivisionError" in ended.data.tags["error"]
