"""temporal_search's engine: Okapi BM25 over the per-segment captions/subtitles of one video.

No model, no download: lowercase word tokens (unicode letters and digits), a
small English stop-word list, BM25 with k1=1.5, b=0.75 and the non-negative
idf ln(1 + (N - n + 0.5) / (n + 0.5)) (Lucene's form, so a word in every
caption still scores a little instead of going negative). Each distinct query
word counts once, so "red red red car" is not a way to weight "red". Ties are
broken by the earlier segment (start time, then list position), so results
are deterministic. Only captions with a positive score are returned.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np

from env.types import Caption

K1 = 1.5
B = 0.75

_WORD_RE = re.compile(r"[^\W_]+")
STOP_WORDS = frozenset(
    "a an and are as at be but by for from has have he her his i in is it its of on or she "
    "that the their them they this to was were what when where which who will with you do does did "
    "there then than so if into out up down over".split()
)


def tokenize(text: str) -> list[str]:
    """Lowercase unicode words minus stop words."""
    return [w for w in _WORD_RE.findall(str(text).lower()) if w not in STOP_WORDS]


class CaptionIndex:
    """An inverted index of one video's captions; `search` is BM25 over it."""

    def __init__(self, captions: list[Caption]) -> None:
        self.captions = list(captions)
        docs = [tokenize(c.text) for c in self.captions]
        self._lengths = np.array([len(d) for d in docs], dtype=np.float64)
        n_docs = len(docs)
        avg_len = float(self._lengths.mean()) if n_docs and self._lengths.sum() > 0 else 1.0
        # Per-document length normaliser of BM25's denominator, computed once.
        self._norm = K1 * (1.0 - B + B * self._lengths / avg_len)
        self._postings: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        gathered: dict[str, tuple[list[int], list[int]]] = {}
        for i, doc in enumerate(docs):
            for term, tf in Counter(doc).items():
                ids, tfs = gathered.setdefault(term, ([], []))
                ids.append(i)
                tfs.append(tf)
        self._idf: dict[str, float] = {}
        for term, (ids, tfs) in gathered.items():
            self._postings[term] = (np.array(ids, dtype=np.int64), np.array(tfs, dtype=np.float64))
            df = len(ids)
            self._idf[term] = math.log(1.0 + (n_docs - df + 0.5) / (df + 0.5))
        # Tie order: earlier segment first, then earlier in the list.
        self._tie_rank = np.empty(n_docs, dtype=np.int64)
        order = sorted(range(n_docs), key=lambda i: (_safe_start(self.captions[i]), i))
        self._tie_rank[order] = np.arange(n_docs)

    def __len__(self) -> int:
        return len(self.captions)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every caption for `query` (float64[N])."""
        scores = np.zeros(len(self.captions), dtype=np.float64)
        for term in dict.fromkeys(tokenize(query)):  # distinct words, in query order
            posting = self._postings.get(term)
            if posting is None:
                continue
            ids, tfs = posting
            scores[ids] += self._idf[term] * tfs * (K1 + 1.0) / (tfs + self._norm[ids])
        return scores

    def search(self, query: str, top_k: int) -> list[tuple[Caption, float]]:
        """The top_k best captions with their scores, best first; [] for an empty or unmatched query."""
        if not isinstance(query, str) or not self.captions or top_k <= 0:
            return []
        scores = self.scores(query)
        hits = np.flatnonzero(scores > 0)
        if hits.size == 0:
            return []
        # lexsort sorts by the last key first: score descending, then tie rank ascending.
        order = hits[np.lexsort((self._tie_rank[hits], -scores[hits]))]
        return [(self.captions[i], float(scores[i])) for i in order[: int(top_k)]]


def _safe_start(c: Caption) -> float:
    try:
        s = float(c.start)
    except (TypeError, ValueError):
        return math.inf
    return s if math.isfinite(s) else math.inf
