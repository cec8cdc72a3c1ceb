"""`trm serve --token-cache kafka`: the candidates' item_tokens features from an in-process cache.

A background thread runs streams.token_cache.TokenCache (the workers' own cache of the
`item_tokens` topic: every partition from the beginning, no consumer group; the topic is compacted,
so it holds the latest tokens of every item) with `keep_records=True`, in an asyncio loop of its
own. The app reads it lock-free (one dict lookup per candidate; a dict item is replaced atomically
under the GIL).

What the cache answers is exactly the item_tokens row of the online store: the item agent writes a
batch's rows to Feast, then produces the same values (ItemTokensEvent: gen_tokens, mem_tokens,
tokenizer_version, created_at, retired) to `item_tokens`, keyed by item, in the same order, and
both the online stores and the cache keep the last write. So an item in the cache is scored
exactly as the Feast-read path scores it (tests/test_serve.py checks it bit for bit).

An item not in the cache is read from Feast (trainer.serving.online.CachedOnlineFeatures), not
answered as unknown: a miss does not mean "no tokens". The cache may still be replaying the topic
(start-up), the broker may be unreachable, or the item was written to Feast and its record is not
produced yet (the worker writes Feast first). Answering `known: false` would score such an item
with the unknown token while the store has its tokens: a different score than the Feast path, for
as long as the cache lags. Reading the misses from Feast keeps the scores equal; its cost is paid
only for the misses (items that truly have no tokens are such misses every time).

Failure behaviour: a broker that is down or goes away never fails a request; the thread retries
every `retry_s` (its state and last error are in /healthz's `token_cache`), the items already
cached keep being served, the rest come from Feast. Staleness is bounded by the outage: an item
re-tokenized while the broker is down is served with its previous tokens until the record arrives.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time

from streams.contract.topics import ITEM_TOKENS
from streams.kafka_config import KafkaConfig

log = logging.getLogger(__name__)


class KafkaTokenCache:
    """The item_tokens topic, consumed in a background thread into {item_id: ItemTokensEvent record}."""

    def __init__(self, config: KafkaConfig, topic: str = ITEM_TOKENS, retry_s: float = 1.0):
        from streams.token_cache import TokenCache

        self.config, self.retry_s = config, retry_s
        self._cache = TokenCache(config, topic, keep_records=True)
        self.topic = self._cache.topic
        self.error: str | None = None  # the consumer's last failure, None while it runs
        self.started_at: float | None = None
        self.caught_up_s: float | None = None  # seconds from start to caught up (the first replay)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # ---- read side (request threads)
    def get(self, item_id: int) -> dict | None:
        return self._cache.records.get(item_id)

    def __len__(self) -> int:
        return len(self._cache.records)

    @property
    def caught_up(self) -> bool:
        return self._cache.caught_up

    def status(self) -> dict:
        return {"topic": self.topic, "bootstrap": self.config.bootstrap_servers, "reading": self._cache.reading,
                "items": len(self), "received": self._cache.received, "caught_up": self.caught_up,
                "caught_up_s": self.caught_up_s, "last_error": self.error}

    # ---- lifecycle
    def start(self) -> None:
        if self._thread is not None:
            return
        self.started_at = time.monotonic()
        self._thread = threading.Thread(target=self._main, name="trm-serve-token-cache", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._cache.stop)
            except RuntimeError:  # the loop closed meanwhile
                pass
        if self._thread is not None:
            self._thread.join(timeout)

    def wait_caught_up(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while not self.caught_up and time.monotonic() < end:
            time.sleep(0.02)
        return self.caught_up

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._run())
        finally:
            loop.close()

    async def _run(self) -> None:
        watch = asyncio.ensure_future(self._watch_caught_up())
        try:
            while not self._stop.is_set():
                try:
                    await self._cache.run()  # returns when stopped; raises when the broker fails
                except Exception as exc:  # noqa: BLE001 - any consumer failure: keep serving, retry
                    error = f"{type(exc).__name__}: {exc}"
                    # one warning per outage, not one per retry (a broker down for an hour is 3,600 retries)
                    log.log(logging.DEBUG if error == self.error else logging.WARNING,
                            "token cache consumer of %s failed (retrying every %.1f s): %s", self.topic,
                            self.retry_s, error)
                    self.error = error
                    await asyncio.sleep(self.retry_s)
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch

    async def _watch_caught_up(self) -> None:
        while True:
            await asyncio.sleep(0.02 if not self.caught_up else 0.5)
            if self.caught_up and self.caught_up_s is None:
                self.caught_up_s = time.monotonic() - (self.started_at or time.monotonic())
            if self.error is not None and self._cache.reading:
                self.error = None  # reading again after a failure
