"""Lexical tokens (issue 12): the words of the item event's categories and title as stable ints
(tokenizer/lexical.py), written by the item agent beside gen/mem/coarse tokens, kept by a retire
without text."""
from __future__ import annotations

import zlib
from types import SimpleNamespace

import pytest

from streams.contract.codec import AvroCodec
from streams.contract.events import ItemEvent, ItemTokensEvent
from streams.dlq import SourceRecord
from tokenizer.lexical import (MAX_CATEGORY_TOKENS, MAX_LEXICAL_TOKENS, MAX_TITLE_TOKENS, YEAR_OFFSET, category_token,
                              category_tokens, is_title, lexical_tokens, release_year, title_token, title_tokens,
                              token_year, year_token)

CODEC = AvroCodec()


def test_category_tokens_are_normalized_deduplicated_in_order_and_bounded():
    assert category_tokens(["Action", " action ", "ACTION", "Sci-Fi", "", "  ", "sci-fi", "Drama"]) == [
        category_token("action"), category_token("sci-fi"), category_token("drama")]
    assert category_tokens([]) == [] and category_tokens(None) == []
    many = [f"genre {k}" for k in range(20)]
    got = category_tokens(many)
    assert len(got) == MAX_CATEGORY_TOKENS == 8 and got == [category_token(c) for c in many[:8]]
    assert all(type(t) is int and 0 <= t < 2**26 and not is_title(t) for t in got)


def test_title_tokens_are_lower_cased_words_deduplicated_and_bounded():
    assert title_tokens("Toy Story (1995)") == [title_token("toy"), title_token("story"), title_token("1995")]
    assert title_tokens("STAR wars: Star Wars") == [title_token("star"), title_token("wars")]
    assert title_tokens("") == [] and title_tokens(None) == [] and title_tokens(" (  ) ") == []
    got = title_tokens(" ".join(f"w{k}" for k in range(30)))
    assert len(got) == MAX_TITLE_TOKENS == 10
    assert all(type(t) is int and 2**26 <= t < 2**27 and is_title(t) for t in got)


def test_lexical_tokens_are_categories_then_title_words_in_disjoint_ranges():
    got = lexical_tokens(["Comedy"], "Comedy")  # the same word as a category and in a title: two tokens
    assert got == [category_token("comedy"), title_token("comedy")] and got[0] != got[1]
    many = lexical_tokens([f"g{k}" for k in range(20)], " ".join(f"w{k}" for k in range(30)) + " (1999)")
    assert len(many) == MAX_LEXICAL_TOKENS == 19 and many[-1] == year_token(1999)


def test_the_release_year_is_a_third_kind_after_the_title_words():
    got = lexical_tokens(["Comedy"], "Heat (1995)")
    assert got == [category_token("comedy"), title_token("heat"), title_token("1995"), YEAR_OFFSET + 1995]
    assert not is_title(got[-1]) and token_year(got[-1]) == 1995 and token_year(got[1]) is None
    assert all(token_year(t) is None for t in got[:-1]) and 2**27 <= got[-1] < 2**28
    # MovieLens spellings: a trailing "(1995)", a series' "(2006-2007)" or "(2006–)"; nothing else is a year
    assert release_year("Toy Story (1995)") == 1995 and release_year("Toy Story (1995) ") == 1995
    assert release_year("Cosmos (2014-2015)") == 2014 and release_year("The Office (2005–)") == 2005
    for no_year in ("Babylon 5", "1984", "Movie (1995) part 2", "Blade Runner 2049", "(12345)", "(0999)", "", None):
        assert release_year(no_year) is None, no_year
    assert lexical_tokens([], "Babylon 5") == title_tokens("Babylon 5")  # no year: no year token


def test_tokens_are_a_stable_hash_not_the_process_salted_one():
    # pinned: crc32 of "g" + the normalized category (26 bits), of "t" + a title word (+ 2**26)
    assert category_token("Action") == zlib.crc32(b"gaction") & (2**26 - 1) == 24346660
    assert category_tokens(["Action", "Sci-Fi"]) == [24346660, 19638016]
    assert title_token("toy") == 2**26 + (zlib.crc32(b"ttoy") & (2**26 - 1))


