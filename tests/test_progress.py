"""Progress that reaches a log: with stderr not a terminal, training prints one line per epoch
(what is trained, epoch k/n, validation accuracy, time left); quiet prints nothing."""

from __future__ import annotations

import re

import torch

from fmnist.data import Split
from fmnist.models.dense import build_mlp
from fmnist.train.engine import EpochLines, fit, format_duration
from fmnist.train.settings import TrainConfig

LINE = re.compile(
    r"^\[(?P<label>[^\]]+)\] epoch (?P<epoch>\d+)/(?P<epochs>\d+): val_accuracy "
    r"(?P<acc>[01]\.\d{4}), \d+ s so far, about (?P<left>\d+:\d\d) left$"
)


def test_one_line_per_epoch_when_stderr_is_not_a_terminal(capsys):
    lines = EpochLines("cnn fast", epochs=3, first_epoch=1, quiet=False, min_interval=0.0)
    for epoch, accuracy in ((1, 0.5), (2, 0.625), (3, 0.75)):
        lines.epoch_done(epoch, accuracy)
    printed = capsys.readouterr().err.strip().splitlines()
    matches = [LINE.match(line) for line in printed]
    assert all(matches), printed
    assert [(m["label"], m["epoch"], m["epochs"], m["acc"]) for m in matches] == [
        ("cnn fast", "1", "3", "0.5000"),
        ("cnn fast", "2", "3", "0.6250"),
        ("cnn fast", "3", "3", "0.7500"),
    ]
    assert matches[-1]["left"] == "0:00"


def test_short_epochs_share_lines_and_the_last_one_is_always_printed(capsys):
    lines = EpochLines("dnn", epochs=30, first_epoch=1, quiet=False, min_interval=3600.0)
    for epoch in range(1, 31):
        lines.epoch_done(epoch, 0.9)
    printed = capsys.readouterr().err.strip().splitlines()
    assert len(printed) == 1 and LINE.match(printed[0])["epoch"] == "30"


def test_fit_prints_its_label_and_quiet_prints_nothing(capsys):
    features, labels = torch.randn(64, 6), torch.arange(64) % 10
    split = Split(features, labels)
    settings = TrainConfig(batch_size=16, epochs=2, label="tiny mlp")
    fit(build_mlp(6, [8]), split, split, settings)
    (line,) = capsys.readouterr().err.strip().splitlines()  # short epochs: the last one only
    assert LINE.match(line)["label"] == "tiny mlp" and LINE.match(line)["epoch"] == "2"
    fit(build_mlp(6, [8]), split, split, settings.replace(quiet=True))
    assert capsys.readouterr().err == ""


def test_durations_read_as_clock_times():
    assert [format_duration(s) for s in (0, 59.6, 75, 3725)] == ["0:00", "1:00", "1:15", "1:02:05"]
