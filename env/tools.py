"""The four built-in video tools as `env.Tool` objects, and the JSON-Schema checks every tool's arguments get.

`builtin_tools(cfg)` builds temporal_zoom, spatial_zoom, temporal_search and get_frame with
this config's caps and frame sizes; `env.tools` names which of them (and which of a user's
own Tools) a run has (env/tool.py). `check_schema` is a small JSON-Schema interpreter (type,
required, additionalProperties, minimum/maximum, minItems/maxItems, minLength/maxLength);
`Tool.validate` runs it and then the tool's own `check`, and returns normalised arguments or
one exact error message. `sample_valid_args`/`sample_invalid_args` let a checker prove that a
tool's schema and what it accepts agree (check_env does, for built-in and user tools alike).

Semantic decisions of the built-ins:
* Times are seconds in [0, duration]. A time up to TIME_TOLERANCE_S past the end
  is clamped to `duration` (models round up the last second); further is an error.
  -0.0 becomes 0.0.
* temporal_zoom needs start < end after clamping (a single moment is get_frame).
* bbox is [x1, y1, x2, y2] as fractions of the frame, x1 < x2, y1 < y2, and each
  side at least MIN_BBOX_SIDE (a smaller crop is upscaled noise).
* temporal_search on a video without captions is refused with a message naming the other
  tools; the query must have non-whitespace text and at most MAX_QUERY_CHARS characters.
* integer accepts 8.0 (JSON Schema does) and returns 8; booleans are never
  numbers; NaN and +-inf are rejected everywhere.
"""

from __future__ import annotations

import json
import math
import random
import threading
from typing import Any, Optional

from configs.schema import EnvConfig
from env.rewards import point_window
from env.tool import Tool, ToolError, ToolOutput, resolve_tools
from env.types import ToolCall

TIME_TOLERANCE_S = 1.0
MIN_BBOX_SIDE = 0.05
MAX_QUERY_CHARS = 500

_TIME = {"type": "number", "minimum": 0}
TOOL_NAMES: tuple[str, ...] = ("temporal_zoom", "spatial_zoom", "temporal_search", "get_frame")


def _object(properties: dict, required: list[str]) -> dict:
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def builtin_tools(cfg: EnvConfig) -> dict[str, Tool]:
    """The four built-in tools with this config's caps (frames per call, search hits) and sizes."""
    zoom_size, crop_size = tuple(cfg.zoom_size), tuple(cfg.crop_size)
    return {t.name: t for t in (
        Tool("temporal_zoom",
             "Look closer at a time window: returns num_frames frames sampled uniformly in [start, end] "
             "seconds, each with its timestamp.",
             _object({"start": {**_TIME, "description": "Window start, in seconds from the beginning of the video."},
                      "end": {**_TIME, "description": "Window end, in seconds; must be greater than start."},
                      "num_frames": {"type": "integer", "minimum": 1, "maximum": int(cfg.max_frames_per_call),
                                     "description": "How many frames to sample in the window."}},
                     ["start", "end", "num_frames"]),
             run=lambda video, a: _run_temporal_zoom(video, a, zoom_size), check=_semantic_temporal_zoom,
             frame_cost=lambda a: a["num_frames"], label=lambda a: f"zoom {a['start']:.1f}-{a['end']:.1f}s"),
        Tool("spatial_zoom",
             "Crop a region of the frame at one moment and return it at higher resolution.",
             _object({"time": {**_TIME, "description": "The moment, in seconds."},
                      "bbox": {"type": "array", "minItems": 4, "maxItems": 4,
                               "items": {"type": "number", "minimum": 0, "maximum": 1},
                               "description": "[x1, y1, x2, y2] as fractions of the frame width and height in "
                                              f"[0, 1], x1 < x2, y1 < y2, each side at least {MIN_BBOX_SIDE}."}},
                     ["time", "bbox"]),
             run=lambda video, a: _run_spatial_zoom(video, a, crop_size), check=_semantic_spatial_zoom,
             frame_cost=lambda a: 1, label=lambda a: f"crop @{a['time']:.1f}s"),
        Tool("temporal_search",
             "Find the moments whose captions or subtitles best match a text query; returns time "
             "spans with their text, best first. Only for videos that have captions.",
             _object({"query": {"type": "string", "minLength": 1, "maxLength": MAX_QUERY_CHARS,
                                "description": "What to look for, in words."},
                      "top_k": {"type": "integer", "minimum": 1, "maximum": int(cfg.search_top_k),
                                "description": "How many moments to return."}},
                     ["query", "top_k"]),
             run=_run_temporal_search, check=_semantic_temporal_search, frame_cost=lambda a: 0,
             label=lambda a: f"search {a['query'][:30]!r}"),
        Tool("get_frame",
             "Return the single frame at one moment, with its timestamp.",
             _object({"time": {**_TIME, "description": "The moment, in seconds."}}, ["time"]),
             run=lambda video, a: _run_get_frame(video, a, zoom_size), check=_semantic_get_frame,
             frame_cost=lambda a: 1, label=lambda a: f"frame @{a['time']:.1f}s"),
    )}


