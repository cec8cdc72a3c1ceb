"""`trm tokenizer refit`: warm start + matching keep an id's meaning; lineage; bad input names the fix."""
from __future__ import annotations

import json
from functools import lru_cache

import numpy as np
import pytest
from tokenizer_fixtures import embeddings, encoder, subset, subset_config

N_OLD = 1100  # the old artifact knows the first 1100 items; the refit sees all 1500 (new items arrived)


@lru_cache(maxsize=1)
def _old():
    from tokenizer.hybrid import HybridTokenizer

    items, inter, _ = subset()
    known = {it.item_id for it in items[:N_OLD]}
    return HybridTokenizer.fit(items[:N_OLD], [i for i in inter if i.item_id in known], subset_config(),
                               progress=False, embeddings=embeddings()[:N_OLD], encoder=encoder())


@lru_cache(maxsize=1)
def _refit():
    from tokenizer.hybrid import HybridTokenizer

    items, inter, _ = subset()
    return HybridTokenizer.refit(_old(), items, inter, progress=False, embeddings=embeddings(), encoder=encoder())


def test_match_levels_recovers_a_renaming():
    from tokenizer.refit import match_levels

    rng = np.random.default_rng(0)
    old = rng.normal(size=(3, 16, 8)).astype(np.float32)
    perm = np.stack([rng.permutation(16) for _ in range(3)])
    new = np.empty_like(old)
    for lvl in range(3):
        new[lvl, perm[lvl]] = old[lvl] + 0.01 * rng.normal(size=(16, 8))  # new centroid perm[c] is old c
    got = match_levels(old, new)  # got[l, new id] = old id
    for lvl in range(3):
        assert (got[lvl][perm[lvl]] == np.arange(16)).all()


def test_refit_keeps_most_codes_where_scratch_renames_them():
    old, new = _old(), _refit()
    rep = new.fit_report
    assert new.version != old.version and rep["refit_from"] == old.version
    assert (new.num_levels, new.codebook_size, new.mem_vocab_size) == (old.num_levels, old.codebook_size,
                                                                       old.mem_vocab_size)
    refit, scratch, matched = rep["refit"]["code_changed"], rep["scratch"]["code_changed"], \
        rep["scratch_matched"]["code_changed"]
    assert refit[0] < 0.35 and scratch[0] > 0.9  # a fresh fit names its clusters arbitrarily
    assert all(r < m <= s + 1e-9 for r, m, s in zip(refit, matched, scratch))  # matching helps, warm start more
    assert rep["refit"]["tuple_changed"] < rep["scratch"]["tuple_changed"]
    for run in ("refit", "scratch", "scratch_matched"):
        assert len(rep[run]["usage"]) == len(rep[run]["perplexity"]) == new.num_levels
        assert 0.0 <= rep[run]["collision_rate"] <= 1.0
    # the refit tokenizes the old items with the old codes where their clusters persisted
    items, _, _ = subset()
    before = np.array([t.gen_tokens for t in old.encode_embeddings(embeddings()[:N_OLD])])
    after = np.array([t.gen_tokens for t in new.encode_embeddings(embeddings()[:N_OLD])])
    assert (before[:, 0] == after[:, 0]).mean() > 0.65


def test_lineage_maps_every_id_and_survives_save_load(tmp_path):
    from tokenizer.hybrid import HybridTokenizer

    old, new = _old(), _refit()
    lin = new.lineage
    assert lin["parent"] == old.version and (lin["levels"], lin["codebook_size"]) == (3, 32)
    near = np.array(lin["gen"]["nearest_old"])
    assert near.shape == (3, 32) and ((near >= 0) & (near < 32)).all()
    same = np.array(lin["gen"]["similarity_same_id"])
    assert (same <= np.array(lin["gen"]["similarity_nearest"]) + 1e-6).all()
    assert np.median(same[0]) > 0.9  # most first-level ids kept their cluster
    # a new mem piece starts from an old piece that is its prefix; kept pieces keep their ids
    old_pieces, new_pieces = old.bpe.pieces(), new.bpe.pieces()
    assert new.fit_report["bpe"]["merges_kept"] > 0
    for i, src in lin["mem_init"].items():
        piece = new_pieces[int(i)]
        if len(piece) > 1:
            assert piece[:len(old_pieces[src])] == old_pieces[src] and old_pieces.get(int(i)) != piece
    for i, piece in new_pieces.items():
        if len(piece) > 1 and str(i) not in lin["mem_init"]:
            assert old_pieces[i] == piece
    back = HybridTokenizer.load(new.save(tmp_path / "new"), verify_encoder=False)
    assert back.version == new.version and back.lineage == lin
    assert HybridTokenizer.load(old.save(tmp_path / "old"), verify_encoder=False).lineage is None


