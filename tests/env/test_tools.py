"""Tool schemas and validation: the validator accepts exactly what the schema (plus semantics) allows."""

import copy
import json
import math
import random

import pytest

from configs.schema import EnvConfig
from env.fuzz import fuzz_actions
from env.parser import parse_action
from env.tools import (MAX_QUERY_CHARS, MIN_BBOX_SIDE, TIME_TOLERANCE_S, TOOL_NAMES, builtin_tools, check_schema,
                       sample_invalid_args, sample_valid_args, tool_schemas, validate_call)
from env.types import ToolCall

CFG = EnvConfig(max_frames_per_call=12, search_top_k=7)
TOOL_SCHEMAS = [t.schema for t in builtin_tools(EnvConfig()).values()]  # the defaults' caps: 16 frames, top 5


def validate(name, args, *, duration=60.0, cfg=CFG):
    return validate_call(ToolCall(name=name, arguments=args), builtin_tools(cfg), duration)


def fresh_rng():
    seed = random.SystemRandom().randrange(2**32)
    return random.Random(seed), seed


def test_schemas_are_openai_tool_format_with_exact_names():
    assert TOOL_NAMES == ("temporal_zoom", "spatial_zoom", "temporal_search", "get_frame")
    expected_args = {"temporal_zoom": {"start", "end", "num_frames"}, "spatial_zoom": {"time", "bbox"},
                     "temporal_search": {"query", "top_k"}, "get_frame": {"time"}}
    for tool in TOOL_SCHEMAS:
        assert tool["type"] == "function"
        fn = tool["function"]
        assert set(fn) == {"name", "description", "parameters"} and fn["description"]
        params = fn["parameters"]
        assert params["type"] == "object" and params["additionalProperties"] is False
        assert set(params["properties"]) == expected_args[fn["name"]] == set(params["required"])
        for prop in params["properties"].values():
            assert prop["description"]
    json.dumps(TOOL_SCHEMAS)  # serialisable as the chat template needs


def test_tool_schemas_fill_caps_and_do_not_share_state():
    s = {t["function"]["name"]: t["function"]["parameters"]["properties"] for t in tool_schemas(CFG)}
    assert s["temporal_zoom"]["num_frames"]["maximum"] == 12
    assert s["temporal_search"]["top_k"]["maximum"] == 7
    assert TOOL_SCHEMAS[0]["function"]["parameters"]["properties"]["num_frames"]["maximum"] == 16
    mutated = tool_schemas(CFG)
    mutated[0]["function"]["parameters"]["properties"]["num_frames"]["maximum"] = 999
    assert validate("temporal_zoom", {"start": 0, "end": 5, "num_frames": 13})[1] is not None
    names = [t["function"]["name"] for t in tool_schemas(CFG, include_search=False)]
    assert names == ["temporal_zoom", "spatial_zoom", "get_frame"]


@pytest.mark.parametrize("max_frames, top_k", [(16, 5), (3, 1), (64, 50)])
def test_sampled_valid_args_are_accepted(max_frames, top_k):
    cfg = EnvConfig(max_frames_per_call=max_frames, search_top_k=top_k)
    rng, seed = fresh_rng()
    for schema in tool_schemas(cfg):
        name = schema["function"]["name"]
        for _ in range(300):
            duration = rng.uniform(0.5, 7200)
            args = sample_valid_args(schema, rng, duration)
            assert check_schema(args, schema["function"]["parameters"], "arguments") is None
            out, err = validate(name, args, duration=duration, cfg=cfg)
            assert err is None, (seed, name, args, err)
            assert set(out) == set(args)


