"""The tokenizer's parts on real MovieLens embeddings: RQ-Kmeans, BPE, n-grams, alignment; the manifest helper."""
from __future__ import annotations

import numpy as np
import pytest


# --- RQ-Kmeans ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rq(tok_embeddings):
    from tokenizer.rq_kmeans import ResidualKMeans

    return ResidualKMeans.fit(tok_embeddings, levels=3, codebook_size=32, niter=15, seed=0)


def test_rq_encode_of_training_points_equals_fit_assignment(rq, tok_embeddings):
    quantizer, codes = rq
    assert codes.shape == (len(tok_embeddings), 3)
    np.testing.assert_array_equal(quantizer.encode(tok_embeddings), codes)
    assert codes.min() >= 0 and codes.max() < 32


def test_rq_is_seeded_and_each_level_reduces_error(rq, tok_embeddings):
    from tokenizer.rq_kmeans import ResidualKMeans

    quantizer, codes = rq
    again, codes2 = ResidualKMeans.fit(tok_embeddings, levels=3, codebook_size=32, niter=15, seed=0)
    np.testing.assert_array_equal(codes, codes2)
    np.testing.assert_array_equal(quantizer.codebooks, again.codebooks)
    stats = quantizer.stats(tok_embeddings, codes)
    errs = stats.rel_mse_per_level
    assert errs[0] > errs[1] > errs[2] and 0 < stats.rel_mse < 0.5
    assert all(1.0 < p <= 32 for p in stats.perplexity)
    assert 0.0 <= stats.collision_rate < 0.6 and stats.unique_tuples > len(codes) // 2


def test_direction_assignment_balances_deep_levels(rq, tok_embeddings):
    """Plain L2 RQ collapses the last level onto a few near-origin centroids; cosine assignment does not."""
    from tokenizer.rq_kmeans import ResidualKMeans

    cos_q, cos_codes = rq
    l2_q, l2_codes = ResidualKMeans.fit(tok_embeddings, levels=3, codebook_size=32, niter=15, seed=0, assign="l2")
    np.testing.assert_array_equal(l2_q.encode(tok_embeddings), l2_codes)
    cos, l2 = cos_q.stats(tok_embeddings, cos_codes), l2_q.stats(tok_embeddings, l2_codes)
    assert cos.perplexity[-1] > l2.perplexity[-1] + 3
    assert cos.collision_rate < l2.collision_rate
    assert cos.rel_mse < l2.rel_mse * 1.05


def test_rq_rejects_bad_input(rq):
    from tokenizer.rq_kmeans import QuantizerError, ResidualKMeans

    quantizer, _ = rq
    with pytest.raises(QuantizerError, match="shape"):
        quantizer.encode(np.zeros((3, 10), dtype=np.float32))
    with pytest.raises(QuantizerError, match="lower codebook_size"):
        ResidualKMeans.fit(np.zeros((5, 8), dtype=np.float32), levels=1, codebook_size=16)


def test_offset_codes_use_disjoint_ranges():
    from tokenizer.rq_kmeans import offset_codes

    got = offset_codes(np.array([[0, 0, 0], [31, 5, 31]]), 32)
    assert got.tolist() == [[0, 32, 64], [31, 37, 95]]


# --- BPE ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gen_corpus(rq, tok_subset):
    from tokenizer.rq_kmeans import offset_codes

    _, codes = rq
    items, inter, _ = tok_subset
    counts = {it.item_id: 0 for it in items}
    for i in inter:
        counts[i.item_id] += 1
    gen = offset_codes(codes, 32).tolist()
    weights = [1 + counts[it.item_id] for it in items]
    return gen, weights


def test_bpe_round_trips_and_stays_in_budget(gen_corpus):
    from tokenizer.bpe import GenBPE

    gen, weights = gen_corpus
    bpe = GenBPE.learn(gen, weights, num_symbols=96, vocab_size=400)
    assert bpe.vocab_used <= 400 and bpe.num_merges > 0
    mem = bpe.encode(gen)
    for g, m in zip(gen, mem):
        assert bpe.decode(m) == g
        assert all(0 <= x < 400 for x in m)
    # a never-seen sequence still round-trips (falls back to single symbols where no merge applies)
    unseen = [[0, 63, 64], [31, 32, 95]]
    for g, m in zip(unseen, bpe.encode(unseen)):
        assert bpe.decode(m) == g


def test_bpe_merges_follow_interaction_frequency(gen_corpus):
    """The most-interacted item's whole sequence becomes one mem-token; the budget caps merges."""
    from tokenizer.bpe import GenBPE

    gen, weights = gen_corpus
    bpe = GenBPE.learn(gen, weights, num_symbols=96, vocab_size=140)
    top = int(np.argmax(weights))
    assert len(bpe.encode([gen[top]])[0]) == 1
    rare = [g for g, w in zip(gen, weights) if w == min(weights)]
    pieces = bpe.encode(rare)
    assert np.mean([len(p) for p in pieces]) > 1.5  # rare items stay mostly as their gen symbols