def test_refit_on_the_same_data_changes_nothing_that_matters():
    from tokenizer.hybrid import HybridTokenizer

    items, inter, _ = subset()
    known = {it.item_id for it in items[:N_OLD]}
    again = HybridTokenizer.refit(_old(), items[:N_OLD], [i for i in inter if i.item_id in known], progress=False,
                                  embeddings=embeddings()[:N_OLD], encoder=encoder(), compare_scratch=False)
    assert max(again.fit_report["refit"]["code_changed"]) < 0.05
    assert "scratch" not in again.fit_report
    b = again.fit_report["bpe"]
    assert b["merges_kept"] >= 0.9 * (b["merges_kept"] + b["merges_retired"])


def test_bpe_renumbered_keeps_encoding_and_old_ids():
    from tokenizer.bpe import GenBPE

    old = GenBPE.learn([[0, 5, 9], [0, 5, 10], [1, 5, 9]], [6, 4, 2], 12, 20, 2)
    learned = GenBPE.learn([[1, 5, 9], [2, 6, 9], [0, 5, 9]], [6, 4, 2], 12, 20, 2)
    new = learned.renumbered(old, 20)
    seqs = [[1, 5, 9], [2, 6, 9], [0, 5, 9], [3, 3, 3]]
    assert [new.decode(m) for m in new.encode(seqs)] == [learned.decode(m) for m in learned.encode(seqs)] == seqs
    old_ids = {tuple(p): i for i, p in old.pieces().items()}
    for i, p in new.pieces().items():
        if tuple(p) in old_ids:
            assert old_ids[tuple(p)] == i
        else:
            assert i not in old.pieces()  # a new piece never takes a live old id while fresh ones remain
    assert max(new.pieces()) < 20


def test_refit_refuses_another_encoder_and_too_few_items(monkeypatch):
    from tokenizer.hybrid import HybridTokenizer
    from tokenizer.refit import RefitError

    items, inter, _ = subset()
    old = _old()
    with pytest.raises(RefitError, match="lower|geometry|fit a new tokenizer"):
        HybridTokenizer.refit(old, items[:10], inter, progress=False, embeddings=embeddings()[:10],
                              encoder=encoder())
    monkeypatch.setattr(type(encoder()), "checksum", lambda self: "f" * 64)
    with pytest.raises(RefitError, match="other encoder weights.*trm tokenizer fit"):
        HybridTokenizer.refit(old, items, inter, progress=False, embeddings=embeddings(), encoder=encoder())


def _tiny_ml(tmp_path):
    import pandas as pd
    from tokenizer_fixtures import DATA

    data = tmp_path / "ml"
    data.mkdir()
    movies = pd.read_csv(DATA / "movies.csv").iloc[::32]
    ratings = pd.read_csv(DATA / "ratings.csv")
    movies.to_csv(data / "movies.csv", index=False)
    ratings[ratings.movieId.isin(movies.movieId)].to_csv(data / "ratings.csv", index=False)
    return data


def test_cli_refit_writes_an_artifact_with_lineage_and_refuses_a_tampered_one(tmp_path, capsys):
    from tokenizer.hybrid import HybridTokenizer
    from trm.cli import main

    data = _tiny_ml(tmp_path)
    old, new = tmp_path / "old", tmp_path / "new"
    assert main(["tokenizer", "fit", "--data", str(data), "--out", str(old), "--cutoff-quantile", "0.5",
                 "--levels", "2", "--codebook", "8", "--mem-vocab", "64", "--align-epochs", "1",
                 "--threads", "2", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["tokenizer", "refit", "--from", str(old), "--data", str(data), "--out", str(new),
                 "--cutoff-quantile", "0.8", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "scratch" in printed and "kept with their ids" in printed and "lineage from" in printed
    a, b = HybridTokenizer.load(old), HybridTokenizer.load(new)
    assert b.lineage["parent"] == a.version and b.fit_report["n_items"] > a.fit_report["n_items"]
    # tampered: one flipped byte in the codebooks
    path = old / "codebooks.safetensors"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 1
    path.write_bytes(bytes(raw))
    assert main(["tokenizer", "refit", "--from", str(old), "--data", str(data), "--out", str(tmp_path / "x"),
                 "--quiet"]) == 2
    err = capsys.readouterr().out.replace("\n", "")  # rich wraps long lines
    assert "codebooks.safetensors fails its checksum" in err and "restore" in err
    # another geometry inside the artifact (config edited, manifest made consistent): named too
    import shutil

    from tests.tokenizer_fixtures import rewrite_artifact_file

    geom = tmp_path / "geom"
    shutil.copytree(new, geom)
    cfg = json.loads((geom / "config.json").read_text())
    cfg["codebook_size"] = 16
    rewrite_artifact_file(geom, "config.json", json.dumps(cfg).encode())
    assert main(["tokenizer", "refit", "--from", str(geom), "--data", str(data), "--out",
                 str(tmp_path / "y"), "--quiet"]) == 2
    assert "codebooks of shape" in capsys.readouterr().out.replace("\n", "")
