"""The judge hook: an open-ended answer scored by a judge model behind an OpenAI-compatible chat
endpoint (vLLM's `vllm serve MODEL`, on the cluster; VideoZoomer used GPT-4o, DeepEyes a served
Qwen2.5-72B). A reward function calls `judge_score`; the recipes' rewards take `judge_url` and
`judge_model` in `reward.kwargs`.

The judge answers 1 or 0. It is asked for exactly that, and where the server supports vLLM's
structured outputs the answer is constrained to those two strings, so even a small judge's reply
always parses. A judge that cannot be reached, times out or answers anything else does not fail
the episode: the rule match (`fallback`) is used, counted in env.env.COUNTERS (judge_error,
judge_unparsed), and the run goes on.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Optional

from env.env import COUNTERS

JUDGE_PROMPT = (
    "Below are a question, its reference answer and a model's answer. Say whether the model's answer means "
    "the same as the reference (the same fact, however it is worded). Reply with 1 if it does and 0 if it "
    "does not, and nothing else.\n\n[Question]: {question}\n[Reference]: {reference}\n[Model answer]: {prediction}\n"
    "Judgement:")


def judge_score(question: str, reference: str, prediction: str, *, url: str, model: str = "",
                timeout_s: float = 60.0, fallback: bool = False) -> float:
    """1.0 or 0.0 as the judge at `url` (the server's base, e.g. http://host:8000/v1) says."""
    body = {"model": model,
            "messages": [{"role": "user", "content": JUDGE_PROMPT.format(question=question, reference=reference,
                                                                       prediction=prediction)}],
            "temperature": 0.0, "max_tokens": 4,
            "structured_outputs": {"choice": ["1", "0"]}}  # vLLM >= 0.11; other servers ignore unknown fields
    try:
        body["model"] = model or _first_model(url, timeout_s)
        reply = _post(f"{url.rstrip('/')}/chat/completions", body, timeout_s)
        text = str(reply["choices"][0]["message"]["content"] or "").strip()
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        COUNTERS["judge_error"] += 1
        COUNTERS[f"judge_error:{type(e).__name__}"] += 1
        return 1.0 if fallback else 0.0
    verdict = _verdict(text)
    if verdict is None:
        COUNTERS["judge_unparsed"] += 1
        return 1.0 if fallback else 0.0
    COUNTERS["judge_calls"] += 1
    return verdict


def _verdict(text: str) -> Optional[float]:
    t = text.split("Judgement:")[-1].strip().lower()
    if t.startswith(("1", "yes")):
        return 1.0
    if t.startswith(("0", "no")):
        return 0.0
    return None


_MODELS: dict[str, str] = {}


def _first_model(url: str, timeout_s: float) -> str:
    """The id of the first model the server lists (GET /models), remembered per server."""
    if url not in _MODELS:
        with urllib.request.urlopen(f"{url.rstrip('/')}/models", timeout=timeout_s) as r:
            _MODELS[url] = json.loads(r.read())["data"][0]["id"]
    return _MODELS[url]


def _post(url: str, body: dict, timeout_s: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:  # say what the server said, not just the status
        raise ValueError(f"judge server {e.code}: {e.read()[:200]!r}") from None
