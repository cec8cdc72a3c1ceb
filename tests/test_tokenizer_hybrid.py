"""HybridTokenizer end to end on a real MovieLens subset: tokens, determinism, artifact integrity, CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.tokenizer_fixtures import rewrite_artifact_file, subset_config


def test_tokens_follow_the_contract(fitted_tokenizer, tok_subset):
    tok = fitted_tokenizer
    items, _, _ = tok_subset
    assert (tok.num_levels, tok.codebook_size, tok.gen_vocab_size, tok.mem_vocab_size) == (3, 32, 96, 1024)
    assert tok.version.startswith("tok-")
    toks = tok.encode_items(items[:300])
    for t in toks:
        assert len(t.gen_tokens) == 3
        for level, g in enumerate(t.gen_tokens):
            assert level * 32 <= g < (level + 1) * 32
        assert t.mem_tokens and all(0 <= m < tok.mem_vocab_size for m in t.mem_tokens)
        assert tok.bpe.decode(t.mem_tokens) == t.gen_tokens  # mem pieces cover the gen sequence exactly
        assert t.tokenizer_version == tok.version
        assert all(type(x) is int for x in t.gen_tokens + t.mem_tokens + t.coarse_tokens)
        # coarse tokens: the nearest level-1 codes, distinct, the first being the item's own
        assert len(t.coarse_tokens) == tok.config.coarse_k == 6 and len(set(t.coarse_tokens)) == 6
        assert t.coarse_tokens[0] == t.gen_tokens[0] and all(0 <= c < 32 for c in t.coarse_tokens)


def test_coarse_tokens_are_the_nearest_level1_centroids_in_order(fitted_tokenizer, tok_embeddings):
    """Computed from the item's content embedding alone (no label, no interaction enters them)."""
    import numpy as np

    tok = fitted_tokenizer
    aligned = tok.projector.project(tok_embeddings[:50])
    sims = aligned @ tok.quantizer.directions[0].T  # unit rows: cosine
    for row, t in zip(sims, tok.encode_embeddings(tok_embeddings[:50])):
        got = row[t.coarse_tokens]
        assert (np.diff(got) <= 1e-6).all()  # nearest first
        assert got[-1] >= np.sort(row)[::-1][len(got) - 1] - 1e-6  # and no nearer code left out


def test_encode_items_matches_encode_texts_and_is_deterministic(fitted_tokenizer, tok_subset):
    tok = fitted_tokenizer
    items, _, unseen = tok_subset
    sample = items[:40] + unseen
    a = tok.encode_items(sample)
    b = tok.encode_texts([it.text() for it in sample])
    c = tok.encode_texts([it.text() for it in reversed(sample)])[::-1]  # batch order does not matter
    assert a == b == c


def test_fit_is_reproducible(fitted_tokenizer, tok_subset, tok_embeddings):
    """Same data + seed → same version, whatever the item order (a smaller fit, to keep the suite fast)."""
    from tokenizer.hybrid import HybridTokenizer, TokenizerConfig

    items, inter, _ = tok_subset
    cfg = subset_config()
    cfg.codebook_size, cfg.mem_vocab_size, cfg.align_epochs, cfg.align_max_pairs = 16, 256, 2, 3000
    n = 500
    keep = {it.item_id for it in items[:n]}
    inter = [i for i in inter if i.item_id in keep]
    a = HybridTokenizer.fit(items[:n], inter, cfg, progress=False, embeddings=tok_embeddings[:n],
                            encoder=fitted_tokenizer.encoder)
    b = HybridTokenizer.fit(list(reversed(items[:n])), inter, cfg, progress=False,
                            embeddings=tok_embeddings[:n][::-1].copy(), encoder=fitted_tokenizer.encoder)
    assert a.version == b.version
    assert a.fit_report["alignment"]["loss_per_epoch"] == b.fit_report["alignment"]["loss_per_epoch"]
    c = HybridTokenizer.fit(items[:n], inter, TokenizerConfig(**{**cfg.to_dict(), "seed": 1}), progress=False,
                            embeddings=tok_embeddings[:n], encoder=fitted_tokenizer.encoder)
    assert c.version != a.version  # the seed matters, so the check above is not vacuous


