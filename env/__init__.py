"""The video-tool environment: decoding (video.py), tools (tools.py), action parser
(parser.py), rewards (rewards.py), caption search (search.py), episodes (env.py),
vectorised episodes (vector.py), task files (tasks.py), demo data (demo.py), and the
env unit-testing harness (testing.py). Imports neither Ray, vLLM nor training code.
"""

from env.env import VideoToolEnv
from env.errors import VideoCorrupt, VideoDecodeTimeout, VideoEmpty, VideoError, VideoNotFound
from env.tasks import TaskFileError, load_tasks
from env.types import IMAGE_MARKER, Caption, Frame, Observation, ParsedAction, Task, ToolCall
from env.vector import SerialVectorEnv, VectorVideoEnv
from env.video import FrameDecoder, VideoReader, get_decoder

__all__ = [
    "VideoToolEnv", "VectorVideoEnv", "SerialVectorEnv", "VideoReader", "FrameDecoder", "get_decoder",
    "VideoError", "VideoNotFound", "VideoEmpty", "VideoCorrupt", "VideoDecodeTimeout",
    "load_tasks", "TaskFileError", "Task", "Caption", "Frame", "Observation", "ParsedAction", "ToolCall",
    "IMAGE_MARKER",
]
