"""Rewards: answer matching, the evidence score's interval arithmetic, and the named terms."""

import random

import pytest

from configs.schema import RewardConfig
from env.rewards import (compute_reward, evidence_score, is_correct, match_answer, normalize_text, point_window,
                         union_intervals, weigh)
from env.tool import ToolOutput
from env.types import Episode, Task, ToolCallRecord

OPTS = ["red car", "blue car", "a green bus", "12"]


def fresh_rng():
    seed = random.SystemRandom().randrange(2**32)
    return random.Random(seed), seed


# ---------------------------------------------------------------- match_answer


@pytest.mark.parametrize("pred", ["B", "b", "(B)", "(b)", "[B]", "B.", "B)", "B:", "B) blue car", "B. blue car",
                                  "Option B", "option b", "The answer is B", "Answer: (b)", "blue car",
                                  " Blue  CAR. ", "The blue car", "  B  "])
@pytest.mark.parametrize("gold", ["B", "b", "(B)", "blue car", "Blue car"])
def test_multiple_choice_accepts_letter_and_text_forms(pred, gold):
    assert match_answer(pred, gold, OPTS)


@pytest.mark.parametrize("pred", ["A", "C", "(D)", "red car", "blue", "E", "(e)", "B red", "", "   ",
                                  "A and B", "blue car or red car", "a"])
def test_multiple_choice_rejects_other_choices(pred):
    assert not match_answer(pred, "B", OPTS)


def test_multiple_choice_options_with_their_own_labels():
    opts = ["A. red car", "B. blue car", "(C) a bus"]
    assert match_answer("B", "B. blue car", opts)
    assert match_answer("blue car", "B", opts)
    assert match_answer("B. blue car", "blue car", opts)
    assert match_answer("a bus", "C", opts) and match_answer("bus", "C", opts)
    assert not match_answer("A", "B", opts)


def test_option_text_starting_with_an_article_is_text_not_a_letter():
    assert match_answer("a green bus", "C", OPTS)
    assert match_answer("A green bus", "C", OPTS)
    assert not match_answer("a green bus", "A", OPTS)


def test_numeric_option_text():
    assert match_answer("12", "D", OPTS) and not match_answer("12", "A", OPTS)


def test_letter_answer_without_options():
    assert match_answer("(c)", "C", None) and match_answer("Option C", "c", None)
    assert not match_answer("D", "C", None)


@pytest.mark.parametrize("pred, gold, ok", [
    ("3", "3", True), ("3.0", "3", True), ("3", "3.0", True), ("three", "3", True), ("3", "three", True),
    ("There are 3 cars.", "3", True), ("3 or 4", "3", False), ("4", "3", False), ("1,000", "1000", True),
    ("-2.5", "-2.5", True), ("2.5", "-2.5", False), ("1e3", "1000", True),
    ("1000000.5", "1000000", True),  # within relative 1e-6
    ("1000002", "1000000", False), ("3.00001", "3", False), ("3.0000001", "3", True),
    ("0", "0", True), ("zero", "0", True), ("0.0", "0", True), ("twelve", "12", True),
    ("none", "3", False), ("", "3", False),
])
def test_numeric(pred, gold, ok):
    assert match_answer(pred, gold, None) is ok


@pytest.mark.parametrize("pred, gold, ok", [
    ("The Eiffel Tower!", "eiffel tower", True), ("an apple", "Apple", True), ("  red   car ", "Red car.", True),
    ("Café", "café", True), ("red car", "blue car", False), ("", "", False), ("tower", "eiffel tower", False),
])
def test_short_answer(pred, gold, ok):
    assert match_answer(pred, gold, None) is ok


def test_match_answer_never_raises():
    rng, seed = fresh_rng()
    junk = ["\x00", "\ud800", "(", ")", "B", "1e999", "NaN", "inf", "-", ".", "A.", "the", "\u202e", "9" * 400]
    for _ in range(2000):
        pred = "".join(rng.choice(junk) for _ in range(rng.randint(0, 5)))
        gold = rng.choice(["B", "3", "red car", "", "nan", "1e999"])
        opts = rng.choice([None, [], OPTS, ["", "", ""], ["(A)"]])
        assert match_answer(pred, gold, opts) in (True, False), seed
    assert match_answer(None, "B", OPTS) is False
    assert normalize_text("The  Quick, brown fox!") == "quick brown fox"


# ---------------------------------------------------------------- evidence_score


