"""One hyper-parameter set for every ranker, so TRM and its baselines differ only in item inputs."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..features import N_DENSE

# Fields added after checkpoints were first written, and the value that reproduces the model an
# older config describes: `from_dict` fills a missing field with it, so old checkpoints still load.
LEGACY_VALUES = {"history": "positives", "wide_dense": False, "ntp_tied_grad": True, "ntp_mean_levels": False,
                 "ntp_item_grad": True, "user_weights": False,
                 "online_keys": False, "user_power": 0.5, "stack_lr": None, "coarse_keys": 0,
                 "stats_scale": False, "key_global_lr": None, "lexical_keys": False, "linear_mix": 0.0,
                 "era_keys": False}


@dataclass
class RankerConfig:
    # tokenizer geometry (from the fitted HybridTokenizer)
    num_levels: int = 3  # L: gen-tokens per item
    codebook_size: int = 256  # K: ids per level; gen ids are level-offset, level l uses [l*K, (l+1)*K)
    # feature tokens fed to the backbone: N_q query + N_u user + N_i item + 1 stats = n_tokens
    n_query_tokens: int = 2  # N_q (MovieLens has no query: learned "no query" tokens)
    n_user_tokens: int = 2  # N_u
    n_item_tokens: int = 3  # N_i
    n_stats: int = N_DENSE  # request-time features read (trainer/features.py; older models: the first 4)
    hist_len: int = 20  # H: last H positive items of the user
    recent_len: int = 20  # R: the user's last R labelled events
    history: str = "recent"  # user tokens from: recent (last R events, with labels) | positives (last H)
    wide_dense: bool = True  # Wide & Deep: a linear logit on the request-time features
    stats_scale: bool = True  # standardize the request-time features; the deep head starts at 0 (ranker.StatsScale)
    max_wide: int = 8  # most wide-side ids (mem-tokens / n-grams) read per item
    # per-user online correction of the logit, learned second by second (models/user_weights.py)
    user_weights: bool = True
    # its AdaGrad rate (validation window: 0.1 and 0.2 tied, 0.7663 / 0.7661; with the lexical keys and the
    # key rates below, 0.08: 0.7767 vs 0.7765 at 0.1, both seeds)
    user_lr: float = 0.08
    user_bits: int = 18  # 2**bits hashed slots (VW's default size; raise it for millions of users)
    # the table also learns the item's keys and user × key crosses (validation window [q0.4, q0.5),
    # trm, seed 0, AUC / GAUC: off 0.7608 / 0.6864, on 0.7614 / 0.6925; models/user_weights.py)
    online_keys: bool = True
    # their rate (None: user_lr). Validation, with user_power 0.3: 0.02 0.7636, 0.05 0.7644, 0.1 0.7637;
    # with 0.5: 0.05 0.7627, 0.1 0.7614, 0.3 0.7495
    # with the lexical keys, the crosses at 0.04 and the keys' global weights at 0.03 (key_global_lr):
    # replayed, seeds 0 / 1, 0.7757 / 0.7758 at 0.05 / 0.05 -> 0.7766 / 0.7768 (user_lr 0.08)
    key_lr: float | None = 0.04
    key_global_lr: float | None = 0.03  # the rate of a key's global weight (None: key_lr)
    # the request-time features (trainer/features.py) each user gets a weight on, comma separated.
    # Validation: + last1, last20 0.7642; + prefix2 rate, log1p item count 0.7634; these four 0.7644
    user_features: str = "user_rate_logit,item_rate_logit,last5_rate_logit,prefix1_rate_logit"
    # rate = lr / (Σ g²)^power per slot: 0.5 is AdaGrad, lower decays slower (VW's --power_t 0.3 does
    # the same for the peer). Validation: 0.3 0.7637 vs 0.5 0.7614 (key_lr 0.1); user_lr 0.05 at 0.3: 0.7623
    user_power: float = 0.3
    # AdaGrad rate of the table's global weight on the ranker's own logit (None: no such weight).
    # Validation (trm, seed 0): none 0.7647, 0.03 0.7670, 0.1 0.7679, 0.3 0.7684 (GAUC falls above 0.1)
    stack_lr: float | None = 0.1
    # the item's next-nearest level-1 codes (item_tokens.coarse_tokens[1:]) the TRM's online keys add, each
    # the same key as that code's own: an item between two categories shares the user's weights of both,
    # as a film of two genres does in the peer's genre features. Validation ([q0.4, q0.5), trm, stack 0.1,
    # AUC / GAUC, seeds 0 and 1 alike): 0 0.7679 / 0.6922, 1 0.7698, 3 0.7716 / 0.7003, 5 0.7727 / 0.7025,
    # 7 0.7715, 11 0.7687; in their own namespace instead 0.7703 (3); a centroid's neighbours instead of
    # the item's own 0.7698 (5); from the tokens' reconstruction instead of the embedding 0.7714 (5)
    coarse_keys: int = 5
    # the item's lexical tokens (item_tokens.lexical_tokens, tokenizer/lexical.py: hashed words of its published
    # categories and title; content, not an ID) as TRM's online keys too. Replayed on the real trainer's
    # recorded validation rows ([q0.4, q0.5), AUC, seeds 0 / 1, base 0.7725 / 0.7727): categories as
    # user x category crosses 0.7742 / 0.7743 (with a global weight too: the same; rates 0.03 / 0.08:
    # 0.7740 / 0.7738); title words as global weights +0.0015 more, 0.7757 / 0.7758 (at 0.01 / 0.05: 0.7753 /
    # 0.7757; crossed with the user too: 0.7745; numbers and stop words dropped: +-0.0002). Only TRM
    # reads them (the ID and gen_only baselines are ablations of the item side and stay as they were)
    lexical_keys: bool = True
    category_lr: float = 0.05  # the rate of user x category crosses (categories get no global weight)
    # TRM's era keys (trainer/features.era_keys: the item's decade and its age since release at the event,
    # from the release year its title states) crossed with the user at category_lr in the table, globally and
    # crossed in the linear model, as the categories. Replayed on the real trainer's recordings (seeds 0 / 1,
    # unseen items / all; windows: tokenizer at q0.2 on [q0.2, q0.5), at q0.4 on [q0.4, q0.5), the demo's
    # tokenizer on [q0.4, q0.5)): off 0.7603 / 0.7882, 0.7253 / 0.7809, 0.7278 / 0.7811; on 0.7640 / 0.7895,
    # 0.7282 / 0.7808, 0.7309 / 0.7812. A prototype of the same keys (other hash slots; both: 0.7644 / 0.7897,
    # 0.7285 / 0.7808) on the first two windows: decade alone 0.7625 / 0.7891, 0.7267 / 0.7805; release age
    # alone 0.7633 / 0.7896, 0.7270 / 0.7809; both with a global weight in the table too 0.7642 / 0.7895;
    # finer age buckets (0.5 .. 55 years) 0.7636 / 0.7893; 5-year eras 0.7621; decades and 20-year eras 0.7632
    era_keys: bool = True
    title_lr: float = 0.02  # the rate of title words' global weights (they get no user x word cross)
    # a per-event linear model beside the ranker, averaged with its logit (models/online_linear.py): its
    # share `linear_mix` (0: none), its 2**bits hashed slots, AdaGrad rate and power. Replayed on the real
    # trainer's recordings (means of seeds 0 / 1, AUC all / unseen items): tokenizer at q0.4, window
    # [q0.4, q0.5): 0 0.7777 / 0.7185, 0.5 0.7809 / 0.7254 (VW 0.7775 / 0.7251); window before the demo's
    # cutoff: 0.7784 -> 0.7811. 2**19 slots 0.7806; without the user x rate weights 0.7804 / 0.7265
    linear_mix: float = 0.5
    linear_bits: int = 20
    linear_lr: float = 0.06  # replays: 0.06 0.7809 / 0.7254, 0.08 at power 0.4 0.7808 / 0.7253
    linear_power: float = 0.3
    # backbone
    d_model: int = 64
    n_blocks: int = 2
    backbone: str = "rankmixer"  # rankmixer | transformer
    n_heads: int = 4  # transformer backbone and generative head
    ffn_mult: int = 2
    dropout: float = 0.0
    # sparse tables
    wide_buckets: int = 1 << 14  # hashed table for mem-tokens / n-gram ids
    id_buckets: int = 1 << 16  # hashed item-ID table of the ID baseline (~7x the live items, as in DLRM)
    # TRM specifics
    token_dropout: float = 0.1  # deep side: drop whole gen-token embeddings while training
    ntp_weight: float = 0.1  # λ in L = L_d + λ·L_g
    gen_layers: int = 1  # causal transformer blocks of the generative head
    ntp_mean_levels: bool = True  # L_g = mean (not sum) of the per-level CEs
    ntp_tied_grad: bool = False  # the tied output layer sends NTP gradients into the whole gen table
    ntp_item_grad: bool = False  # NTP's teacher-forced inputs send gradients into the gen table

    @property
    def gen_vocab_size(self) -> int:
        return self.num_levels * self.codebook_size

    @property
    def n_tokens(self) -> int:
        return self.n_query_tokens + self.n_user_tokens + self.n_item_tokens + 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RankerConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{**LEGACY_VALUES, **{k: v for k, v in d.items() if k in names}})