_RESOLVED: dict[tuple, dict[str, Tool]] = {}
_RESOLVED_LOCK = threading.Lock()


def load_tools(cfg: EnvConfig) -> dict[str, Tool]:
    """The tools `cfg.tools` names, resolved once per process and config (a user's module is imported here)."""
    key = (tuple(cfg.tools), cfg.max_frames_per_call, cfg.search_top_k, tuple(cfg.zoom_size), tuple(cfg.crop_size))
    with _RESOLVED_LOCK:
        if key not in _RESOLVED:
            _RESOLVED[key] = resolve_tools(cfg.tools, builtin_tools(cfg))
        return _RESOLVED[key]


def tool_schemas(cfg: EnvConfig, *, include_search: bool = True) -> list[dict]:
    """The tools of `cfg` as the chat template shows them (fresh copies the caller may edit);
    include_search=False leaves temporal_search out, for prompts of videos without captions."""
    return [t.schema for t in load_tools(cfg).values() if include_search or t.name != "temporal_search"]


def validate_call(call: ToolCall, tools: dict[str, Tool], duration: float) -> tuple[Optional[dict], Optional[str]]:
    """(normalised arguments, None) if `call` names one of `tools` and may run, else (None, the error)."""
    name = call.name
    if not isinstance(name, str) or name not in tools:
        return None, f"unknown tool {ascii(str(name)[:40])}; the tools are: {', '.join(tools)}."
    return tools[name].validate(call.arguments, duration)


# ---------------------------------------------------------------- the built-ins' runs


def _run_temporal_zoom(video: Any, args: dict, size: tuple[int, int]) -> ToolOutput:
    start, end, n = args["start"], args["end"], args["num_frames"]
    frames, _ = video.get_frames([start + (end - start) * (i + 0.5) / n for i in range(n)], size)
    return ToolOutput(f"{len(frames)} frame(s) from {start:.1f}s to {end:.1f}s:", frames, (start, end))


def _run_get_frame(video: Any, args: dict, size: tuple[int, int]) -> ToolOutput:
    frames, _ = video.get_frames([args["time"]], size)
    return ToolOutput("1 frame:", frames, point_window(args["time"]))


def _run_spatial_zoom(video: Any, args: dict, box: tuple[int, int]) -> ToolOutput:
    x1, y1, x2, y2 = args["bbox"]
    cw, ch = max(1, round((x2 - x1) * video.width)), max(1, round((y2 - y1) * video.height))
    scale = min(box[0] / cw, box[1] / ch)  # fit the crop in the box, upscaling small crops
    frames, _ = video.get_frames([args["time"]], (max(1, round(cw * scale)), max(1, round(ch * scale))),
                                 crop=(x1, y1, x2, y2))
    return ToolOutput(f"crop [{x1:.2f}, {y1:.2f}, {x2:.2f}, {y2:.2f}]:", frames, point_window(args["time"]))


def _run_temporal_search(video: Any, args: dict) -> ToolOutput:
    if not video.captions:
        raise ToolError("temporal_search: this video has no captions or subtitles to search; "
                        "use temporal_zoom or get_frame instead.")
    hits = video.search(args["query"], args["top_k"])
    if not hits:
        return ToolOutput("no matching moment found.")
    rows = [f"{i + 1}. {c.start:.1f}s-{c.end:.1f}s (score {s:.2f}): {c.text}" for i, (c, s) in enumerate(hits)]
    return ToolOutput("best matches:\n" + "\n".join(rows))


def looks_like_pixels(bbox: Any) -> bool:
    return isinstance(bbox, list) and any(isinstance(v, (int, float)) and not isinstance(v, bool)
                                          and 1 < v < math.inf for v in bbox)


def check_schema(value: Any, schema: dict, path: str) -> Optional[str]:
    """The first way `value` breaks `schema` (the JSON-Schema subset weft's tools use), or None."""
    kind = schema.get("type")
    if kind is not None and not _is_type(value, kind):
        return f"{path} must be {_type_words(kind)}, got {_describe(value)}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{path} must be one of {', '.join(json.dumps(v) for v in schema['enum'])}, got {_describe(value)}"
    if kind == "object":
        return _check_object(value, schema, path)
    if kind == "array":
        return _check_array(value, schema, path)
    if kind in ("number", "integer"):
        return _check_number(value, schema, path)
    if kind == "string":
        return _check_string(value, schema, path)
    return None