def test_evidence_score_hand_computed():
    # W = [0,15] u [30,32] (|W| = 17), S = [10,20] u [31,40] (|S| = 19), |W n S| = 5 + 1 = 6.
    windows = [(0, 10), (5, 15), (30, 32)]
    spans = [(10, 20), (31, 40)]
    iou, iop, iog = 6 / 30, 6 / 17, 6 / 19
    expected = ((2 * iou + iop + iog) / 4 + 1) / 2
    assert evidence_score(windows, spans) == pytest.approx(expected, rel=1e-12)
    assert evidence_score(windows, spans) == pytest.approx(0.6335913312693498, rel=1e-12)


def test_evidence_score_edge_cases():
    assert evidence_score([(3, 8)], [(3, 8)]) == 1.0
    assert evidence_score([(0, 4), (4, 8)], [(0, 8)]) == 1.0  # touching windows merge
    assert evidence_score([(0, 8), (0, 8), (2, 5)], [(0, 8)]) == 1.0  # duplicates counted once
    assert evidence_score([(8, 3)], [(3, 8)]) == 1.0  # a reversed window is flipped
    # No overlap: IoU = IoP = IoG = 0, and the formula as stated gives ((0)/4 + 1)/2 = 0.5.
    assert evidence_score([(0, 5)], [(10, 20)]) == 0.5
    assert evidence_score([], [(10, 20)]) == 0.0  # no windows
    assert evidence_score([(0, 5)], []) == 0.0  # no spans
    assert evidence_score([(5, 5)], [(0, 10)]) == 0.0  # zero-length window: nothing was looked at
    # A window that covers the span: IoU = IoP = 0.1, IoG = 1.
    assert evidence_score([(0, 100)], [(10, 20)]) == pytest.approx(((0.2 + 0.1 + 1) / 4 + 1) / 2)
    assert evidence_score([(float("nan"), 3), (0, 10)], [(0, 10)]) == 1.0
    assert point_window(10.0) == (9.5, 10.5)


def test_union_intervals():
    assert union_intervals([(5, 7), (0, 2), (1, 3), (7, 9), (20, 10)]) == [(0, 3), (5, 9), (10, 20)]
    assert union_intervals([]) == []


def test_evidence_score_matches_a_unit_grid():
    rng, seed = fresh_rng()

    def cells(ivs):
        return {c for a, b in ivs for c in range(min(a, b), max(a, b))}

    for _ in range(300):
        windows = [(rng.randint(0, 60), rng.randint(0, 60)) for _ in range(rng.randint(1, 6))]
        spans = [(rng.randint(0, 60), rng.randint(0, 60)) for _ in range(rng.randint(1, 4))]
        w, s = cells(windows), cells(spans)
        if not w or not s:
            continue
        inter = len(w & s)
        expected = ((2 * inter / len(w | s) + inter / len(w) + inter / len(s)) / 4 + 1) / 2
        assert evidence_score(windows, spans) == pytest.approx(expected, rel=1e-12), (seed, windows, spans)


# ---------------------------------------------------------------- compute_reward


def summary(answer="B", task_answer="B", options=OPTS, evidence=((10.0, 20.0),), format_errors=0, tool_calls_ok=2,
            zoom_windows=((10.0, 20.0),), frames_returned=10, turns=3, status="COMPLETED"):
    """(episode, task): `tool_calls_ok` successful calls, the first of them looking at `zoom_windows`."""
    windows = list(zoom_windows)[:tool_calls_ok]
    calls = [ToolCallRecord(1, "temporal_zoom", {}, True, ToolOutput("", window=w)) for w in windows]
    calls += [ToolCallRecord(1, "temporal_search", {}, True, ToolOutput("")) for _ in range(tool_calls_ok - len(calls))]
    calls.append(ToolCallRecord(1, "get_frame", {"time": -1}, False, error="refused"))  # refused calls pay nothing
    episode = Episode(answer=answer, tool_calls=calls, turns=turns, format_errors=format_errors, status=status,
                      frames_returned=frames_returned)
    return episode, Task(id="t", video="v.mp4", question="q", answer=task_answer, options=options,
                         evidence=list(evidence))


CFG = RewardConfig(weights={"accuracy": 1.0, "format": 0.2, "tool": 0.1, "evidence": 0.3, "cost": 1.0},
                   kwargs={"format_penalty": 0.5, "cost_per_frame": 0.01, "cost_per_turn": 0.05})


def reward(pair, cfg=CFG):
    return compute_reward(*pair, cfg)


def test_perfect_episode_terms():
    total, terms = reward(summary(), CFG)
    assert set(terms) == {"accuracy", "format", "tool", "evidence", "cost"}
    assert terms["accuracy"] == 1.0 and terms["format"] == 0.2 and terms["tool"] == 0.1
    assert terms["evidence"] == pytest.approx(0.3)
    assert terms["cost"] == pytest.approx(-(0.01 * 10 + 0.05 * 2))
    assert total == sum(terms.values())


