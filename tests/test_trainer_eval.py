"""`trm train` (replay) then `trm eval` end to end on a real Feast repo, and the metric definitions."""
import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from tests.trainer_fixtures import TOKENIZER_VERSION, K, L, event_stream, make_repo
from trainer.metrics import DAY, UNSEEN, age_bucket, gauc, summarize


def test_gauc_weights_users_by_rows_and_skips_one_class_users():
    y = np.array([1, 0, 1, 0, 0, 1, 1, 1])
    p = np.array([.9, .1, .2, .8, .3, .7, .5, .5])
    u = np.array([1, 1, 2, 2, 2, 2, 3, 3])  # user 3 has one class: no AUC
    expect = (2 * roc_auc_score(y[:2], p[:2]) + 4 * roc_auc_score(y[2:6], p[2:6])) / 6
    assert gauc(y, p, u) == pytest.approx(expect)


def test_age_buckets_and_unseen_items():
    t = np.array([10 * DAY] * 5)
    created = np.array([10 * DAY - 3600, 8 * DAY, 0, -40 * DAY, np.nan])
    assert list(age_bucket(t, created)) == ["<1d", "1-7d", "7-30d", ">30d", "no item features"]
    df = pd.DataFrame({"label": [1, 0, 1, 0, 1], "s": [.9, .1, .8, .2, .5], "user_id": 1, "event_time": t,
                       "created_at": created})
    r = summarize(df, "s", fit_cutoff=9 * DAY)
    assert r["by_age"][UNSEEN]["n"] == 1 and r["auc"] == 1.0


def write_movielens(d, events):
    """The synthetic stream in MovieLens layout (rating 5 = positive, 1 = negative)."""
    d.mkdir()
    items = sorted({e.item_id for e in events})
    pd.DataFrame({"movieId": items, "title": [f"Item {i}" for i in items], "genres": "Drama"}).to_csv(d / "movies.csv", index=False)
    pd.DataFrame({"userId": [e.user_id for e in events], "movieId": [e.item_id for e in events],
                  "rating": [5.0 if e.label else 1.0 for e in events],
                  "timestamp": [e.event_time for e in events]}).to_csv(d / "ratings.csv", index=False)


@pytest.mark.integration
def test_cli_train_then_eval(tmp_path):
    from trm.cli import main

    stream = event_stream(400)
    repo = make_repo(tmp_path, stream)
    data = tmp_path / "ml"
    write_movielens(data, stream)
    run = tmp_path / "run"
    common = ["--repo", str(repo), "--data", str(data)]
    assert main(["train", *common, "--models", "trm,gen_only,id", "--levels", str(L), "--codebook", str(K),
                 "--tokenizer-version", TOKENIZER_VERSION, "--checkpoint-dir", str(run / "ckpt"), "--end", "0.75",
                 "--batch-size", "100", "--minibatch", "50", "--d-model", "32", "--blocks", "1",
                 "--publish-every", "2", "--fit-cutoff", str(stream[200].event_time)]) == 0
    assert (run / "models" / "LATEST").exists() and (run / "prequential.jsonl").exists()
    out = tmp_path / "eval"
    assert main(["eval", *common, "--checkpoint", str(run / "models"), "--start", "0.75", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["results"]) == {"trm", "gen_only", "id"} and m["fit_cutoff"] == stream[200].event_time
    assert all(r["n"] == 100 for r in m["results"].values())
    assert (out / "auc_by_age.png").stat().st_size > 10_000


@pytest.mark.integration
def test_cli_warm_start_then_replay_continues_from_it(tmp_path, capsys):
    from trainer.checkpoint import read_pointer, read_state
    from trm.cli import main

    stream = event_stream(400)
    repo = make_repo(tmp_path, stream)
    data = tmp_path / "ml"
    write_movielens(data, stream)
    ck = tmp_path / "run" / "ckpt"
    common = ["--repo", str(repo), "--data", str(data), "--models", "trm,id", "--levels", str(L), "--codebook",
              str(K), "--tokenizer-version", TOKENIZER_VERSION, "--checkpoint-dir", str(ck), "--batch-size", "100",
              "--minibatch", "50", "--d-model", "32", "--blocks", "1", "--publish-every", "0"]
    assert main(["train", *common, "--end", "0.5", "--epochs", "2", "--valid-share", "0.25"]) == 0
    warm = read_state(read_pointer(ck))
    assert warm.extra["warm_start"]["epochs"] in (1, 2) and warm.step == 0
    assert "validation AUC by epoch" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="already holds a checkpoint"):  # a warm start never resumes
        main(["train", *common, "--end", "0.5", "--epochs", "2"])
    assert main(["train", *common]) == 0  # the replay resumes the warm checkpoint: skips what it trained
    after = read_state(read_pointer(ck))
    n_new = sum(e.event_time >= warm.extra["trained_until"] for e in stream)
    assert after.extra["skipped_trained"] == len(stream) - n_new and after.events_seen == len(stream)