def _check_object(value: dict, schema: dict, path: str) -> Optional[str]:
    props = schema.get("properties", {})
    missing = [k for k in schema.get("required", []) if k not in value]
    if missing:
        return (f"missing required argument(s) {', '.join(repr(k) for k in missing)}; "
                f"it takes {_signature(schema)}")
    if schema.get("additionalProperties") is False:
        extra = [k for k in value if k not in props]
        if extra:
            return (f"unexpected argument(s) {', '.join(ascii(str(k)[:40]) for k in extra[:5])}; "
                    f"it takes only {_signature(schema)}")
    for key, sub in props.items():
        if key in value:
            err = check_schema(value[key], sub, key if path == "arguments" else f"{path}.{key}")
            if err is not None:
                return err
    return None


def _check_array(value: list, schema: dict, path: str) -> Optional[str]:
    lo, hi = schema.get("minItems"), schema.get("maxItems")
    if lo is not None and len(value) < lo or hi is not None and len(value) > hi:
        want = f"exactly {lo}" if lo == hi else f"{lo if lo is not None else 0}..{hi if hi is not None else 'any'}"
        return f"{path} must have {want} items, got {len(value)}"
    items = schema.get("items")
    if items:
        for i, v in enumerate(value):
            err = check_schema(v, items, f"{path}[{i}]")
            if err is not None:
                return err
    return None


def _check_number(value: float, schema: dict, path: str) -> Optional[str]:
    if isinstance(value, float) and not math.isfinite(value):
        return f"{path} must be a finite number, got {value!r}"
    if isinstance(value, int) and abs(value) > 1e300:  # would overflow float() below
        return f"{path} is far too large"
    lo, hi = schema.get("minimum"), schema.get("maximum")
    if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
        return f"{path} must be > {_num(schema['exclusiveMinimum'])}, got {_num(value)}"
    if lo is not None and value < lo or hi is not None and value > hi:
        if hi is None:
            return f"{path} must be >= {_num(lo)}, got {_num(value)}"
        if lo is None:
            return f"{path} must be <= {_num(hi)}, got {_num(value)}"
        return f"{path} must be in [{_num(lo)}, {_num(hi)}], got {_num(value)}"
    return None


def _check_string(value: str, schema: dict, path: str) -> Optional[str]:
    lo, hi = schema.get("minLength"), schema.get("maxLength")
    if lo is not None and len(value) < lo:
        return f"{path} must have at least {lo} character(s), got {len(value)}"
    if hi is not None and len(value) > hi:
        return f"{path} must have at most {hi} characters, got {len(value)}"
    return None


def _is_type(value: Any, kind: str) -> bool:
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list)
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if isinstance(value, bool):  # bool is an int subclass in Python, never a number in JSON
        return False
    if kind == "number":
        return isinstance(value, (int, float))
    if kind == "integer":
        return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value) and value.is_integer())
    return False


def normalise(value: Any, schema: dict) -> Any:
    """Copy `value` (already schema-valid) into plain Python types: float, int, stripped strings."""
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        return {k: normalise(v, props.get(k, {})) for k, v in value.items()}
    if kind == "array":
        return [normalise(v, schema.get("items", {})) for v in value]
    if kind == "integer":
        return int(value)
    if kind == "number":
        return float(value) + 0.0  # + 0.0 turns -0.0 into 0.0
    if kind == "string":
        return value.strip()
    return value


# ---------------------------------------------------------------- semantic checks


def _clamp_time(args: dict, key: str, duration: float) -> Optional[str]:
    t = args[key]
    if t > duration + TIME_TOLERANCE_S:
        return (f"{key} = {_num(t)} s is past the end of the video (duration {_num(duration)} s); "
                f"use a time in [0, {_num(duration)}]")
    args[key] = min(t, duration)
    return None


def _semantic_temporal_zoom(args: dict, duration: float) -> Optional[str]:
    err = _clamp_time(args, "start", duration) or _clamp_time(args, "end", duration)
    if err:
        return err
    if not args["start"] < args["end"]:
        return (f"end ({_num(args['end'])}) must be greater than start ({_num(args['start'])}); "
                "for a single moment use get_frame")
    return None


