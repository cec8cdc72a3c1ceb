"""Durable per-partition state of the stateful agents, one SQLite file per input partition:

  store.py         the shared part: open (WAL), `meta`, high-water mark, save transaction, log reset
  user_history.py  the interaction agent's users: history as tokens, recent labelled events, counts,
                   dedup, parking
  item_counts.py   the item-stats agent's per-item counts (of `interactions_by_item`)
"""
from .item_counts import ItemEvents, ItemStatsState
from .store import DEFAULT_ALLOWED_LATENESS_S, PartitionStore
from .user_history import DEFAULT_RECENT_LEN, Parked, PartitionState, UserState, tokens_blob, user_row

__all__ = ["DEFAULT_ALLOWED_LATENESS_S", "DEFAULT_RECENT_LEN", "ItemEvents", "ItemStatsState", "Parked", "PartitionState",
           "PartitionStore", "UserState", "tokens_blob", "user_row"]
