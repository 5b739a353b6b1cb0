"""The records that cross every boundary: `FrameRef`, `Trajectory`, `Group`.

One `Trajectory` flows env -> rollout -> learner. Its per-token arrays all have
the same length T (prompt + model turns + observations). Images are not carried
inline by default: `media` holds a `FrameRef` per image, from which the learner
re-decodes the exact pixels (checked against `content_hash`).
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np


class Status(str, enum.Enum):
    """How an episode ended."""

    COMPLETED = "COMPLETED"  # the model answered
    TRUNCATED = "TRUNCATED"  # a turn, token or frame budget ran out
    ABORTED = "ABORTED"  # stopped from outside (shutdown, weight-version bound)
    FAILED = "FAILED"  # the episode could not run (corrupt video, engine error); see metadata["error"]


@dataclass(frozen=True)
class FrameRef:
    """Where one image the model saw came from, precisely enough to re-decode it.

    video:        path of the video file (as the task gave it, resolved to absolute)
    frame_index:  decoded frame index (the frame shown at time t is floor(t * fps))
    time:         seconds of that frame (frame_index / fps)
    crop:         normalised (x1, y1, x2, y2) region of the frame, (0, 0, 1, 1) for all of it
    size:         (width, height) of the image handed to the model
    content_hash: blake2b-128 hex of the uint8 RGB pixels, so a re-decode can be checked
    """

    video: str
    frame_index: int
    time: float
    crop: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)
    size: tuple[int, int] = (0, 0)
    content_hash: str = ""


def content_hash(image: np.ndarray) -> str:
    """The hash recorded in `FrameRef.content_hash` for a uint8 HxWx3 image."""
    arr = np.ascontiguousarray(image, dtype=np.uint8)
    h = hashlib.blake2b(digest_size=16)
    h.update(np.asarray(arr.shape, dtype=np.int64).tobytes())
    h.update(arr.data)
    return h.hexdigest()


@dataclass
class Trajectory:
    """One episode, as token arrays of length T plus what the model saw and earned."""

    token_ids: np.ndarray  # int32[T], exactly the tokens the engine saw
    loss_mask: np.ndarray  # uint8[T], 1 where the policy generated the token
    behavior_logprobs: np.ndarray  # float32[T], the engine's logprob of generated tokens, 0 elsewhere
    policy_version: np.ndarray  # int32[T], weight version of each generated token, -1 elsewhere
    media: list[FrameRef] = field(default_factory=list)
    reward: float = 0.0
    reward_terms: dict[str, float] = field(default_factory=dict)
    status: Status = Status.COMPLETED
    group_id: str = ""
    task_id: str = ""
    traj_id: str = ""  # unique per episode; the learner's exactly-once key
    metrics: dict[str, float] = field(default_factory=dict)  # turns, tool calls, frames, timings
    metadata: dict[str, Any] = field(default_factory=dict)  # free-form extras (error reason, turn texts)
    pixels: Optional[list[np.ndarray]] = None  # inline images, only when configured to send them
    # Sub-agent episodes this episode's tool calls ran on the policy (ParaVT's crop_video), recorded under
    # its id; the learner trains them with this episode's advantage when trainer.train_subagents is on.
    children: list["Trajectory"] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.token_ids = np.asarray(self.token_ids, dtype=np.int32)
        self.loss_mask = np.asarray(self.loss_mask, dtype=np.uint8)
        self.behavior_logprobs = np.asarray(self.behavior_logprobs, dtype=np.float32)
        self.policy_version = np.asarray(self.policy_version, dtype=np.int32)
        self.status = Status(self.status)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @classmethod
    def failed(cls, reason: str, *, task_id: str = "", group_id: str = "", traj_id: str = "",
               metrics: Optional[dict[str, float]] = None) -> "Trajectory":
        """An episode that could not run: empty token arrays, status FAILED, the reason kept."""
        empty = np.zeros(0)
        return cls(empty, empty, empty, empty, status=Status.FAILED, task_id=task_id, group_id=group_id,
                   traj_id=traj_id, metrics=dict(metrics or {}), metadata={"error": reason})


@dataclass
class Group:
    """The G trajectories of one task: the unit of GRPO advantage normalisation."""

    group_id: str
    task_id: str
    trajectories: list[Trajectory] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def rewards(self) -> np.ndarray:
        return np.asarray([t.reward for t in self.trajectories], dtype=np.float32)
