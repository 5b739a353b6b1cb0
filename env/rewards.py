"""Rewards as named terms: answer matching, Video-o3's evidence score, and the default reward function.

A reward function is a plain function `fn(episode, task) -> dict[str, float]` of the finished
`env.types.Episode` (answer, tool calls with their outputs and windows, turns, format errors);
`reward.fn` names it (`module:function`, resolved in the env's process) and `reward.kwargs` are
passed to it. Its terms are weighted (`reward.weights`, 1 when not given) and summed: the
trajectory records the weighted terms, which add up to its reward exactly. `default_reward` is
weft's own. Its decisions:
* An episode that ends without an answer (truncated, aborted, failed) counts one
  extra format error: not answering is a way of not following the format.
* format = max(-1, 1 - format_penalty * format_errors).
* tool bonus: answer right and >= 1 tool call succeeded.
* evidence: answer right, no format errors (counting the one above), and the task
  has ground-truth spans. Its value is ((2*IoU + IoP + IoG)/4 + 1)/2 as Video-o3
  states it, so a right answer whose windows miss the spans still gets 0.5 of the
  weight; zero windows give 0.
* A get_frame / spatial_zoom at time t is the window [t - POINT_HALF_WIDTH_S,
  t + POINT_HALF_WIDTH_S] (`point_window`); each tool reports its window in its ToolOutput.
"""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Any, Callable, Optional

from configs.schema import RewardConfig
from env.types import Episode, Task

POINT_HALF_WIDTH_S = 0.5
DEFAULT_FN = "env.rewards:default_reward"
NUMERIC_REL_TOL = 1e-6

# ---------------------------------------------------------------- answer matching

_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_PUNCT_RE = re.compile(r"[^\w\s]|_")
_SPACE_RE = re.compile(r"\s+")
_NUMBER_RE = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")
_NAMED_RE = re.compile(r"(?:answer|option|choice)\s*(?:is|:)?\s*[:\-]?\s*(\([A-Za-z]\)|\[[A-Za-z]\]|[A-Za-z](?![\w']))", re.IGNORECASE)
_TRAILING_RE = re.compile(r"(?:^|\s)\(?[A-Z]\)?[.!]?\s*$")  # a capital letter alone at the very end
_LONE_LETTER_RE = re.compile(r"(?<![\w'])\(?([A-Z])\)?(?![\w'])")
_LEAD_IN_RE = re.compile(r"^\s*(?:(?:the\s+)?(?:final\s+)?answer\s*(?:is|:)?|option|choice)\s*[:\-]?\s*", re.IGNORECASE)
# A letter label and what follows it: "(B) ...", "[B] ...", "B. ...", "B) ...", "B: ...", or "B" alone.
# A letter followed by a plain space ("A red car") is not a label: there it is usually an article.
_LETTER_RE = re.compile(r"^(?:\(([A-Za-z])\)|\[([A-Za-z])\]|([A-Za-z])[.:)]|([A-Za-z])$)(.*)$", re.DOTALL)
_NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty".split())}
_NUMBER_WORDS.update({"thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70,
                      "eighty": 80, "ninety": 90, "hundred": 100})


def normalize_text(s: str) -> str:
    """Lowercase, NFKC, punctuation and articles removed, spaces collapsed (SQuAD-style)."""
    s = unicodedata.normalize("NFKC", str(s)).lower()
    s = _PUNCT_RE.sub(" ", s)
    s = _ARTICLES_RE.sub(" ", s)
    return _SPACE_RE.sub(" ", s).strip()


def match_answer(pred: Optional[str], answer: str, options: Optional[list[str]]) -> bool:
    """True if `pred` means the same as the ground truth `answer` (letter or text of an option,
    a number within relative tolerance 1e-6, or normalised short text). Never raises."""
    try:
        return _match(pred, answer, options)
    except Exception:  # a reward function must not kill training over one odd string
        return False


def _match(pred: Optional[str], answer: str, options: Optional[list[str]]) -> bool:
    if pred is None or not str(pred).strip() or answer is None:
        return False
    pred, answer = str(pred), str(answer)
    if options:
        gold = choice_of(answer, options)
        if gold is not None:
            return choice_of(pred, options) == gold
    elif _letter(answer, 26) is not None and len(answer.strip(" ()[].:")) == 1:
        # A letter answer with no option list: compare letters.
        return _letter(pred, 26) == _letter(answer, 26)
    gold_num = _as_number(answer)
    if gold_num is not None:
        got = _number_in(pred)
        return got is not None and math.isclose(got, gold_num, rel_tol=NUMERIC_REL_TOL, abs_tol=1e-12)
    return normalize_text(pred) == normalize_text(answer) != ""