def test_near_duplicate_titles_share_the_first_code(fitted_tokenizer, tok_subset):
    tok = fitted_tokenizer
    a, b = tok.encode_texts(["Toy Story (1995)", "Toy Story (1995) "])
    assert a.gen_tokens[0] == b.gen_tokens[0]
    items, _, _ = tok_subset
    texts = [it.text() for it in items[:200]]
    orig = tok.encode_texts(texts)
    variant = tok.encode_texts([t + "." for t in texts])
    same = np.mean([x.gen_tokens[0] == y.gen_tokens[0] for x, y in zip(orig, variant)])
    other = np.mean([x.gen_tokens[0] == y.gen_tokens[0] for x, y in zip(orig, orig[100:] + orig[:100])])
    assert same >= 0.9 and other < 0.3, (same, other)


def test_fit_report_has_the_figures(fitted_tokenizer):
    rep = fitted_tokenizer.fit_report
    al = rep["alignment"]
    assert al["recall@10_after"] > al["recall@10_before"]
    assert al["heldout_pairs"] > 0 and al["train_pairs"] > al["heldout_pairs"]
    rq = rep["rq"]
    assert len(rq["usage"]) == len(rq["perplexity"]) == 3 and 0 <= rq["collision_rate"] <= 1
    assert rq["rel_mse_per_level"][0] > rq["rel_mse_per_level"][-1] == rq["rel_mse"]
    assert 96 < rep["bpe"]["vocab_used"] <= 1024


def test_save_load_encode_identical(fitted_tokenizer, saved_artifact, tok_subset):
    from tokenizer.hybrid import HybridTokenizer

    manifest = json.loads((saved_artifact / "manifest.json").read_text())
    assert manifest["version"] == fitted_tokenizer.version
    assert set(manifest["files"]) == {p.name for p in saved_artifact.iterdir()} - {"manifest.json"}
    assert not any(p.suffix in (".pkl", ".pt", ".pickle") for p in saved_artifact.iterdir())
    loaded = HybridTokenizer.load(saved_artifact)
    assert loaded.version == fitted_tokenizer.version
    assert loaded.config == fitted_tokenizer.config
    assert loaded.fit_report == json.loads(json.dumps(fitted_tokenizer.fit_report))
    items, _, unseen = tok_subset
    sample = items[:50] + unseen[:20]
    assert loaded.encode_items(sample) == fitted_tokenizer.encode_items(sample)
    np.testing.assert_array_equal(loaded.embed_texts(["Heat (1995)"]), fitted_tokenizer.embed_texts(["Heat (1995)"]))
    # saving a loaded tokenizer reproduces the same bytes
    other = loaded.save(saved_artifact.parent / "resaved")
    for name in manifest["files"]:
        assert (other / name).read_bytes() == (saved_artifact / name).read_bytes()


@pytest.mark.parametrize("name", ["codebooks.safetensors", "bpe.json", "projection.safetensors", "config.json",
                                  "report.json"])
def test_tampered_file_raises_naming_it(artifact_copy, name):
    from tokenizer.hybrid import ArtifactError, HybridTokenizer

    path = artifact_copy / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=name):
        HybridTokenizer.load(artifact_copy)


