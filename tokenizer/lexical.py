"""Lexical tokens: the words of an item's published metadata (its categories and its title) and the
release year its title states, as stable ints, beside the semantic tokens.

Why: TRM's per-user online table (trainer/models/user_weights.py) learns a global weight and a
user × key cross for each of the item's keys, second by second. Its keys were the item's semantic
tokens only; the per-event peer (Vowpal Wabbit) also reads the item's genres and title words, and
that content was the whole of the gap left between the two (docs/quality.md, "What else was tried").
Replayed on the real trainer's recorded validation rows (window [q0.4, q0.5) of ml-latest-small,
AUC, two seeds): categories as user × category crosses +0.0016-0.0018 (0.7725 -> 0.7742,
0.7727 -> 0.7743); title words as global weights another +0.0008-0.0015 (-> 0.7757 / 0.7758),
while title words crossed with the user lost 0.0008 (a user sees a title word too rarely to learn
it). The table's rates per kind are in trainer/models/config.py.

These are published item content, not an item ID: two films of the same genres share every
category token, and a title word ("star", "wars", "1977") is shared by every title that has it.

A token is a stable hash (zlib.crc32: the same in every process and machine, unlike Python's
salted `hash`) of the normalized word, in its kind's range: categories in [0, 2**26), title words
in [2**26, 2**27), so one list carries both and a reader can tell them apart (`is_title`). The
online table's `key(value, namespace)` multiplies by 16: well in int64.

The release year (MovieLens titles end in "(1995)") is a third kind, not hashed: YEAR_OFFSET +
the year, at most one, after the title words (`release_year`). The title's words already hold
the year as a word, but as a hash of it: nothing a reader can compute with. As a number it gives
TRM's era keys (trainer/features.era_keys): the decade, and the item's age since release at the
event. Why: replayed on the real trainer's recordings (three validation windows before the demo's
cutoff, means of seeds 0 / 1), those two keys crossed with the user took TRM on items unseen by
the tokenizer from 0.7603 / 0.7253 / 0.7278 to 0.7640 / 0.7282 / 0.7309 (all items: 0.7882 /
0.7809 / 0.7811 -> 0.7895 / 0.7808 / 0.7812): whether a user watches this year's films or old ones
is taste the genres and the words do not carry. A record written before the year kind existed
simply has none (no era keys).
"""
from __future__ import annotations

import re
import zlib
from typing import Iterable

MAX_CATEGORY_TOKENS = 8  # most categories per item (a MovieLens film has at most 10 genres, 99 % <= 5)
MAX_TITLE_TOKENS = 10  # most title words per item (99 % of MovieLens titles have at most 10)
MAX_LEXICAL_TOKENS = MAX_CATEGORY_TOKENS + MAX_TITLE_TOKENS + 1  # + the release year
KIND_BITS = 26  # each kind's tokens span 2**26 values
TITLE_OFFSET = 1 << KIND_BITS  # title words: [2**26, 2**27)
YEAR_OFFSET = 2 << KIND_BITS  # the release year: YEAR_OFFSET + year, in [2**27, 2**27 + 10000)
YEAR_SPAN = 10_000  # year tokens are [YEAR_OFFSET, YEAR_OFFSET + YEAR_SPAN)
LEXICAL_END = YEAR_OFFSET + YEAR_SPAN  # every valid lexical token is in [0, LEXICAL_END)
_MASK = (1 << KIND_BITS) - 1
_WORD = re.compile(r"[^\w]+")  # words: runs of letters, digits and _ ("Toy Story (1995)" -> toy, story, 1995)
# a title's release year: "(1995)" at its end (MovieLens), or the first year of "(2006-2007)" / "(2006–)"
_YEAR = re.compile(r"\((\d{4})(?:\s*[-–]\s*(?:\d{4})?)?\)\s*$")


def category_token(category: str) -> int:
    """One normalized category -> its token in [0, 2**26)."""
    return zlib.crc32(("g" + category.strip().lower()).encode("utf-8")) & _MASK


def title_token(word: str) -> int:
    """One lower-cased title word -> its token in [2**26, 2**27)."""
    return TITLE_OFFSET + (zlib.crc32(("t" + word).encode("utf-8")) & _MASK)


def is_title(token: int) -> bool:
    return TITLE_OFFSET <= token < YEAR_OFFSET


def release_year(title: str | None) -> int | None:
    """The year a title states at its end ("Heat (1995)" -> 1995), or None (no year, or not 1800-2999)."""
    m = _YEAR.search(str(title or ""))
    year = int(m.group(1)) if m else None
    return year if year is not None and 1800 <= year < 3000 else None


def year_token(year: int) -> int:
    return YEAR_OFFSET + year


def is_year(token):
    """Whether `token` (an int, or elementwise an int array) is a release-year token."""
    return (token >= YEAR_OFFSET) & (token < LEXICAL_END)


def token_year(token: int) -> int | None:
    """The year of a year token, else None."""
    return token - YEAR_OFFSET if is_year(token) else None


def _unique(tokens: Iterable[int], limit: int) -> list[int]:
    out: list[int] = []
    for t in tokens:
        if t not in out:  # the same word (or, rarely, a hash collision) once
            out.append(t)
            if len(out) == limit:
                break
    return out


def category_tokens(categories: Iterable[str] | None) -> list[int]:
    """The item's categories -> tokens: normalized (stripped, lower-cased), blanks dropped, duplicates
    dropped in order, at most MAX_CATEGORY_TOKENS, in the catalogue's order."""
    return _unique((category_token(c) for c in (categories or ()) if str(c).strip()), MAX_CATEGORY_TOKENS)


def title_tokens(title: str | None) -> list[int]:
    """The item's title -> tokens of its lower-cased words (punctuation splits words; the year in
    "(1995)" is a word too), duplicates dropped in order, at most MAX_TITLE_TOKENS."""
    words = (w for w in _WORD.split(str(title or "").lower()) if w)
    return _unique((title_token(w) for w in words), MAX_TITLE_TOKENS)


def lexical_tokens(categories: Iterable[str] | None, title: str | None) -> list[int]:
    """An item's lexical tokens: its category tokens, then its title-word tokens, then its release
    year's token if the title states one."""
    year = release_year(title)
    return category_tokens(categories) + title_tokens(title) + ([year_token(year)] if year is not None else [])
