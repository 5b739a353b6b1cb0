"""BM25 caption search: the right caption ranks first, scores match the formula, ties are ordered."""

import math
import random

from env.search import B, K1, CaptionIndex, tokenize
from env.types import Caption

CORPUS = [
    Caption(0, 10, "A man walks into the kitchen and opens the fridge."),
    Caption(10, 20, "He takes out a carton of milk and pours a glass."),
    Caption(20, 30, "A dog runs across the living room chasing a red ball."),
    Caption(30, 40, "The man sits on the sofa and watches television."),
    Caption(40, 50, "The dog falls asleep next to the sofa."),
    Caption(50, 60, "Subtitles: 'Where did I leave my keys?'"),
]


def test_tokenize_lowercases_and_drops_stop_words():
    assert tokenize("The Dog, and THE red-Ball! 42x café") == ["dog", "red", "ball", "42x", "café"]
    assert tokenize("") == [] and tokenize("the of and") == []


def test_right_caption_ranks_first():
    idx = CaptionIndex(CORPUS)
    assert idx.search("red ball", 3)[0][0] is CORPUS[2]
    assert idx.search("pours milk into a glass", 3)[0][0] is CORPUS[1]
    assert idx.search("where are the KEYS", 3)[0][0] is CORPUS[5]
    hits = idx.search("dog sofa", 6)
    assert hits[0][0] is CORPUS[4]  # both words
    assert {c.start for c, _ in hits} == {20, 30, 40}
    assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)


def test_scores_match_the_bm25_formula():
    idx = CaptionIndex(CORPUS)
    docs = [tokenize(c.text) for c in CORPUS]
    avg = sum(map(len, docs)) / len(docs)
    n = len(docs)

    def bm25(query, d):
        score = 0.0
        for term in set(tokenize(query)):
            df = sum(term in doc for doc in docs)
            if df == 0:
                continue
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            tf = d.count(term)
            score += idf * tf * (K1 + 1) / (tf + K1 * (1 - B + B * len(d) / avg))
        return score

    for q in ["dog sofa", "man", "milk glass fridge", "keys"]:
        got = idx.scores(q)
        for i, d in enumerate(docs):
            assert math.isclose(got[i], bm25(q, d), rel_tol=1e-12, abs_tol=1e-15), (q, i)


def test_empty_or_unmatched_queries_give_nothing():
    idx = CaptionIndex(CORPUS)
    assert idx.search("", 5) == []
    assert idx.search("the and of", 5) == []
    assert idx.search("zebra", 5) == []
    assert idx.search("dog", 0) == []
    assert CaptionIndex([]).search("dog", 5) == []


def test_top_k_limits_results():
    idx = CaptionIndex(CORPUS)
    assert len(idx.search("man dog sofa", 2)) == 2
    assert len(idx.search("man dog sofa", 50)) == 4


def test_ties_go_to_the_earlier_segment():
    rng = random.Random(random.SystemRandom().randrange(2**32))
    same = [Caption(float(t), float(t) + 5, "a bird on a fence") for t in range(0, 50, 5)]
    shuffled = same[:]
    rng.shuffle(shuffled)
    hits = CaptionIndex(shuffled).search("bird", 10)
    assert [c.start for c, _ in hits] == [c.start for c in same]
    assert len({s for _, s in hits}) == 1
    # Equal start times fall back to list order; repeated searches are identical.
    dup = [Caption(3, 4, "bird x"), Caption(3, 4, "bird y")]
    idx = CaptionIndex(dup)
    assert [c.text for c, _ in idx.search("bird", 2)] == ["bird x", "bird y"]
    assert idx.search("bird", 2) == idx.search("bird", 2)


def test_repeated_query_words_count_once():
    idx = CaptionIndex(CORPUS)
    assert list(idx.scores("dog dog dog sofa")) == list(idx.scores("dog sofa"))


def test_odd_captions_do_not_break_the_index():
    caps = [Caption(0, 1, ""), Caption(float("nan"), 2, "night sky"), Caption(5, 1, "\x00\u202e night sky")]
    hits = CaptionIndex(caps).search("night", 5)
    assert [c.text for c, _ in hits] == ["\x00\u202e night sky", "night sky"]  # nan start sorts last on ties
    assert CaptionIndex([Caption(0, 1, "")]).search("x", 3) == []