def test_missing_file_or_manifest_raises(artifact_copy):
    from tokenizer.hybrid import ArtifactError, HybridTokenizer

    (artifact_copy / "bpe.json").unlink()
    with pytest.raises(ArtifactError, match="bpe.json is missing"):
        HybridTokenizer.load(artifact_copy)
    (artifact_copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        HybridTokenizer.load(artifact_copy)


def test_config_mismatch_raises(artifact_copy, saved_artifact):
    from tokenizer.hybrid import ArtifactError, HybridTokenizer, TokenizerConfig

    want = subset_config()
    HybridTokenizer.load(saved_artifact, expect_config=want)  # matches
    runtime_only = subset_config()
    runtime_only.threads, runtime_only.encoder_batch_size = 1, 8
    HybridTokenizer.load(saved_artifact, expect_config=runtime_only)  # speed knobs are not a mismatch
    with pytest.raises(ArtifactError, match="codebook_size: artifact 32 != expected 256"):
        HybridTokenizer.load(saved_artifact, expect_config=TokenizerConfig(threads=2))
    # a config that disagrees with the tensors, with a consistent manifest
    cfg = json.loads((artifact_copy / "config.json").read_text())
    cfg["levels"] = 4
    rewrite_artifact_file(artifact_copy, "config.json", json.dumps(cfg).encode())
    with pytest.raises(ArtifactError, match="codebooks.safetensors holds codebooks of shape"):
        HybridTokenizer.load(artifact_copy)


def test_encoder_checksum_mismatch_raises(artifact_copy):
    from tokenizer.hybrid import ArtifactError, HybridTokenizer

    meta = json.loads((artifact_copy / "encoder.json").read_text())
    meta["weights_sha256"] = "0" * 64
    rewrite_artifact_file(artifact_copy, "encoder.json", json.dumps(meta).encode())
    with pytest.raises(ArtifactError, match="encoder.json: the installed encoder weights"):
        HybridTokenizer.load(artifact_copy)


def test_fit_rejects_bad_input(tok_subset):
    from tokenizer.hybrid import HybridTokenizer, TokenizerConfig, TokenizerError

    items, inter, _ = tok_subset
    with pytest.raises(TokenizerError, match="no items"):
        HybridTokenizer.fit([], inter, TokenizerConfig())
    with pytest.raises(TokenizerError, match="mem_vocab_size"):
        HybridTokenizer.fit(items, inter, TokenizerConfig(levels=3, codebook_size=32, mem_vocab_size=50))
    with pytest.raises(TokenizerError, match="lower codebook_size"):
        HybridTokenizer.fit(items[:10], inter, TokenizerConfig(codebook_size=32, mem_vocab_size=200))


def test_cli_encode_prints_the_saved_tokens(saved_artifact, fitted_tokenizer, capsys):
    from trm.cli import main

    assert main(["tokenizer", "encode", "--artifact", str(saved_artifact), "--text", "Heat (1995)", "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    want = fitted_tokenizer.encode_texts(["Heat (1995)"])[0]
    assert line["gen_tokens"] == want.gen_tokens and line["mem_tokens"] == want.mem_tokens
    assert line["tokenizer_version"] == fitted_tokenizer.version


def test_cli_fit_writes_a_loadable_artifact(tmp_path, capsys):
    """`trm tokenizer fit` on a small MovieLens-layout directory, with a cutoff."""
    import pandas as pd
    from tokenizer_fixtures import DATA

    from tokenizer.hybrid import HybridTokenizer
    from trm.cli import main

    data = tmp_path / "ml"
    data.mkdir()
    movies = pd.read_csv(DATA / "movies.csv").iloc[::32]  # ~300 films across all years
    ratings = pd.read_csv(DATA / "ratings.csv")
    movies.to_csv(data / "movies.csv", index=False)
    ratings[ratings.movieId.isin(movies.movieId)].to_csv(data / "ratings.csv", index=False)
    out = tmp_path / "art"
    rc = main(["tokenizer", "fit", "--data", str(data), "--out", str(out), "--cutoff-quantile", "0.5",
               "--levels", "2", "--codebook", "8", "--mem-vocab", "64", "--align-epochs", "1",
               "--threads", "2", "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "recall@10_after" in printed and "collision_rate" in printed
    tok = HybridTokenizer.load(out)
    assert (tok.num_levels, tok.codebook_size, tok.mem_vocab_size) == (2, 8, 64)
    assert tok.fit_report["n_items"] < len(movies)  # the cutoff dropped items first rated later
    cutoff = tok.fit_report["fit_cutoff"]
    assert cutoff is not None and tok.fit_report["data_end"] < cutoff
    assert main(["tokenizer", "fit", "--data", str(tmp_path / "nope"), "--out", str(out)]) == 2


def test_version_does_not_depend_on_global_torch_rng(tok_subset, tok_embeddings):
    """Without alignment the projection is the seeded identity: two fits agree whatever torch's RNG did."""
    import torch

    from tokenizer.hybrid import HybridTokenizer, TokenizerConfig

    items, inter, _ = tok_subset
    cfg = TokenizerConfig(levels=3, codebook_size=8, mem_vocab_size=64, kmeans_niter=10, align=False, threads=2)
    versions = set()
    for seed in (1, 2):
        torch.manual_seed(seed)
        tok = HybridTokenizer.fit(items[:300], inter, cfg, progress=False, embeddings=tok_embeddings[:300])
        versions.add(tok.version)
        np.testing.assert_allclose(tok.projector.project(tok_embeddings[:5]), tok_embeddings[:5], atol=1e-6)
    assert len(versions) == 1
