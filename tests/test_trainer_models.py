"""TRM and baselines: no item-ID table in TRM, the exact semi-causal mask, shapes, parameter counts."""
import pytest
import torch
import torch.nn as nn

from tests.trainer_fixtures import K, L, featurizer, joined_frame, small_config
from trainer.models import MODEL_NAMES, TRM, build_model, count_params, semi_causal_mask
from trainer.models.backbone import token_mix
from trainer.models.embedding import GenTokenEmbedding


@pytest.fixture(scope="module")
def cfg():
    return small_config()


@pytest.fixture(scope="module")
def batch(cfg):
    b, stats = featurizer(cfg)(joined_frame(64))
    assert stats.unknown_item == 13  # every 5th of 64 rows has no item features
    return b


def test_semi_causal_mask_is_exactly_prefix_visible_then_causal():
    # 2 context tokens (C), then BOS (B) and 3 gen-tokens (s1..s3); True = row may attend to column
    C, B, S = 1, 1, 1
    expected = torch.tensor([
        #  c1 c2 BOS s1 s2 s3
        [1, 1, 0, 0, 0, 0],  # c1 sees all context, nothing of the item
        [1, 1, 0, 0, 0, 0],  # c2
        [1, 1, 1, 0, 0, 0],  # BOS: context + itself
        [1, 1, 1, 1, 0, 0],  # s1
        [1, 1, 1, 1, 1, 0],  # s2
        [1, 1, 1, 1, 1, 1],  # s3
    ], dtype=torch.bool)
    assert torch.equal(semi_causal_mask(2, 4), expected)
    assert torch.equal(semi_causal_mask(0, 3), torch.tril(torch.ones(3, 3, dtype=torch.bool)))


def test_generative_head_obeys_the_mask(cfg, batch):
    torch.manual_seed(0)
    m = TRM(cfg).eval()
    ctx = m.context_tokens(batch)
    gen = batch.gen.clone()
    base = m.generative.level_logits(ctx, gen, m.gen_emb)
    gen[:, L - 2] = (gen[:, L - 2] + 1) % K + (L - 2) * K  # change s_{L-1}: only the last level's logits move
    moved = m.generative.level_logits(ctx, gen, m.gen_emb)
    assert torch.allclose(base[:, :L - 1], moved[:, :L - 1])
    assert not torch.allclose(base[:, L - 1], moved[:, L - 1])
    ctx2 = ctx.clone()
    ctx2[:, 0] += torch.randn(ctx.shape[-1])  # the first context token reaches every level
    assert not torch.allclose(base[:, 0], m.generative.level_logits(ctx2, batch.gen, m.gen_emb)[:, 0])


def test_trm_reads_no_item_id_and_has_no_item_table(cfg, batch):
    m = TRM(cfg).eval()
    assert "item_id" not in m.inputs and "hist_ids" not in m.inputs
    tables = {n: mod.num_embeddings for n, mod in m.named_modules() if isinstance(mod, nn.Embedding)}
    assert set(tables.values()) == {L * K + L, cfg.wide_buckets}, tables  # gen-tokens and hashed mem-tokens only
    assert all(p.shape[0] != cfg.id_buckets for p in m.state_dict().values() if p.dim())
    assert not any("id_emb" in k or "item_id" in k for k in m.state_dict())
    view = batch.select(m.inputs)
    assert view.item_id is None and view.hist_ids is None
    shuffled = batch.select(m.inputs + ("item_id", "hist_ids"))
    shuffled.item_id = shuffled.item_id.flip(0) + 12345
    assert torch.equal(m(view), m(shuffled))  # item ids cannot change TRM's score
    idm = build_model("id", cfg)
    assert any(isinstance(x, nn.Embedding) and x.num_embeddings == cfg.id_buckets for x in idm.modules())


@pytest.mark.parametrize("name", MODEL_NAMES + ("trm_transformer",))
def test_forward_backward_shapes(cfg, batch, name):
    torch.manual_seed(0)
    m = build_model(name, cfg).train()
    loss, logits, parts = m.loss(batch.select(m.inputs))
    assert logits.shape == (len(batch),) and torch.isfinite(logits).all()
    assert loss.dim() == 0 and "bce" in parts
    loss.backward()
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    if name.startswith("trm"):
        assert parts["ntp"] > 0  # positives with known tokens exist in the batch


def test_unknown_items_use_the_unknown_token(cfg, batch):
    unknown = ~batch.known
    assert unknown.any()
    expect = torch.tensor([L * K + l for l in range(L)])
    assert torch.equal(batch.gen[unknown], expect.expand(int(unknown.sum()), L))
    assert (batch.mem[unknown] == -1).all()


def test_ntp_is_zero_without_positives(cfg, batch):
    m = TRM(cfg)
    neg = batch.select(m.inputs)
    neg.label = torch.zeros_like(neg.label)
    _, _, parts = m.loss(neg)
    assert parts["ntp"] == 0.0


def test_token_mix_is_the_head_transpose():
    x = torch.arange(2 * 4 * 8, dtype=torch.float32).view(2, 4, 8)
    y = token_mix(x)
    assert y.shape == x.shape
    assert torch.equal(y[:, 1, 0:2], x[:, 0, 2:4])  # head 1 of token 0 -> slot 0 of token 1
    assert torch.equal(token_mix(y), x)  # an involution


