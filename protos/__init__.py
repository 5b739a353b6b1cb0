"""The wire contract: records (`Trajectory`, `Group`, `FrameRef`) and their one msgpack codec.

Imports nothing else of weft.
"""

from protos.codec import CodecError, dumps, iter_trajectories, loads, read_trajectories, write_trajectories
from protos.records import FrameRef, Group, Status, Trajectory, content_hash

__all__ = [
    "CodecError", "dumps", "loads", "read_trajectories", "write_trajectories", "iter_trajectories",
    "FrameRef", "Group", "Status", "Trajectory", "content_hash",
]