def test_each_kind_of_invalid_args_is_rejected():
    rng, seed = fresh_rng()
    kinds_seen = set()
    for schema in tool_schemas(CFG):
        name = schema["function"]["name"]
        for _ in range(20):
            duration = rng.uniform(5, 600)
            cases = sample_invalid_args(schema, rng, duration)
            for kind, args in cases:
                kinds_seen.add(kind.split(":")[0])
                out, err = validate(name, args, duration=duration)
                assert out is None and err, (seed, name, kind, args)
                assert err.startswith(name + ": "), err
    # Every schema keyword and semantic rule we claim to enforce was exercised.
    for kind in ["missing", "extra_key", "string", "bool", "null", "nan", "inf", "below_minimum",
                 "above_maximum", "fractional", "too_few_items", "too_many_items", "item_string",
                 "too_long", "too_short", "start_not_before_end", "time_past_duration",
                 "bbox_inverted_x", "bbox_inverted_y", "bbox_too_small", "blank_query"]:
        assert kind in kinds_seen, kind


def test_validation_is_driven_by_the_schema():
    schema = copy.deepcopy(TOOL_SCHEMAS[3]["function"]["parameters"])
    assert check_schema({"time": 5}, schema, "arguments") is None
    schema["properties"]["time"]["maximum"] = 4
    assert "must be in [0, 4], got 5" in check_schema({"time": 5}, schema, "arguments")
    schema["properties"]["time"]["type"] = "integer"
    assert "must be an integer" in check_schema({"time": 1.5}, schema, "arguments")


@pytest.mark.parametrize("name, args, expected", [
    ("zoom", {"time": 1}, "unknown tool 'zoom'; the tools are: temporal_zoom, spatial_zoom"),
    ("", {}, "unknown tool ''"),
    ("temporal_zoom", {"start": 0, "end": 5}, "missing required argument(s) 'num_frames'"),
    ("temporal_zoom", {"start": 0, "end": 5, "num_frames": 4, "fps": 2}, "unexpected argument(s) 'fps'"),
    ("temporal_zoom", {"start": 0, "end": 5, "num_frames": 13}, "num_frames must be in [1, 12], got 13"),
    ("temporal_zoom", {"start": 0, "end": 5, "num_frames": 0}, "num_frames must be in [1, 12], got 0"),
    ("temporal_zoom", {"start": 0, "end": 5, "num_frames": 2.5}, "num_frames must be an integer, got the number 2.5"),
    ("temporal_zoom", {"start": 0, "end": 5, "num_frames": True}, "num_frames must be an integer, got a boolean"),
    ("temporal_zoom", {"start": "0", "end": 5, "num_frames": 2}, "start must be a number, got the string '0'"),
    ("temporal_zoom", {"start": 0, "end": False, "num_frames": 2}, "end must be a number, got a boolean (false)"),
    ("temporal_zoom", {"start": -1, "end": 5, "num_frames": 2}, "start must be >= 0, got -1"),
    ("temporal_zoom", {"start": 5, "end": 5, "num_frames": 2}, "end (5) must be greater than start (5)"),
    ("temporal_zoom", {"start": 9, "end": 3, "num_frames": 2}, "end (3) must be greater than start (9)"),
    ("temporal_zoom", {"start": 0, "end": 99, "num_frames": 2}, "end = 99 s is past the end of the video (duration 60 s)"),
    ("temporal_zoom", {"start": 60.5, "end": 61, "num_frames": 2}, "end (60) must be greater than start (60)"),
    ("temporal_zoom", {"start": float("nan"), "end": 3, "num_frames": 2}, "start must be a finite number"),
    ("temporal_zoom", {"start": 0, "end": float("inf"), "num_frames": 2}, "end must be a finite number"),
    ("temporal_zoom", {"start": 0, "end": 1e308, "num_frames": 2}, "past the end of the video"),
    ("get_frame", {"time": 10**400}, "time is far too large"),
    ("get_frame", {"time": None}, "time must be a number, got null"),
    ("get_frame", [], "arguments must be an object, got an array of 0"),
    ("get_frame", None, "arguments must be an object, got null"),
    ("spatial_zoom", {"time": 1, "bbox": [0.1, 0.1, 0.5]}, "bbox must have exactly 4 items, got 3"),
    ("spatial_zoom", {"time": 1, "bbox": "0,0,1,1"}, "bbox must be an array, got the string"),
    ("spatial_zoom", {"time": 1, "bbox": [0.1, 0.1, 0.5, 1.2]}, "bbox[3] must be in [0, 1], got 1.2"),
    ("spatial_zoom", {"time": 1, "bbox": [10, 20, 300, 200]}, "not pixels"),
    ("spatial_zoom", {"time": 1, "bbox": [0.6, 0.1, 0.2, 0.5]}, "bbox [0.6, 0.1, 0.2, 0.5] is inverted"),
    ("spatial_zoom", {"time": 1, "bbox": [0.1, 0.5, 0.2, 0.1]}, "is inverted"),
    ("spatial_zoom", {"time": 1, "bbox": [0.1, 0.1, 0.12, 0.5]}, f"too small: each side must be at least {MIN_BBOX_SIDE}"),
    ("spatial_zoom", {"time": 1, "bbox": [0.1, 0.1, 0.5, True]}, "bbox[3] must be a number, got a boolean"),
    ("temporal_search", {"query": "", "top_k": 2}, "query must have at least 1 character(s), got 0"),
    ("temporal_search", {"query": "  \n ", "top_k": 2}, "query is blank"),
    ("temporal_search", {"query": "x" * (MAX_QUERY_CHARS + 1), "top_k": 2}, f"query must have at most {MAX_QUERY_CHARS}"),
    ("temporal_search", {"query": "dog", "top_k": 8}, "top_k must be in [1, 7], got 8"),
    ("temporal_search", {"query": 5, "top_k": 2}, "query must be a string, got the number 5"),
])
def test_exact_error_messages(name, args, expected):
    out, err = validate(name, args)
    assert out is None and expected in err, err