def test_wrong_answer_pays_no_tool_or_evidence():
    s = summary(answer="A")
    assert not is_correct(*s)
    total, terms = reward(s, CFG)
    assert terms["accuracy"] == 0.0 and terms["tool"] == 0.0 and terms["evidence"] == 0.0
    assert terms["format"] == 0.2


def test_format_errors_cancel_evidence_and_floor_at_minus_one():
    _, terms = reward(summary(format_errors=1), CFG)
    assert terms["format"] == pytest.approx(0.2 * 0.5) and terms["evidence"] == 0.0
    assert terms["accuracy"] == 1.0 and terms["tool"] == 0.1
    _, terms = reward(summary(format_errors=40), CFG)
    assert terms["format"] == pytest.approx(-0.2)


def test_no_answer_counts_as_a_format_error():
    _, terms = reward(summary(answer=None, status="TRUNCATED"), CFG)
    assert terms["format"] == pytest.approx(0.2 * 0.5)
    assert terms["accuracy"] == terms["tool"] == terms["evidence"] == 0.0


def test_tool_bonus_needs_a_successful_call_and_evidence_needs_spans():
    _, terms = reward(summary(tool_calls_ok=0), CFG)
    assert terms["tool"] == 0.0 and terms["accuracy"] == 1.0
    _, terms = reward(summary(evidence=[]), CFG)
    assert terms["evidence"] == 0.0
    _, terms = reward(summary(zoom_windows=[]), CFG)
    assert terms["evidence"] == 0.0
    _, terms = reward(summary(zoom_windows=[(40.0, 50.0)]), CFG)
    assert terms["evidence"] == pytest.approx(0.3 * 0.5)  # right answer, windows missed: the formula's floor


def test_zero_costs_are_plain_zero():
    _, terms = reward(summary(), RewardConfig())
    assert terms["cost"] == 0.0 and str(terms["cost"]) == "0.0"
    _, terms = reward(summary(turns=1, frames_returned=0), CFG)
    assert terms["cost"] == 0.0


def test_terms_sum_to_total_exactly_on_random_episodes():
    rng, seed = fresh_rng()
    for _ in range(2000):
        cfg = RewardConfig(weights={k: rng.choice([0.0, rng.uniform(0, 2)]) for k in ("accuracy", "format", "tool",
                                                                                     "evidence", "cost")},
                           kwargs={"format_penalty": rng.uniform(0, 1), "cost_per_frame": rng.choice([0.0, 0.01]),
                                   "cost_per_turn": rng.choice([0.0, 0.05])})
        s = summary(answer=rng.choice([None, "A", "B", "blue car", "junk"]), format_errors=rng.randint(0, 5),
                    tool_calls_ok=rng.randint(0, 3), evidence=rng.choice([[], [(5.0, 9.0)]]),
                    zoom_windows=[(rng.uniform(0, 30), rng.uniform(0, 30)) for _ in range(rng.randint(0, 3))],
                    frames_returned=rng.randint(0, 64), turns=rng.randint(1, 8))
        total, terms = reward(s, cfg)
        assert total == sum(terms.values()), seed
        if not is_correct(*s):
            assert terms["tool"] == terms["evidence"] == terms["accuracy"] == 0.0, seed
        w = cfg.weights["format"]
        assert -w - 1e-12 <= terms["format"] <= w + 1e-12, seed


def test_a_reward_function_is_a_plain_function_named_in_config(tmp_path, monkeypatch):
    """reward.fn names module:function; its terms are weighted by reward.weights (1 when not given) and
    summed; reward.kwargs reach it; a broken return is an error naming the term."""
    (tmp_path / "plain_rewards.py").write_text(
        "def length_bonus(episode, task, per_turn=0.0):\n"
        "    return {'right': float(episode.answer == task.answer), 'turns': -per_turn * episode.turns}\n"
        "def broken(episode, task):\n"
        "    return {'right': float('nan')}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = RewardConfig(fn="plain_rewards:length_bonus", weights={"right": 2.0}, kwargs={"per_turn": 0.1})
    total, terms = reward(summary(turns=3), cfg)
    assert terms == {"right": 2.0, "turns": pytest.approx(-0.3)} and total == sum(terms.values())
    with pytest.raises(ValueError, match="reward term 'right' = nan is not a finite number"):
        reward(summary(), RewardConfig(fn="plain_rewards:broken"))
    with pytest.raises(ValueError, match="cannot import 'nowhere'"):
        reward(summary(), RewardConfig(fn="nowhere:fn"))
    with pytest.raises(ValueError, match="non-empty dict"):
        weigh([], {})