def _semantic_spatial_zoom(args: dict, duration: float) -> Optional[str]:
    err = _clamp_time(args, "time", duration)
    if err:
        return err
    x1, y1, x2, y2 = args["bbox"]
    if not (x1 < x2 and y1 < y2):
        return (f"bbox {_box(args['bbox'])} is inverted: it is [x1, y1, x2, y2] with x1 < x2 and y1 < y2 "
                "(top-left corner, then bottom-right)")
    if x2 - x1 < MIN_BBOX_SIDE or y2 - y1 < MIN_BBOX_SIDE:
        return (f"bbox {_box(args['bbox'])} is too small: each side must be at least {MIN_BBOX_SIDE} "
                "of the frame")
    return None


def _semantic_temporal_search(args: dict, duration: float) -> Optional[str]:
    if not args["query"]:
        return "query is blank; say in words what to look for"
    return None


def _semantic_get_frame(args: dict, duration: float) -> Optional[str]:
    return _clamp_time(args, "time", duration)


# ---------------------------------------------------------------- words


def _signature(schema: dict) -> str:
    props = schema.get("properties", {})
    return "(" + ", ".join(f"{k}: {_schema_words(v)}" for k, v in props.items()) + ")"


def _schema_words(schema: dict) -> str:
    kind = schema.get("type", "any")
    if kind == "array" and schema.get("minItems") is not None and schema.get("minItems") == schema.get("maxItems"):
        return f"an array of {schema['minItems']} {schema.get('items', {}).get('type', 'value')}s"
    return _type_words(kind)


def _type_words(kind: str) -> str:
    return {"number": "a number", "integer": "an integer", "string": "a string", "array": "an array",
            "object": "an object", "boolean": "a boolean"}.get(kind, kind)


