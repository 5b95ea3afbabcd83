"""Training configs from files: TOML / a run's JSON, command-line overrides, the resolved config on disk."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from vlsearch.app.cli import app
from vlsearch.app.options import TRAIN_FLAGS, train_overrides
from vlsearch.core.errors import TrainingError
from vlsearch.train.config import CONFIG_FILE, TrainConfig, load_train_config
from vlsearch.train.images import AugmentConfig

from test_train import make_shapes

TOML = """
model = "vlsearch-tiny"
epochs = 1
batch_size = 8
lr = 0.002
warmup_steps = 2
val_fraction = 0.0
workers = 0
checkpoint_every = 0
threads = 1

[augment]
scale = [0.5, 1.0]
hflip = 0.25
"""


def test_toml_file_then_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(TOML)
    config = load_train_config(path)
    assert config.epochs == 1 and config.lr == 0.002 and config.threads == 1
    assert config.augment == AugmentConfig(scale=(0.5, 1.0), hflip=0.25)
    assert config.weight_decay == TrainConfig().weight_decay  # not in the file: the default
    config = load_train_config(path, {"epochs": 3, "augment.hflip": 0.5})
    assert config.epochs == 3 and config.augment == AugmentConfig(scale=(0.5, 1.0), hflip=0.5)
    assert load_train_config(path, {"augment": False}).augment is None


def test_no_augment_wins_over_augment_details():
    """--no-augment with --hflip: augmentation stays off, as the flags always behaved."""
    config = load_train_config(None, {"augment.hflip": 0.5, "augment": False})
    assert config.augment is None


def test_bad_files_and_keys_are_named(tmp_path):
    with pytest.raises(TrainingError, match="not found"):
        load_train_config(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("epochs = = 1")
    with pytest.raises(TrainingError, match="cannot read"):
        load_train_config(tmp_path / "bad.toml")
    (tmp_path / "typo.toml").write_text("epoch = 3")
    with pytest.raises(TrainingError, match="unknown training setting.*epoch"):
        load_train_config(tmp_path / "typo.toml")
    (tmp_path / "neg.toml").write_text("epochs = 0")
    with pytest.raises(TrainingError, match="epochs must be >= 1"):
        load_train_config(tmp_path / "neg.toml")


def test_flag_defaults_shown_in_help_are_trainconfigs():
    """Each flag's documented default, applied as an override, leaves TrainConfig() unchanged."""
    parse = {int: int, float: float, str: str, bool: lambda v: {"yes": True, "on": True, "no": False}[v]}
    given = {}
    for flag in TRAIN_FLAGS:
        if flag.default != "none" and (flag.default != "auto" or flag.type is str):
            given[flag.name] = parse[flag.type](flag.default)
    assert load_train_config(None, train_overrides(given)) == TrainConfig()


def test_cli_config_file_overrides_and_resolved_config(tmp_path):
    data = make_shapes(tmp_path / "shapes", 16)
    (tmp_path / "run.toml").write_text(TOML)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(data), str(out), "--config", str(tmp_path / "run.toml"),
                                      "--seed", "7", "--no-augment"])
    assert result.exit_code == 0, result.output
    written = json.loads((out / CONFIG_FILE).read_text())
    assert written["seed"] == 7 and written["epochs"] == 1 and written["augment"] is None
    assert load_train_config(out / CONFIG_FILE) == load_train_config(tmp_path / "run.toml",
                                                                     {"seed": 7, "augment": False})
    bad = CliRunner().invoke(app, ["train", str(data), str(tmp_path / "x"), "--config", str(tmp_path / "no.toml")])
    assert bad.exit_code == 1 and "not found" in bad.output
