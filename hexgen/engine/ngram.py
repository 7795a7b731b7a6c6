"""Draft tokens for speculative decoding without a draft model: n-gram lookup in the sequence itself (no torch).

A sequence's last n tokens are looked up among its earlier tokens (its prompt and what it generated): where they
occurred before, the tokens that followed then are proposed as the next ones. Text that repeats itself (code,
lists, quoting or rewriting the prompt, a small model's loops) gets drafts that the model accepts; other text gets
none, and a step without drafts costs what it did before. The engine verifies every draft (Scheduler.update), so
drafts change how many tokens a step yields, never which.
"""

from __future__ import annotations

MAX_NGRAM = 4  # the longest suffix looked up first: a longer match predicts the continuation better
MIN_NGRAM = 2  # a single repeated token predicts too little to be worth a draft
SEARCH_WINDOW = 1024  # tokens searched back from the end: the cost per step stays bounded on long sequences


def propose_drafts(tokens: list[int], max_drafts: int) -> list[int]:
    """Up to `max_drafts` tokens that followed the latest earlier occurrence of the longest suffix of `tokens`
    (MAX_NGRAM down to MIN_NGRAM tokens) within the last SEARCH_WINDOW tokens; [] where none occurred."""
    length = len(tokens)
    if max_drafts < 1:
        return []
    first = max(0, length - SEARCH_WINDOW)
    for n in range(min(MAX_NGRAM, length - 1), MIN_NGRAM - 1, -1):
        suffix = tokens[length - n :]
        # latest start i < length - n whose n tokens equal the suffix (the suffix itself excluded)
        for i in range(length - n - 1, first - 1, -1):
            if tokens[i : i + n] == suffix:
                return tokens[i + n : i + n + max_drafts]
    return []
