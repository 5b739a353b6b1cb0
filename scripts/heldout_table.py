"""The demo's closing table: held-out accuracy of each `weft eval` run, side by side.

    python scripts/heldout_table.py RUN/heldout    # reads RUN/heldout/<name>/summary.json

Each folder under the given one is one `weft eval --out` (scripts/demo.sh names them oracle, blind,
sft, sft-no-tools, rl, rl-no-tools). Prints one row each and the two differences the demo is judged
on (RL with tools over SFT with tools, and over RL without tools), and writes them to table.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ORDER = ("oracle", "blind", "sft", "sft-no-tools", "rl", "rl-no-tools")
LABELS = {"oracle": "oracle policy (search, zoom, read the colour)", "blind": "blind policy (overview only)",
          "sft": "SFT model, tools", "sft-no-tools": "SFT model, no tools", "rl": "RL model, tools",
          "rl-no-tools": "RL model, no tools"}


def main(root: str) -> int:
    rows = {}
    for name in ORDER:
        f = Path(root) / name / "summary.json"
        if f.is_file():
            rows[name] = json.loads(f.read_text())
    if not rows:
        print(f"no eval summaries under {root}", file=sys.stderr)
        return 1
    print(f"held-out accuracy ({next(iter(rows.values()))['tasks']} tasks never trained on):")
    for name, s in rows.items():
        print(f"  {LABELS[name]:<48} {s['accuracy']:.3f}   tool calls/episode {s['mean_tool_calls']:.2f}, "
              f"frames {s['mean_frames']:.1f}")
    acc = {k: v["accuracy"] for k, v in rows.items()}
    out = {"accuracy": acc}
    if {"rl", "sft"} <= acc.keys():
        out["rl_minus_sft"] = acc["rl"] - acc["sft"]
        print(f"  RL - SFT (tools):            {out['rl_minus_sft']:+.3f}")
    if {"rl", "rl-no-tools"} <= acc.keys():
        out["rl_tools_minus_no_tools"] = acc["rl"] - acc["rl-no-tools"]
        print(f"  RL tools - RL no tools:      {out['rl_tools_minus_no_tools']:+.3f}")
    (Path(root) / "table.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
