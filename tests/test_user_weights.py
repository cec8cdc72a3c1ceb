"""Per-user online weights (trainer/models/user_weights.py): second-by-second ordering, the
point-in-time rule, learning, and the table travelling with the checkpoint."""
import pytest
import torch

from tests.trainer_fixtures import assert_checkpoint_carries, joined_frame, small_config
from trainer.features import N_DENSE
from trainer.featurizer import Featurizer
from trainer.learner import Learner, LearnerConfig
from trainer.models import build_model
from trainer.models.user_weights import UserWeights


def rows(users, seconds, labels):
    n = len(users)
    return (torch.zeros(n), torch.tensor(users), torch.randn(n, N_DENSE, generator=torch.Generator().manual_seed(0)),
            torch.tensor(labels, dtype=torch.float32), torch.tensor(seconds))


def test_a_second_is_scored_before_any_of_it_is_learned():
    uw = UserWeights(bits=10)
    base, users, stats, labels, secs = rows([1, 1, 1, 2], [10, 10, 11, 11], [1, 1, 1, 0])
    out = uw.score_then_learn(base, users, stats, labels, secs)
    assert out[0] == 0 and out[1] == 0  # second 10: nothing learned yet, not even its first event
    assert out[2] != 0  # second 11 sees what user 1 did in second 10
    assert out[3] == 0  # user 2 has no past


def test_no_score_depends_on_its_own_label_or_its_second():
    base, users, stats, labels, secs = rows([1, 1, 1, 1, 1], [5, 6, 6, 7, 7], [1, 0, 1, 1, 0])
    a = UserWeights(bits=10).score_then_learn(base, users, stats, labels, secs)
    flipped = labels.clone()
    flipped[1:3] = 1 - flipped[1:3]  # the labels of second 6
    b = UserWeights(bits=10).score_then_learn(base, users, stats, flipped, secs)
    assert torch.equal(a[:3], b[:3])  # seconds 5 and 6 unchanged
    assert not torch.equal(a[3:], b[3:])  # second 7 learned from second 6


