"""The typed config: defaults from the paper, YAML loading, flag overrides, refusals."""

import pytest
import yaml

from microsr_tf.config import Config
from microsr_tf.errors import ConfigError, InputError


def test_defaults_follow_the_paper():
    cfg = Config().validate()
    assert (cfg.data.patch_size, cfg.data.stride) == (256, 128)
    assert (cfg.train.batch_size, cfg.train.learning_rate, cfg.train.epochs) == (5, 1e-4, 50)
    assert (cfg.train.lambda_rec, cfg.train.lambda_adv) == (10.0, 1.0)
    assert cfg.model.n_blocks == 9 and cfg.model.dropout_position == "bottleneck"


def test_yaml_then_flags_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"patch_size": 64, "seed": 3}, "train": {"epochs": 2}}))
    cfg = Config.load(path, {"train": {"epochs": 7, "batch_size": None}})
    assert cfg.data.patch_size == 64 and cfg.data.seed == 3
    assert cfg.train.epochs == 7  # flag wins over YAML
    assert cfg.train.batch_size == 5  # an unset flag (None) keeps the value


def test_save_round_trip(tmp_path):
    cfg = Config.load(None, {"model": {"ngf": 8, "upsample": "resize"}})
    cfg.save(tmp_path / "config.yaml")
    again = Config.load(tmp_path / "config.yaml")
    assert again == cfg
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temp file left


@pytest.mark.parametrize(
    "raw, needle",
    [
        ({"train": {"epoch": 3}}, "unknown config key train.epoch"),
        ({"optim": {}}, "unknown config section 'optim'"),
        ({"data": {"patch_size": 30}}, "multiple of 4"),
        ({"model": {"dropout_position": "everywhere"}}, "dropout_position"),
        ({"train": {"batch_size": "five"}}, "train.batch_size must be an integer, got 'five'"),
        ({"train": {"epochs": 2.5}}, "train.epochs must be an integer, got 2.5"),
        ({"train": {"epochs": None}}, "train.epochs must be an integer, got None"),
        ({"train": {"epochs": True}}, "train.epochs must be an integer, got True"),
        ({"train": {"lambda_rec": "ten"}}, "train.lambda_rec must be a number, got 'ten'"),
        ({"model": {"upsample": 3}}, "model.upsample must be a string, got 3"),
        ({"data": {"shards_dir": 5}}, "data.shards_dir must be a string or null, got 5"),
        ({"data": {"seed": 1.5}}, "data.seed must be an integer or null, got 1.5"),
        ({"train": {"seed": -1}}, "bad.yaml: train.seed must be in [0, 2147483647] or null, got -1"),
        ({"data": {"seed": 2**31}}, "bad.yaml: data.seed must be in [0, 2147483647] or null, got 2147483648"),
        ({"train": {"learning_rate": float("nan")}}, "train.learning_rate must be a finite number"),
        ({"data": {"min_foreground": float("inf")}}, "data.min_foreground must be a finite number"),
        ({"data": {"axis": 7}}, "bad.yaml: data.axis must be 0, 1 or 2"),
        ({"train": {"lambda_rec": -5}}, "bad.yaml: train.lambda_rec must be >= 0"),
        ({"train": {"beta_1": 1.5}}, "bad.yaml: train.beta_1 must be in [0, 1)"),
        ({"data": {"stride": 0}}, "bad.yaml: data.stride must be positive"),
        (["data", "train"], "bad.yaml: expected a mapping of sections, got list"),
        ({"train": {"mc_samples_val": 1}}, "bad.yaml: train.mc_samples_val must be >= 2"),
        ({"train": {"n_val_patches": 0}}, "bad.yaml: train.n_val_patches must be >= 1"),
    ],
)
def test_bad_values_are_refused_in_one_line(tmp_path, raw, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as info:
        Config.load(path)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(InputError, match="config file not found"):
        Config.load(tmp_path / "nope.yaml")
    bad = tmp_path / "broken.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(InputError, match="not valid YAML"):
        Config.load(bad)


@pytest.mark.parametrize("text, key", [("data:\n  patch_size: 32\ndata:\n  stride: 8\n", "'data'"),
                                       ("data:\n  patch_size: 32\n  patch_size: 64\n", "'patch_size'")])
def test_a_key_given_twice_is_refused_not_silently_overwritten(tmp_path, text, key):
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(InputError) as info:
        Config.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not valid YAML (key {key} appears twice") and "\n" not in message


def test_unreadable_config_files_are_input_errors(tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00 not text")
    with pytest.raises(InputError, match="not a text"):
        Config.load(binary)
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    with pytest.raises(InputError) as info:
        Config.load(folder)
    assert str(info.value).startswith(f"{folder}: cannot read the config file")


def test_flag_values_are_checked_as_from_the_command_line():
    with pytest.raises(ConfigError, match="^command line: train.learning_rate must be a finite number"):
        Config.load(None, {"train": {"learning_rate": float("nan")}})


def test_nullable_keys_come_from_the_annotations(tmp_path):
    """`int | None` keys take null; a seed of null means "draw one at the start of the run"."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  seed: null\n  steps_per_epoch: null\n  decay_start_epoch: 3\n"
                    "data:\n  seed: null\n  roi_threshold_lr: 12\n  lr_dir: scans/lr\n")
    cfg = Config.load(path)
    assert cfg.train.seed is None and cfg.data.seed is None and cfg.train.steps_per_epoch is None
    assert cfg.train.decay_start_epoch == 3 and cfg.data.lr_dir == "scans/lr"
    assert cfg.data.roi_threshold_lr == 12.0 and isinstance(cfg.data.roi_threshold_lr, float)
