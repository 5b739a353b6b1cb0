"""The action parser: one model turn (raw text) -> ParsedAction (think, tool calls, answer, errors).

A turn is free text with optional `<think>...</think>`, zero or more
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (run in
parallel) and at most one `<answer>...</answer>` (ends the episode). Every
malformation becomes one sentence in `errors`, written for the model: it is the
observation the model reads next, so it says what was wrong and what the right
form looks like. The parser never raises and runs in time linear in the input.

Decisions (the observation text and the format reward depend on them):
* Text outside the tags is allowed and ignored.
* A block opened while another is open is a *nested* tag: an error, and the
  inner tag is kept as plain text of the outer block. A closing tag that closes
  nothing is an error; so is a block still open at the end of the turn (it is
  dropped). Exception: a `</think>` before any other tag with no `<think>` is
  accepted, because chat templates often put `<think>` into the prompt.
* Several `<think>` blocks are joined with a newline; no error.
* A tool call's JSON must be an object with exactly the keys "name" (a string)
  and "arguments" (an object). `arguments` given as a JSON *string* that encodes
  an object is accepted without error: models emit it often and it is
  unambiguous. NaN/Infinity literals are rejected (they are not JSON).
  A malformed call is dropped; the well-formed calls of the turn are still
  returned (the env runs them and shows the errors next to their results).
* More than `max_calls` calls: the first `max_calls` are kept, the rest dropped,
  one error.
* An `<answer>` together with tool calls: the answer wins, the calls are ignored,
  one error. Several answers, or an empty one: `answer` stays None (the turn does
  not end the episode) and an error says so; this stops a model from hedging
  with two answers.
* A turn with no `<tool_call>` and no `<answer>` block at all is an error.
* At most MAX_ERRORS messages are listed; the rest are counted in a last one.
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional

from env.types import ParsedAction, ToolCall

MAX_ERRORS = 10  # messages listed per turn; more would flood the observation
MAX_CALL_CHARS = 20_000  # a single tool call's JSON; real calls are < 300 chars
MAX_JSON_DEPTH = 16  # real calls nest 3 deep ({"arguments": {"bbox": [..]}})
SNIPPET_CHARS = 40

_TAG_RE = re.compile(r"<(/?)(think|tool_call|answer)>")
# Near-misses of the tags (wrong case, spaces, attributes, other vendors' names).
# Bounded quantifiers keep this linear: each start position does O(60) work.
_NEAR_TAG_RE = re.compile(
    r"<\s{0,3}/?\s{0,3}(?:tool[\s_-]{0,2}calls?|function[\s_-]{0,2}calls?|tool[\s_-]{0,2}use|answer|think)\b[^<>\n]{0,40}>",
    re.IGNORECASE,
)
_BLOCKS = ("think", "tool_call", "answer")


def format_tool_calls_example() -> str:
    """The canonical form of a turn, quoted in error messages."""
    return (
        '<tool_call>{"name": "temporal_zoom", "arguments": {"start": 10.0, "end": 20.0, "num_frames": 8}}</tool_call>\n'
        "(one <tool_call> block per call; several calls in one turn run in parallel), or, to finish:\n"
        "<answer>B</answer>"
    )


def parse_action(text: str, *, max_calls: int = 4) -> ParsedAction:
    """Take one model turn apart. Never raises; see the module docstring for the rules."""
    out = ParsedAction()
    errors = _Errors()
    try:
        _parse_into(text, max_calls, out, errors)
    except Exception as exc:  # a bug here must not kill an episode; say it loudly instead
        out.calls, out.answer = [], None
        errors.add(f"internal parser error ({type(exc).__name__}); the turn was ignored.")
    out.errors = errors.finish()
    return out


class _Errors:
    """An error list that keeps the first MAX_ERRORS messages and counts the rest."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.dropped = 0

    def add(self, msg: str) -> None:
        if len(self.items) < MAX_ERRORS:
            self.items.append(msg)
        else:
            self.dropped += 1

    def finish(self) -> list[str]:
        if self.dropped:
            return self.items + [f"... and {self.dropped} more problems of the same kinds."]
        return self.items