def test_a_user_who_likes_everything_is_scored_higher_over_time():
    n = 50
    uw = UserWeights(bits=10)
    base, users, stats, labels, secs = rows([3] * n, list(range(n)), [1] * n)
    out = uw.score_then_learn(base, users, torch.zeros_like(stats), labels, secs)
    assert out[0] == 0 and out[-1] > out[n // 2] > 0.5
    assert uw.logits(torch.tensor([3]), torch.zeros(1, N_DENSE)) > 0
    assert uw.logits(torch.tensor([4]), torch.zeros(1, N_DENSE)) == 0  # another user: untouched


def test_learner_scores_with_the_table_and_the_checkpoint_carries_it(tmp_path):
    cfg = small_config()
    df = joined_frame(64)
    batch, _ = Featurizer.for_config(cfg, None)(df.sort_values("event_time", kind="stable"))
    lr = Learner(["trm", "id"], cfg, LearnerConfig(seed=0))
    plain = lr.predict(batch)
    online = lr.predict_then_learn_users(batch)
    for n in lr.names:
        assert lr.models[n].user_weights.w.abs().sum() > 0  # it learned
        assert plain[n].shape == online[n].shape
    assert_checkpoint_carries(lr, cfg, batch, tmp_path, "user_weights.w")


def test_old_configs_build_models_without_the_table():
    from trainer.models import RankerConfig
    old = {k: v for k, v in small_config().to_dict().items() if k != "user_weights"}
    assert build_model("trm", RankerConfig.from_dict(old)).user_weights is None
    assert "user_weights.w" not in build_model("id", RankerConfig.from_dict(old)).state_dict()


def test_item_keys_learn_a_users_taste_per_category_without_leaking_the_second():
    """User 1 likes category 5 and dislikes category 6; the user × key crosses learn it from the
    user's own events (second by second), and a flipped label never changes its own second."""
    from trainer.models.user_weights import key
    n = 40
    cats = torch.tensor([5, 6] * (n // 2))
    keys = key(cats, 0).unsqueeze(1)  # (n, 1)
    labels = (cats == 5).float()
    base, users, stats, _, secs = rows([1] * n, list(range(n)), [0] * n)
    stats = torch.zeros_like(stats)
    out = UserWeights(bits=12).score_then_learn(base, users, stats, labels, secs, keys)
    assert out[-2] > 0 > out[-1]  # category 5 above, 6 below, for this user
    uw = UserWeights(bits=12)
    uw.score_then_learn(base, users, stats, labels, secs, keys)
    other = uw.logits(torch.tensor([2, 2]), torch.zeros(2, N_DENSE), key(torch.tensor([5, 6]), 0).unsqueeze(1))
    mine = uw.logits(torch.tensor([1, 1]), torch.zeros(2, N_DENSE), key(torch.tensor([5, 6]), 0).unsqueeze(1))
    assert mine[0] - mine[1] > other[0] - other[1]  # the cross is this user's; the global keys share the rest
    flipped = labels.clone()
    flipped[10] = 1 - flipped[10]
    again = UserWeights(bits=12).score_then_learn(base, users, stats, flipped, secs, keys)
    assert torch.equal(again[:11], out[:11]) and not torch.equal(again[11:], out[11:])


def test_token_models_key_on_tokens_and_only_the_id_baseline_on_the_id():
    from trainer.models import RankerConfig
    cfg = small_config()
    df = joined_frame(32)
    batch, _ = Featurizer.for_config(cfg, None)(df.sort_values("event_time", kind="stable"))
    trm, idm = build_model("trm", cfg), build_model("id", cfg)
    k = trm.online_keys(batch.select(trm.inputs))  # item_id is None in TRM's view
    L, M, C, G = cfg.num_levels, batch.mem.shape[1], cfg.coarse_keys, batch.lexical.shape[1]
    assert G == 19 and cfg.lexical_keys and cfg.era_keys
    assert k.shape == (len(batch), L + M + C + G + 2)
    same = (batch.gen[:, 0].unsqueeze(1) == batch.gen[:, 0].unsqueeze(0))
    assert torch.equal(k[:, 0].unsqueeze(1) == k[:, 0].unsqueeze(0), same)  # level-1 prefix key = the first code
    # an item's next-nearest level-1 codes are the same keys as those codes' own first prefix
    coarse = batch.coarse[:, 1:1 + C]
    alt = k[:, L + M:L + M + C]
    assert torch.equal(alt[coarse >= 0], coarse[coarse >= 0] * 16) and bool((alt[coarse < 0] == -1).all())
    known = batch.known
    assert torch.equal(k[known, 0], batch.gen[known, 0] * 16)
    # the item's lexical tokens: categories in namespace 11, title words in 12, -1 pads stay padding;
    # read for every item
    lex, lk = batch.lexical, k[:, L + M + C:L + M + C + G]
    cat, title, year = (lex >= 0) & (lex < 2**26), (lex >= 2**26) & (lex < 2**27), lex >= 2**27
    assert bool(cat.any()) and torch.equal(lk[cat], lex[cat] * 16 + 11)
    assert bool(title.any()) and torch.equal(lk[title], lex[title] * 16 + 12)
    assert bool(year.any()) and bool((lk[year] == -1).all())  # the year is read as the era keys instead
    assert bool((lk[lex < 0] == -1).all())
    era = k[:, L + M + C + G:]  # the decade (namespace 13) and the release age at the event (14)
    assert torch.equal(era, torch.where(batch.era >= 0, batch.era * 16 + torch.tensor([13, 14]), -1))
    assert torch.equal(batch.era[:, 0] >= 0, year.any(1))
    no_era = RankerConfig.from_dict({k2: v for k2, v in cfg.to_dict().items() if k2 != "era_keys"})
    assert not no_era.era_keys and torch.equal(build_model("trm", no_era).online_keys(batch.select(trm.inputs)),
                                               k[:, :L + M + C + G])
    legacy = RankerConfig.from_dict({k2: v for k2, v in cfg.to_dict().items()
                                     if k2 not in ("coarse_keys", "lexical_keys", "era_keys")})
    assert not legacy.lexical_keys and not legacy.era_keys
    assert build_model("trm", legacy).online_keys(batch.select(trm.inputs)).shape == (len(batch), L + M)
    no_cat = RankerConfig.from_dict({**cfg.to_dict(), "lexical_keys": False})
    assert torch.equal(build_model("trm", no_cat).online_keys(batch.select(trm.inputs)),
                       torch.cat([k[:, :L + M + C], era], 1))  # the era keys do not depend on the lexical keys
    assert "lexical" in build_model("trm_no_ntp", cfg).inputs
    # the baselines are ablations of the item side: they neither read nor key on categories
    for name in ("id", "gen_only", "two_gram", "prefix_ngram"):
        m = build_model(name, cfg)
        assert "lexical" not in m.inputs, name
        assert m.online_keys(batch.select(m.inputs)).shape[1] in (1, L, L + batch.two_gram.shape[1]), name
    assert torch.equal(idm.online_keys(batch.select(idm.inputs))[:, 0] // 16, batch.item_id)
    old = RankerConfig.from_dict({k2: v for k2, v in cfg.to_dict().items() if k2 != "online_keys"})
    assert build_model("trm", old).online_keys(batch.select(trm.inputs)) is None


def test_power_sets_how_fast_the_rate_decays_and_old_configs_keep_adagrad():
    """One step on a fresh slot moves it by lr * grad / g^power (g = g0 + grad²): AdaGrad at 0.5."""
    from trainer.models import RankerConfig
    base, users, stats, _, secs = rows([3], [0], [0])
    stats = torch.zeros_like(stats)
    moved = {}
    for power in (0.5, 0.3):
        uw = UserWeights(bits=8, lr=0.1, power=power)
        uw.score_then_learn(base, users, stats, torch.ones(1), secs)
        slot = uw.slots(users)[0, 0]
        grad = torch.sigmoid(base[0]) - 1.0
        assert torch.isclose(uw.w[slot], -0.1 * grad / (1e-2 + grad * grad) ** power)
        moved[power] = float(uw.w[slot])
    assert moved[0.3] != moved[0.5]
    old = {k: v for k, v in small_config().to_dict().items() if k not in ("user_power", "online_keys")}
    assert RankerConfig.from_dict(old).user_power == 0.5 and build_model("trm", RankerConfig.from_dict(old)) \
        .user_weights.power == 0.5
    assert RankerConfig().user_power == 0.3


def test_the_stacking_weight_learns_to_discount_an_overconfident_ranker_without_leaking_the_second():
    """The global weight on the ranker's logit (stack_lr) shrinks a logit that is confidently wrong half
    the time; a second's scores use the weight as it was before that second."""
    from trainer.models import RankerConfig
    n = 200
    g = torch.Generator().manual_seed(1)
    base = torch.randn(n, generator=g).sign() * 4.0  # confident either way
    labels = torch.bernoulli(torch.full((n,), 0.5), generator=g)  # unrelated to the logit
    users, stats, secs = torch.arange(n), torch.zeros(n, N_DENSE), torch.arange(n) // 2
    uw = UserWeights(bits=10, stack_lr=0.1)
    out = uw.score_then_learn(base, users, stats, labels, secs)
    assert out[0] == base[0] and out[1] == base[1]  # second 0: nothing learned yet
    assert -1.0 < float(uw.stack[0]) < -0.3  # the ranker's logit is trusted less
    new = torch.tensor([10_000])  # a user with no slots of their own yet: only the stacked part
    assert torch.isclose(uw.logits(new, stats[:1], base=base[:1]), uw.stack[0] * base[:1]).all()
    flipped = labels.clone()
    flipped[10] = 1 - flipped[10]  # a label of second 5
    again = UserWeights(bits=10, stack_lr=0.1).score_then_learn(base, users, stats, flipped, secs)
    assert torch.equal(out[:12], again[:12]) and not torch.equal(out[12:], again[12:])
    old = {k: v for k, v in small_config().to_dict().items() if k != "stack_lr"}
    assert build_model("trm", RankerConfig.from_dict(old)).user_weights.stack_lr is None  # old checkpoints load
    assert RankerConfig().stack_lr == 0.1


def test_a_namespace_learns_only_the_parts_its_rates_allow():
    """Category keys (11) learn a user x key cross and no global weight; title words (12) a global
    weight and no cross (trainer/models/config.py: category_lr, title_lr); other keys both."""
    from trainer.models.user_weights import CATEGORY_NS, TITLE_NS, key

    uw = UserWeights(bits=12, key_lr=0.1, key_global_lr=0.05, ns_rates={CATEGORY_NS: (0.0, 0.1), TITLE_NS: (0.1, 0.0)})
    users, stats = torch.tensor([1, 2]), torch.zeros(2, N_DENSE)
    keys = torch.cat([key(torch.tensor([[3], [3]]), 0), key(torch.tensor([[3], [3]]), CATEGORY_NS),
                      key(torch.tensor([[3], [3]]), TITLE_NS)], 1)  # (2, 3)
    x = uw.inputs(stats, keys)
    F = 1 + len(uw.cols)
    # columns: F head, then 3 global parts, then 3 crosses
    assert x[:, F:].tolist() == [[1, 0, 1, 1, 1, 0]] * 2
    r = uw.rates(keys, 2)
    assert r[0, F:].tolist() == pytest.approx([0.05, 0.0, 0.1, 0.1, 0.1, 0.0])
    # user 1 learns a positive on the three keys; user 2 then sees only the global parts: key 0 and the title word
    uw.score_then_learn(torch.zeros(1), users[:1], stats[:1], torch.ones(1), torch.tensor([0]), keys[:1])
    only_global = uw.logits(users[1:], stats[1:], keys[1:])
    title_only = UserWeights(bits=12, ns_rates={CATEGORY_NS: (0.0, 0.1), TITLE_NS: (0.1, 0.0)})
    title_only.score_then_learn(torch.zeros(1), users[:1], stats[:1], torch.ones(1), torch.tensor([0]), keys[:1, 2:])
    assert float(only_global) > 0 and float(title_only.logits(users[1:], stats[1:], keys[1:, 2:])) > 0
    cat_only = UserWeights(bits=12, ns_rates={CATEGORY_NS: (0.0, 0.1), TITLE_NS: (0.1, 0.0)})
    cat_only.score_then_learn(torch.zeros(1), users[:1], stats[:1], torch.ones(1), torch.tensor([0]), keys[:1, 1:2])
    assert float(cat_only.logits(users[1:], stats[1:], keys[1:, 1:2])) == 0  # no global weight: user 2 sees nothing
    assert float(cat_only.logits(users[:1], stats[:1], keys[:1, 1:2])) > 0  # user 1's own cross
