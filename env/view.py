"""`weft view`: a run directory's sampled trajectories as one self-contained HTML page.

Owns reading a run dir (`config.yaml`, `trajectories/step_*.msgpack`, `metrics.jsonl`)
and rendering it: per trajectory an SVG timeline of the video (evidence span, zoom
windows the model asked for, the frames it saw), thumbnails of those frames re-decoded
from their FrameRefs through env's shared decoder (checked against the recorded content
hash, as the learner does), each turn's text with tool calls highlighted, the answer
against the correct one, status, reward and its terms.

Why one file with inline CSS, SVG and base64 JPEGs and no script: it can be mailed,
attached to an issue or opened from a cluster's shared disk with nothing else. Every
piece of text a model or a task wrote is HTML-escaped. Nothing here raises for bad
input (missing video, unreadable record, unknown task): it shows the error in place
and counts it in `View.problems`.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from env.parser import parse_action
from env.rewards import match_answer, point_window
from env.types import Task
from protos.records import FrameRef, Trajectory, content_hash

EVIDENCE_COLOUR = "#e8178a"  # magenta: no demo marker colour is near it (tests look for it in screenshots)
ZOOM_COLOUR = "#6a3d9a"  # purple
OVERVIEW_COLOUR = "#777777"
TOOL_FRAME_COLOUR = "#1f6fb4"
THUMB_MAX = (176, 132)  # (width, height) box a thumbnail is scaled into
MAX_THUMBS = 96  # per trajectory; more are counted, not shown (a page must stay openable)
SVG_W, LEFT, RIGHT = 960, 150, 20  # timeline geometry in px
_STEP_RE = re.compile(r"step_(\d+)\.msgpack$")
_BLOCK_RE = re.compile(r"(<think>.*?</think>|<tool_call>.*?</tool_call>|<answer>.*?</answer>)", re.DOTALL)


@dataclass
class View:
    """What a run dir holds for the page: trajectories of one step, their tasks, the config, metrics."""

    run_dir: str
    step: Optional[int] = None
    steps: list[int] = field(default_factory=list)
    trajectories: list[Trajectory] = field(default_factory=list)
    total: int = 0  # trajectories in the step file (before --max)
    tasks: dict[str, Task] = field(default_factory=dict)
    cfg: Any = None
    metrics: list[dict] = field(default_factory=list)
    problems: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)  # the first few problems in words

    def problem(self, kind: str, detail: str) -> None:
        self.problems[kind] += 1
        if len(self.notes) < 20:
            self.notes.append(f"{kind}: {detail}")


# ------------------------------------------------------------------ loading


def trajectory_files(run_dir: str | Path) -> dict[int, Path]:
    """step -> RUN_DIR/trajectories/step_NNNNNN.msgpack."""
    d = Path(run_dir) / "trajectories"
    out = {}
    for p in sorted(d.glob("step_*.msgpack")) if d.is_dir() else []:
        m = _STEP_RE.search(p.name)
        if m:
            out[int(m.group(1))] = p
    return out


def load_view(run_dir: str | Path, *, step: Optional[int] = None, max_trajectories: Optional[int] = None,
              data: Optional[str] = None) -> View:
    """Read a run dir (or a single trajectories .msgpack file); `step` None = the newest step file."""
    run_dir = Path(run_dir)
    view = View(run_dir=str(run_dir))
    if run_dir.is_file():
        path: Optional[Path] = run_dir
    else:
        files = trajectory_files(run_dir)
        view.steps = sorted(files)
        view.step = step if step is not None else (view.steps[-1] if view.steps else None)
        path = files.get(view.step) if view.step is not None else None
        if step is not None and path is None:
            view.problem("step_missing", f"no trajectories/step_{step:06d}.msgpack (steps: {view.steps or 'none'})")
        _load_config(view, run_dir / "config.yaml")
        view.metrics = _load_metrics(run_dir / "metrics.jsonl", view)
    if path is not None:
        _load_trajectories(view, path, max_trajectories)
    _load_tasks(view, data, run_dir)
    return view


def _load_config(view: View, path: Path) -> None:
    from configs import ConfigError, load_config

    if not path.is_file():
        view.problem("config_missing", f"{path} not found; env defaults are used")
        return
    try:
        view.cfg = load_config(path, [])
    except (ConfigError, OSError, ValueError) as e:
        view.problem("config_unreadable", f"{path}: {e}")


def _load_metrics(path: Path, view: View) -> list[dict]:
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            view.problems["metrics_bad_lines"] += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _load_trajectories(view: View, path: Path, max_n: Optional[int]) -> None:
    from protos.codec import CodecError, iter_trajectories

    try:
        for t in iter_trajectories(path):
            view.total += 1
            if max_n is None or len(view.trajectories) < max_n:
                view.trajectories.append(t)
    except (CodecError, OSError, ValueError) as e:  # keep what was read before the bad record
        view.problem("trajectories_unreadable", f"{path}: {type(e).__name__}: {e}")


def _load_tasks(view: View, data: Optional[str], run_dir: Path) -> None:
    from env.tasks import TaskFileError, load_tasks

    raw = data or (view.cfg.data.path if view.cfg is not None else None)
    if not raw:
        return
    cands = [Path(raw)] if Path(raw).is_absolute() else [Path(raw), run_dir / raw, run_dir.parent / raw]
    path = next((p for p in cands if p.is_file()), None)
    if path is None:
        view.problem("tasks_missing", f"task file {raw} not found (tried {', '.join(map(str, cands))})")
        return
    try:
        view.tasks = {t.id: t for t in load_tasks(path)}
    except TaskFileError as e:
        view.problem("tasks_unreadable", str(e).splitlines()[0])


# ------------------------------------------------------------------ frames


def decode_thumbnails(refs: Sequence[FrameRef], decoder: Any = None) -> list[tuple[Optional[np.ndarray], str]]:
    """Per ref: (uint8 image at the ref's size, "") or (None, error). Decoded as the learner does:
    one decoder call per (video, size, crop), so frames shared by a group come from one GOP walk."""
    if decoder is None:
        from env.video import get_decoder

        decoder = get_decoder()
    wanted: dict[tuple, set[int]] = {}
    for r in refs:
        wanted.setdefault(_key(r), set()).add(int(r.frame_index))
    got: dict[tuple, Any] = {}
    for (video, size, crop), idx in wanted.items():
        order = sorted(idx)
        try:
            images = decoder.frames(video, order, size=size, crop=crop)
        except Exception:  # noqa: BLE001 - retry one by one so only the frames that fail are placeholders
            images = [_decode_one(decoder, video, i, size, crop) for i in order]
        for i, img in zip(order, images):
            got[(video, size, crop, i)] = img
    return [_checked(r, got[(*_key(r), int(r.frame_index))]) for r in refs]


def _key(r: FrameRef) -> tuple:
    size = tuple(int(v) for v in r.size)
    return r.video, (size if min(size) > 0 else None), tuple(float(v) for v in r.crop)


def _decode_one(decoder: Any, video: str, i: int, size: Any, crop: Any) -> Any:
    try:
        return decoder.frames(video, [i], size=size, crop=crop)[0]
    except Exception as e:  # noqa: BLE001 - shown on the page as the frame's placeholder
        return f"{type(e).__name__}: {e}"


def _checked(ref: FrameRef, img: Any) -> tuple[Optional[np.ndarray], str]:
    if isinstance(img, str):
        return None, img
    if ref.content_hash and content_hash(img) != ref.content_hash:
        return np.asarray(img), "hash mismatch: the video changed since the episode (these are not the pixels the model saw)"
    return np.asarray(img), ""


def jpeg_data_uri(img: np.ndarray, box: tuple[int, int] = THUMB_MAX) -> str:
    """A base64 JPEG data URI of `img` scaled to fit `box` (never up)."""
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8))
    im.thumbnail(box)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ------------------------------------------------------------------ what the model did


@dataclass
class Zoom:
    """One window the model asked to look at, from its tool calls."""

    turn: int
    name: str
    start: float
    end: float
    error: str = ""  # why the env would refuse it (then it is drawn as an outline)


def zoom_windows(traj: Trajectory, duration: float, cfg: Any = None) -> list[Zoom]:
    """The windows of every call that looked at a stretch of the video. A trajectory recorded since tools
    report their windows carries its calls (metadata["tool_calls"], what the env decided, labels and
    refusals included); an older one is parsed from its turn texts with the built-ins' rules."""
    recorded = traj.metadata.get("tool_calls")
    if isinstance(recorded, list):
        out = []
        for c in recorded:
            w = c.get("window") if isinstance(c, dict) else None
            if w is not None and len(w) == 2:
                out.append(Zoom(int(c.get("turn", 0)), str(c.get("label") or c.get("name", "")), float(w[0]),
                                float(w[1]), "" if c.get("ok") else str(c.get("error", ""))))
        return out
    from configs.schema import EnvConfig
    from env.tools import builtin_tools, validate_call

    env_cfg = cfg.env if cfg is not None else EnvConfig()
    tools = builtin_tools(env_cfg)
    out = []
    for turn, text in enumerate(traj.metadata.get("turn_texts") or [], 1):
        for call in parse_action(str(text), max_calls=env_cfg.max_calls_per_turn).calls:
            window = _window(call.name, call.arguments, duration)
            if window is None:
                continue
            _, err = validate_call(call, tools, duration)
            out.append(Zoom(turn, call.name, window[0], window[1], err or ""))
    return out


def _window(name: str, args: dict, duration: float) -> Optional[tuple[float, float]]:
    """A built-in call's window, for trajectories recorded before tools reported theirs."""
    def num(k: str) -> Optional[float]:
        v = args.get(k)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None

    if name == "temporal_zoom" and num("start") is not None and num("end") is not None:
        return num("start"), num("end")
    if name in ("spatial_zoom", "get_frame") and num("time") is not None:
        a, b = point_window(num("time"))
        return max(0.0, a), min(duration, b) if duration > 0 else b
    return None


def overview_count(traj: Trajectory, task: Optional[Task], cfg: Any) -> int:
    """How many leading media are the reset's overview: the env's own count when the task is known,
    else the leading run of frames with the first frame's size and no crop."""
    if task is not None:
        from configs.schema import EnvConfig
        from env.env import VideoToolEnv

        env_cfg = cfg.env if cfg is not None else EnvConfig()
        return min(len(traj.media), VideoToolEnv(env_cfg).overview_count(task))
    n = 0
    for r in traj.media:
        if r.size != traj.media[0].size or tuple(r.crop) != (0.0, 0.0, 1.0, 1.0):
            break
        n += 1
    return n


def video_duration(traj: Trajectory, task: Optional[Task], zooms_hint: Sequence[float] = ()) -> tuple[float, str]:
    """(duration in s, error): from the decoder, else the furthest time anything mentions."""
    video = task.video if task is not None else (traj.media[0].video if traj.media else "")
    if video:
        from env.video import get_decoder

        try:
            return get_decoder().info(video).duration, ""
        except Exception as e:  # noqa: BLE001 - the timeline falls back to what the records say
            err = f"{type(e).__name__}: {e}"
    else:
        err = "no video known for this trajectory"
    times = [r.time for r in traj.media] + [e for s in (task.evidence if task else []) for e in s] + list(zooms_hint)
    return max([1.0] + [t * 1.05 for t in times if math.isfinite(t)]), err


# ------------------------------------------------------------------ SVG


def nice_step(duration: float, max_ticks: int = 12) -> float:
    """A round tick spacing (1-2-5 series, in s) giving at most max_ticks ticks."""
    for s in (0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200):
        if duration / s <= max_ticks:
            return float(s)
    return float(10 ** math.ceil(math.log10(max(duration, 1.0) / max_ticks)))


def timeline_svg(duration: float, evidence: Sequence[tuple[float, float]], zooms: Sequence[Zoom],
                 overview: Sequence[float], tool_frames: Sequence[float]) -> str:
    """The timeline: an evidence lane, one lane per zoom window, a frames lane, the seconds axis, a legend."""
    span = max(duration, 1e-6)
    x = lambda t: LEFT + (SVG_W - LEFT - RIGHT) * min(max(t, 0.0), span) / span  # noqa: E731
    parts, y = [], 6
    parts.append(_lane_label(y, "evidence"))
    for a, b in evidence:
        parts.append(_rect(x(a), y, max(2.0, x(b) - x(a)), 16, EVIDENCE_COLOUR, f"evidence {a:.2f}-{b:.2f} s"))
    if not evidence:
        parts.append(f'<text x="{LEFT}" y="{y + 12}" class="muted">no evidence span in the task</text>')
    y += 22
    for z in zooms:
        label = f"t{z.turn} {z.name}"
        tip = f"turn {z.turn} {z.name} {z.start:.2f}-{z.end:.2f} s" + (f" (refused: {z.error})" if z.error else "")
        parts.append(_lane_label(y, label))
        w = max(2.0, x(z.end) - x(z.start))
        parts.append(_rect(x(z.start), y, w, 12, "none" if z.error else ZOOM_COLOUR, tip,
                           stroke=ZOOM_COLOUR if z.error else None))
        y += 16
    parts.append(_lane_label(y, "frames seen"))
    for t in overview:
        parts.append(f'<line x1="{x(t):.1f}" y1="{y}" x2="{x(t):.1f}" y2="{y + 16}" stroke="{OVERVIEW_COLOUR}" '
                     f'stroke-width="2"><title>overview frame {t:.2f} s</title></line>')
    for t in tool_frames:
        parts.append(f'<line x1="{x(t):.1f}" y1="{y}" x2="{x(t):.1f}" y2="{y + 16}" stroke="{TOOL_FRAME_COLOUR}" '
                     f'stroke-width="2"><title>tool frame {t:.2f} s</title></line>')
    y += 22
    parts += _axis(y, span, x)
    y += 30
    parts += _legend(y)
    y += 20
    return (f'<svg width="{SVG_W}" height="{y}" viewBox="0 0 {SVG_W} {y}" '
            f'class="timeline">' + "".join(parts) + "</svg>")


def _rect(x: float, y: float, w: float, h: float, fill: str, tip: str, stroke: Optional[str] = None) -> str:
    s = f' stroke="{stroke}" stroke-width="1.5" stroke-dasharray="4 2"' if stroke else ""
    return (f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{h}" fill="{fill}"{s}>'
            f"<title>{html.escape(tip)}</title></rect>")


def _lane_label(y: float, text: str) -> str:
    return f'<text x="{LEFT - 8}" y="{y + 11}" text-anchor="end" class="lane">{html.escape(text)}</text>'


def _axis(y: float, span: float, x: Any) -> list[str]:
    parts = [f'<line x1="{LEFT}" y1="{y}" x2="{SVG_W - RIGHT}" y2="{y}" stroke="#222"/>']
    step = nice_step(span)
    for k in range(int(span / step + 1e-9) + 1):
        t = k * step
        parts.append(f'<line x1="{x(t):.1f}" y1="{y}" x2="{x(t):.1f}" y2="{y + 5}" stroke="#222"/>')
        parts.append(f'<text x="{x(t):.1f}" y="{y + 17}" text-anchor="middle" class="tick">{t:g}s</text>')
    parts.append(f'<text x="{LEFT - 8}" y="{y + 4}" text-anchor="end" class="lane">{span:.1f} s</text>')
    return parts


def _legend(y: float) -> list[str]:
    items = [("evidence span", EVIDENCE_COLOUR), ("zoom window (dashed: refused)", ZOOM_COLOUR),
             ("overview frame", OVERVIEW_COLOUR), ("tool frame", TOOL_FRAME_COLOUR)]
    parts, x = [], LEFT
    for label, colour in items:
        parts.append(f'<rect x="{x}" y="{y}" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{x + 14}" y="{y + 9}" class="tick">{html.escape(label)}</text>')
        x += 24 + 7 * len(label)
    return parts


def reward_curve_svg(rows: Sequence[dict], key: str = "reward_mean", w: int = 480, h: int = 120) -> str:
    """A small line plot of one metric over steps, or "" when the metrics have none of it."""
    pts = [(float(r["step"]), float(r[key])) for r in rows
           if isinstance(r.get(key), (int, float)) and isinstance(r.get("step"), (int, float))
           and math.isfinite(float(r[key]))]
    if len(pts) < 2:
        return ""
    (s0, s1), (v0, v1) = (min(p[0] for p in pts), max(p[0] for p in pts)), (min(p[1] for p in pts), max(p[1] for p in pts))
    sx = lambda s: 40 + (w - 50) * (s - s0) / max(s1 - s0, 1e-9)  # noqa: E731
    sy = lambda v: h - 20 - (h - 30) * (v - v0) / max(v1 - v0, 1e-9)  # noqa: E731
    line = " ".join(f"{sx(s):.1f},{sy(v):.1f}" for s, v in pts)
    return (f'<svg width="{w}" height="{h}" class="curve">'
            f'<polyline points="{line}" fill="none" stroke="#1f6fb4" stroke-width="2"/>'
            f'<text x="2" y="{sy(v1) + 4:.1f}" class="tick">{v1:.3g}</text>'
            f'<text x="2" y="{sy(v0) + 4:.1f}" class="tick">{v0:.3g}</text>'
            f'<text x="40" y="{h - 4}" class="tick">step {s0:g}</text>'
            f'<text x="{w - 10}" y="{h - 4}" text-anchor="end" class="tick">step {s1:g}</text>'
            f'<text x="{w / 2}" y="12" text-anchor="middle" class="tick">{html.escape(key)}</text></svg>')


# ------------------------------------------------------------------ HTML


def highlight_turn(text: str) -> str:
    """A turn's text, HTML-escaped, with <think>, <tool_call> and <answer> blocks in styled spans."""
    out = []
    for part in _BLOCK_RE.split(str(text)):
        if not part:
            continue
        esc = html.escape(part)
        if part.startswith("<tool_call>"):
            out.append(f'<span class="call">{esc}</span>')
        elif part.startswith("<answer>"):
            out.append(f'<span class="ans">{esc}</span>')
        elif part.startswith("<think>"):
            out.append(f'<span class="think">{esc}</span>')
        else:
            out.append(esc)
    return "".join(out)


def trajectory_section(i: int, traj: Trajectory, view: View, decoder: Any = None) -> str:
    """One trajectory's section: header, result table, timeline, frames, turns."""
    task = view.tasks.get(traj.task_id)
    texts = [str(t) for t in traj.metadata.get("turn_texts") or []]
    duration, dur_err = video_duration(traj, task)
    zooms = zoom_windows(traj, duration, view.cfg)
    n_over = overview_count(traj, task, view.cfg)
    if dur_err:
        view.problem("video_unreadable", dur_err)
    times = [r.time for r in traj.media]
    svg = timeline_svg(duration, task.evidence if task else [], zooms, times[:n_over], times[n_over:])
    head = (f'<h2>#{i} <code>{html.escape(traj.task_id)}</code> <span class="st st-{html.escape(traj.status.value)}">'
            f'{html.escape(traj.status.value)}</span> reward {traj.reward:+.3f}</h2>')
    ids = (f'<div class="muted">traj {html.escape(traj.traj_id)} · group {html.escape(traj.group_id)}'
           + (f' · video {html.escape(task.video)}' if task else ' · task not found in the task file') + "</div>")
    err = f'<p class="err">{html.escape(dur_err)}</p>' if dur_err else ""
    return (f'<section id="traj-{i}">{head}{ids}{_question(task)}{_result_tables(traj, task)}'
            f'<h3>Timeline</h3>{svg}{err}<h3>Frames the model saw ({len(traj.media)})</h3>'
            f'{_frames(traj, n_over, view, decoder)}<h3>Turns</h3>{_turns(traj, texts, view)}</section>')


def _question(task: Optional[Task]) -> str:
    if task is None:
        return ""
    opts = "".join(f'<li{" class=ok" if o.strip().lower() == task.answer.strip().lower() else ""}>'
                   f"{chr(65 + k)}. {html.escape(o)}</li>" for k, o in enumerate(task.options or []))
    return f'<p class="q">{html.escape(task.question)}</p>' + (f"<ol class=opts>{opts}</ol>" if opts else "")


def _result_tables(traj: Trajectory, task: Optional[Task]) -> str:
    pred = traj.metadata.get("answer")
    if task is not None:
        ok = match_answer(pred, task.answer, task.options) if pred is not None else False
        verdict = f'<span class="{"ok" if ok else "bad"}">{"correct" if ok else "wrong"}</span>'
        truth = html.escape(truth_text(task))
    else:
        verdict, truth = '<span class="muted">unknown (task not found)</span>', "?"
    rows = [("answer", html.escape(str(pred)) if pred is not None else '<span class="muted">none</span>'),
            ("correct answer", truth), ("verdict", verdict), ("status", html.escape(traj.status.value)),
            ("reward", f"{traj.reward:+.4f}")]
    if traj.metadata.get("error"):
        rows.append(("error", f'<span class="err">{html.escape(str(traj.metadata["error"]))}</span>'))
    rows += [(f"reward/{k}", f"{float(v):+.4f}") for k, v in sorted(traj.reward_terms.items())]
    metrics = "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in sorted(traj.metrics.items()))
    main = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in rows)
    return (f'<div class="tables"><table class="kv">{main}</table>'
            f'<table class="kv"><tr><th colspan=2>metrics</th></tr>{metrics}</table></div>')


