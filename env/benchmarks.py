"""Benchmark annotation files -> weft task files (`weft convert FORMAT --annotations A --videos V --out F`).

Each reader takes the annotations as the benchmark distributes them (fields as the benchmark's
own loader and lmms-eval's read them) and yields one task dict or one `Skip` per question:
* `videomme`: the HF parquet (`videomme/test-00000-of-00001.parquet`) or its JSON / JSONL export;
  rows `video_id, duration (short|medium|long), domain, sub_category, videoID, question_id,
  task_type, question, options ["A. ...", ...], answer "A"`; videos `<videoID>.mp4`; subtitles
  `<videoID>.srt` (`subtitle/` beside the annotations unless --subtitles says otherwise).
* `lvbench`: `video_info.meta.jsonl`, a line per video `{key, type, qa: [{uid, question (options
  inside it as "(A) ..." lines), answer, question_type: [...], time_reference "mm:ss-mm:ss"}],
  video_info}`; videos `<key>.mp4`.
* `mlvu`: the per-task files `json/N_task.json` (a list of `{video, duration, question, candidates,
  answer (the option's text), question_type}`); videos `video/<task>/<video>`. The open-ended
  tasks (no candidates: sub-scene captioning, summary) are skipped, counted as `open_ended`.
* `longvideobench`: `lvb_val.json` (`{id, video_path, subtitle_path, question, candidates,
  correct_choice, duration, duration_group, question_category, topic_category, level,
  starting_timestamp_for_subtitles}`); subtitles `subtitles/<subtitle_path>`, JSON lists of
  `{start, end, line}` ("HH:MM:SS.mmm") or `{timestamp: [s, e], text}`, shifted by the start offset.

A task holds the options without their "A." / "(A)" labels, the answer as the option's letter,
metadata (source, question id, task type, duration group, category), evidence spans where the
benchmark gives times, and captions from subtitles (so `temporal_search` works on them). Video
paths are written relative to the output file.

Bad input never stops a conversion: a line that does not parse, a record missing a field, a
missing video, an answer that is not among the options is a `Skip` with a reason; `convert`
counts them by reason and names the first few of each in its summary.
"""

from __future__ import annotations

import html
import json
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

VIDEO_EXTS = (".mp4", ".MP4", ".mkv", ".webm", ".avi", ".mov")
EXAMPLES_PER_REASON = 5


@dataclass(frozen=True)
class Skip:
    """A question that was not converted: why (`reason`, a short key) and which (`ref`)."""

    reason: str
    ref: str
    detail: str = ""


Out = Union[dict, Skip]


