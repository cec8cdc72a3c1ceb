"""Hybrid semantic tokenizer (TRM §3.1–3.2): item text → gen-tokens (RQ-Kmeans) + mem-tokens (BPE).

Modules, one concept each: `encoder` (frozen MiniLM), `alignment` (collaborative projection),
`rq_kmeans` (gen-tokens), `bpe` (mem-tokens), `ngrams` (comparison tokenizations), `hybrid`
(the fitted whole and its artifact), `cli` (`trm tokenizer ...`). Nothing heavy is imported here,
so `import tokenizer.cli` stays cheap for `trm --help`.
"""
