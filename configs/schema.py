"""The typed configuration of weft: one dataclass per part, help text on every field.

Every field carries `metadata={"help": ...}` and, where it has them, bounds
(`"min"`, `"max"`, `"choices"`). `configs.loader.load_config` turns these into
an OmegaConf structured config, merges YAML and `key=value` overrides, checks
the bounds, and hands back plain dataclasses: no DictConfig travels past it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


def f(default: Any = None, help: str = "", *, factory: Any = None, **bounds: Any) -> Any:
    """A dataclass field with help text and optional bounds (min, max, choices)."""
    meta = {"help": help, **bounds}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RewardConfig:
    """Weights of the named reward terms. The total reward is the weighted sum."""

    accuracy: float = f(1.0, "Weight of the accuracy term (1 if the answer matches, else 0).", min=0.0)
    format: float = f(0.2, "Weight of the format term: 1 for a clean episode, minus format_penalty per malformed action, floored at -1.", min=0.0)
    format_penalty: float = f(0.5, "How much each malformed action (bad JSON, unknown tool, bad arguments, over budget) takes off the format term.", min=0.0, max=1.0)
    tool: float = f(0.1, "Weight of the tool bonus: paid when the answer is right and at least one tool call succeeded (ParaVT, DeepEyes).", min=0.0)
    evidence: float = f(0.2, "Weight of the evidence term: Video-o3's ((2*IoU+IoP+IoG)/4+1)/2 of the zoomed windows against the ground-truth spans, paid only when the answer is right and the format is clean.", min=0.0)
    cost_per_frame: float = f(0.0, "Cost per frame returned by tools (subtracted).", min=0.0)
    cost_per_turn: float = f(0.0, "Cost per model turn after the first (subtracted).", min=0.0)


@dataclass
class EnvConfig:
    """The video-tool environment: overview, tool caps, budgets, decoding."""

    overview_frames: int = f(8, "Frames in the first observation's uniform overview of the whole video.", min=1, max=256)
    overview_choices: Optional[list[int]] = f(None, "If set, the overview frame count is drawn per task (seeded by the task id) from this list, e.g. [4, 8, 16, 32] as in ParaVT, so tool calls earn measurable credit.")
    overview_size: list[int] = f(factory=lambda: [160, 90], help="(width, height) of overview frames. Small on purpose: the overview is a coarse map, the tools give detail.")
    zoom_size: list[int] = f(factory=lambda: [320, 180], help="(width, height) of frames returned by temporal_zoom and get_frame.")
    crop_size: list[int] = f(factory=lambda: [224, 224], help="Largest (width, height) of a spatial_zoom crop; the crop keeps its aspect ratio inside this box.")
    max_frames_per_call: int = f(16, "Most frames one temporal_zoom call may return.", min=1, max=256)
    max_pixels_per_frame: int = f(320 * 320, "Most pixels in any frame a tool returns; larger requested sizes are scaled down to fit.", min=64)
    max_turns: int = f(6, "Model turns per episode; the episode is truncated after this many.", min=1)
    max_tool_calls: int = f(8, "Tool calls per episode across all turns; calls beyond it are refused with an error observation.", min=0)
    max_calls_per_turn: int = f(4, "Tool calls in one turn (they run in parallel).", min=1)
    max_frames: int = f(64, "Frames the tools may return in one episode, overview excluded.", min=0)
    search_top_k: int = f(5, "Most results temporal_search returns.", min=1, max=50)
    decode_threads: int = f(2, "Threads that decode video for a VectorVideoEnv.", min=1, max=64)
    cache_bytes: int = f(512 * 2**20, "Byte bound of the process-wide decoded-frame LRU cache shared by all episodes.", min=0)
    reader_pool_size: int = f(16, "Open decord readers kept per process (LRU).", min=1)
    seed: int = f(0, "Seed for per-task random choices (overview size draw).")


@dataclass
class LossConfig:
    """GRPO policy loss with decoupled-PPO off-policy correction (see learner/grpo.py)."""

    clip_low: float = f(0.2, "PPO lower clip: the ratio pi/pi_prox is clipped at 1 - clip_low.", min=0.0, max=1.0)
    clip_high: float = f(0.28, "PPO upper clip: the ratio is clipped at 1 + clip_high (clip-higher, DAPO).", min=0.0)
    dual_clip: Optional[float] = f(None, "Dual clip constant c > 1: for negative advantages the loss is capped at -c*A. None disables it.")
    is_mode: str = f("token_tis", "Behaviour-policy correction w = pi_prox/mu: none | token_tis (min(w, is_cap)) | seq_tis | token_mis (mask tokens with w outside [is_low, is_high]) | geo_mask (drop sequences whose geometric-mean w is outside [is_low, is_high]).",
                     choices=["none", "token_tis", "seq_tis", "token_mis", "geo_mask"])
    is_cap: float = f(2.0, "C for truncated importance sampling: w is capped at C.", min=1.0)
    is_low: float = f(0.5, "Lower bound on w for token_mis / geo_mask.", min=0.0)
    is_high: float = f(2.0, "Upper bound on w for token_mis / geo_mask.", min=1.0)
    loss_agg: str = f("token-mean", "Aggregation: token-mean | seq-mean-token-mean | seq-mean-token-sum-norm (Dr.GRPO, divided by max_len).",
                      choices=["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
    max_len: int = f(4096, "Fixed normaliser for seq-mean-token-sum-norm.", min=1)
    kl_coef: float = f(0.0, "Coefficient of the KL penalty to the reference policy; 0 disables it.", min=0.0)
    kl_estimator: str = f("k3", "KL estimator: k1 | k2 | k3 (Schulman's).", choices=["k1", "k2", "k3"])


@dataclass
class DataConfig:
    """Where tasks come from."""

    path: str = f("data/demo/tasks.jsonl", "JSONL task file (one task a line); video paths are relative to it.")


@dataclass
class WeftConfig:
    """Everything a weft run needs. Later parts (rollout, learner) add sections here."""

    data: DataConfig = f(factory=DataConfig, help="Task data.")
    env: EnvConfig = f(factory=EnvConfig, help="Video-tool environment.")
    reward: RewardConfig = f(factory=RewardConfig, help="Reward term weights.")
    loss: LossConfig = f(factory=LossConfig, help="Policy loss.")
    seed: int = f(0, "Global seed.")