def choice_of(text: Optional[str], options: list[str]) -> Optional[int]:
    """Which option `text` picks, from the forms models write: "B", "(B)", "B.", "B) red car", "Answer: B",
    "The answer is B", the option's text, or a sentence that names one ("... so the answer is (B).",
    "I think it is B."). None when it names none. Never raises."""
    try:
        if text is None or not options:
            return None
        texts = [_option_text(o, i) for i, o in enumerate(options)]
        s = str(text).strip()
        found = _choice_index(s, texts)
        if found is None:
            named = _NAMED_RE.findall(s)  # the last "answer is X" of a longer text
            found = _letter(named[-1], len(texts)) if named else None
        if found is None and _TRAILING_RE.search(s):  # "... it is B.": the one option letter, closing the text
            letters = {m.upper() for m in _LONE_LETTER_RE.findall(s) if ord(m.upper()) - 65 < len(texts)}
            found = ord(letters.pop()) - 65 if len(letters) == 1 else None
        return found
    except Exception:  # noqa: BLE001 - a reward or a score must not die over one odd string
        return None


def _option_text(option: str, i: int) -> str:
    """An option's text without its own label: 'B. red car' and 'red car' both give 'red car'."""
    s = str(option).strip()
    label = _label(s)
    if label is not None and label[0].upper() == chr(65 + i) and label[1].strip():
        s = label[1]
    return normalize_text(s)


def _choice_index(s: str, texts: list[str]) -> Optional[int]:
    """Which option `s` names: its exact text first (so 'a cat' is text, not letter a), then a letter."""
    for candidate in (s, _LEAD_IN_RE.sub("", s, count=1)):
        norm = normalize_text(candidate)
        if norm and norm in texts:
            return texts.index(norm)
    return _letter(s, len(texts))


def _label(s: str) -> Optional[tuple[str, str]]:
    """(letter, rest) if `s` starts with a letter label, else None."""
    m = _LETTER_RE.match(s)
    if not m:
        return None
    letter = next(g for g in m.groups()[:4] if g)
    return letter, m.group(5)


def _letter(s: str, n: int) -> Optional[int]:
    """Index of the letter label that starts `s` (after a lead-in like 'Answer:' or 'Option'), if any."""
    label = _label(_LEAD_IN_RE.sub("", s.strip(), count=1).strip())
    if label is None:
        return None
    idx = ord(label[0].upper()) - 65
    return idx if 0 <= idx < n else None


def _as_number(s: str) -> Optional[float]:
    """The value of a string that is just a number ('3', '3.0', '-1,000', 'three'), else None."""
    t = s.strip().rstrip(".").strip()
    if _NUMBER_RE.fullmatch(t):
        return _to_float(t)
    return _NUMBER_WORDS.get(normalize_text(t))


def _number_in(s: str) -> Optional[float]:
    """The number a prediction states: itself if it is one, else its only number ('3 cars')."""
    whole = _as_number(s)
    if whole is not None:
        return whole
    found = {v for v in (_to_float(m) for m in _NUMBER_RE.findall(s)) if v is not None}
    found |= {float(_NUMBER_WORDS[w]) for w in normalize_text(s).split() if w in _NUMBER_WORDS}
    return found.pop() if len(found) == 1 else None


def _to_float(t: str) -> Optional[float]:
    try:
        v = float(t.replace(",", ""))
    except ValueError:
        return None
    return v if math.isfinite(v) else None


# ---------------------------------------------------------------- evidence


def point_window(t: float, half_width: float = POINT_HALF_WIDTH_S) -> tuple[float, float]:
    """The window a single-moment tool call (get_frame, spatial_zoom) counts as."""
    return (t - half_width, t + half_width)