def test_bpe_is_deterministic_and_serialises(gen_corpus):
    from tokenizer.bpe import GenBPE

    gen, weights = gen_corpus
    a = GenBPE.learn(gen, weights, num_symbols=96, vocab_size=300)
    b = GenBPE.learn(gen, weights, num_symbols=96, vocab_size=300)
    assert a.to_json() == b.to_json()
    c = GenBPE.from_json(a.to_json(), num_symbols=96)
    assert c.encode(gen) == a.encode(gen)


def test_bpe_budget_below_alphabet_raises():
    from tokenizer.bpe import BPEError, GenBPE

    with pytest.raises(BPEError, match="raise mem_vocab_size"):
        GenBPE.learn([[0, 1]], [1], num_symbols=96, vocab_size=50)


# --- n-grams -----------------------------------------------------------------------------------
def test_ngrams_are_stable_distinct_63_bit_ids():
    from tokenizer.ngrams import prefix_ngram, two_gram

    gen = [3, 40, 77]
    p, t = prefix_ngram(gen), two_gram(gen)
    assert len(p) == 3 and len(t) == 2
    assert p == prefix_ngram(list(gen)) and t == two_gram(tuple(gen))
    assert all(0 <= x < 2 ** 63 for x in p + t)
    assert len(set(p + t)) == 5
    # the prefix id of [3] is shared with any item starting with 3; the full prefix is not
    other = prefix_ngram([3, 41, 77])
    assert other[0] == p[0] and other[1] != p[1] and other[2] != p[2]
    assert two_gram([9, 40, 77])[1] == t[1]
    # pinned value: ids must not change across processes/releases (the model's tables depend on them)
    assert prefix_ngram([1, 300, 600]) == [652495900451899065, 3575449957559653460, 341063192023351097]
    assert two_gram([1, 300, 600]) == [2243909024437706782, 1227914775328629572]


def test_ngram_ids_do_not_depend_on_hash_seed():
    import subprocess
    import sys

    code = "from tokenizer.ngrams import prefix_ngram, two_gram; print(prefix_ngram([5, 38, 70]), two_gram([5, 38, 70]))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout for seed in ("1", "2")}
    assert len(outs) == 1


# --- alignment ---------------------------------------------------------------------------------
def test_mined_pairs_are_co_liked_within_the_window(tok_subset):
    from tokenizer.alignment import item_rows, mine_pairs

    items, inter, _ = tok_subset
    rows = item_rows([it.item_id for it in items])
    pairs = mine_pairs(inter, rows, window=3, min_count=3)
    assert len(pairs) > 100
    assert (pairs.a < pairs.b).all() and (pairs.count >= 3).all()
    assert (np.diff(pairs.count) <= 0).all()  # highest counts first
    # recount the top pair by hand from the log
    a, b = int(pairs.a[0]), int(pairs.b[0])
    by_user: dict[int, list[int]] = {}
    for i in inter:
        if i.label == 1:
            by_user.setdefault(i.user_id, []).append(rows[i.item_id])
    n = 0
    for seq in by_user.values():  # interactions are already in event-time order
        for k, x in enumerate(seq):
            for y in seq[k + 1:k + 4]:
                n += {x, y} == {a, b}
    assert n == int(pairs.count[0])


def test_alignment_improves_heldout_recall_and_keeps_content(tok_subset, tok_embeddings, fitted_tokenizer):
    """Recomputed here from the fitted projector, independently of the fit report's figures."""
    from tokenizer.alignment import item_rows, mine_pairs, recall_at_k, split_pairs

    cfg = fitted_tokenizer.config
    items, inter, _ = tok_subset
    pairs = mine_pairs(inter, item_rows([it.item_id for it in items]), cfg.align_window, cfg.align_min_count,
                       cfg.align_max_pairs)
    train, held = split_pairs(pairs, cfg.align_holdout, seed=cfg.seed)
    assert len(held) > 200 and not set(zip(train.a, train.b)) & set(zip(held.a, held.b))
    aligned = fitted_tokenizer.projector.project(tok_embeddings)
    before, after = recall_at_k(tok_embeddings, held), recall_at_k(aligned, held)
    assert after > 1.3 * before, (before, after)
    assert after == pytest.approx(fitted_tokenizer.fit_report["alignment"]["recall@10_after"])
    losses = fitted_tokenizer.fit_report["alignment"]["loss_per_epoch"]
    assert losses[-1] < losses[0]
    np.testing.assert_allclose(np.linalg.norm(aligned, axis=1), 1.0, atol=1e-5)
    assert float((aligned * tok_embeddings).sum(1).mean()) > 0.7  # still near the content embedding


def test_projector_starts_as_identity(tok_embeddings):
    from tokenizer.alignment import ResidualProjector

    out = ResidualProjector(384, 64).project(tok_embeddings[:20])
    np.testing.assert_allclose(out, tok_embeddings[:20], atol=1e-6)


