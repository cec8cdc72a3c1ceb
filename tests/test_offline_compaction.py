"""Offline compaction (`streams/compaction.py`, `trm compact`) against a real materialized Feast repo.

The promise under test: merging a view's part files changes no point-in-time answer, even with
replayed rows (same entity and event_timestamp, later `created`, different values: the later one
must win before and after), while fresh files, the seed file and other writers' temp files are
left alone, and a crash between the publish and the deletes leaves only harmless duplicates.
"""
from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from streams.compaction import LOCK_NAME, SEED_NAME, compact_repo, compact_view
from streams.feast_sink import OFFLINE_SCHEMAS, FeastSink, offline_dir

ROOT = Path(__file__).resolve().parent.parent
FEATURES = [  # what the trainer reads (the FeatureService ranker_features, feature_repo/definitions.py)
    "item_tokens:gen_tokens", "item_tokens:mem_tokens", "item_tokens:tokenizer_version",
    "item_tokens:created_at", "item_tokens:retired",
    "user_history:hist_gen_tokens", "user_history:hist_item_ids",
    "user_history:user_n_events", "user_history:user_n_positives",
    "item_stats:item_n_interactions", "item_stats:item_n_positives",
]
T0 = 1_200_000_000  # event time base (epoch s)
W0 = datetime(2024, 1, 1, tzinfo=timezone.utc)  # `created` base: all writes happen "later" than events
N_BATCHES, USERS, ITEMS = 40, 12, 15
REPLAYED = range(10, 20)  # batches written again with a later `created`
DUP_USER = 3  # the user whose replayed rows carry different values


def _user_rows(b: int, bump: int = 0) -> list[dict]:
    return [{"user_id": u, "hist_gen_tokens": [b, u, 1], "hist_item_ids": [b * 100 + u],
             "user_n_events": b + bump, "user_n_positives": b // 2 + bump,
             "event_timestamp": T0 + b * 100 + u} for u in range(1, USERS + 1) if (u + b) % 3]


def _stat_rows(b: int, bump: int = 0) -> list[dict]:
    return [{"item_id": i, "item_n_interactions": b * 10 + i + bump, "item_n_positives": b + bump,
             "event_timestamp": T0 + b * 100 + 50} for i in range(1, ITEMS + 1) if (i + b) % 4]


def _token_rows(b: int) -> list[dict]:
    return [{"item_id": i, "gen_tokens": [i, b, 7], "mem_tokens": [i * b % 13], "tokenizer_version": f"v{b % 3}",
             "created_at": T0 + b, "retired": b % 5 == 0, "event_timestamp": T0 + b * 100 + 20}
            for i in range(1, ITEMS + 1) if (i + b) % 5 == 0]


def _part_files(repo: Path, view: str) -> list[Path]:
    return sorted(offline_dir(repo, view).glob("*.parquet"))


def _age_all_parts(repo: Path, seconds: float = 3600) -> None:
    old = time.time() - seconds
    for view in OFFLINE_SCHEMAS:
        for p in _part_files(repo, view):
            os.utime(p, (old, old))


@pytest.fixture
def stream_repo(tmp_path):
    """A materialized repo holding N_BATCHES stream batches per view plus replayed batches."""
    from streams.feature_repo_tools import materialize_repo

    repo = materialize_repo(tmp_path / "repo")
    sink = FeastSink(repo, writer_id="test")
    for b in range(N_BATCHES):
        created = W0 + timedelta(seconds=b)
        sink.write_offline("user_history", _user_rows(b), created)
        sink.write_offline("item_stats", _stat_rows(b), created)
        rows = _token_rows(b)
        if rows:
            sink.write_offline("item_tokens", rows, created)
    replay = FeastSink(repo, writer_id="replay")  # a restarted worker re-writing batches an hour later
    for b in REPLAYED:
        created = W0 + timedelta(hours=1, seconds=b)
        users = [dict(r, user_n_events=r["user_n_events"] + 1000) if r["user_id"] == DUP_USER else r
                 for r in _user_rows(b)]
        replay.write_offline("user_history", users, created)
        replay.write_offline("item_stats", _stat_rows(b, bump=500), created)  # different values
        if _token_rows(b):
            replay.write_offline("item_tokens", _token_rows(b), created)  # identical values
    _age_all_parts(repo)
    return repo


