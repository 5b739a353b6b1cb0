"""What the demo's sampled episodes did with the tools: did they look, and did the zoom take the segment the
search returned? Whether a demo run's GRPO turns the policy to looking follows that copy rate (README, demo
reliability).

    python scripts/demo_looks.py MODEL_DIR RUN/trajectories/*.msgpack

MODEL_DIR gives the tokenizer (any of the run's models: they share it). Prints, summed over the files, the
count and accuracy of three kinds of episode: answered without a zoom; zoomed into the searched segment
(start and end of the search's first hit); zoomed elsewhere.
"""

from __future__ import annotations

import re
import sys
from collections import Counter

import numpy as np

HIT = re.compile(r"^1\. (\d+(?:\.\d+)?)s-(\d+(?:\.\d+)?)s \(score", re.MULTILINE)  # env/tools.py's search rows
ZOOM = re.compile(r'"name": "temporal_zoom", "arguments": \{"start": ([\d.]+), "end": ([\d.]+)')


def kind(text: str) -> str:
    """'no zoom', 'searched segment' or 'elsewhere', from an episode's text after its prompt."""
    zoom = ZOOM.search(text)
    if not zoom:
        return "no zoom"
    hit = HIT.search(text)
    same = hit and (float(hit.group(1)), float(hit.group(2))) == (float(zoom.group(1)), float(zoom.group(2)))
    return "searched segment" if same else "elsewhere"


def main(model_dir: str, files: list[str]) -> int:
    from transformers import AutoTokenizer

    from protos.codec import read_trajectories

    tok = AutoTokenizer.from_pretrained(model_dir)
    count, right = Counter(), Counter()
    for f in files:
        for t in read_trajectories(f):
            gen = np.flatnonzero(t.loss_mask)
            if not len(gen):
                continue
            k = kind(tok.decode(t.token_ids[gen[0]:].tolist()))
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
