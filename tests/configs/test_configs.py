"""Config loading: every shipped YAML loads, overrides apply, unknown keys and bad values name the key."""

import dataclasses
from pathlib import Path

import pytest

from configs import ConfigError, LossConfig, WeftConfig, load_config, shipped_configs, to_yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", shipped_configs(), ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, WeftConfig)
    assert dataclasses.is_dataclass(cfg.env) and not hasattr(cfg.env, "_metadata")  # no DictConfig past the loader


def test_there_are_shipped_configs():
    assert any(p.name == "demo.yaml" for p in shipped_configs())


def test_overrides_apply_with_types():
    cfg = load_config(None, ["env.overview_frames=4", "loss.is_mode=geo_mask", "env.overview_choices=[4,8]"])
    assert cfg.env.overview_frames == 4 and cfg.loss.is_mode == "geo_mask" and cfg.env.overview_choices == [4, 8]


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match="overveiw_frames"):
        load_config(None, ["env.overveiw_frames=4"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("env:\n  nope: 1\n")
    with pytest.raises(ConfigError, match="nope"):
        load_config(bad)


@pytest.mark.parametrize("override,key", [("env.max_turns=0", "env.max_turns"), ("loss.is_mode=bogus", "loss.is_mode"),
                                          ("loss.clip_low=2", "loss.clip_low"), ("env.max_turns=abc", "max_turns")])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def _all_fields(cls):
    for f in dataclasses.fields(cls):
        yield cls, f
        if dataclasses.is_dataclass(f.type if isinstance(f.type, type) else None):
            yield from _all_fields(f.type)


def test_every_field_has_help():
    import configs.schema as schema

    classes = [c for c in vars(schema).values() if dataclasses.is_dataclass(c) and isinstance(c, type)]
    assert LossConfig in classes
    for cls in classes:
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help", "").strip(), f"{cls.__name__}.{f.name} has no help text"


def test_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["env.overview_frames=16", "seed=3"])
    p = tmp_path / "c.yaml"
    p.write_text(to_yaml(cfg))
    assert load_config(p) == cfg


def test_reward_weights_belong_to_the_reward_function(tmp_path):
    """The default weights go with the default reward; a config naming another function keeps only the
    weights it sets (a plug-in's own `format` term is weighed 1, not the default's 0.2), whether they come
    from a YAML file, a whole-dict override or dotted keys; the default function's weights merge as before."""
    tweaked = load_config(overrides=["reward.weights.tool=0.5"])
    assert tweaked.reward.weights == {"accuracy": 1.0, "format": 0.2, "tool": 0.5, "evidence": 0.2, "cost": 1.0}
    plug = load_config(overrides=["reward.fn=my_plugin:reward", "reward.weights={right: 1.0, clean: 0.5}"])
    assert plug.reward.weights == {"right": 1.0, "clean": 0.5}
    dotted = load_config(overrides=["reward.fn=my_plugin:reward", "reward.weights.right=2"])
    assert dotted.reward.weights == {"right": 2.0}
    assert load_config(overrides=["reward.fn=my_plugin:reward"]).reward.weights == {}
    (tmp_path / "r.yaml").write_text("reward:\n  fn: my_plugin:reward\n  weights: {right: 0.7}\n")
    both = load_config(tmp_path / "r.yaml", ["reward.weights.clean=0.1"])
    assert both.reward.weights == {"right": 0.7, "clean": 0.1}
    weaver = load_config(ROOT / "configs/recipes/weaver.yaml")
    assert weaver.reward.weights == {"accuracy": 0.7, "format": 0.2, "tool": 0.1}