class SkipError(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason, self.detail = reason, detail


# ------------------------------------------------------------------ shared pieces

_LABEL_RE = re.compile(r"^\s*(?:\(([A-Za-z])\)|\[([A-Za-z])\]|([A-Za-z])\s*[.:)．、])\s*(.*)$", re.DOTALL)
_TIME_RE = r"\d+(?::\d+){0,2}(?:\.\d+)?"


def split_label(option: str) -> tuple[Optional[str], str]:
    """('B', 'a red car') for 'B. a red car', '(B) a red car', 'B) a red car'; (None, text) unlabelled."""
    m = _LABEL_RE.match(str(option))
    if not m or not m.group(4).strip():
        return None, str(option).strip()
    return next(g for g in m.groups()[:3] if g).upper(), m.group(4).strip()


def strip_labels(options: list[Any]) -> list[str]:
    """Options without their labels; labels must run A, B, C, ... when present."""
    if not isinstance(options, (list, tuple)) or len(options) < 2:
        raise SkipError("no_options", f"{len(options) if isinstance(options, (list, tuple)) else 0} option(s)")
    out = []
    for i, o in enumerate(options):
        if not isinstance(o, str) or not o.strip():
            raise SkipError("bad_options", f"option {i} is {o!r}")
        label, text = split_label(o)
        if label is not None and label != chr(65 + i):
            raise SkipError("bad_options", f"option {i} is labelled {label!r}")
        out.append(text)
    return out


def answer_letter(answer: Any, options: list[str]) -> str:
    """The gold answer as an option letter: from a letter ('B', '(B)', 'B.'), an index, or the option's text."""
    if isinstance(answer, bool) or answer is None:
        raise SkipError("answer_not_in_options", f"answer {answer!r}")
    if isinstance(answer, int):
        if 0 <= answer < len(options):
            return chr(65 + answer)
        raise SkipError("answer_not_in_options", f"answer index {answer} with {len(options)} options")
    s = str(answer).strip()
    letter = s.strip("()[]. ").upper()
    if len(letter) == 1 and letter.isalpha():
        if ord(letter) - 65 < len(options):
            return letter
        raise SkipError("answer_not_in_options", f"answer {s!r} with {len(options)} options")
    label, text = split_label(s)
    norm = [" ".join(o.split()).lower() for o in options]
    for candidate in (s, text):
        key = " ".join(candidate.split()).lower()
        if key in norm:
            return chr(65 + norm.index(key))
    raise SkipError("answer_not_in_options", f"answer {s[:80]!r} is none of the options")


def parse_time(s: Any) -> float:
    """Seconds of '75', '01:15', '1:01:15.5', '00:01:15,500' (SRT) or a number."""
    if isinstance(s, (int, float)) and not isinstance(s, bool):
        return float(s)
    parts = str(s).strip().replace(",", ".").split(":")
    if not 1 <= len(parts) <= 3:
        raise ValueError(f"not a time: {s!r}")
    seconds = 0.0
    for p in parts:
        seconds = seconds * 60 + float(p)
    return seconds


def parse_spans(text: Any) -> list[list[float]]:
    """Evidence spans of LVBench's time_reference ('00:15-00:19', several separated by ',' or ';')."""
    spans = []
    for a, b in re.findall(rf"({_TIME_RE})\s*[-–~]\s*({_TIME_RE})", str(text or "")):
        start, end = parse_time(a), parse_time(b)
        spans.append([min(start, end), max(start, end)])
    return spans


_TAG_RE = re.compile(r"<[^>]+>")


def read_srt(path: Path) -> list[dict]:
    """Captions of an .srt file: [{start, end, text}], markup (Video-MME's <font ...>) removed."""
    captions = []
    text = path.read_text(encoding="utf-8-sig", errors="replace").replace("\r\n", "\n")
    for block in re.split(r"\n\s*\n", text):
        lines = [ln for ln in block.strip().split("\n") if ln.strip()]
        arrow = next((i for i, ln in enumerate(lines) if "-->" in ln), None)
        if arrow is None:
            continue
        try:
            a, b = lines[arrow].split("-->")
            start, end = parse_time(a.strip().split()[0]), parse_time(b.strip().split()[0])
        except (ValueError, IndexError):
            continue
        body = " ".join(html.unescape(_TAG_RE.sub("", ln)).strip() for ln in lines[arrow + 1:]).strip()
        if body and end >= start:
            captions.append({"start": start, "end": end, "text": body})
    return captions


def read_lvb_subtitles(path: Path, offset: float, duration: float) -> list[dict]:
    """Captions of a LongVideoBench subtitle file, shifted to the clip's own clock."""
    captions = []
    for sub in json.loads(path.read_text(encoding="utf-8")):
        if "timestamp" in sub:
            start, end = sub["timestamp"]
            end = duration + offset if end is None else end
            text = sub.get("text", "")
        else:
            start, end, text = parse_time(sub["start"]), parse_time(sub["end"]), sub.get("line", "")
        start, end = float(start) - offset, float(end) - offset
        if str(text).strip() and end >= 0:
            captions.append({"start": max(0.0, start), "end": max(0.0, end), "text": str(text).strip()})
    return captions


class VideoIndex:
    """Finds a benchmark's video under --videos: by relative path first, then by file name (stem), over
    the known video extensions. The directory is walked once."""

    def __init__(self, root: Path) -> None:
        self.root = root = root.resolve()
        self.by_stem: dict[str, list[Path]] = defaultdict(list)
        for dirpath, _, files in os.walk(root):
            for name in files:
                if name.endswith(VIDEO_EXTS):
                    self.by_stem[Path(name).stem].append(Path(dirpath) / name)

    def find(self, *candidates: str) -> Path:
        for rel in candidates:
            p = self.root / rel
            if p.suffix in VIDEO_EXTS and p.is_file():
                return p
            for ext in VIDEO_EXTS:
                q = p.with_name(p.name + ext) if p.suffix not in VIDEO_EXTS else p.with_suffix(ext)
                if q.is_file():
                    return q
        for rel in candidates:
            hits = self.by_stem.get(Path(rel).stem if Path(rel).suffix in VIDEO_EXTS else Path(rel).name, [])
            if len(hits) == 1:
                return hits[0]
        raise SkipError("missing_video", f"no video {candidates[0]!r} under {self.root}")


def _task(fmt: str, qid: Any, video: Path, question: Any, options: list[str], answer: str, **metadata: Any) -> dict:
    if not isinstance(question, str) or not question.strip():
        raise SkipError("bad_record", "no question text")
    meta = {"source": fmt, "question_id": str(qid)}
    meta.update({k: v for k, v in metadata.items() if v not in (None, "", [])})
    return {"id": f"{fmt}-{qid}", "video": str(video), "question": question.strip(), "options": options,
            "answer": answer, "metadata": meta}


# ------------------------------------------------------------------ the four readers


@dataclass
class Ctx:
    annotations: Path
    videos: VideoIndex
    subtitles: Optional[Path]
    warnings: Counter


def _records(rows: Iterator[tuple[str, Any]], make: Callable[[Any], dict]) -> Iterator[Out]:
    """`make` each (ref, row); a SkipError or any other error becomes a Skip naming the row."""
    for ref, row in rows:
        if isinstance(row, Skip):
            yield row
            continue
        try:
            yield make(row)
        except SkipError as e:
            yield Skip(e.reason, ref, e.detail)
        except Exception as e:  # noqa: BLE001 - a malformed record is skipped and named, never fatal
            yield Skip("bad_record", ref, f"{type(e).__name__}: {e}")


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(ref, object) of a JSON list file or a JSONL file; a line or file that does not parse is a Skip."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".jsonl" or not text.lstrip().startswith("["):
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    yield f"{path.name}:{n}", json.loads(line)
                except ValueError as e:
                    yield f"{path.name}:{n}", Skip("bad_line", f"{path.name}:{n}", str(e)[:120])
        return
    try:
        rows = json.loads(text)
    except ValueError as e:
        yield path.name, Skip("unreadable_file", path.name, str(e)[:120])
        return
    if not isinstance(rows, list):
        yield path.name, Skip("unreadable_file", path.name, "not a JSON list")
        return
    for i, row in enumerate(rows):
        yield f"{path.name}[{i}]", row


def read_videomme(ctx: Ctx) -> Iterator[Out]:
    path = ctx.annotations
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows: Iterator[tuple[str, Any]] = ((f"{path.name}[{i}]", r) for i, r in enumerate(pq.read_table(path).to_pylist()))
    else:
        rows = _json_rows(path)
    subs = ctx.subtitles or path.parent / "subtitle"

    def make(r: dict) -> dict:
        options = strip_labels(list(r["options"]))
        video = ctx.videos.find(r["videoID"], f"data/{r['videoID']}")
        task = _task("videomme", r["question_id"], video, r["question"], options, answer_letter(r["answer"], options),
                     task_type=r.get("task_type"), duration_group=r.get("duration"), domain=r.get("domain"),
                     sub_category=r.get("sub_category"), video_id=r.get("video_id"))
        task["captions"] = _captions(ctx, subs / f"{r['videoID']}.srt", read_srt)
        return task

    yield from _records(rows, make)


def read_lvbench(ctx: Ctx) -> Iterator[Out]:
    def questions() -> Iterator[tuple[str, Any]]:
        for ref, video in _json_rows(ctx.annotations):
            if isinstance(video, Skip) or not isinstance(video, dict) or not isinstance(video.get("qa"), list):
                yield ref, video if isinstance(video, Skip) else Skip("bad_record", ref, "no qa list")
                continue
            for j, qa in enumerate(video["qa"]):
                yield f"{ref} qa[{j}]", (video, qa)

    def make(pair: tuple[dict, dict]) -> dict:
        video, qa = pair
        stem, options = _inline_options(qa["question"])
        path = ctx.videos.find(video["key"])
        types = qa.get("question_type") or []
        types = [types] if isinstance(types, str) else list(types)
        minutes = (video.get("video_info") or {}).get("duration_minutes")
        task = _task("lvbench", qa["uid"], path, stem, options, answer_letter(qa["answer"], options),
                     question_type=";".join(types), category=video.get("type"), video_key=video["key"],
                     duration_minutes=minutes)
        task["evidence"] = parse_spans(qa.get("time_reference"))
        return task

    yield from _records(questions(), make)


def _inline_options(text: str) -> tuple[str, list[str]]:
    """LVBench puts the options in the question: 'What ...?\\n(A) ...\\n(B) ...'."""
    lines = str(text).split("\n")
    first = next((i for i, ln in enumerate(lines) if split_label(ln)[0] == "A"), None)
    if first is None:
        raise SkipError("no_options", "no '(A) ...' line in the question")
    return "\n".join(lines[:first]).strip(), strip_labels([ln for ln in lines[first:] if ln.strip()])


def read_mlvu(ctx: Ctx) -> Iterator[Out]:
    root = ctx.annotations
    files = sorted(root.glob("*.json")) if root.is_dir() else [root]

    def make(item: tuple[str, int, dict]) -> dict:
        task_name, i, r = item
        if not r.get("candidates"):
            raise SkipError("open_ended", "no candidates (a generation task)")
        options = strip_labels(list(r["candidates"]))
        video = ctx.videos.find(f"{task_name}/{r['video']}", f"video/{task_name}/{r['video']}", r["video"])
        seconds = r.get("duration")
        return _task("mlvu", r.get("question_id") or f"{task_name}-{i}", video, r["question"], options,
                     answer_letter(r["answer"], options), task_type=r.get("question_type") or task_name,
                     duration_s=seconds, duration_group=_duration_group(seconds))

    def rows() -> Iterator[tuple[str, Any]]:
        for path in files:
            task_name = re.sub(r"^\d+_", "", path.stem)  # 1_plotQA.json -> plotQA, the video folder's name
            for i, (ref, r) in enumerate(_json_rows(path)):
                yield ref, r if isinstance(r, Skip) else (task_name, i, r)

    yield from _records(rows(), make)


def _duration_group(seconds: Any) -> Optional[str]:
    """Video-MME's duration groups by length: short < 2 min <= medium < 15 min <= long."""
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return None
    return "short" if seconds < 120 else "medium" if seconds < 900 else "long"


def read_longvideobench(ctx: Ctx) -> Iterator[Out]:
    subs = ctx.subtitles or ctx.annotations.parent / "subtitles"

    def make(r: dict) -> dict:
        if r.get("correct_choice") is None:
            raise SkipError("no_answer", "no correct_choice (the test split)")
        options = strip_labels(list(r["candidates"]))
        video = ctx.videos.find(r["video_path"], f"videos/{r['video_path']}")
        task = _task("longvideobench", r["id"], video, r["question"], options,
                     answer_letter(int(r["correct_choice"]), options), task_type=r.get("question_category"),
                     category=r.get("topic_category"), duration_group=r.get("duration_group"), level=r.get("level"))
        offset, duration = float(r.get("starting_timestamp_for_subtitles") or 0.0), float(r.get("duration") or 0.0)
        if r.get("subtitle_path"):
            task["captions"] = _captions(ctx, subs / r["subtitle_path"], lambda p: read_lvb_subtitles(p, offset, duration))
        return task

    yield from _records(_json_rows(ctx.annotations), make)


def _captions(ctx: Ctx, path: Path, read: Callable[[Path], list[dict]]) -> list[dict]:
    """A question's captions; a missing or broken subtitle file leaves it without (counted as a warning)."""
    if not path.is_file():
        ctx.warnings["missing_subtitles"] += 1
        return []
    try:
        return read(path)
    except Exception:  # noqa: BLE001 - a broken subtitle file costs the captions, not the question
        ctx.warnings["unreadable_subtitles"] += 1
        return []


READERS = {"videomme": read_videomme, "lvbench": read_lvbench, "mlvu": read_mlvu, "longvideobench": read_longvideobench}


# ------------------------------------------------------------------ `weft convert`


def convert(fmt: str, annotations: str | Path, videos: str | Path, out: str | Path,
            subtitles: Optional[str | Path] = None) -> dict[str, Any]:
    """Convert a benchmark's annotations to a task file; returns the summary `weft convert` prints."""
    if fmt not in READERS:
        raise ValueError(f"unknown format {fmt!r}; one of {sorted(READERS)}")
    annotations, out = Path(annotations), Path(out)
    if not annotations.exists():
        raise FileNotFoundError(f"{annotations}: no such annotation file or directory")
    ctx = Ctx(annotations, VideoIndex(Path(videos)), Path(subtitles) if subtitles else None, Counter())
    skipped: Counter = Counter()
    examples: dict[str, list[str]] = defaultdict(list)
    tasks, seen = [], set()
    for result in READERS[fmt](ctx):
        if isinstance(result, dict) and result["id"] in seen:
            result = Skip("duplicate_id", result["id"])
        if isinstance(result, Skip):
            skipped[result.reason] += 1
            if len(examples[result.reason]) < EXAMPLES_PER_REASON:
                examples[result.reason].append(f"{result.ref}: {result.detail}" if result.detail else result.ref)
            continue
        seen.add(result["id"])
        result["video"] = os.path.relpath(result["video"], out.parent.resolve())
        tasks.append(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in tasks), encoding="utf-8")
    return {"format": fmt, "out": str(out), "tasks": len(tasks), "videos": len({t["video"] for t in tasks}),
            "with_evidence": sum(bool(t.get("evidence")) for t in tasks),
            "with_captions": sum(bool(t.get("captions")) for t in tasks),
            "skipped": dict(skipped), "skipped_total": sum(skipped.values()), "skipped_examples": dict(examples),
            "warnings": dict(ctx.warnings)}
