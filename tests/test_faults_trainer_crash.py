"""Fault injection, trainer crash: `trm train --follow` is killed with SIGKILL (by PID) four times,
at four different points, and restarted after each kill; the fifth run finishes the stream.

1. at whatever point it has reached once its journal shows two checkpoints (progress-timed),
2. inside `save_checkpoint`, weights written under the temporary name (`trainer.mid_checkpoint`),
3. after the checkpoint directory's rename, before `LATEST` moves to it (`trainer.before_pointer`),
4. inside the publisher's copy of a model version, before its rename (`trainer.mid_publish`).

Kills 2-4 land exactly where named: `streams.failpoints` pauses the trainer there and the test kills
it while it waits. Right after every kill (before the restart) both pointers (checkpoints and
published model versions) must name a complete directory that verifies against its manifest and
loads into freshly built models. At the end, from the trainer's progress journal: every event
was trained at least once, the events trained twice are exactly the batch each kill caught
trained but not checkpointed (at most one batch per kill), and the committed offsets (Kafka and
checkpoint) equal the number of events.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.fault_checks import committed_total
from tests.streams_fixtures import ROOT
from tests.trainer_fixtures import TOKENIZER_VERSION, K, L, event_stream, make_repo, publish

pytestmark = pytest.mark.integration
N, BATCH = 600, 50
GROUP = "trm-trainer-crash"
WAIT_S = 120  # generous: 2 shared cores, torch + Feast import per start
KILLS = ("progress", "trainer.mid_checkpoint", "trainer.before_pointer", "trainer.mid_publish")


def _start(cfg, repo, run_dir: Path, k: int, failpoint: str | None):
    env = {k_: v for k_, v in os.environ.items() if not k_.startswith("TRM_")}
    env.update(TRM_KAFKA_SESSION_TIMEOUT_MS="6000", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    if failpoint:
        env.update(TRM_FAILPOINT=failpoint, TRM_FAILPOINT_DIR=str(run_dir / f"fp{k}"))
    log = open(run_dir / f"trainer{k}.log", "w")
    cmd = [sys.executable, "-W", "ignore", "-m", "trm.cli", "train", "--follow", "--models", "trm",
           "--repo", str(repo), "--levels", str(L), "--codebook", str(K), "--tokenizer-version", TOKENIZER_VERSION,
           "--d-model", "32", "--blocks", "1", "--batch-size", str(BATCH), "--minibatch", "50",
           "--checkpoint-dir", str(run_dir / "ckpt"), "--models-dir", str(run_dir / "models"),
           "--publish-every", "1", "--bootstrap", cfg.bootstrap_servers, "--group-id", GROUP,
           "--feature-group", "", "--idle-timeout", "4"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    p._log = log  # type: ignore[attr-defined]
    p._log_path = run_dir / f"trainer{k}.log"  # type: ignore[attr-defined]
    return p


def _tail(p) -> str:
    return p._log_path.read_text()[-3000:]


def _journal(path: Path) -> list[dict]:
    """Complete lines only: a kill during a write may leave a truncated last line."""
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def _events(entry: dict) -> list[tuple[str, int]]:
    return [(part, o) for part, runs in entry["offsets"].items() for a, b in runs for o in range(a, b)]


def _wait(cond, p, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert p.poll() is None, f"trainer exited (rc {p.returncode}) before {what}:\n{_tail(p)}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{_tail(p)}"
        time.sleep(0.02)


def _check_pointers(ck: Path, models_dir: Path) -> dict:
    """Both pointers name a complete, verified directory that loads into fresh models."""
    from trainer.checkpoint import load_checkpoint, read_pointer, read_state
    from trainer.learner import Learner
    from trainer.models import RankerConfig

    out = {}
    p = read_pointer(ck)
    assert p is not None and re.fullmatch(r"ckpt-\d{9}", p.name), p
    st = read_state(p)  # verifies every file against the manifest
    learner = Learner(st.extra["models"], RankerConfig(**st.extra["config"]))
    assert load_checkpoint(p, learner.models, learner.optimizers, restore_rng=False).step == st.step
    out["ckpt"] = st
    v = read_pointer(models_dir)
    if v is not None:
        assert re.fullmatch(r"v\d+", v.name), v
        vst = read_state(v)
        learner = Learner(vst.extra["models"], RankerConfig(**vst.extra["config"]))
        load_checkpoint(v, learner.models, None, restore_rng=False)
        assert int(v.name[1:]) == vst.step <= st.step
        out["version"] = vst
    return out


class PointerWatch(threading.Thread):
    """Reads both LATEST pointers every 10 ms while trainers run; every name seen must be a final
    (not temporary) directory holding its manifest at that moment."""

    def __init__(self, roots: list[Path]):
        super().__init__(daemon=True)
        self.roots, self.stop, self.seen, self.bad = roots, threading.Event(), Counter(), []

    def run(self) -> None:
        while not self.stop.is_set():
            for root in self.roots:
                try:
                    name = (root / "LATEST").read_text().strip()
                except FileNotFoundError:
                    continue
                self.seen[name] += 1
                if name.startswith(".") or "tmp" in name or not (root / name / "manifest.json").exists():
                    self.bad.append((root.name, name, sorted(x.name for x in root.iterdir())))
            time.sleep(0.01)


def test_kill_9_trainer_four_times_replays_at_most_the_uncommitted_batch(kafka_config, tmp_path):  # noqa: F811
    from trainer.checkpoint import read_pointer, read_state

    t_start = time.monotonic()
    stream = event_stream(N)
    repo = make_repo(tmp_path, stream)
    publish(kafka_config, stream)
    t_prep = time.monotonic() - t_start  # Feast repo + features + publishing the events
    topic = kafka_config.topic("interactions")
    ck, models_dir, journal = tmp_path / "ckpt", tmp_path / "models", tmp_path / "journal.jsonl"
    ck.mkdir()
    models_dir.mkdir()
    watch = PointerWatch([ck, models_dir])
    watch.start()
    kills = []  # per kill: what the test saw right after it
    p = None
    try:
        for k, point in enumerate(KILLS):
            t_run = time.monotonic()
            p = _start(kafka_config, repo, tmp_path, k, None if point == "progress" else point)
            mine = lambda: [e for e in _journal(journal) if e["pid"] == p.pid]  # noqa: E731
            if point == "progress":  # two batches checkpointed (some, not all events): kill wherever it is
                _wait(lambda: sum(e["kind"] == "checkpoint" for e in mine()) >= 2, p, "two checkpoints")
            else:
                marker = tmp_path / f"fp{k}" / f"{point}.paused"
                _wait(marker.exists, p, f"failpoint {point}")
            os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
            p._log.close()
            assert p.returncode == -signal.SIGKILL
            time.sleep(0.05)  # the watcher reads the pointers once more after the kill
            # -- right after the kill, before the restart: both pointers name complete, loadable dirs
            ptr = _check_pointers(ck, models_dir)
            ck_state = ptr["ckpt"]
            temps = sorted(x.name for d in (ck, models_dir) for x in d.iterdir() if x.name.startswith("."))
            run = mine()
            trained = [e for e in run if e["kind"] == "trained"]
            assert trained, f"kill {k} ({point}) came before any trained batch"
            # what this run trained that the checkpoint LATEST names does not hold: the replay
            uncommitted = [e for e in trained
                           if any(o >= ck_state.offsets.get(part, 0) for part, o in _events(e))]
            for e in uncommitted:  # a batch is all in or all out of the checkpoint
                assert all(o >= ck_state.offsets.get(part, 0) for part, o in _events(e)), e
            kills.append(dict(point=point, step=ck_state.step, events_seen=ck_state.events_seen,
                              version=ptr.get("version") and ptr["version"].step, temps=temps,
                              trained_batches=len(trained), uncommitted=uncommitted,
                              secs=round(time.monotonic() - t_run, 1)))
            if point == "trainer.mid_checkpoint":  # a partial checkpoint exists and LATEST ignores it
                assert any(t.startswith(".tmp-ckpt-") for t in temps), temps
                assert ck_state.step == trained[-1]["step"] - 1 and len(uncommitted) == 1
            elif point == "trainer.before_pointer":  # the complete next checkpoint exists, not yet named
                assert (ck / f"ckpt-{ck_state.step + 1:09d}" / "manifest.json").exists()
                assert ck_state.step == trained[-1]["step"] - 1 and len(uncommitted) == 1
            elif point == "trainer.mid_publish":  # checkpoint durable, version copy partial
                assert any(t.startswith(".tmp-v") for t in temps), temps
                assert ck_state.step == trained[-1]["step"] and uncommitted == []
                assert kills[-1]["version"] is None or kills[-1]["version"] < ck_state.step
            assert len(uncommitted) <= 1, uncommitted  # at most the one batch not yet checkpointed
            assert 0 < len({ev for e in trained for ev in _events(e)}) < N
            assert ck_state.events_seen < N

        t_run = time.monotonic()
        p = _start(kafka_config, repo, tmp_path, len(KILLS), None)  # runs to the end (4 s idle)
        rc = p.wait(timeout=300)
        p._log.close()
        assert rc == 0, _tail(p)
        t_last = time.monotonic() - t_run
    finally:
        watch.stop.set()
        watch.join(timeout=5)
        if p is not None and p.poll() is None:
            p.kill()
            p.wait(timeout=30)
            p._log.close()
    runtime = time.monotonic() - t_start

    assert not watch.bad, watch.bad[:5]
    assert watch.seen, "the watcher never saw a pointer"
    entries = _journal(journal)
    counts = Counter(ev for e in entries if e["kind"] == "trained" for ev in _events(e))
    committed = committed_total(kafka_config, GROUP, "interactions")
    all_events = {ev for ev in counts}
    assert len(all_events) == N, f"{N - len(all_events)} events never trained"  # every event at least once
    assert {part for part, _ in all_events} == {f"{topic}:{i}" for i in range(4)}
    for part in {part for part, _ in all_events}:  # and they are offsets 0..end-1 of each partition
        offs = sorted(o for q, o in all_events if q == part)
        assert offs == list(range(len(offs)))
    replayed = Counter(ev for kill in kills for e in kill["uncommitted"] for ev in _events(e))
    twice = {ev: c - 1 for ev, c in counts.items() if c > 1}
    assert twice == dict(replayed)  # trained again == exactly the uncommitted batches, once per kill
    # each kill replays at most the one batch it caught trained but not checkpointed; two kills in a
    # row can catch the same batch (the restart's first checkpoint is the replayed batch's), so an
    # event may be trained 1 + (number of kills) times, never more
    assert all(sum(len(_events(e)) for e in kl["uncommitted"]) <= BATCH for kl in kills)
    assert max(counts.values()) <= 1 + len(kills)
    # the checkpointed lineage trained every event exactly once; Kafka and the checkpoint agree
    final = read_state(read_pointer(ck))
    assert final.events_seen == N and sum(final.offsets.values()) == N
    assert committed == N
    assert read_state(read_pointer(models_dir)).step == final.step
    assert not [x.name for d in (ck, models_dir) for x in d.iterdir() if x.name.startswith(".")]  # temps removed

    per_kill = [(kl["point"], sum(len(_events(e)) for e in kl["uncommitted"])) for kl in kills]
    print(f"\n{N} events, batch {BATCH}, 4 partitions; kills (point, events replayed): {per_kill}; "
          f"steps at kills {[kl['step'] for kl in kills]}, final step {final.step}; "
          f"trained events total {sum(counts.values())}; temps seen after kills {[kl['temps'] for kl in kills]}; "
          f"pointer reads {sum(watch.seen.values())} over {len(watch.seen)} names; runtime {runtime:.1f} s "
          f"(setup {t_prep:.1f} s, runs to each kill {[kl['secs'] for kl in kills]} s, last run "
          f"{t_last:.1f} s)")