def truth_text(task: Task) -> str:
    """The correct answer, with its option letter when the task has options ("B. 7")."""
    for k, o in enumerate(task.options or []):
        if o.strip().lower() == task.answer.strip().lower():
            return f"{chr(65 + k)}. {task.answer}"
    return task.answer


def _verdict(traj: Trajectory, task: Optional[Task]) -> str:
    pred = traj.metadata.get("answer")
    if task is None:
        return "?"
    return "&#10003;" if pred is not None and match_answer(pred, task.answer, task.options) else "&#10007;"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))


def _frames(traj: Trajectory, n_over: int, view: View, decoder: Any) -> str:
    refs = traj.media[:MAX_THUMBS]
    if not refs:
        return '<p class="muted">no frames</p>'
    if traj.pixels is not None and len(traj.pixels) == len(traj.media):
        images = [_checked(r, p) for r, p in zip(refs, traj.pixels)]
    else:
        images = decode_thumbnails(refs, decoder)
    cells = []
    for k, (ref, (img, err)) in enumerate(zip(refs, images)):
        kind = "overview" if k < n_over else "tool"
        crop = "" if tuple(ref.crop) == (0.0, 0.0, 1.0, 1.0) else " crop " + ",".join(f"{c:.2f}" for c in ref.crop)
        label = f"{kind} t={ref.time:.2f}s{crop}"
        if err:
            view.problem("frame_hash_mismatch" if img is not None else "frame_unreadable", f"{ref.video}#{ref.frame_index}: {err}")
        if img is None:
            cells.append(f'<figure class="ph"><div class="phbox">frame unavailable<br>{html.escape(err[:300])}</div>'
                         f"<figcaption>{html.escape(label)}</figcaption></figure>")
            continue
        warn = f'<div class="err">{html.escape(err)}</div>' if err else ""
        cells.append(f'<figure class="{kind}"><img src="{jpeg_data_uri(img)}" alt="{html.escape(label)}">'
                     f"<figcaption>{html.escape(label)}</figcaption>{warn}</figure>")
    more = len(traj.media) - len(refs)
    tail = f'<p class="muted">{more} more frame(s) not shown</p>' if more > 0 else ""
    return f'<div class="frames">{"".join(cells)}</div>{tail}'


