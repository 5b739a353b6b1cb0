"""The video-tool environment: decoding (video.py), the tool contract (tool.py) and the built-in
tools (tools.py), action parser (parser.py), rewards (rewards.py), caption search (search.py),
one episode (env.py: VideoToolEnv), the episode interface and its in-process host (episodes.py:
LocalEnv), task files (tasks.py), demo data (demo.py), and the env unit-testing harness
(testing.py). Imports neither Ray, vLLM nor training code.
"""

from env.env import VideoToolEnv
from env.episodes import LocalEnv
from env.errors import VideoCorrupt, VideoDecodeTimeout, VideoEmpty, VideoError, VideoNotFound
from env.tasks import TaskFileError, load_tasks
from env.tool import EpisodeVideo, Tool, ToolError, ToolOutput
from env.types import IMAGE_MARKER, Caption, Episode, Frame, Observation, ParsedAction, Task, ToolCall, ToolCallRecord
from env.video import FrameDecoder, VideoReader, get_decoder

__all__ = [
    "VideoToolEnv", "LocalEnv", "Tool", "ToolOutput", "ToolError", "EpisodeVideo", "VideoReader", "FrameDecoder",
    "get_decoder", "VideoError", "VideoNotFound", "VideoEmpty", "VideoCorrupt", "VideoDecodeTimeout",
    "load_tasks", "TaskFileError", "Task", "Caption", "Episode", "Frame", "Observation", "ParsedAction",
    "ToolCall", "ToolCallRecord", "IMAGE_MARKER",
]
