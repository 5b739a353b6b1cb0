"""What the demo's sampled episodes did with the tools: did they look, and did the zoom take the segment the
search returned? Whether a demo run's GRPO turns the policy to looking follows that copy rate (README, demo
reliability).

    python scripts/demo_looks.py MODEL_DIR RUN/trajectories/*.msgpack

MODEL_DIR gives the tokenizer (any of the run's models: they share it). Prints, summed over the files, the
count and accuracy of three kinds of episode: answered without a zoom; zoomed into the searched segment
(start and end of the search's first hit); zoomed elsewhere.
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Sequence

from env.parser import parse_action
from env.testing import FIRST_HIT  # the search's first row, as env/tools.py writes it


def kind(turns: Sequence[str], text: str) -> str:
    """'no zoom', 'searched segment' or 'elsewhere': the first temporal_zoom call of the policy's `turns`
    (parsed as the env parses them) against the first search hit in the episode's `text`."""
    zoom = next((c.arguments for turn in turns for c in parse_action(turn).calls if c.name == "temporal_zoom"), None)
    if zoom is None:
        return "no zoom"
    hit = FIRST_HIT.search(text)
    try:
        same = hit is not None and (float(hit.group(1)), float(hit.group(2))) == (float(zoom["start"]), float(zoom["end"]))
    except (KeyError, TypeError, ValueError):  # a call the env rejected for its arguments zoomed nowhere useful
        same = False
    return "searched segment" if same else "elsewhere"


def main(model_dir: str, files: list[str]) -> int:
    from transformers import AutoTokenizer

    from learner.sft import model_turns
    from protos.codec import read_trajectories

    tok = AutoTokenizer.from_pretrained(model_dir)
    count, right = Counter(), Counter()
    for f in files:
        for t in read_trajectories(f):
            spans = model_turns(t)
            if not spans:
                continue
            turns = [tok.decode(t.token_ids[a:b].tolist()) for a, b in spans]
            k = kind(turns, tok.decode(t.token_ids[spans[0][0]:].tolist()))
            count[k] += 1
            right[k] += t.reward_terms.get("accuracy", 0.0) > 0.5
    for k in ("no zoom", "searched segment", "elsewhere"):
        print(f"{k:17s} {count[k]:4d} episodes, right {right[k]:4d}")
    looks = count["searched segment"] + count["elsewhere"]
    print(f"looked in {looks} of {sum(count.values())}; zoomed into the searched segment in {count['searched segment']}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    raise SystemExit(main(sys.argv[1], sys.argv[2:]))
