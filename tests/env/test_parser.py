"""The action parser: every malformation gives a precise error; valid turns parse; fuzz never raises."""

import json
import random
import time

import pytest

from env.fuzz import fuzz_actions
from env.parser import MAX_CALL_CHARS, MAX_ERRORS, format_tool_calls_example, parse_action


def call(name="get_frame", **args):
    return "<tool_call>" + json.dumps({"name": name, "arguments": args}) + "</tool_call>"


def test_valid_multi_call_turn_with_think_and_surrounding_text():
    text = ("I will look twice. <think>zoom in, then crop</think>\n"
            + call("temporal_zoom", start=1.5, end=9, num_frames=4) + " and "
            + call("spatial_zoom", time=3, bbox=[0.1, 0.2, 0.5, 0.6]) + " done")
    p = parse_action(text)
    assert p.errors == []
    assert p.think == "zoom in, then crop"
    assert [c.name for c in p.calls] == ["temporal_zoom", "spatial_zoom"]
    assert p.calls[0].arguments == {"start": 1.5, "end": 9, "num_frames": 4}
    assert p.calls[1].arguments["bbox"] == [0.1, 0.2, 0.5, 0.6]
    assert p.answer is None


def test_valid_answer():
    p = parse_action("<think>it is the red one</think>\n<answer>  B  </answer>")
    assert p.errors == [] and p.answer == "B" and p.calls == []


def test_arguments_as_json_string_is_accepted():
    text = '<tool_call>{"name": "get_frame", "arguments": "{\\"time\\": 4.5}"}</tool_call>'
    p = parse_action(text)
    assert p.errors == [] and p.calls[0].arguments == {"time": 4.5}


def test_leading_close_think_from_template_prompt_is_accepted():
    p = parse_action("reasoning here</think><answer>C</answer>")
    assert p.errors == [] and p.think == "reasoning here" and p.answer == "C"


@pytest.mark.parametrize("text, expected", [
    (call()[:-len("</tool_call>")], "<tool_call> opened at char 0 is never closed"),
    ("<answer>B", "<answer> opened at char 0 is never closed"),
    ("text </tool_call>", "</tool_call> at char 5 closes nothing"),
    ("<answer>A</answer></answer>", "</answer> at char 18 closes nothing"),
    ("<tool_call><tool_call>{}</tool_call>", "nested tag: <tool_call> at char 11 is inside the <tool_call> opened at char 0"),
    ("<think><answer>x</answer></think>", "nested tag: <answer> at char 7 is inside the <think>"),
    ("<answer>B</tool_call>", "</tool_call> at char 9 does not match the <answer> opened at char 0"),
    ('<tool_call>{"name": "get_frame" "arguments": {}}</tool_call>',
     "invalid JSON: Expecting ',' delimiter at line 1 column 22"),
    ('<tool_call>{"name": "get_frame", "arguments": {"time": 1}</tool_call>', "invalid JSON"),
    ("<tool_call>[1, 2]</tool_call>", 'the JSON must be an object with "name" and "arguments", got an array'),
    ('<tool_call>"get_frame"</tool_call>', "the JSON must be an object"),
    ('<tool_call>{"name": "get_frame"}</tool_call>', 'missing key(s) "arguments"'),
    ('<tool_call>{"arguments": {}}</tool_call>', 'missing key(s) "name"'),
    ('<tool_call>{"name": "get_frame", "arguments": {}, "id": 7}</tool_call>', "unexpected key(s) 'id'"),
    ('<tool_call>{"name": 3, "arguments": {}}</tool_call>', '"name" must be a string (the tool name), got a number'),
    ('<tool_call>{"name": "get_frame", "arguments": [1]}</tool_call>', '"arguments" must be a JSON object like'),
    ('<tool_call>{"name": "get_frame", "arguments": "time=3"}</tool_call>', "got a string that is not one"),
    ('<tool_call>{"name": "get_frame", "arguments": "[1]"}</tool_call>', "got a string that is not one (an array)"),
    ('<tool_call>{"name": "get_frame", "arguments": {"time": NaN}}</tool_call>', "NaN is not valid JSON"),
    ('<tool_call>{"name": "get_frame", "arguments": {"time": -Infinity}}</tool_call>', "-Infinity is not valid JSON"),
    ("<tool_call>" + "[" * 40 + "]" * 40 + "</tool_call>", "nested more than"),
    ("<tool_call>   </tool_call>", "the block is empty"),
    ("<tool_call>```json\n{}\n```</tool_call>", "remove the ``` code fence"),
    ("<tool_call>" + "1" * (MAX_CALL_CHARS + 1) + "</tool_call>", f"at most {MAX_CALL_CHARS}"),
    ("<answer>A</answer> <answer>B</answer>", "2 <answer> blocks (at chars 0, 19); give exactly one"),
    ("<answer> \n </answer>", "the <answer> at char 0 is empty"),
    ("I think it is B.", "the turn has neither a <tool_call> nor an <answer>"),
    ("", "the turn has neither a <tool_call> nor an <answer>"),
    ("<think>only thinking</think>", "the turn has neither"),
    ("<Tool_Call>{}</Tool_Call>", "malformed tag '<Tool_Call>' at char 0"),
    ('<tool_call name="get_frame">{}</tool_call>', "malformed tag '<tool_call name=\"get_frame\">'"),
    ("<answer >B</answer >", "malformed tag '<answer >'"),
])
def test_each_malformation_has_its_error(text, expected):
    p = parse_action(text)
    assert any(expected in e for e in p.errors), (expected, p.errors)
    assert p.calls == [], "a malformed call must not be returned"


