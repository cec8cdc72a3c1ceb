"""Mem-tokens: BPE over gen-token sequences (paper §3.2, "memorization tokens").

Each level-offset gen id is one BPE symbol, mapped to a unique character in Unicode's
Supplementary Private Use Area so HF `tokenizers` can learn merges on plain strings with no
pre-tokenizer or normaliser touching them. Merges are learned from items weighted by their
interaction frequency: frequent code combinations (popular items, or popular refinements of a
coarse code) get their own token, which is what lets the ranker memorise item-specific knowledge
that the shared gen-tokens average away.

Ids: the base alphabet is every gen id, so the piece for a single symbol g has mem id g, and
merges take ids from L·K up to `vocab_size`. Every gen sequence therefore encodes with no
unknown symbol and the pieces' symbols concatenate back to the sequence exactly.
"""
from __future__ import annotations

import json
from typing import Iterable, Sequence

from tokenizer.errors import TokenizerError

CHAR_BASE = 0xF0000  # Supplementary Private Use Area-A
MAX_SYMBOLS = 0xFFFFE - CHAR_BASE


class BPEError(TokenizerError):
    """Bad BPE budget or a vocabulary that does not cover the gen alphabet."""


def to_text(gen: Sequence[int]) -> str:
    return "".join(chr(CHAR_BASE + int(g)) for g in gen)


def from_text(text: str) -> list[int]:
    return [ord(c) - CHAR_BASE for c in text]


class GenBPE:
    """A trained BPE over gen-id symbols; wraps a `tokenizers.Tokenizer` (JSON-serialised, no pickle)."""

    def __init__(self, tokenizer, num_symbols: int) -> None:
        self._tok = tokenizer
        self.num_symbols = num_symbols
        vocab = tokenizer.get_vocab()
        self._pieces: dict[int, list[int]] = {i: from_text(t) for t, i in vocab.items()}
        for g in range(num_symbols):  # the base alphabet must map symbol g to id g
            if self._pieces.get(g) != [g]:
                raise BPEError(f"BPE vocabulary does not map gen symbol {g} to mem id {g}; "
                               "the merges file is corrupt or was trained on another gen alphabet")

    @property
    def vocab_used(self) -> int:
        return len(self._pieces)

    @property
    def num_merges(self) -> int:
        return self.vocab_used - self.num_symbols

    @classmethod
    def learn(cls, gen_seqs: Sequence[Sequence[int]], weights: Iterable[int], num_symbols: int,
              vocab_size: int, min_frequency: int = 2) -> "GenBPE":
        """Learn merges from gen sequences, each counted `weight` times (e.g. 1 + its interactions)."""
        from tokenizers import Tokenizer, models, trainers

        if num_symbols > MAX_SYMBOLS:
            raise BPEError(f"{num_symbols} gen symbols exceed the {MAX_SYMBOLS} private-use characters")
        if vocab_size < num_symbols:
            raise BPEError(f"mem_vocab_size={vocab_size} is smaller than the gen alphabet "
                           f"(levels·codebook = {num_symbols}); raise mem_vocab_size to at least {num_symbols}")
        texts = [to_text(g) for g in gen_seqs]
        weights = [int(w) for w in weights]
        if len(weights) != len(texts):
            raise BPEError(f"{len(texts)} sequences but {len(weights)} weights")

        def stream():
            for t, w in zip(texts, weights):
                for _ in range(max(w, 0)):
                    yield t

        alphabet = [chr(CHAR_BASE + g) for g in range(num_symbols)]
        tok = Tokenizer(models.BPE())
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      show_progress=False, special_tokens=[], initial_alphabet=alphabet,
                                      limit_alphabet=num_symbols)
        tok.train_from_iterator(stream(), trainer, length=sum(max(w, 0) for w in weights))
        return cls(tok, num_symbols)

    def encode(self, gen_seqs: Sequence[Sequence[int]]) -> list[list[int]]:
        """Mem ids of the BPE pieces covering each gen sequence."""
        if not gen_seqs:
            return []
        return [list(e.ids) for e in self._tok.encode_batch([to_text(g) for g in gen_seqs])]

    def piece(self, mem_id: int) -> list[int]:
        """The gen symbols a mem id stands for."""
        return list(self._pieces[int(mem_id)])

    def decode(self, mem_ids: Sequence[int]) -> list[int]:
        """Concatenate the pieces' symbols: the inverse of encode."""
        out: list[int] = []
        for m in mem_ids:
            out.extend(self._pieces[int(m)])
        return out

    def pieces(self) -> dict[int, list[int]]:
        """Every mem id and the gen symbols it stands for."""
        return {i: list(p) for i, p in self._pieces.items()}

    def renumbered(self, old: "GenBPE", vocab_size: int) -> "GenBPE":
        """These merges, with ids renamed so that every piece `old` also has keeps its old id.

        Why: a ranker trained on `old` holds one embedding row per mem id; a piece that survives a
        refit keeps its row only if it keeps its id. A new piece takes an id `old` never used, and
        only when those run out one of an old piece that is gone. Encoding is unchanged (BPE applies
        merges by rank; the ids are only names)."""
        if old.num_symbols != self.num_symbols:
            raise BPEError(f"cannot renumber onto a BPE over {old.num_symbols} gen symbols (this one has "
                           f"{self.num_symbols}): the refit changed the gen alphabet")
        old_ids = {tuple(p): i for i, p in old._pieces.items()}
        mine = {tuple(p) for p in self._pieces.values()}
        gone = sorted(i for p, i in old_ids.items() if p not in mine)
        fresh = iter([i for i in range(vocab_size) if i not in old._pieces] + gone)
        rename: dict[int, int] = {}
        for i, p in sorted(self._pieces.items()):
            kept = old_ids.get(tuple(p))
            rename[i] = kept if kept is not None else next(fresh, -1)
        if -1 in rename.values():
            raise BPEError(f"{len(self._pieces)} pieces do not fit mem_vocab_size={vocab_size}")
        doc = json.loads(self._tok.to_str())
        doc["model"]["vocab"] = {t: rename[i] for t, i in doc["model"]["vocab"].items()}
        return GenBPE.from_json(json.dumps(doc), self.num_symbols)

    def to_json(self) -> str:
        return json.dumps(json.loads(self._tok.to_str()), sort_keys=True, ensure_ascii=True)

    @classmethod
    def from_json(cls, text: str, num_symbols: int) -> "GenBPE":
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_str(text)
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise BPEError(f"cannot read BPE merges: {exc}") from exc
        return cls(tok, num_symbols)