def test_same_content_same_tokens_whatever_the_item():
    """Content, not an ID: two items of the same genres and title words share every token."""
    a = ItemEvent(1, "Heat", "A. Genres: Comedy, Romance", ["Comedy", "Romance"], 10, 10)
    b = ItemEvent(2, "heat", "B. Genres: Comedy, Romance", ["comedy", "Romance "], 20, 20)
    assert lexical_tokens(a.categories, a.title) == lexical_tokens(b.categories, b.title)


class FakeTokenizer:
    version = "tok-v"

    def encode_texts(self, texts):
        return [SimpleNamespace(gen_tokens=[1, 9, 17], mem_tokens=[3], tokenizer_version=self.version,
                                coarse_tokens=[1, 4]) for _ in texts]


class FakeSink:
    def __init__(self):
        self.rows: dict[int, dict] = {}
        self.written: list[dict] = []

    def write(self, view, rows):
        assert view == "item_tokens"
        self.written += rows
        self.rows.update({r["item_id"]: r for r in rows})

    def read_online(self, view, ids):
        return {i: self.rows.get(i, {}) for i in ids}


def _rec(off: int, ev: ItemEvent) -> SourceRecord:
    return SourceRecord("items", 0, off, str(ev.item_id).encode(), CODEC.encode(ev.to_record(), "ItemEvent"))


@pytest.mark.parametrize("retire_categories,expected", [
    ([], ["Crime", "Thriller"]),  # a retire without text or categories keeps the item's
    (["Drama"], ["Drama"]),  # one that names categories has them (and its title's words)
])
def test_item_agent_writes_lexical_tokens_and_a_retire_keeps_them(retire_categories, expected):
    from streams.item_agent import ItemProcessor

    sink = FakeSink()
    proc = ItemProcessor(sink, FakeTokenizer())
    up = ItemEvent(7, "Heat", "Heat (1995). Genres: Crime, Thriller", ["Crime", "Thriller", "crime"], 100, 100)
    res = proc.process([_rec(0, up)])
    out = ItemTokensEvent.from_record(CODEC.decode(res.outputs[0][1], expect="ItemTokensEvent"))
    assert out.lexical_tokens == sink.rows[7]["lexical_tokens"] == lexical_tokens(["Crime", "Thriller"], "Heat")
    assert out.coarse_tokens == [1, 4] and out.gen_tokens == [1, 9, 17]
    retire = ItemEvent(7, "Heat", "", retire_categories, 100, 200, op="retire")
    res = proc.process([_rec(1, retire)])
    out = ItemTokensEvent.from_record(CODEC.decode(res.outputs[0][1], expect="ItemTokensEvent"))
    assert out.retired and out.lexical_tokens == sink.rows[7]["lexical_tokens"] == lexical_tokens(expected, "Heat")


def test_featurizer_carries_lexical_tokens_padded_and_even_for_stale_tokens():
    """(B, 19), -1 pads; categories and title words are the item's content, not the artifact's: an item
    whose tokens are another version's (scored as unknown) keeps its lexical keys; a bad list is dropped."""
    import torch

    from tests.trainer_fixtures import lexical_tokens as fixture_categories
    from tests.trainer_fixtures import featurizer, joined_frame, small_config

    df = joined_frame(12, null_every=0)
    df.loc[df.index[3], "tokenizer_version"] = "another-version"
    df.at[df.index[5], "lexical_tokens"] = [1, 2**28]  # out of range: dropped
    df.at[df.index[6], "lexical_tokens"] = None  # no row: none
    batch, st = featurizer(small_config())(df)
    assert batch.lexical.shape == (12, 19) and batch.lexical.dtype == torch.int64
    assert st.stale_version == 1 and not bool(batch.known[3])
    for j, it in enumerate(df["item_id"]):
        want = [] if j in (5, 6) else fixture_categories(int(it))
        assert batch.lexical[j].tolist() == want + [-1] * (19 - len(want)), j
