"""Load a config: dataclass schema -> OmegaConf.structured -> YAML + key=value -> dataclass.

Unknown keys are an error that names the key (OmegaConf's struct mode), bounds
in field metadata are checked, and what comes back is a plain dataclass. `eval_config`
derives the config evaluation plays from a run's config.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Optional, Sequence, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key."""


# Keys that moved: a config that still sets one is told where it went.
MOVED = {f"reward.{k}": f"reward.weights.{k}" for k in ("accuracy", "format", "tool", "evidence")}
MOVED.update({f"reward.{k}": f"reward.kwargs.{k}" for k in ("format_penalty", "cost_per_frame", "cost_per_turn")})


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), schema: type[T] | None = None) -> T:
    """Merge the schema's defaults, an optional YAML file and `key=value` overrides."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if schema is None:
        from configs.schema import WeftConfig as schema  # noqa: N813
    base = OmegaConf.structured(schema)
    layers = []
    try:
        if path is not None:
            layers.append(OmegaConf.load(str(path)))
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(base, *layers)
        obj = OmegaConf.to_object(merged)
        _own_reward_weights(obj, layers)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or getattr(e, "key", None)
        where = f" (in {path})" if path else ""
        if key in MOVED:
            raise ConfigError(f"config key '{key}'{where} is now '{MOVED[key]}'") from None
        raise ConfigError(f"config key '{key}'{where}: {e.msg if hasattr(e, 'msg') else e}") from None
    check_bounds(obj)
    return obj


def _own_reward_weights(obj: Any, layers: Sequence[Any]) -> None:
    """The default reward.weights are the default reward function's. A config that names another
    function gets only the weights its own layers set (1 for a term not listed), never the default's
    leftovers: merged in, a plug-in's own `format` term would silently be weighed 0.2."""
    from omegaconf import OmegaConf

    reward = getattr(obj, "reward", None)
    if reward is None or reward.fn == type(reward)().fn:
        return
    weights: dict[str, float] = {}
    for layer in layers:
        w = OmegaConf.select(layer, "reward.weights", default=None)
        if w is not None:
            weights.update({str(k): float(v) for k, v in OmegaConf.to_container(w).items()})
    reward.weights = weights


def eval_config(cfg: Any, *, samples: Optional[int] = None, temperature: Optional[float] = None,
                no_tools: bool = False, frames: Optional[int] = None) -> Any:
    """The run config as evaluation plays it: K episodes a task at eval.temperature; for the no-tools
    baseline, no tools, one turn and `frames` uniform frames at the tools' frame size."""
    cfg = copy.deepcopy(cfg)
    if samples is not None:
        cfg.eval.samples = samples
    if temperature is not None:
        cfg.eval.temperature = temperature
    cfg.rollout = dataclasses.replace(cfg.rollout, group_size=cfg.eval.samples, temperature=cfg.eval.temperature)
    if no_tools:
        cfg.env = dataclasses.replace(cfg.env, tools=[], max_turns=1, overview_choices=[], overview_fps=None,
                                      overview_frames=frames or cfg.env.overview_frames,
                                      overview_size=list(cfg.env.zoom_size))
        cfg.rollout = dataclasses.replace(cfg.rollout, system_prompt=cfg.eval.no_tools_prompt)
    else:
        if frames:
            cfg.env = dataclasses.replace(cfg.env, overview_frames=frames, overview_choices=[], overview_fps=None)
        if cfg.eval.max_turns:
            cfg.env = dataclasses.replace(cfg.env, max_turns=cfg.eval.max_turns)
    return cfg


def check_bounds(obj: Any, prefix: str = "") -> None:
    """Check the min/max/choices of every field, recursing into nested dataclasses."""
    for fld in dataclasses.fields(obj):
        value = getattr(obj, fld.name)
        key = f"{prefix}{fld.name}"
        if dataclasses.is_dataclass(value):
            check_bounds(value, key + ".")
            continue
        if value is None or isinstance(value, (list, dict)):
            continue
        meta = fld.metadata
        if "choices" in meta and value not in meta["choices"]:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {meta['choices']}")
        if "min" in meta and value < meta["min"]:
            raise ConfigError(f"config key '{key}': {value!r} is below the minimum {meta['min']}")
        if "max" in meta and value > meta["max"]:
            raise ConfigError(f"config key '{key}': {value!r} is above the maximum {meta['max']}")


def to_yaml(obj: Any) -> str:
    """The YAML text of a config dataclass (what a run saves next to its outputs)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(obj))


def shipped_configs() -> list[Path]:
    """Every YAML file shipped in configs/."""
    return sorted(Path(__file__).parent.glob("*.yaml"))
