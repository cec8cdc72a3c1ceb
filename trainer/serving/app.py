"""The `trm serve` HTTP app: rank a user's candidates with the published model on online features.

  POST /rank     {"user_id": 42, "item_ids": [10, 11, 12]} -> {"model_version", "tokenizer_version",
                 "event_time", "items": [{"item_id", "score", "known"}, ...]} sorted by score, highest first
  GET  /healthz  200 once a model version and the online store are loaded, else 503 with the reason
  GET  /metrics  Prometheus text (a registry per app, so several apps can live in one process)

Scoring is the trainer's offline scoring of the same rows (trainer.evaluate.score on the joined
frame of trainer.serving.online), so a served score equals what `trm eval` gives the same row at
the same second; `event_time` in the response is that second.

Failure behaviour: no client input gives a 500. A bad body (malformed JSON, missing or unknown
fields, ids that are not strict integers in [0, 2**63), an empty, duplicated or too long candidate
list) is a 422 naming the field. No model version loaded yet, or an online store that fails, is a
503 with the reason; the store is re-opened on the next request, so the service recovers without a
restart. New versions are loaded by a background poller (trainer.serving.registry); one that does
not verify is refused and counted in `trm_serve_errors_total{kind="version_refused"}`, and the old
one keeps serving.

`token_cache` (a trainer.serving.token_cache.KafkaTokenCache, `trm serve --token-cache kafka`):
the candidates' item_tokens features come from it, misses and every other feature from Feast
(trainer.serving.online.CachedOnlineFeatures); it is started and stopped with the app, counted in
`trm_serve_token_cache_lookups_total{result="hit"|"miss"}` and shown in /healthz's `token_cache`.
A token cache that cannot reach its broker does not make the service unready: misses are read
from Feast, so the answers stay correct.
"""
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, Info, generate_latest
from pydantic import BaseModel, ConfigDict, Field, field_validator

from streams.metrics import in_process_values

from ..evaluate import score
from .online import CachedOnlineFeatures, OnlineFeatures, StoreUnavailable
from .registry import ModelBundle, ModelRegistry, Poller

log = logging.getLogger(__name__)
INT64_MAX = 2**63 - 1
# Feast entity keys are int64; strict: a bool, a float (even 1.0) or a numeric string is refused
EntityId = Annotated[int, Field(strict=True, ge=0, le=INT64_MAX)]
ROUTES = ("/rank", "/healthz", "/metrics")
STATUSES = ("200", "404", "405", "422", "500", "503")  # any other status is exported as "other"
ERROR_KINDS = ("bad_request", "no_model", "store_unavailable", "version_refused", "internal")


@dataclass(frozen=True)
class ServeConfig:
    repo: str  # the Feast repo (feature_store.yaml) whose online store the features come from
    models_dir: str  # the trainer's published versions: v<step>/ directories and LATEST
    model: str = "trm"  # which model of a version to serve
    max_candidates: int = 1000
    poll_s: float = 2.0  # how often LATEST is read (and a store not yet open is retried)
    token_cache: str = "off"  # "off": item tokens from Feast; "kafka": from the item_tokens topic's cache
    torch_threads: int | None = 1  # torch's intra-op threads for the process (None: torch's default, one per core)


class RankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: EntityId
    item_ids: list[EntityId] = Field(min_length=1)

    @field_validator("item_ids")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            seen: set[int] = set()
            dup: set[int] = set()
            for i in v:
                (dup if i in seen else seen).add(i)
            raise ValueError(f"item_ids must be distinct; repeated: {sorted(dup)[:10]}")
        return v


class RankedItem(BaseModel):
    item_id: int
    score: float
    known: bool  # False: the store had no usable tokens for the item; scored with the unknown token


class RankResponse(BaseModel):
    model_version: str
    tokenizer_version: str | None
    event_time: int  # the second the request was scored at (the features' "now")
    items: list[RankedItem]


class ServeMetrics:
    """The app's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        with in_process_values():
            self._create()

    def _create(self) -> None:
        self.registry = r = CollectorRegistry()
        self.request_seconds = Histogram("trm_serve_request_seconds", "HTTP request latency", ["route", "status"],
                                         registry=r, buckets=(.002, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.candidates = Histogram("trm_serve_candidates", "candidates per /rank request", registry=r,
                                    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000))
        self.feature_read_seconds = Histogram("trm_serve_feature_read_seconds", "online feature read latency",
                                              registry=r, buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 5))
        self.score_seconds = Histogram("trm_serve_score_seconds", "featurize + score latency", registry=r,
                                       buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 5))
        self.unknown_items = Counter("trm_serve_unknown_items", "candidates scored without tokens", registry=r)
        self.cache_lookups = Counter("trm_serve_token_cache_lookups", "token cache lookups of candidates (kafka "
                                     "token cache only; a miss is read from Feast)", ["result"], registry=r)
        self.errors = Counter("trm_serve_errors", "errors by kind", ["kind"], registry=r)
        self.model = Info("trm_serve_model", "the model version being served", registry=r)
        self.swaps = Counter("trm_serve_model_swaps", "model versions loaded", registry=r)
        # every label child now (see streams.metrics.in_process_values); all exported from the start, at 0
        self._errors = {k: self.errors.labels(k) for k in ERROR_KINDS}
        self.cache_hits, self.cache_misses = self.cache_lookups.labels("hit"), self.cache_lookups.labels("miss")
        self._requests = {(route, st): self.request_seconds.labels(route, st)
                          for route in (*ROUTES, "other") for st in (*STATUSES, "other")}

    def error(self, kind: str) -> None:
        self._errors[kind].inc()

    def request(self, path: str, status: int, seconds: float) -> None:
        route = path if path in ROUTES else "other"
        st = str(status) if str(status) in STATUSES else "other"
        self._requests[route, st].observe(seconds)

    def swapped(self, b: ModelBundle) -> None:
        self.model.info({"version": b.version, "model": b.model_name, "step": str(b.step),
                         "tokenizer_version": b.tokenizer_version or ""})
        self.swaps.inc()


def _errors(exc: RequestValidationError) -> list[dict]:
    """pydantic's errors, JSON-safe (its ctx may hold exception objects)."""
    return [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()]


