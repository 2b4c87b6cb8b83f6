"""Config schema: every file in configs/ loads; unknown keys and bad values name the path."""

from pathlib import Path

import pytest

from copd_mega.config import Config, ConfigError, load_config, save_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"tiny_cpu.yaml", "copd_8branch.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_validates(path):
    """Every config passes what `copd train` checks at start-up, at its own world size."""
    from copd_mega.launch.validate import validate_job

    cfg = load_config(path)
    assert isinstance(cfg, Config)
    layout = validate_job(cfg, len(cfg.branches) * cfg.ranks_per_branch)
    assert len(layout.branches) == len(cfg.branches)


def test_yaml_round_trip(tmp_path):
    cfg = load_config(CONFIGS[0], ["model.num_layers=4", "branches.0.beta=0.25"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg
    assert again.model.num_layers == 4 and again.branches[0].beta == 0.25


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.nope=1", "model.nope"),
        ("model.num_layers=abc", "model.num_layers"),
        ("teaching.graph=star", "teaching.graph"),
        ("model.num_attention_heads=3", "model.num_attention_heads"),
        ("schedule.mode=bogus", "schedule.mode"),
        ("branches.5.beta=1", "branches.5"),
        ("teaching.graph=hub_spoke", "teaching.hub"),
        ("rollout.top_p=1.5", "rollout.top_p"),
    ],
)
def test_bad_values_name_the_dotted_path(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert fragment in str(err.value)


def test_missing_file_says_how_to_fix(tmp_path):
    with pytest.raises(ConfigError, match="--config"):
        load_config(tmp_path / "nope.yaml")


def test_exponent_without_dot_is_a_float():
    cfg = load_config(None, ["optim.lr=2e-3"])
    assert cfg.optim.lr == 2e-3