def union_intervals(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sorted, disjoint union of intervals; reversed ones are flipped, non-finite ones dropped."""
    clean = []
    for iv in intervals:
        try:
            a, b = float(iv[0]), float(iv[1])
        except (TypeError, ValueError, IndexError):
            continue
        if math.isfinite(a) and math.isfinite(b):
            clean.append((min(a, b), max(a, b)))
    clean.sort()
    merged: list[tuple[float, float]] = []
    for a, b in clean:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _length(union: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in union)


def _intersection_length(u: list[tuple[float, float]], v: list[tuple[float, float]]) -> float:
    """|U ∩ V| of two disjoint sorted unions, by a two-pointer sweep."""
    i = j = 0
    total = 0.0
    while i < len(u) and j < len(v):
        lo, hi = max(u[i][0], v[j][0]), min(u[i][1], v[j][1])
        if hi > lo:
            total += hi - lo
        if u[i][1] < v[j][1]:
            i += 1
        else:
            j += 1
    return total


def overlap_score(windows: list[tuple[float, float]], spans: list[tuple[float, float]]) -> float:
    """Video-o3's g = (2*IoU + IoP + IoG)/4 of W = union(windows) vs S = union(spans): IoU = |W∩S|/|W∪S|,
    IoP = |W∩S|/|W|, IoG = |W∩S|/|S|. No windows (or no spans) -> 0."""
    w, s = union_intervals(windows), union_intervals(spans)
    len_w, len_s = _length(w), _length(s)
    if len_w <= 0 or len_s <= 0:
        return 0.0
    inter = _intersection_length(w, s)
    return (2 * inter / (len_w + len_s - inter) + inter / len_w + inter / len_s) / 4


def evidence_score(windows: list[tuple[float, float]], spans: list[tuple[float, float]]) -> float:
    """Video-o3's evidence term (overlap_score(windows, spans) + 1)/2; no windows (or no spans) -> 0.
    Windows that miss the spans entirely give 0.5 (the formula's floor)."""
    if _length(union_intervals(windows)) <= 0 or _length(union_intervals(spans)) <= 0:
        return 0.0
    return (overlap_score(windows, spans) + 1) / 2


# ---------------------------------------------------------------- episode reward

DEFAULT_WEIGHTS = {"accuracy": 1.0, "format": 0.2, "tool": 0.1, "evidence": 0.2, "cost": 1.0}


def is_correct(episode: Episode, task: Task) -> bool:
    return episode.answer is not None and match_answer(episode.answer, task.answer, task.options)


def effective_format_errors(episode: Episode) -> int:
    """Malformed turns, plus one if the episode ended without an answer."""
    return max(0, int(episode.format_errors)) + (1 if episode.answer is None else 0)


def default_reward(episode: Episode, task: Task, *, format_penalty: float = 0.5, cost_per_frame: float = 0.0,
                   cost_per_turn: float = 0.0) -> dict[str, float]:
    """weft's reward, unweighted: accuracy (1 if the answer matches), format (1 - format_penalty per
    malformed turn, floored at -1), tool (right and at least one call succeeded: ParaVT, DeepEyes),
    evidence (Video-o3's score of the looked-at windows, when right, clean and the task has spans),
    cost (minus the frames and extra turns it spent, when priced)."""
    correct = is_correct(episode, task)
    n_errors = effective_format_errors(episode)
    evidence = 0.0
    if correct and n_errors == 0 and task.evidence:
        evidence = evidence_score(episode.windows, task.evidence)
    cost = cost_per_frame * max(0, episode.frames_returned) + cost_per_turn * max(0, episode.turns - 1)
    return {"accuracy": 1.0 if correct else 0.0, "format": max(-1.0, 1.0 - format_penalty * n_errors),
            "tool": 1.0 if correct and any(c.ok for c in episode.tool_calls) else 0.0,
            "evidence": evidence, "cost": -cost if cost else 0.0}


RewardFn = Callable[..., dict]


def load_reward(cfg: RewardConfig) -> RewardFn:
    """The configured reward function (`reward.fn`, `module:function`) with its `reward.kwargs` bound."""
    from env.tool import load_object

    fn = default_reward if cfg.fn in ("", DEFAULT_FN) else load_object(cfg.fn, "reward.fn")
    if not callable(fn):
        raise ValueError(f"reward.fn {cfg.fn!r} is a {type(fn).__name__}, not a function")
    kwargs = dict(cfg.kwargs or {})
    return (lambda episode, task: fn(episode, task, **kwargs)) if kwargs else fn


def weigh(terms: Any, weights: dict[str, float]) -> tuple[float, dict[str, float]]:
    """(total, weighted terms) of a reward function's named terms: each times its weight (1 when not
    given); the total is their sum exactly. ValueError for terms that are not finite numbers by name."""
    if not isinstance(terms, dict) or not terms:
        raise ValueError(f"a reward function must return a non-empty dict of named terms, got {type(terms).__name__}")
    out = {}
    for k, v in terms.items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"reward term {k!r} = {v!r} is not a finite number")
        out[k] = float(weights.get(k, 1.0)) * float(v)
    return sum(out.values()), out


def compute_reward(episode: Episode, task: Task, cfg: RewardConfig) -> tuple[float, dict[str, float]]:
    """(total, weighted terms) of an episode under `cfg`; sum(terms.values()) == total exactly."""
    return weigh(load_reward(cfg)(episode, task), cfg.weights)