# --- manifest (tokenizer/manifest.py) ----------------------------------------------------------
def _sealed_dir(tmp_path, **extra):
    from tokenizer.manifest import seal

    d = tmp_path / "sealed"
    d.mkdir()
    (d / "a.bin").write_bytes(b"alpha")
    (d / "b.json").write_bytes(b"{}")
    return d, seal(d, extra=extra or None)


def test_manifest_seal_then_verify(tmp_path):
    import hashlib
    import json

    from tokenizer.manifest import MANIFEST, read_manifest, read_verified, sha256_file, verify

    d, written = _sealed_dir(tmp_path, format="x", format_version=1)
    assert written == read_manifest(d) == verify(d, exact=True, required=["a.bin"])
    assert written["files"] == {"a.bin": hashlib.sha256(b"alpha").hexdigest(), "b.json": sha256_file(d / "b.json")}
    assert (written["format"], written["format_version"]) == ("x", 1)
    raw = (d / MANIFEST).read_text()
    assert raw.endswith("}\n") and json.loads(raw) == written  # sorted keys, one trailing newline
    assert read_verified(d, written, ["b.json", "a.bin"]) == {"b.json": b"{}", "a.bin": b"alpha"}


def test_manifest_errors_name_what_failed(tmp_path):
    from tokenizer.manifest import (
        MANIFEST,
        DigestMismatch,
        FileMissing,
        FilesDiffer,
        ManifestError,
        ManifestMissing,
        ManifestUnreadable,
        NotListed,
        read_verified,
        remove_manifest,
        verify,
    )

    d, written = _sealed_dir(tmp_path)
    with pytest.raises(NotListed) as e:
        verify(d, required=["a.bin", "c.bin", "d.bin"])
    assert e.value.names == ["c.bin", "d.bin"]
    (d / "extra").write_bytes(b"")
    verify(d)  # not exact: an unlisted file is tolerated
    with pytest.raises(FilesDiffer) as e:
        verify(d, exact=True)
    assert e.value.names == ["extra"]
    (d / "a.bin").write_bytes(b"alphA")
    with pytest.raises(DigestMismatch, match="a.bin") as e:
        verify(d)
    assert (e.value.name, e.value.path) == ("a.bin", d / "a.bin")
    with pytest.raises(DigestMismatch):
        read_verified(d, written, ["a.bin"])
    (d / "b.json").unlink()
    with pytest.raises(FileMissing) as e:
        read_verified(d, written, ["b.json"])
    assert e.value.name == "b.json"
    (d / MANIFEST).write_text("[1, 2]")
    with pytest.raises(ManifestUnreadable, match="JSON object"):
        verify(d)
    (d / MANIFEST).write_text('{"files": ')
    with pytest.raises(ManifestUnreadable) as e:
        verify(d)
    assert e.value.detail and e.value.path == d / MANIFEST
    remove_manifest(d)
    with pytest.raises(ManifestMissing):
        verify(d)
    remove_manifest(d)  # idempotent
    assert all(issubclass(c, ManifestError) for c in (NotListed, FilesDiffer, DigestMismatch, FileMissing,
                                                       ManifestUnreadable, ManifestMissing))


def test_manifest_fsync_dir_best_effort(tmp_path):
    from tokenizer.manifest import fsync_dir, fsync_file

    fsync_dir(tmp_path)
    (tmp_path / "f").write_bytes(b"x")
    fsync_file(tmp_path / "f")
    with pytest.raises(OSError):
        fsync_dir(tmp_path / "nope")
    fsync_dir(tmp_path / "nope", best_effort=True)  # compaction's mode: a failing fsync is not an error


def test_manifest_module_imports_nothing_of_the_project():
    """tokenizer/ is the bottom layer: trainer/ and streams/ import this module, never the reverse."""
    import subprocess
    import sys

    code = ("import sys, tokenizer.manifest, tokenizer.artifact, tokenizer.hybrid; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'streams', 'trainer', 'trm'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_an_embedding_does_not_depend_on_its_batch(tok_subset):
    """The worker embeds the item events of one poll in one batch, so batches follow arrival timing:
    a text's embedding must be the same bits whatever else shares its batch, or two runs of the same
    stream can put an item near a centroid boundary on different codes."""
    from tests.tokenizer_fixtures import THREADS
    from tokenizer.encoder import ContentEncoder

    items, _, _ = tok_subset
    texts = [it.text() for it in items[:40]]
    enc = ContentEncoder(threads=THREADS, device="cpu")  # exact on the CPU (CUDA keeps float32)
    together = enc.encode(texts)
    assert together.dtype == np.float32 and together.shape == (40, 384)
    in_threes = np.concatenate([enc.encode(texts[i:i + 3]) for i in range(0, 40, 3)])
    alone = np.stack([enc.encode([t])[0] for t in texts[::8]])
    assert np.array_equal(together, in_threes)
    assert np.array_equal(together[::8], alone)
    assert np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-6)