def _entity_df() -> pd.DataFrame:
    """Entity rows before, exactly at, between and after the stream's event times."""
    rows = []
    for k, t in enumerate(range(T0 - 50, T0 + N_BATCHES * 100 + 100, 37)):
        rows.append((1 + k % USERS, 1 + k % ITEMS, t))
    for b in REPLAYED:  # exactly at the replayed rows' event times
        rows.append((DUP_USER, 1 + b % ITEMS, T0 + b * 100 + DUP_USER))
        rows.append((1 + b % USERS, 1 + b % ITEMS, T0 + b * 100 + 50))
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "t"])
    df["event_timestamp"] = pd.to_datetime(df["t"], unit="s", utc=True)
    df["row"] = range(len(df))
    return df.drop(columns=["t"])


def _pit(repo: Path, entity: pd.DataFrame) -> pd.DataFrame:
    from feast import FeatureStore

    out = FeatureStore(repo_path=str(repo)).get_historical_features(entity_df=entity, features=FEATURES).to_df()
    assert len(out) == len(entity)
    return out.sort_values("row").reset_index(drop=True)


def _assert_same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.columns) == list(b.columns)
    for col in a.columns:  # list columns hold numpy arrays: compare as plain lists
        left = [x.tolist() if hasattr(x, "tolist") else x for x in a[col]]
        right = [x.tolist() if hasattr(x, "tolist") else x for x in b[col]]
        assert pd.Series(left, dtype=object).equals(pd.Series(right, dtype=object)), col


def test_compaction_keeps_every_point_in_time_answer(stream_repo):
    repo, entity = stream_repo, _entity_df()
    before = _pit(repo, entity)
    # the replayed row (later `created`, different values) wins, as the stream intends
    at_dup = before[(before.user_id == DUP_USER)
                    & (before.event_timestamp == pd.Timestamp(T0 + 14 * 100 + DUP_USER, unit="s", tz="UTC"))]
    assert at_dup.user_n_events.tolist() == [14 + 1000]
    files_before = {v: len(_part_files(repo, v)) for v in OFFLINE_SCHEMAS}
    assert files_before["user_history"] == 1 + N_BATCHES + len(REPLAYED)

    results = {r.view: r for r in compact_repo(repo, delete_grace_s=0)}

    for view in OFFLINE_SCHEMAS:
        files = _part_files(repo, view)
        r = results[view]
        assert [p.name for p in files] == sorted([SEED_NAME, r.output.name]), view  # 1 (+ seed)
        assert r.files_before == files_before[view] and r.files_after == 2
        assert pq.read_schema(r.output).remove_metadata() == OFFLINE_SCHEMAS[view]
        assert not list(offline_dir(repo, view).glob(".part-*.tmp"))
    # each replayed (entity, ts) keeps exactly one row: the later one
    u = results["user_history"]
    assert u.rows_before - u.rows_after == sum(len(_user_rows(b)) for b in REPLAYED)
    merged = pq.read_table(u.output).to_pandas()
    assert not merged.duplicated(["user_id", "event_timestamp"]).any()
    dup = merged[(merged.user_id == DUP_USER) & (merged.user_n_events >= 1000)]
    assert len(dup) == sum(1 for b in REPLAYED if (DUP_USER + b) % 3)

    after = _pit(repo, entity)
    _assert_same(before, after)
    pd.testing.assert_frame_equal(before[["user_id", "item_id", "event_timestamp", "row"]],
                                  after[["user_id", "item_id", "event_timestamp", "row"]])

    # a second run has nothing (new) to merge beyond the one file: idempotent answers
    again = compact_view(repo, "user_history", delete_grace_s=0, older_than_s=0)
    assert again.skipped and again.files_after == 2


