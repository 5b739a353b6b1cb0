"""`weft convert`: each benchmark's annotations, laid out as the benchmark ships them (written here from the
public schemas: the benchmarks' own loaders and lmms-eval's), over generated H.264 videos.

Each test checks the options (labels stripped), the answer as a letter, the categories, evidence and
captions, that the task file loads, and that bad input (a corrupt line, a missing video, an answer that
is not among the options) is skipped, counted by reason and named, without stopping the conversion.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from env.benchmarks import answer_letter, convert, parse_spans, read_srt, split_label, strip_labels
from env.tasks import load_tasks

ROOT = Path(__file__).resolve().parents[2]


def _video(path: Path, seconds: float = 4.0, fps: float = 5.0) -> Path:
    from env.demo import write_video

    rng = np.random.default_rng(len(str(path)))
    frames = [np.full((90, 160, 3), rng.integers(0, 255, 3), np.uint8) for _ in range(int(seconds * fps))]
    return write_video(path, frames, fps, gop=10)


def _jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _by_id(out: Path) -> dict:
    return {t.id: t for t in load_tasks(out)}


def test_labels_answers_and_times():
    assert split_label("A. a red car") == ("A", "a red car")
    assert split_label("(B) two") == ("B", "two")
    assert split_label("C) 3 people") == ("C", "3 people")
    assert split_label("A red car") == (None, "A red car")  # an article, not a label
    assert strip_labels(["A. x", "B. y"]) == ["x", "y"] and strip_labels(["x", "y"]) == ["x", "y"]
    assert answer_letter("(C)", ["a", "b", "c"]) == "C" and answer_letter(1, ["a", "b"]) == "B"
    assert answer_letter("The Dog", ["a cat", "the dog"]) == "B"
    assert parse_spans("00:15-00:19") == [[15.0, 19.0]]
    assert parse_spans("01:02:03-01:02:10, 5:00 - 5:30") == [[3723.0, 3730.0], [300.0, 330.0]]
    assert parse_spans("") == [] and parse_spans(None) == []


def test_videomme_parquet_and_json_export(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "Video-MME"
    for vid in ("fFjv93ACGo8", "k5Vp1N9f_Xs"):
        _video(root / "data" / f"{vid}.mp4")
    (root / "subtitle").mkdir(parents=True)
    (root / "subtitle" / "fFjv93ACGo8.srt").write_text(
        "1\n00:00:00,500 --> 00:00:01,800\n<font color=\"white\" size=\".72c\">the chef picks up a knife</font>\n\n"
        "2\n00:00:02,000 --> 00:00:03,500\n<font color=\"white\" size=\".72c\">and slices the onion</font>\n\n", encoding="utf-8")
    rows = [
        dict(video_id="001", duration="short", domain="Life Record", sub_category="Food", url="u", videoID="fFjv93ACGo8",
             question_id="001-1", task_type="Action Recognition", question="What does the chef slice?",
             options=["A. A tomato.", "B. An onion.", "C. Bread.", "D. Nothing."], answer="B"),
        dict(video_id="002", duration="medium", domain="Knowledge", sub_category="Astronomy", url="u", videoID="k5Vp1N9f_Xs",
             question_id="002-1", task_type="Counting Problem", question="How many planets are shown?",
             options=["A. 1.", "B. 2.", "C. 3.", "D. 4."], answer="D"),
        dict(video_id="003", duration="long", domain="Knowledge", sub_category="Law", url="u", videoID="missing0001",
             question_id="003-1", task_type="OCR Problems", question="?", options=["A. a", "B. b", "C. c", "D. d"], answer="A"),
        dict(video_id="002", duration="medium", domain="Knowledge", sub_category="Astronomy", url="u", videoID="k5Vp1N9f_Xs",
             question_id="002-2", task_type="Counting Problem", question="Which?", options=["A. a", "B. b", "C. c", "D. d"],
             answer="E"),
    ]
    (root / "videomme").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), root / "videomme" / "test-00000-of-00001.parquet")
    out = tmp_path / "vm.jsonl"
    s = convert("videomme", root / "videomme" / "test-00000-of-00001.parquet", root, out, subtitles=root / "subtitle")
    assert s["tasks"] == 2 and s["skipped"] == {"missing_video": 1, "answer_not_in_options": 1}, s
    assert any("003-1" in e or "[2]" in e for e in s["skipped_examples"]["missing_video"])
    tasks = _by_id(out)
    t = tasks["videomme-001-1"]
    assert t.options == ["A tomato.", "An onion.", "Bread.", "Nothing."] and t.answer == "B"
    assert t.metadata == {"source": "videomme", "question_id": "001-1", "task_type": "Action Recognition",
                          "duration_group": "short", "domain": "Life Record", "sub_category": "Food", "video_id": "001"}
    assert [(c.start, c.end, c.text) for c in t.captions] == [(0.5, 1.8, "the chef picks up a knife"),
                                                              (2.0, 3.5, "and slices the onion")]
    assert Path(t.video).is_file() and tasks["videomme-002-1"].answer == "D" and not tasks["videomme-002-1"].captions
    # The JSON export of the same rows converts the same, with its subtitles found beside it by default.
    export = root / "videomme.json"
    export.write_text(json.dumps(rows), encoding="utf-8")
    s2 = convert("videomme", export, root, tmp_path / "vm2.jsonl")
    assert s2["tasks"] == 2 and s2["with_captions"] == 1


def test_lvbench_meta_jsonl_with_time_references(tmp_path):
    root = tmp_path / "LVBench"
    _video(root / "videos" / "00000" / "4FLhm4dDeOI.mp4", seconds=6)
    _video(root / "videos" / "00001" / "GyoUXHYgVrQ.mp4")
    lines = [
        {"key": "4FLhm4dDeOI", "type": "cartoon", "video_info": {"duration_minutes": 0.1, "fps": 5},
         "qa": [{"uid": 101, "question": "What colour is the hat the rabbit wears?\n(A) Red\n(B) Blue\n(C) Green\n(D) Black",
                 "answer": "C", "question_type": ["entity recognition", "key information retrieval"],
                 "time_reference": "00:02-00:04"},
                {"uid": 102, "question": "Why does he run?\n(A) Late\n(B) Chased\n(C) Sport\n(D) Fun", "answer": "B",
                 "question_type": ["reasoning"], "time_reference": "00:01-00:02, 00:04-00:05"},
                {"uid": 103, "question": "Who?\n(A) a\n(B) b", "answer": "F", "question_type": ["reasoning"],
                 "time_reference": ""}]},
        '{"key": "brokenline", "qa": [',
        {"key": "GyoUXHYgVrQ", "type": "sports", "qa": [{"uid": 201, "question": "How many goals?\n(A) 1\n(B) 2\n(C) 3\n(D) 4",
                                                         "answer": "A", "question_type": ["counting"], "time_reference": "0:00-0:03"}]},
        {"key": "notdownloaded", "type": "news", "qa": [{"uid": 301, "question": "Q?\n(A) a\n(B) b", "answer": "A",
                                                          "question_type": [], "time_reference": ""}]},
    ]
    meta = _jsonl(root / "data" / "video_info.meta.jsonl", lines)
    out = tmp_path / "lvb" / "tasks.jsonl"
    s = convert("lvbench", meta, root / "videos", out)
    assert s["tasks"] == 3 and s["with_evidence"] == 3, s
    assert s["skipped"] == {"answer_not_in_options": 1, "bad_line": 1, "missing_video": 1}
    assert "video_info.meta.jsonl:2" in s["skipped_examples"]["bad_line"][0]
    tasks = _by_id(out)
    t = tasks["lvbench-101"]
    assert t.question == "What colour is the hat the rabbit wears?" and t.options == ["Red", "Blue", "Green", "Black"]
    assert t.answer == "C" and t.evidence == [(2.0, 4.0)]
    assert t.metadata["question_type"] == "entity recognition;key information retrieval" and t.metadata["category"] == "cartoon"
    assert tasks["lvbench-102"].evidence == [(1.0, 2.0), (4.0, 5.0)]
    from env.scoring import categories

    assert categories(t)["question_type"] == ["entity recognition", "key information retrieval"]


def test_mlvu_per_task_json_answer_as_text(tmp_path):
    root = tmp_path / "MLVU"
    _video(root / "video" / "plotQA" / "movie101_66.mp4")
    _video(root / "video" / "count" / "count_1.mp4")
    (root / "json").mkdir(parents=True)
    (root / "json" / "1_plotQA.json").write_text(json.dumps([
        {"video": "movie101_66.mp4", "duration": 246.0, "question": "What does the man hold?",
         "candidates": ["a cup", "a phone", "a book", "a key"], "answer": "a book", "question_type": "plotQA"},
        {"video": "movie101_66.mp4", "duration": 246.0, "question": "Where is he?",
         "candidates": ["home", "office"], "answer": "a park", "question_type": "plotQA"}]), encoding="utf-8")
    (root / "json" / "4_count.json").write_text(json.dumps([
        {"video": "count_1.mp4", "duration": 1200, "question": "How many times does the dog jump?",
         "candidates": ["2", "3", "4", "5"], "answer": "4", "question_type": "count"},
        {"video": "count_404.mp4", "duration": 90, "question": "How many?", "candidates": ["1", "2"], "answer": "1",
         "question_type": "count"}]), encoding="utf-8")
    (root / "json" / "9_summary.json").write_text(json.dumps([
        {"video": "movie101_66.mp4", "duration": 246.0, "question": "Summarize the video.", "answer": "A man reads.",
         "question_type": "summary"}]), encoding="utf-8")
    (root / "json" / "5_order.json").write_text("[{not json", encoding="utf-8")
    out = tmp_path / "mlvu.jsonl"
    s = convert("mlvu", root / "json", root / "video", out)
    assert s["tasks"] == 2, s
    assert s["skipped"] == {"answer_not_in_options": 1, "missing_video": 1, "open_ended": 1, "unreadable_file": 1}
    tasks = _by_id(out)
    plot, count = tasks["mlvu-plotQA-0"], tasks["mlvu-count-0"]
    assert plot.options == ["a cup", "a phone", "a book", "a key"] and plot.answer == "C"
    assert plot.metadata["task_type"] == "plotQA" and plot.metadata["duration_group"] == "medium"
    assert count.answer == "C" and count.metadata["task_type"] == "count" and count.metadata["duration_group"] == "long"
    assert Path(plot.video).parent.name == "plotQA"


def test_longvideobench_with_both_subtitle_forms(tmp_path):
    root = tmp_path / "LongVideoBench"
    _video(root / "videos" / "86CxyhFV9MI.mp4", seconds=5)
    _video(root / "videos" / "ZmH1bQXuxgI.mp4", seconds=5)
    (root / "subtitles").mkdir(parents=True)
    (root / "subtitles" / "86CxyhFV9MI_en.json").write_text(json.dumps([
        {"start": "00:00:10.000", "end": "00:00:11.500", "line": "welcome back to the kitchen"},
        {"start": "00:00:12.000", "end": "00:00:13.000", "line": "now we add salt"}]), encoding="utf-8")
    (root / "subtitles" / "ZmH1bQXuxgI_en.json").write_text(json.dumps([
        {"timestamp": [1.0, 2.5], "text": "the ball goes in"}, {"timestamp": [3.0, None], "text": "final whistle"}]),
        encoding="utf-8")
    base = dict(question_wo_referring_query="q", position=[1], view_count=10, level="L1-Perception")
    (root / "lvb_val.json").write_text(json.dumps([
        dict(base, id="86CxyhFV9MI_0", video_id="86CxyhFV9MI", video_path="86CxyhFV9MI.mp4",
             subtitle_path="86CxyhFV9MI_en.json", question="What is added?", candidates=["sugar", "salt", "pepper", "oil"],
             correct_choice=1, duration=5.0, duration_group=15, question_category="S2E", topic_category="NP-News-Programs",
             starting_timestamp_for_subtitles=10.0),
        dict(base, id="ZmH1bQXuxgI_0", video_id="ZmH1bQXuxgI", video_path="ZmH1bQXuxgI.mp4",
             subtitle_path="ZmH1bQXuxgI_en.json", question="Who scores?", candidates=["red", "blue", "nobody"],
             correct_choice=0, duration=5.0, duration_group=15, question_category="E2O", topic_category="SP-Sports",
             starting_timestamp_for_subtitles=0),
        dict(base, id="ZmH1bQXuxgI_1", video_id="ZmH1bQXuxgI", video_path="ZmH1bQXuxgI.mp4",
             subtitle_path="ZmH1bQXuxgI_en.json", question="Q?", candidates=["a", "b"], correct_choice=4, duration=5.0,
             duration_group=15, question_category="E2O", topic_category="SP-Sports", starting_timestamp_for_subtitles=0),
        dict(base, id="gone_0", video_id="gone", video_path="gone.mp4", subtitle_path="gone_en.json", question="Q?",
             candidates=["a", "b"], correct_choice=0, duration=5.0, duration_group=15, question_category="E2O",
             topic_category="SP-Sports", starting_timestamp_for_subtitles=0),
        ["not", "a", "record"],
    ]), encoding="utf-8")
    out = tmp_path / "lvb.jsonl"
    s = convert("longvideobench", root / "lvb_val.json", root / "videos", out)
    assert s["tasks"] == 2 and s["with_captions"] == 2, s
    assert s["skipped"] == {"answer_not_in_options": 1, "missing_video": 1, "bad_record": 1}
    tasks = _by_id(out)
    t = tasks["longvideobench-86CxyhFV9MI_0"]
    assert t.options == ["sugar", "salt", "pepper", "oil"] and t.answer == "B"
    assert t.metadata["task_type"] == "S2E" and t.metadata["category"] == "NP-News-Programs"
    assert t.metadata["duration_group"] == 15 and t.metadata["level"] == "L1-Perception"
    assert [(c.start, c.end, c.text) for c in t.captions] == [(0.0, 1.5, "welcome back to the kitchen"),
                                                              (2.0, 3.0, "now we add salt")]
    assert [(c.start, c.end) for c in tasks["longvideobench-ZmH1bQXuxgI_0"].captions] == [(1.0, 2.5), (3.0, 5.0)]


def test_captions_feed_temporal_search_in_the_env(tmp_path):
    """A converted task's subtitles are what temporal_search searches."""
    from env import VideoToolEnv

    root = tmp_path / "vm"
    _video(root / "data" / "abc.mp4")
    (root / "subtitle").mkdir(parents=True)
    (root / "subtitle" / "abc.srt").write_text("1\n00:00:01,000 --> 00:00:02,000\nthe red balloon pops\n", encoding="utf-8")
    (root / "ann.jsonl").write_text(json.dumps(dict(video_id="1", duration="short", domain="d", sub_category="s",
                                                    videoID="abc", question_id="1-1", task_type="t", question="When?",
                                                    options=["A. 1 s", "B. 3 s"], answer="A")) + "\n")
    convert("videomme", root / "ann.jsonl", root, tmp_path / "t.jsonl")
    env = VideoToolEnv(overview_frames=2)
    env.reset(load_tasks(tmp_path / "t.jsonl")[0])
    obs, *_ = env.step('<tool_call>{"name": "temporal_search", "arguments": {"query": "balloon pops", "top_k": 1}}</tool_call>')
    assert "1.0s-2.0s" in obs.text and "red balloon" in obs.text