def test_malformed_answers_give_no_answer():
    for text in ["<answer>A</answer><answer>B</answer>", "<answer></answer>", "<answer>B"]:
        assert parse_action(text).answer is None, text


def test_neither_error_shows_the_canonical_example():
    p = parse_action("no tags")
    assert format_tool_calls_example() in p.errors[0]
    assert "<tool_call>" in format_tool_calls_example() and "<answer>" in format_tool_calls_example()


def test_too_many_calls_keeps_the_first_ones():
    text = "".join(call(time=float(i)) for i in range(7))
    p = parse_action(text, max_calls=3)
    assert [c.arguments["time"] for c in p.calls] == [0.0, 1.0, 2.0]
    assert len(p.errors) == 1 and "7 tool calls in one turn, at most 3" in p.errors[0]


def test_answer_with_calls_answer_wins():
    p = parse_action(call(time=1.0) + call(time=2.0) + "<answer>D</answer>")
    assert p.answer == "D" and p.calls == []
    assert len(p.errors) == 1 and "the 2 <tool_call> block(s) were ignored" in p.errors[0]


def test_good_calls_survive_a_bad_sibling():
    p = parse_action(call(time=1.0) + "<tool_call>{oops}</tool_call>" + call(time=2.0))
    assert [c.arguments["time"] for c in p.calls] == [1.0, 2.0]
    assert len(p.errors) == 1 and "<tool_call> #2" in p.errors[0]


def test_error_list_is_capped():
    p = parse_action("</answer>" * 50)
    assert len(p.errors) == MAX_ERRORS + 1
    assert p.errors[-1].startswith(f"... and {50 - MAX_ERRORS} more")


def test_non_string_input_does_not_raise():
    for bad in [None, 3, b"<answer>A</answer>", ["<answer>A</answer>"]]:
        p = parse_action(bad)  # type: ignore[arg-type]
        assert p.errors and p.answer is None and p.calls == []


def test_control_characters_are_escaped_in_errors():
    p = parse_action('<tool_call>{"name": "\x00\u202e", "x": 1}</tool_call>')
    assert p.errors and "\x00" not in p.errors[0] and "\u202e" not in p.errors[0]


@pytest.mark.parametrize("text", [
    "<tool_call>" * 90_000,  # ~1 MB of openers
    "</tool_call>" * 80_000,
    "<tool_call>" + "[" * 1_000_000 + "</tool_call>",
    "<tool_call>" + '{"a":' * 200_000 + "</tool_call>",
    "<tool_call>" + '"\\"' * 300_000 + "</tool_call>",
    "<tool_call>" + '{"a":' * 3_900 + "</tool_call>",  # under the size cap: the depth scan runs
    call(time=1.0) * 40_000,  # ~2 MB of valid calls
    "<Tool_Call>" * 90_000,
    "<" * 1_000_000,
])
def test_huge_adversarial_inputs_are_fast(text):
    t0 = time.perf_counter()
    p = parse_action(text)
    elapsed = time.perf_counter() - t0
    assert p.errors
    assert len(p.errors) <= MAX_ERRORS + 1
    assert elapsed < 2.0, f"{elapsed:.2f}s for {len(text)} chars"


def test_parse_time_is_linear_in_input():
    def timed(k):
        t0 = time.perf_counter()
        parse_action("<tool_call>x" * k)
        return time.perf_counter() - t0
    small, big = min(timed(10_000) for _ in range(3)), min(timed(80_000) for _ in range(3))
    assert big < 8 * small * 3, f"8x input took {big / small:.1f}x time"


def test_fuzz_10000_actions_never_raise_and_are_fast():
    seed = random.SystemRandom().randrange(2**32)
    actions = fuzz_actions(random.Random(seed), 10_000)
    assert len(actions) == 10_000
    t0 = time.perf_counter()
    parsed = [parse_action(a) for a in actions]
    elapsed = time.perf_counter() - t0
    assert elapsed < 5.0, f"seed {seed}: {elapsed:.2f}s"
    assert all(isinstance(e, str) for p in parsed for e in p.errors)
    # The mix really contains valid and broken turns.
    assert sum(1 for p in parsed if not p.errors and p.calls) > 500, seed
    assert sum(1 for p in parsed if p.errors) > 3000, seed
    assert sum(1 for p in parsed if p.answer is not None) > 100, seed