def _describe(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"a boolean ({str(v).lower()})"
    if isinstance(v, (int, float)):
        return f"the number {_num(v)}"
    if isinstance(v, str):
        return f"the string {ascii(v[:40])}{'...' if len(v) > 40 else ''}"
    if isinstance(v, list):
        return f"an array of {len(v)}"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _num(x: Any) -> str:
    if isinstance(x, int) and abs(x) > 10**15:  # str() of a huge int can itself raise
        return "a very large integer"
    if isinstance(x, float):
        if not math.isfinite(x):
            return repr(x)
        return f"{x:.6g}"
    return str(x)


def _box(b: list) -> str:
    return "[" + ", ".join(_num(v) for v in b) + "]"


# ---------------------------------------------------------------- samplers (for checkers and tests)


def _params(schema: dict) -> tuple[str, dict]:
    """Accept a full OpenAI tool dict, its "function" part, or the bare parameters schema."""
    fn = schema.get("function", schema)
    return fn.get("name", ""), fn.get("parameters", fn)


def sample_valid_args(schema: dict, rng: random.Random, duration: float) -> dict:
    """Arguments that satisfy the tool's schema and its semantic rules (validate_call accepts them)."""
    name, params = _params(schema)
    args = {k: _sample_value(sub, rng, duration) for k, sub in params.get("properties", {}).items()}
    return _make_semantic(name, args, rng, duration)


def _sample_value(schema: dict, rng: random.Random, duration: float) -> Any:
    kind = schema.get("type")
    if "enum" in schema:
        return rng.choice(list(schema["enum"]))
    if kind == "integer":
        return rng.randint(int(schema.get("minimum", 0)), int(schema.get("maximum", 100)))
    if kind == "number":
        lo = float(schema.get("minimum", schema.get("exclusiveMinimum", 0.0)))
        hi = float(schema.get("maximum", duration))
        v = rng.uniform(lo, hi)
        return v if v > schema.get("exclusiveMinimum", -math.inf) else (lo + hi) / 2 or hi
    if kind == "string":
        n = rng.randint(max(1, schema.get("minLength", 1)), min(40, schema.get("maxLength", 40)))
        return "".join(rng.choice("abcdefghij klmnop") for _ in range(n)).strip() or "a"
    if kind == "array":
        n = rng.randint(schema.get("minItems", 0), schema.get("maxItems", 4))
        return [_sample_value(schema.get("items", {}), rng, duration) for _ in range(n)]
    if kind == "boolean":
        return rng.random() < 0.5
    return None


def _make_semantic(name: str, args: dict, rng: random.Random, duration: float) -> dict:
    """Repair schema-random values so the tool-specific rules hold too."""
    if name == "temporal_zoom":
        a, b = sorted(rng.uniform(0, duration) for _ in range(2))
        if b - a < 1e-3:
            a, b = 0.0, duration
        args["start"], args["end"] = a, b
    if name in ("spatial_zoom", "get_frame"):
        args["time"] = rng.uniform(0, duration)
    if name == "spatial_zoom":
        w = rng.uniform(MIN_BBOX_SIDE * 1.01, 1.0)
        h = rng.uniform(MIN_BBOX_SIDE * 1.01, 1.0)
        x1, y1 = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
        args["bbox"] = [x1, y1, min(1.0, x1 + w), min(1.0, y1 + h)]
    return args


def sample_invalid_args(schema: dict, rng: random.Random, duration: float) -> list[tuple[str, Any]]:
    """(kind, arguments) pairs, each breaking the schema or a semantic rule in one named way.

    Pass the schema from tool_schemas(cfg) so the caps match the cfg given to validate_call."""
    name, params = _params(schema)
    base = sample_valid_args(schema, rng, duration)
    props = params.get("properties", {})
    out: list[tuple[str, Any]] = [("not_an_object", [base])]
    for key in params.get("required", []):
        out.append((f"missing:{key}", {k: v for k, v in base.items() if k != key}))
    if params.get("additionalProperties") is False:
        out.append(("extra_key", {**base, "extra_" + str(rng.randint(0, 99)): 1}))
    for key, sub in props.items():
        for kind, bad in _bad_values(sub, rng):
            out.append((f"{kind}:{key}", {**base, key: bad}))
    out.extend(_semantic_invalid(name, base, rng, duration))
    return out


def _bad_values(schema: dict, rng: random.Random) -> list[tuple[str, Any]]:
    kind = schema.get("type")
    bad: list[tuple[str, Any]] = [("null", None), ("object", {"v": 1})]
    if kind in ("number", "integer"):
        bad += [("string", str(rng.randint(0, 9))), ("bool", rng.random() < 0.5), ("list", [1.0]),
                ("nan", float("nan")), ("inf", rng.choice([float("inf"), float("-inf")]))]
        if "minimum" in schema:
            bad.append(("below_minimum", schema["minimum"] - rng.uniform(0.01, 100) if kind == "number"
                        else schema["minimum"] - rng.randint(1, 100)))
        if "maximum" in schema:
            bad.append(("above_maximum", schema["maximum"] + rng.uniform(0.01, 100) if kind == "number"
                        else schema["maximum"] + rng.randint(1, 100)))
    if kind == "integer":
        bad.append(("fractional", schema.get("minimum", 0) + 0.5))
    if kind == "string":
        bad += [("number", rng.uniform(0, 9)), ("list", ["a"])]
        if "enum" in schema:
            bad.append(("not_in_enum", "zz-" + str(rng.randint(0, 99))))
        if schema.get("minLength"):
            bad.append(("too_short", ""))
        if "maxLength" in schema:
            bad.append(("too_long", "x" * (schema["maxLength"] + rng.randint(1, 50))))
    if kind == "array":
        items = schema.get("items", {})
        good = [_sample_value(items, rng, 1.0) for _ in range(schema.get("minItems", 1))]
        bad += [("string", "[0, 0, 1, 1]")]
        if schema.get("minItems"):
            bad.append(("too_few_items", good[:-1]))
        if "maxItems" in schema:
            bad.append(("too_many_items", good + [0.5] * (schema["maxItems"] - len(good) + 1)))
        for item_kind, v in _bad_values(items, rng):
            bad.append((f"item_{item_kind}", [v] + good[1:]))
    return bad


def _semantic_invalid(name: str, base: dict, rng: random.Random, duration: float) -> list[tuple[str, dict]]:
    past = duration + TIME_TOLERANCE_S + rng.uniform(0.5, 100)
    out: list[tuple[str, dict]] = []
    if name == "temporal_zoom":
        t = rng.uniform(0, duration)
        out += [("start_not_before_end", {**base, "start": t, "end": t}),
                ("reversed_window", {**base, "start": base["end"], "end": base["start"]}),
                ("end_past_duration", {**base, "end": past}),
                ("start_past_duration", {**base, "start": past, "end": past + 1})]
    if name in ("spatial_zoom", "get_frame"):
        out.append(("time_past_duration", {**base, "time": past}))
    if name == "spatial_zoom":
        x1, y1, x2, y2 = base["bbox"]
        out += [("bbox_inverted_x", {**base, "bbox": [x2, y1, x1, y2]}),
                ("bbox_inverted_y", {**base, "bbox": [x1, y2, x2, y1]}),
                ("bbox_too_small", {**base, "bbox": [0.5, 0.5, 0.5 + MIN_BBOX_SIDE / 2, 0.9]})]
    if name == "temporal_search":
        out.append(("blank_query", {**base, "query": " " * rng.randint(1, 5)}))
    return out