def test_count_params_splits_tables_from_dense(cfg):
    counts = {n: count_params(build_model(n, cfg)) for n in MODEL_NAMES}
    D = cfg.d_model
    gen_rows = (L * K + L) * D
    assert counts["gen_only"][1] == gen_rows
    assert counts["trm"][1] == gen_rows + cfg.wide_buckets * D
    assert counts["two_gram"][1] == counts["prefix_ngram"][1] == counts["trm"][1]
    assert counts["id"][1] == cfg.id_buckets * D
    for n, (dense, sparse) in counts.items():
        m = build_model(n, cfg)
        assert dense + sparse == sum(p.numel() for p in m.parameters())
    assert counts["trm"][0] > counts["two_gram"][0]  # the generative head is dense
    assert isinstance(TRM(cfg).gen_emb, GenTokenEmbedding)


def test_warm_start_linear_fit_matches_a_logistic_regression_and_the_deep_part_starts_at_zero():
    """Learner.fit_linear fits each wide logit to convergence on standardized features (the warm
    start's step 3): its training logloss equals scikit-learn's logistic regression on the same
    rows; an untrained model's logit is its linear part alone; the wide rate then drops."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    from trainer.learner import Learner, LearnerConfig

    cfg = small_config()
    df = joined_frame(400, seed=3)
    b, _ = featurizer(cfg)(df)
    b.label = (b.stats[:, 4] + 0.5 * torch.randn(len(b), generator=torch.Generator().manual_seed(0)) > 0).float()
    lr = Learner(["trm"], cfg, LearnerConfig(seed=0, wide_lr_after_fit=1e-3))
    m = lr.models["trm"]
    view = b.select(m.inputs)
    loss = lr.fit_linear(b, l2=0.0)["trm"]
    xs = m.dense_inputs(view).numpy()
    ref = LogisticRegression(C=1e6, max_iter=5000).fit(xs, b.label.numpy())
    assert loss == pytest.approx(log_loss(b.label.numpy(), ref.predict_proba(xs)[:, 1]), abs=2e-3)
    assert np.allclose(m.stats_scale.mean.numpy(), b.stats[:, :cfg.n_stats].mean(0).numpy(), atol=1e-5)
    m.eval()
    with torch.no_grad():
        assert torch.allclose(m(view), m.wide_dense(m.dense_inputs(view)).squeeze(-1), atol=1e-6)
    assert lr.optimizers["trm"].param_groups[1]["lr"] == 1e-3
    # the scale is fitted once: later training rows do not move it
    mean = m.stats_scale.mean.clone()
    lr.train_model("trm", b.slice(slice(0, 64)))
    assert torch.equal(m.stats_scale.mean, mean)


def test_each_kind_of_online_key_has_its_own_namespace(cfg, batch):
    # a namespace carries its rates (user_weights.ns_rates): the n-gram baselines' wide ids must not land
    # in the categories' namespace, nor any kind in another's
    from trainer.models.user_weights import (CATEGORY_NS, DECADE_NS, ID_NS, MEM_NS, PREFIX_NGRAM_NS, RELEASE_AGE_NS,
                                             TITLE_NS, TWO_GRAM_NS)

    def namespaces(name):
        m = build_model(name, cfg)
        k = m.item_keys(batch.select(m.inputs))
        return set((k[k >= 0] & 15).tolist())

    prefixes = set(range(L))
    assert namespaces("id") == {ID_NS}
    assert namespaces("gen_only") == prefixes
    assert namespaces("two_gram") == prefixes | {TWO_GRAM_NS}
    assert namespaces("prefix_ngram") == prefixes | {PREFIX_NGRAM_NS}
    assert MEM_NS in namespaces("trm")
    assert namespaces("trm") <= prefixes | {MEM_NS, CATEGORY_NS, TITLE_NS, DECADE_NS, RELEASE_AGE_NS}
    named = [MEM_NS, ID_NS, TWO_GRAM_NS, PREFIX_NGRAM_NS, CATEGORY_NS, TITLE_NS, DECADE_NS, RELEASE_AGE_NS]
    assert len(set(named)) == len(named) and min(named) == 8  # distinct, and above every gen level's
    with pytest.raises(ValueError, match="at most 8 levels"):
        build_model("trm", small_config(num_levels=9))


def test_online_keys_never_overflow_into_padding(cfg, batch):
    """Keys are non-negative (negative reads as padding): the n-gram baselines' 63-bit hashed ids and the
    prefixes of 8 levels of 256 codes overflowed int64 before; the tokens' own small ids keep their keys."""
    from trainer.models.ranker import Ranker
    from trainer.models.user_weights import key

    for name in ("two_gram", "prefix_ngram"):
        m = build_model(name, cfg)
        ids = getattr(batch, name)
        assert (ids >= 2 ** 59).any()  # hashes that overflowed when multiplied by 16
        k = m.item_keys(batch.select(m.inputs))[:, L:]
        assert torch.equal(k >= 0, ids >= 0) and (k[k >= 0] * 64 >= 0).all()  # and the linear model's tag fits too
    assert torch.equal(key(torch.tensor([5, -1]), 3), torch.tensor([83, -1]))
    deep = small_config(num_levels=8, codebook_size=256)
    gen = torch.randint(0, 256, (500, 8)) + torch.arange(8) * 256  # level-offset codes
    k = Ranker.gen_prefix_keys(deep, gen)
    assert (k >= 0).all() and (k * 64 >= 0).all()
    for level in range(8):  # distinct prefixes keep distinct keys
        assert len(set(k[:, level].tolist())) == len({tuple(g) for g in gen[:, :level + 1].tolist()})
    V = 3 * 256 + 3
    g3 = gen[:, :3] % 256 + torch.arange(3) * 256
    assert torch.equal(Ranker.gen_prefix_keys(small_config(num_levels=3, codebook_size=256), g3)[:, 2],
                       ((g3[:, 0] * V + g3[:, 1]) * V + g3[:, 2]) * 16 + 2)  # 3 levels: the keys as they were