def _parse_into(text: Any, max_calls: int, out: ParsedAction, errors: _Errors) -> None:
    if not isinstance(text, str):
        errors.add(f"the turn must be text, got {type(text).__name__}.")
        return
    max_calls = max(0, int(max_calls))
    blocks = _scan_blocks(text, errors)
    _check_near_miss_tags(text, errors)

    thinks = [body for kind, _, body in blocks if kind == "think"]
    if thinks:
        out.think = "\n".join(thinks)
    call_blocks = [(pos, body) for kind, pos, body in blocks if kind == "tool_call"]
    answers = [(pos, body) for kind, pos, body in blocks if kind == "answer"]

    if not call_blocks and not answers:
        if not errors.items:
            errors.add("the turn has neither a <tool_call> nor an <answer>. Call a tool or answer, e.g.\n"
                       + format_tool_calls_example())
        return
    if answers:
        _take_answer(answers, call_blocks, out, errors)
        return
    if len(call_blocks) > max_calls:
        errors.add(f"{len(call_blocks)} tool calls in one turn, at most {max_calls}: only the first "
                   f"{max_calls} were run, the rest were dropped.")
        call_blocks = call_blocks[:max_calls]
    for i, (pos, body) in enumerate(call_blocks, 1):
        call = _parse_call(body, i, pos, errors)
        if call is not None:
            out.calls.append(call)


def _scan_blocks(text: str, errors: _Errors) -> list[tuple[str, int, str]]:
    """One pass over the tags: (kind, start offset, inner text) of every closed block."""
    blocks: list[tuple[str, int, str]] = []
    open_kind: Optional[str] = None
    open_at = body_at = 0
    seen_tag = False
    for m in _TAG_RE.finditer(text):
        closing, kind = m.group(1) == "/", m.group(2)
        if open_kind is None and not closing:
            open_kind, open_at, body_at = kind, m.start(), m.end()
        elif open_kind is None:  # a closing tag with nothing open
            if kind == "think" and not seen_tag:
                blocks.append(("think", 0, text[: m.start()]))  # template put <think> in the prompt
            else:
                errors.add(f"</{kind}> at char {m.start()} closes nothing: there is no <{kind}> open before it.")
        elif closing and kind == open_kind:
            blocks.append((kind, open_at, text[body_at: m.start()]))
            open_kind = None
        elif closing:
            errors.add(f"</{kind}> at char {m.start()} does not match the <{open_kind}> opened at char "
                       f"{open_at}; close it with </{open_kind}> first.")
        else:
            errors.add(f"nested tag: <{kind}> at char {m.start()} is inside the <{open_kind}> opened at char "
                       f"{open_at}; close each block (</{open_kind}>) before opening the next.")
        seen_tag = True
    if open_kind is not None:
        errors.add(f"<{open_kind}> opened at char {open_at} is never closed: add </{open_kind}>. "
                   f"The unclosed block was ignored.")
    return blocks


def _check_near_miss_tags(text: str, errors: _Errors) -> None:
    """Flag tags that look like ours but are not exact (e.g. <Tool_Call>, <tool_call name=x>)."""
    if "<" not in text:
        return
    for m in _NEAR_TAG_RE.finditer(text):
        tag = m.group(0)
        if _TAG_RE.fullmatch(tag):
            continue
        errors.add(f"malformed tag {_snippet(tag)} at char {m.start()}: the only tags are exactly "
                   "<think>, </think>, <tool_call>, </tool_call>, <answer>, </answer> (lowercase, no spaces).")


def _take_answer(answers: list[tuple[int, str]], call_blocks: list, out: ParsedAction, errors: _Errors) -> None:
    if call_blocks:
        errors.add(f"a turn with an <answer> must not also call tools: the {len(call_blocks)} <tool_call> "
                   "block(s) were ignored. Answer only once you are done calling tools.")
    if len(answers) > 1:
        errors.add(f"{len(answers)} <answer> blocks (at chars {', '.join(str(p) for p, _ in answers[:5])}); "
                   "give exactly one. No answer was taken.")
        return
    body = answers[0][1].strip()
    if not body:
        errors.add(f"the <answer> at char {answers[0][0]} is empty; write the answer inside it, e.g. <answer>B</answer>.")
        return
    out.answer = body