def test_keep_duplicates_merges_without_dropping(stream_repo):
    r = compact_view(stream_repo, "item_stats", keep_duplicates=True, delete_grace_s=0)
    assert r.rows_after == r.rows_before and r.merged == N_BATCHES + len(REPLAYED)
    assert len(_part_files(stream_repo, "item_stats")) == 2


def test_fresh_files_seed_and_writer_temps_are_left_alone(stream_repo):
    repo = stream_repo
    d = offline_dir(repo, "user_history")
    sink = FeastSink(repo, writer_id="live")
    fresh = [sink.write_offline("user_history", _user_rows(b), W0 + timedelta(hours=2, seconds=b))
             for b in range(N_BATCHES, N_BATCHES + 3)]  # just written: younger than older_than_s
    in_flight = d / ".part-20240101T000000000000-live-000099.parquet.tmp"
    in_flight.write_bytes(b"half a file")  # a writer mid-write
    stale = d / ".part-20230101T000000000000-dead-000001.parquet.tmp"
    stale.write_bytes(b"left by a killed writer")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    seed_mtime = (d / SEED_NAME).stat().st_mtime

    r = compact_view(repo, "user_history", older_than_s=60, delete_grace_s=0)

    assert r.merged == N_BATCHES + len(REPLAYED)
    names = {p.name for p in _part_files(repo, "user_history")}
    assert names == {SEED_NAME, r.output.name} | {p.name for p in fresh}
    assert all(p.stat().st_mtime >= time.time() - 60 for p in fresh)  # untouched
    assert (d / SEED_NAME).stat().st_mtime == seed_mtime
    assert in_flight.exists() and not stale.exists() and r.removed_tmp == [stale]


def test_seed_only_view_stays_readable(tmp_path):
    from streams.feature_repo_tools import materialize_repo

    repo = materialize_repo(tmp_path / "repo")
    results = compact_repo(repo, older_than_s=0, delete_grace_s=0)
    assert all(r.skipped and r.files_after == 1 for r in results)
    for view in OFFLINE_SCHEMAS:
        assert [p.name for p in _part_files(repo, view)] == [SEED_NAME]
    out = _pit(repo, _entity_df().head(5))
    assert out["user_n_events"].isna().all()


def test_kill_between_publish_and_deletes_leaves_harmless_duplicates(stream_repo, monkeypatch):
    import streams.compaction as compaction

    repo, entity = stream_repo, _entity_df()
    before = _pit(repo, entity)

    def killed(_seconds):  # the process dies during the grace period: output published, inputs kept
        raise SystemExit("killed")

    monkeypatch.setattr(compaction.time, "sleep", killed)
    with pytest.raises(SystemExit):
        compact_view(repo, "user_history", delete_grace_s=1)
    monkeypatch.undo()
    files = _part_files(repo, "user_history")
    assert len(files) == 1 + N_BATCHES + len(REPLAYED) + 1  # inputs + the published merge
    _assert_same(before, _pit(repo, entity))  # rows visible twice: same answers

    # the next run (a cron period later: the published file is no longer fresh) cleans up
    r = compact_view(repo, "user_history", delete_grace_s=0, older_than_s=0)
    assert len(_part_files(repo, "user_history")) == 2 and r.merged == len(files) - 1
    _assert_same(before, _pit(repo, entity))


def test_kill_before_publish_leaves_only_a_temp_file(stream_repo, monkeypatch):
    import streams.compaction as compaction

    d = offline_dir(stream_repo, "item_stats")
    names = {p.name for p in _part_files(stream_repo, "item_stats")}

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(compaction.os, "replace", failing_replace)
    with pytest.raises(OSError):
        compact_view(stream_repo, "item_stats", delete_grace_s=0)
    monkeypatch.undo()
    assert {p.name for p in _part_files(stream_repo, "item_stats")} == names  # nothing lost or added
    assert not list(d.glob(".part-*.tmp"))  # a failure (not a kill) removes its own temp file


