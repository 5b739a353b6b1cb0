"""Task files: valid lines load with paths resolved against the file; bad lines are all reported by number."""

import json

import pytest

from env import TaskFileError, load_tasks


def write(tmp_path, lines):
    p = tmp_path / "tasks.jsonl"
    p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return p


GOOD = {"id": "a", "video": "videos/a.mp4", "question": "What digit?", "answer": "B", "options": ["1", "2", "3", "4"],
        "evidence": [[10, 11.5]], "captions": [{"start": 0, "end": 5, "text": "a blue square"}]}


def test_good_task_loads(tmp_path):
    (t,) = load_tasks(write(tmp_path, [GOOD]))
    assert t.video == str((tmp_path / "videos/a.mp4").resolve())
    assert t.evidence == [(10.0, 11.5)] and t.captions[0].text == "a blue square" and t.options[1] == "2"


def test_minimal_task_and_numeric_answer(tmp_path):
    (t,) = load_tasks(write(tmp_path, [{"id": 7, "video": "x.mp4", "question": "How many?", "answer": 3}]))
    assert t.id == "7" and t.answer == "3" and t.options is None and t.evidence == []


def test_every_bad_line_is_reported_by_number(tmp_path):
    bad = [GOOD, "{not json", {**GOOD, "id": "b", "evidence": [[5, 1]]}, {**GOOD, "id": "c", "extra": 1},
           {"id": "d", "video": "x.mp4"}, {**GOOD, "id": "e", "options": ["only one"]}, GOOD,
           {**GOOD, "id": "f", "captions": [{"start": "x", "end": 1, "text": "t"}]}, [1, 2]]
    with pytest.raises(TaskFileError) as e:
        load_tasks(write(tmp_path, bad))
    msg = str(e.value)
    for n in (2, 3, 4, 5, 6, 7, 8, 9):
        assert f"line {n}:" in msg, msg
    assert "line 1:" not in msg and "duplicate" in msg and "extra" in msg and "ends before it starts" in msg


def test_missing_file(tmp_path):
    with pytest.raises(TaskFileError, match="no such task file"):
        load_tasks(tmp_path / "nope.jsonl")
