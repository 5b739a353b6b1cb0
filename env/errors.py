"""Typed errors of video decoding. Every way a video can fail to give frames maps to one of
these, so callers (the env, the learner's re-decode) catch `VideoError` and never a
library's own exception, and the message always names the file and what was wrong.
"""

from __future__ import annotations


class VideoError(Exception):
    """A video could not give the frames asked for. `path` is the file concerned."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class VideoNotFound(VideoError):
    """The file does not exist or is not a readable regular file."""


class VideoEmpty(VideoError):
    """The file is zero-length, or has no video stream / no frames."""


class VideoCorrupt(VideoError):
    """The file is not a decodable video: garbage, truncated, or a decoder error mid-stream."""


class VideoDecodeTimeout(VideoError):
    """Opening or decoding the file took longer than the allowed time (a hang was cut off)."""


class EpisodeLost(Exception):
    """The env no longer holds this episode: the env actor hosting it died and Ray restarted it between
    two of the episode's calls. Not the policy's fault, so it is not caught as a failed episode: the
    rollout worker runs the group again."""