def test_srt_reader_tolerates_junk(tmp_path):
    p = tmp_path / "x.srt"
    p.write_text("\ufeff1\r\n00:00:01,000 --> 00:00:02,500\r\nHello &amp; <i>bye</i>\r\n\r\nnot a block\r\n\r\n"
                 "3\r\n00:00:xx --> 1\r\nbad\r\n", encoding="utf-8")
    assert read_srt(p) == [{"start": 1.0, "end": 2.5, "text": "Hello & bye"}]


def test_weft_convert_cli_prints_a_json_summary_last(tmp_path):
    root = tmp_path / "m"
    _video(root / "video" / "count" / "c.mp4")
    (root / "json").mkdir(parents=True)
    (root / "json" / "4_count.json").write_text(json.dumps([
        {"video": "c.mp4", "duration": 10, "question": "How many?", "candidates": ["1", "2"], "answer": "2",
         "question_type": "count"},
        {"video": "c.mp4", "duration": 10, "question": "How many?", "candidates": ["1", "2"], "answer": "7",
         "question_type": "count"}]), encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "weft_cli", "convert", "mlvu", "--annotations", str(root / "json"),
                        "--videos", str(root / "video"), "--out", str(tmp_path / "o.jsonl")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["tasks"] == 1 and summary["skipped"] == {"answer_not_in_options": 1}
    assert "answer_not_in_options" in r.stderr


@pytest.mark.parametrize("fmt", ["videomme", "lvbench", "mlvu", "longvideobench"])
def test_garbage_annotations_never_stop_a_conversion(tmp_path, fmt):
    """Random bytes, wrong types and empty files: everything is skipped and counted, nothing raises."""
    rng = np.random.default_rng(0)
    bad = tmp_path / ("ann.jsonl" if fmt in ("lvbench",) else "ann.json")
    junk = [json.dumps(x) for x in (1, None, "s", [], {}, {"qa": 3}, {"qa": [None, {"uid": 1}]},
                                    {"question": 5, "options": "x", "candidates": [1, 2]})]
    junk.append(rng.bytes(64).decode("latin-1").replace("\n", " "))
    if fmt == "mlvu":
        (tmp_path / "json").mkdir()
        (tmp_path / "json" / "1_x.json").write_text("[" + ",".join(junk[:-1]) + "]")
        (tmp_path / "json" / "2_y.json").write_text(junk[-1])
        bad = tmp_path / "json"
    elif fmt == "lvbench":
        bad.write_text("\n".join(junk) + "\n")
    else:
        bad.write_text("[" + ",".join(junk[:-1]) + "]")
    s = convert(fmt, bad, tmp_path, tmp_path / "out.jsonl")
    assert s["tasks"] == 0 and s["skipped_total"] > 0, s
    assert load_tasks(tmp_path / "out.jsonl") == []