def create_app(repo: str | Path, models_dir: str | Path, model: str = "trm", max_candidates: int = 1000,
               poll_s: float = 2.0, token_cache=None, torch_threads: int | None = 1) -> FastAPI:
    """A ranking app over `repo`'s online store and the versions published in `models_dir`.

    `token_cache`: a KafkaTokenCache (not started) to read the candidates' item tokens from, or None.
    `torch_threads`: set for the whole process here, before any request thread runs torch (each thread
    takes the process's setting on its first op); None leaves torch's. One by default: a request's
    forward is small, concurrent requests already use the cores, and intra-op threads that wait for a
    busy core cost far more than they save (the trainer scores with one thread too, `trm train --threads`).
    The poller (version watcher, store opener) and the token cache run while the app is served (its lifespan)."""
    cfg = ServeConfig(str(repo), str(models_dir), model, max_candidates, poll_s,
                      "off" if token_cache is None else "kafka", torch_threads)
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    metrics = ServeMetrics()
    online = OnlineFeatures(cfg.repo) if token_cache is None else CachedOnlineFeatures(cfg.repo, token_cache)
    registry = ModelRegistry(cfg.models_dir, cfg.model, on_swap=metrics.swapped,
                             on_refused=lambda name, exc: metrics.error("version_refused"))

    def open_store() -> None:
        if not online.healthy:
            try:
                online.open()
            except StoreUnavailable as exc:
                log.warning("online store unavailable: %s", exc.reason)
        online.refresh()  # the service's views re-read from the registry now and then (not per request)

    poller = Poller(cfg.poll_s, [registry.poll, open_store])

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        if token_cache is not None:
            token_cache.start()
        poller.start()
        try:
            yield
        finally:
            poller.stop()
            if token_cache is not None:
                token_cache.stop()

    class AppRankRequest(RankRequest):
        item_ids: list[EntityId] = Field(min_length=1, max_length=cfg.max_candidates)

    app = FastAPI(title="trm serve", lifespan=lifespan)
    app.state.config, app.state.metrics, app.state.online, app.state.registry = cfg, metrics, online, registry
    app.state.token_cache = token_cache

    @app.middleware("http")
    async def timed(request: Request, call_next):
        t0 = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            metrics.request(request.url.path, status, time.perf_counter() - t0)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.error("bad_request")
        return JSONResponse({"detail": _errors(exc)}, status_code=422)

    @app.exception_handler(StoreUnavailable)
    async def store_down(_request: Request, exc: StoreUnavailable) -> JSONResponse:
        metrics.error("store_unavailable")
        return JSONResponse({"detail": exc.reason}, status_code=503)

    @app.exception_handler(Exception)
    async def internal(_request: Request, exc: Exception) -> JSONResponse:
        metrics.error("internal")
        log.exception("internal error", exc_info=exc)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)

    # (no `from __future__ import annotations` in this module: FastAPI must read the local class
    # AppRankRequest from the annotation object itself, a string would not resolve)
    @app.post("/rank", response_model=RankResponse)
    def rank(req: AppRankRequest):  # sync: FastAPI runs it in its threadpool (blocking store read, torch)
        bundle = registry.current  # taken once: this request is scored and answered by this version
        if bundle is None:
            metrics.error("no_model")
            return JSONResponse({"detail": registry.reason}, status_code=503)
        metrics.candidates.observe(len(req.item_ids))
        now = int(time.time())
        got = online.read(req.user_id, req.item_ids, now)
        metrics.feature_read_seconds.observe(got.seconds)
        if token_cache is not None:
            metrics.cache_hits.inc(got.cache_hits)
            metrics.cache_misses.inc(got.cache_misses)
        t0 = time.perf_counter()
        with torch.inference_mode():  # no autograd bookkeeping at all (score itself is no_grad); same values
            scored = score(bundle.models, got.frame, bundle.featurizer)
        metrics.score_seconds.observe(time.perf_counter() - t0)
        s = scored[f"score_{bundle.model_name}"].to_numpy()
        known = scored["known"].to_numpy()
        metrics.unknown_items.inc(int((~known).sum()))
        order = np.argsort(-s, kind="stable")  # highest first; ties keep the request order
        items = [RankedItem(item_id=req.item_ids[j], score=float(s[j]), known=bool(known[j])) for j in order]
        return RankResponse(model_version=bundle.version, tokenizer_version=bundle.tokenizer_version,
                            event_time=now, items=items)

    @app.get("/healthz")
    def healthz():
        bundle = registry.current
        if bundle is None:
            return JSONResponse({"status": "unavailable", "reason": registry.reason}, status_code=503)
        if not online.healthy and not online.probe():  # a failed store is probed: health recovers with it
            return JSONResponse({"status": "unavailable", "reason": online.error}, status_code=503)
        body = {"status": "ok", "model_version": bundle.version, "model": bundle.model_name,
                "tokenizer_version": bundle.tokenizer_version, "step": bundle.step}
        if token_cache is not None:
            body["token_cache"] = token_cache.status()
        if registry.last_refused is not None:
            body["last_refused"] = {"version": registry.last_refused[0], "reason": registry.last_refused[1]}
        return body

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