def test_a_held_lock_skips_the_view(stream_repo):
    d = offline_dir(stream_repo, "item_stats")
    with open(d / LOCK_NAME, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        r = compact_view(stream_repo, "item_stats", delete_grace_s=0)
    assert r.skipped and "lock" in r.skipped and r.merged == 0
    assert compact_view(stream_repo, "item_stats", delete_grace_s=0).merged == N_BATCHES + len(REPLAYED)


def trm(*args, **kw):
    return subprocess.run([sys.executable, "-W", "ignore", "-m", "trm.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, **kw)


def test_cli_help_and_real_run(stream_repo):
    p = trm("compact", "--help")
    assert p.returncode == 0 and "--older-than" in p.stdout and "--keep-duplicates" in p.stdout
    n_user = len(_part_files(stream_repo, "user_history"))
    p = trm("compact", "--repo", str(stream_repo), "--view", "user_history", "--delete-grace", "0", "--quiet")
    assert p.returncode == 0, p.stderr
    rows_before = sum(len(_user_rows(b)) for b in range(N_BATCHES)) + sum(len(_user_rows(b)) for b in REPLAYED)
    rows_after = sum(len(_user_rows(b)) for b in range(N_BATCHES))
    assert f"files {n_user:,} -> 2, rows {rows_before:,} -> {rows_after:,} in " in p.stdout
    assert "user_history" in p.stdout
    assert len(_part_files(stream_repo, "item_stats")) > 2  # --view: the others untouched
    p = trm("compact", "--repo", str(stream_repo), "--delete-grace", "0")
    assert p.returncode == 0 and "compacted: files" in p.stdout, p.stderr
    assert all(len(_part_files(stream_repo, v)) == 2 for v in OFFLINE_SCHEMAS)
    p = trm("compact", "--repo", str(stream_repo / "nope"))
    assert p.returncode == 2 and "no data/offline" in p.stderr


def test_k8s_cronjob_runs_a_command_the_cli_accepts():
    import re

    import yaml

    from trm.cli import build_parser

    base = ROOT / "deploy" / "k8s" / "base"
    assert "compaction-cronjob.yaml" in yaml.safe_load((base / "kustomization.yaml").read_text())["resources"]
    cron = yaml.safe_load((base / "compaction-cronjob.yaml").read_text())
    assert cron["kind"] == "CronJob" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    cm = yaml.safe_load((base / "configmap.yaml").read_text())["data"]
    argv = [re.sub(r"\$\((\w+)\)", lambda m: cm[m.group(1)], a) for a in pod["containers"][0]["args"]]
    args = build_parser().parse_args(argv)
    assert args.func.__module__ == "trm.cli.compact" and args.repo == cm["TRM_FEAST_REPO"]
    mount = pod["containers"][0]["volumeMounts"][0]
    assert mount["mountPath"] == str(offline_dir(args.repo, "x").parent)  # where the workers write
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
    assert claims[mount["name"]] == "trm-offline" and pod["securityContext"]["runAsNonRoot"] is True


def test_a_later_compaction_merges_what_is_new_not_the_whole_store(stream_repo):
    """Size-tiered: the big merged file stays as it is while a little new data is merged beside
    it; once as much new data has been merged as it holds, they merge together. Answers hold."""
    repo, entity = stream_repo, _entity_df()
    before = _pit(repo, entity)
    first = compact_view(repo, "user_history", delete_grace_s=0, older_than_s=0)
    big = first.output
    sink = FeastSink(repo, writer_id="late")
    for b in range(2):  # two small new batches (copies of earlier rows: answers unchanged)
        sink.write_offline("user_history", _user_rows(b), W0 + timedelta(seconds=b))
    second = compact_view(repo, "user_history", delete_grace_s=0, older_than_s=0)
    assert second.merged == 2 and big.exists()  # only the new files were read and rewritten
    assert second.rows_before - second.rows_after == 0
    _assert_same(before, _pit(repo, entity))
    for b in range(N_BATCHES):  # as much new data again: the tiers merge
        sink.write_offline("user_history", _user_rows(b), W0 + timedelta(seconds=b))
    third = compact_view(repo, "user_history", delete_grace_s=0, older_than_s=0)
    assert not big.exists() and third.merged == N_BATCHES + 2
    assert len(_part_files(repo, "user_history")) == 2  # seed + one merged file
    _assert_same(before, _pit(repo, entity))