def _turns(traj: Trajectory, texts: list[str], view: View) -> str:
    if not texts:
        return '<p class="muted">no model turns recorded</p>'
    obs = traj.metadata.get("observation_texts") or []
    max_calls = view.cfg.env.max_calls_per_turn if view.cfg is not None else 4
    out = []
    for k, text in enumerate(texts):
        errors = parse_action(text, max_calls=max_calls).errors
        errs = "".join(f"<li>{html.escape(e)}</li>" for e in errors)
        out.append(f'<div class="turn"><div class="th">turn {k + 1}</div><pre>{highlight_turn(text)}</pre>'
                   + (f'<ul class="err">{errs}</ul>' if errs else ""))
        if k < len(obs) and obs[k]:
            out.append(f'<div class="th obs">tool response</div><pre class="obs">{html.escape(str(obs[k]))}</pre>')
        out.append("</div>")
    return "".join(out)


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:16px 24px;color:#111;background:#fff}
h1{font-size:20px;margin:0 0 6px}h2{font-size:17px;margin:0 0 4px}h3{font-size:14px;margin:12px 0 4px}
section{border-top:3px solid #ccc;padding:12px 0 20px}
.muted{color:#777}.err{color:#b00020}.ok{color:#137333;font-weight:600}.bad{color:#b00020;font-weight:600}
.st{font-size:12px;padding:1px 6px;border-radius:3px;background:#eee}.st-COMPLETED{background:#d7f0dd}
.st-TRUNCATED{background:#fff1c2}.st-FAILED,.st-ABORTED{background:#f8d0d6}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:2px 8px;text-align:left}
.tables{display:flex;gap:16px;align-items:flex-start;margin:6px 0}
.q{font-weight:600;margin:6px 0 2px}.opts{margin:0 0 6px;padding-left:20px;list-style:none}.opts li.ok{color:#137333}
.timeline text,.curve text{font:11px system-ui,sans-serif}.timeline .lane{fill:#333}.timeline .muted{fill:#999}
.frames{display:flex;flex-wrap:wrap;gap:6px}
figure{margin:0;border:1px solid #ccc;padding:2px;background:#fafafa;max-width:180px}
figure.tool{border-color:#1f6fb4}figcaption{font-size:11px;color:#333}
.phbox{width:160px;height:90px;background:#eee;color:#b00020;font-size:11px;overflow:hidden;padding:4px;box-sizing:border-box}
pre{white-space:pre-wrap;word-break:break-word;background:#f6f6f6;padding:6px;margin:2px 0 6px;font-size:12px}
pre.obs{background:#eef4fb}.th{font-size:12px;color:#555}
.call{background:#efe6f7;color:#4b1d80;font-weight:600}.ans{background:#d7f0dd;font-weight:600}.think{color:#666}
"""


def render_page(view: View, decoder: Any = None) -> str:
    """The whole page as one HTML string (no external resources, no script)."""
    title = f"weft view: {view.run_dir}" + (f" step {view.step}" if view.step is not None else "")
    body = [f"<h1>{html.escape(title)}</h1>", _summary(view)]
    if not view.trajectories:
        body.append('<p class="err" id="empty">No sampled trajectories to show: '
                    + html.escape(_why_empty(view)) + "</p>")
    for i, t in enumerate(view.trajectories):
        try:
            body.append(trajectory_section(i, t, view, decoder))
        except Exception as e:  # noqa: BLE001 - one odd record must not cost the whole page
            view.problem("section_error", f"trajectory {i}: {type(e).__name__}: {e}")
            body.append(f'<section id="traj-{i}"><h2>#{i}</h2><p class="err">could not render: '
                        f"{html.escape(type(e).__name__ + ': ' + str(e))}</p></section>")
    body.append(_problems(view))
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>")


def _why_empty(view: View) -> str:
    if view.total:
        return "--max is 0"
    if view.steps or Path(view.run_dir).is_file():
        return "the trajectories file holds none"
    return f"{Path(view.run_dir) / 'trajectories'} has no step_*.msgpack files"


def _summary(view: View) -> str:
    steps = f"steps with samples: {', '.join(map(str, view.steps[-20:]))}" if view.steps else ""
    shown = f"showing {len(view.trajectories)} of {view.total} trajectories"
    rows = "".join(
        f'<tr><td><a href="#traj-{i}">#{i}</a></td><td>{html.escape(t.task_id)}</td>'
        f"<td>{html.escape(t.status.value)}</td><td>{t.reward:+.3f}</td>"
        f"<td>{html.escape(str(t.metadata.get('answer')))}</td>"
        f"<td>{html.escape(truth_text(view.tasks[t.task_id])) if t.task_id in view.tasks else '?'}</td>"
        f"<td>{_verdict(t, view.tasks.get(t.task_id))}</td></tr>"
        for i, t in enumerate(view.trajectories))
    table = (f"<table><tr><th></th><th>task</th><th>status</th><th>reward</th><th>answer</th><th>correct answer</th><th></th></tr>"
             f"{rows}</table>") if rows else ""
    curve = reward_curve_svg(view.metrics)
    return f'<p class="muted">{shown}. {steps}</p><div class="tables">{table}{curve}</div>'


def _problems(view: View) -> str:
    if not view.problems:
        return ""
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(view.problems.items()))
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in view.notes)
    return f'<section id="problems"><h3>Problems ({html.escape(counts)})</h3><ul class="err">{notes}</ul></section>'


def write_view(run_dir: str | Path, out: str | Path, *, step: Optional[int] = None,
               max_trajectories: Optional[int] = 32, data: Optional[str] = None) -> dict:
    """Load, render and write the page; returns a JSON-able summary (what `weft view` prints)."""
    view = load_view(run_dir, step=step, max_trajectories=max_trajectories, data=data)
    page = render_page(view)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return {"out": str(out), "step": view.step, "trajectories": len(view.trajectories), "total": view.total,
            "bytes": len(page.encode("utf-8")), "problems": dict(view.problems)}