def _parse_call(body: str, index: int, pos: int, errors: _Errors) -> Optional[ToolCall]:
    """One <tool_call> body -> ToolCall, or None after adding the reason to errors."""
    where = f"<tool_call> #{index} (char {pos})"
    obj, err = _load_json(body.strip())
    if err is not None:
        errors.add(f"{where}: {err}. Expected e.g. " + _EXAMPLE_CALL)
        return None
    if not isinstance(obj, dict):
        errors.add(f"{where}: the JSON must be an object with \"name\" and \"arguments\", got {_json_type(obj)}. "
                   "Expected e.g. " + _EXAMPLE_CALL)
        return None
    missing = [k for k in ("name", "arguments") if k not in obj]
    extra = [k for k in obj if k not in ("name", "arguments")]
    if missing or extra:
        parts = []
        if missing:
            parts.append("missing key(s) " + ", ".join(f'"{k}"' for k in missing))
        if extra:
            parts.append("unexpected key(s) " + ", ".join(_snippet(k) for k in extra[:5]))
        errors.add(f"{where}: {'; '.join(parts)}. A call has exactly the keys \"name\" and \"arguments\", e.g. "
                   + _EXAMPLE_CALL)
        return None
    name, args = obj["name"], obj["arguments"]
    if not isinstance(name, str):
        errors.add(f"{where}: \"name\" must be a string (the tool name), got {_json_type(name)}.")
        return None
    if isinstance(args, str):  # arguments double-encoded as a JSON string: accepted (see docstring)
        decoded, err = _load_json(args.strip())
        if err is None and isinstance(decoded, dict):
            args = decoded
        else:
            errors.add(f"{where}: \"arguments\" must be a JSON object like {{\"time\": 12.5}}, got a string "
                       f"that is not one ({err or _json_type(decoded)}).")
            return None
    if not isinstance(args, dict):
        errors.add(f"{where}: \"arguments\" must be a JSON object like {{\"time\": 12.5}}, got {_json_type(args)}.")
        return None
    return ToolCall(name=name, arguments=args, raw=body)


_EXAMPLE_CALL = '<tool_call>{"name": "get_frame", "arguments": {"time": 12.5}}</tool_call>'


def _load_json(s: str) -> tuple[Any, Optional[str]]:
    """json.loads with size and depth caps; returns (value, None) or (None, reason)."""
    if not s:
        return None, "the block is empty"
    if len(s) > MAX_CALL_CHARS:
        return None, f"the call is {len(s)} characters long, at most {MAX_CALL_CHARS}"
    if s.startswith("```"):
        return None, "remove the ``` code fence: put the bare JSON object between the tags"
    if _json_depth(s) > MAX_JSON_DEPTH:
        return None, f"the JSON is nested more than {MAX_JSON_DEPTH} levels deep"
    try:
        return json.loads(s, parse_constant=_reject_constant), None
    except json.JSONDecodeError as e:
        return None, f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno} of the JSON, near {_snippet(s[max(0, e.pos - 15): e.pos + 15])}"
    except (ValueError, RecursionError, TypeError) as e:  # NaN/Infinity, over-long integers
        return None, f"invalid JSON: {_snippet(str(e), 120)}"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON; use a finite number")


def _json_depth(s: str) -> int:
    """Deepest nesting of [ and { outside strings. Linear; skipped when the count of openers is small."""
    if s.count("[") + s.count("{") <= MAX_JSON_DEPTH:
        return 0
    depth = deepest = 0
    in_str = escaped = False
    for ch in s:
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_JSON_DEPTH:
                    return deepest
        elif ch in "]}":
            depth -= 1
    return deepest


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"a boolean ({str(v).lower()})"
    if isinstance(v, (int, float)):
        return f"a number ({v!r})"
    if isinstance(v, str):
        return f"a string {_snippet(v)}"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _snippet(s: str, n: int = SNIPPET_CHARS) -> str:
    """A short, printable, quoted excerpt (escapes control characters and odd unicode)."""
    s = str(s)
    cut = s[:n]
    return ascii(cut) if len(s) <= n else ascii(cut) + "..."
