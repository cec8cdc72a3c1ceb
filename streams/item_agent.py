"""Item agent: item events -> hybrid tokens -> Feast (online + offline) and the `item_tokens` topic.

What one batch computes (when it is written, produced and committed: `BatchLoop._process_and_commit`):
  1. decode   – framed Avro -> ItemEvent; bad bytes/content become dead letters
  2. compute  – one `encode_texts` call for the batch's texts (the encoder is the cost, so it
                runs batched); a retire keeps the item's tokens and sets `retired=True` — marked,
                not forgotten (a retire without text reuses the tokens in the online store);
                lexical tokens are the words of the event's categories and title hashed, and the release
                year its title states (tokenizer/lexical.py)
  3. write    – Feast online + offline, stamped with each item event's event time; the outputs are
                ItemTokensEvents for `item_tokens` (dead letters go to `items.dlq`)
No state of its own (`BaseProcessor`'s defaults): tokens are a pure function of (text, tokenizer
artifact), so a replay rewrites identical values.

Rotation (streams/rotation.py): with a `RotationWatch`, the artifact is picked per event by its
event time from the repo's rotation record (re-read when it changes), so tokens stay a pure
function of (text, event time, record); without a record, `tokenizer` tokenizes everything.
"""
from __future__ import annotations

from typing import Callable

from tokenizer.lexical import lexical_tokens

from .contract.codec import AvroCodec, DecodeError
from .contract.events import InvalidEvent, ItemEvent, ItemTokensEvent
from .dlq import DeadLetter, SourceRecord
from .processor import BaseProcessor, BatchResult
from .rotation import Rotation, RotationError, RotationWatch


class ItemProcessor(BaseProcessor):
    def __init__(self, sink, tokenizer, codec: AvroCodec | None = None, rotation: RotationWatch | None = None,
                 load: Callable[[str], object] | None = None):
        self.sink = sink
        self.tokenizer = tokenizer
        self.codec = codec or AvroCodec()
        self.rotation = rotation
        self.load = load  # artifact dir -> tokenizer (HybridTokenizer.load: refuses another encoder)
        self._by_version = {tokenizer.version: tokenizer}

    def tokenizer_at(self, t: int, rot: Rotation | None):
        """The tokenizer of event time `t` under the rotation record `rot` (None: `tokenizer`)."""
        if rot is None:
            return self.tokenizer
        version = rot.version_at(t)
        tok = self._by_version.get(version)
        if tok is None:
            if self.load is None:
                raise RotationError(f"the rotation record names {version}, and this item agent cannot load artifacts")
            tok = self.load(rot.artifact_at(t))
            if tok.version != version:
                raise RotationError(f"{rot.artifact_at(t)} is version {tok.version}, but the rotation record "
                                    f"names {version}: rewrite it with `trm tokenizer rotate`")
            self._by_version[version] = tok
        return tok

    def process(self, records: list[SourceRecord]) -> BatchResult:
        res = BatchResult()
        events: list[tuple[ItemEvent, SourceRecord]] = []
        for r in records:
            res.hwm[r.partition] = max(res.hwm.get(r.partition, -1), r.offset)
            try:
                events.append((ItemEvent.from_record(self.codec.decode(r.value, expect="ItemEvent")), r))
            except (DecodeError, InvalidEvent) as exc:
                res.dead.append(DeadLetter(r, f"{'decode' if isinstance(exc, DecodeError) else 'invalid'}: {exc}"))
            except (KeyError, TypeError) as exc:
                res.dead.append(DeadLetter(r, f"invalid: missing or mistyped field {exc}"))
        if not events:
            return res
        # the record read once per batch; one encode_texts call per artifact (two only across a rotation time)
        rot = self.rotation.current() if self.rotation is not None else None
        tok_of = {ev.event_time: self.tokenizer_at(ev.event_time, rot) for ev, _ in events if ev.text.strip()}
        by_tok: dict[str, tuple[object, set[str]]] = {}
        for ev, _ in events:
            if ev.text.strip():
                tok = tok_of[ev.event_time]
                by_tok.setdefault(tok.version, (tok, set()))[1].add(ev.text)
        encoded: dict[tuple[str, str], object] = {}
        for version, (tok, group) in by_tok.items():
            texts = sorted(group)
            encoded.update(zip(((version, x) for x in texts), tok.encode_texts(texts)))
        no_text = [ev.item_id for ev, _ in events if not ev.text.strip()]
        known = self.sink.read_online("item_tokens", no_text) if no_text else {}
        rows, outs = [], []
        for ev, r in events:
            if ev.text.strip():
                tok = encoded[(tok_of[ev.event_time].version, ev.text)]
                gen, mem, version = list(tok.gen_tokens), list(tok.mem_tokens), tok.tokenizer_version
                coarse = list(tok.coarse_tokens)
                lex = lexical_tokens(ev.categories, ev.title)
            else:  # a retire with no text: keep the tokens the item already has
                cur = known.get(ev.item_id) or {}
                if cur.get("gen_tokens") is None:
                    res.dead.append(DeadLetter(r, f"invalid: retire of item {ev.item_id} without text, "
                                                  f"and the item has no tokens to keep"))
                    continue
                gen, mem, version = cur["gen_tokens"], cur["mem_tokens"], cur["tokenizer_version"]
                coarse = cur.get("coarse_tokens") or []  # none in rows written before coarse tokens
                # the event's own categories (and title) if it names categories, else the item's (none in older rows)
                lex = lexical_tokens(ev.categories, ev.title) if ev.categories else cur.get("lexical_tokens") or []
            out = ItemTokensEvent(ev.item_id, [int(x) for x in gen], [int(x) for x in mem], version,
                                  ev.created_at, ev.event_time, ev.op == "retire", [int(x) for x in coarse],
                                  [int(x) for x in lex])
            rows.append({"item_id": out.item_id, "gen_tokens": out.gen_tokens, "mem_tokens": out.mem_tokens,
                         "coarse_tokens": out.coarse_tokens, "lexical_tokens": out.lexical_tokens,
                         "tokenizer_version": out.tokenizer_version, "created_at": out.created_at,
                         "retired": out.retired, "event_timestamp": out.event_time})
            outs.append((str(ev.item_id).encode(), self.codec.encode(out.to_record(), "ItemTokensEvent")))
        self.sink.write("item_tokens", rows)
        res.outputs = outs
        res.applied = len(rows)
        return res
