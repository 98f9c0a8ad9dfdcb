from __future__ import annotations

from pathlib import Path

import pytest

from wsiats.config import CONFIG_VERSION, Config, load_yaml, resolve
from wsiats.errors import CheckpointError, ConfigError
from wsiats.run import RunFolder


def test_defaults_are_the_official_hyperparameters_where_the_needle_benchmark_did_not_move_them() -> None:
    cfg = Config()
    assert cfg.clip_norm == 1.0 and cfg.entropy_weight == 1e-4 and cfg.attention_eps == 1e-4
    assert cfg.replace is False and cfg.attention == "learned"
    # moved by benchmarks/bench_needles.py (README "Training for needles"): official N 10, batch 8, one lr
    assert (cfg.pooling, cfg.candidates, cfg.train_patches, cfg.zoom) == ("gated", 256, 64, 0.625)
    assert (cfg.lr, cfg.head_lr_scale, cfg.n_patches, cfg.batch_size) == (1e-3, 3.0, 32, 4)
    paper = resolve(overrides={"pooling": "ats"})  # the paper's procedure: no candidates
    assert paper.candidates == 0


def test_flags_override_file_override_defaults(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 7\nlr: 0.01\nreplace: true\n")
    cfg = resolve(config_file=f, overrides={"lr": 0.5, "epochs": None})
    assert (cfg.epochs, cfg.lr, cfg.replace) == (7, 0.5, True)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("epoch: 3\n", "unknown key(s) epoch"),
        ("epochs: three\n", "epochs must be int"),
        ("replace: 1\n", "replace must be bool"),
        ("- a\n- b\n", "expected a mapping"),
        ("lr: [1\n", "not a readable YAML file"),
    ],
)
def test_bad_config_files_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_yaml(f)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("lr", -1.0, r"lr \(flag --lr\) must be a positive number"),
        ("n_patches", 0, r"n_patches \(flag --n-patches\) must be an integer >= 1"),
        ("val_fraction", 1.5, r"val_fraction \(flag --val-fraction\) must be in \[0, 1\)"),
        ("attention", "random", r"attention \(flag --attention\) must be 'learned' or 'uniform'"),
        ("device", "tpu", r"device \(flag --device\) must be auto, cpu, cuda or cuda:N"),
        ("feature_norm", "l1", r"feature_norm \(flag --feature-norm\) must be 'l2' or 'none'"),
    ],
)
def test_out_of_range_values_name_the_flag(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve(overrides={key: value})


def test_run_config_round_trip_and_version_check(tmp_path: Path) -> None:
    cfg = Config(epochs=3, classes=["a", "b"])
    cfg.save(tmp_path / "config.yaml")
    assert RunFolder(tmp_path).load_config() == cfg
    text = (tmp_path / "config.yaml").read_text().replace(f"version: {CONFIG_VERSION}", "version: 99")
    (tmp_path / "config.yaml").write_text(text)
    with pytest.raises(CheckpointError, match="config version 99 is not supported"):
        RunFolder(tmp_path).load_config()
    with pytest.raises(CheckpointError, match="model folder not found"):
        RunFolder(tmp_path / "nope").load_config()
    with pytest.raises(CheckpointError, match=r"not a wsiats run folder \(no config.yaml, no last_state.pt\)"):
        RunFolder(tmp_path / "nope").load_config(use="resume")


def test_a_run_saved_before_feature_norm_keeps_unit_norm_features(tmp_path: Path) -> None:
    assert (Config().feature_norm, Config(pooling="ats").feature_norm) == ("l2", "l2")  # the defaults
    cfg = Config(epochs=3, classes=["a", "b"], feature_norm="none")
    cfg.save(tmp_path / "config.yaml")
    assert RunFolder(tmp_path).load_config().feature_norm == "none"
    from wsiats.checkpoint import build_model

    assert build_model(RunFolder(tmp_path).load_config()).feature_net.normalize is False
    text = (tmp_path / "config.yaml").read_text()
    (tmp_path / "config.yaml").write_text(text.replace("feature_norm: none\n", ""))
    assert "feature_norm" not in (tmp_path / "config.yaml").read_text()
    assert RunFolder(tmp_path).load_config().feature_norm == "l2"


def test_resume_config_takes_what_may_change_and_refuses_the_rest() -> None:
    from wsiats.config import resume_config

    saved = Config(epochs=3, classes=["a", "b"], n_patches=8)
    cfg, taken = resume_config(saved, {"epochs": 9, "workers": 0, "n_patches": 8, "lr": None})
    assert (cfg.epochs, cfg.workers, cfg.n_patches, cfg.lr, cfg.classes) == (9, 0, 8, saved.lr, ["a", "b"])
    assert taken == ["--epochs 9 (was 3)", "--workers 0 (was 2)"] and saved.epochs == 3
    with pytest.raises(ConfigError, match=r"^--n-patches 4 \(the run has 8\): would change the model"):
        resume_config(saved, {"epochs": 9, "n_patches": 4})
    with pytest.raises(ConfigError, match="epochs"):
        resume_config(saved, {"epochs": 0})  # the merged config is checked like any other


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--instance-weight", "-1", "instance_weight (flag --instance-weight) must be >= 0"),
    ("--select-random", "1.5", "select_random (flag --select-random) must be in [0, 1]"),
    ("--feature-norm", "l1", "feature_norm (flag --feature-norm) must be 'l2' or 'none'"),
])
def test_train_refuses_bad_instance_and_selection_options(tmp_path: Path, flag: str, value: str, message: str) -> None:
    from conftest import invoke

    (tmp_path / "slides").mkdir()
    (tmp_path / "labels.csv").write_text("slide_id,label\n")
    result = invoke("train", tmp_path / "slides", "--labels", tmp_path / "labels.csv", "--out", tmp_path / "run",
                    flag, value)
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()