def test_search_without_captions_is_a_clear_error(small_demo_tasks):
    import dataclasses

    from env import VideoToolEnv

    env = VideoToolEnv(CFG)
    env.reset(dataclasses.replace(small_demo_tasks[0], captions=[]))
    obs, _, _, _, info = env.step('<tool_call>{"name": "temporal_search", "arguments": {"query": "dog", "top_k": 2}}</tool_call>')
    assert ("[temporal_search] error: temporal_search: this video has no captions or subtitles to search; "
            "use temporal_zoom or get_frame instead.") in obs.text
    assert info["tool_calls"] == 0 and info["format_errors"] == 1  # refused: a format error, no budget spent


def test_normalisation():
    out, err = validate("temporal_zoom", {"start": -0.0, "end": 60 + TIME_TOLERANCE_S, "num_frames": 8.0})
    assert err is None and out == {"start": 0.0, "end": 60.0, "num_frames": 8}
    assert isinstance(out["num_frames"], int) and math.copysign(1, out["start"]) == 1
    out, _ = validate("spatial_zoom", {"time": 3, "bbox": [0, 0, 1, 1]})
    assert out == {"time": 3.0, "bbox": [0.0, 0.0, 1.0, 1.0]} and all(isinstance(v, float) for v in out["bbox"])
    out, _ = validate("temporal_search", {"query": "  red car ", "top_k": 1})
    assert out["query"] == "red car"
    out, _ = validate("get_frame", {"time": 60.4})
    assert out == {"time": 60.0}


def test_fuzzed_calls_validate_without_raising():
    rng, seed = fresh_rng()
    accepted = rejected = 0
    for text in fuzz_actions(rng, 3000, duration=60.0):
        for c in parse_action(text).calls:
            out, err = validate_call(c, builtin_tools(CFG), 60.0)
            assert (out is None) != (err is None), seed
            if out is None:
                rejected += 1
                continue
            accepted += 1
            # Whatever is accepted is in range and finite.
            for v in out.values():
                for x in (v if isinstance(v, list) else [v]):
                    if isinstance(x, float):
                        assert math.isfinite(x), (seed, out)
            for key in ("start", "end", "time"):
                if key in out:
                    assert 0.0 <= out[key] <= 60.0, (seed, out)
    assert accepted > 100 and rejected > 100, (seed, accepted, rejected)
