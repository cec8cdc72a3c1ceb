"""`trm demo`: the whole product on one machine with the embedded defaults.

  run.py     the ordered steps (data, tokenizer, Feast + broker, worker + trainer, replay, report)
  probes.py  live measurements against the running pipeline (freshness, raw consumer rate)
  report.py  report.json / report.md, plots, the summary table
The command itself is registered by trm/cli/demo.py.
"""
MODELS = ("trm", "id", "gen_only", "two_gram", "prefix_ngram", "trm_no_ntp")  # last: the NTP ablation


class DemoError(RuntimeError):
    """A clear, user-facing failure (port taken, malformed data, a part that died)."""
