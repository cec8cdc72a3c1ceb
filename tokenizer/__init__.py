"""Hybrid semantic tokenizer (TRM §3.1–3.2): item text → gen-tokens (RQ-Kmeans) + mem-tokens (BPE).

Modules, one concept each: `encoder` (frozen MiniLM), `alignment` (collaborative projection),
`rq_kmeans` (gen-tokens), `bpe` (mem-tokens), `ngrams` (comparison tokenizations),
`lexical` (the words of the item's categories and title as tokens), `hybrid`
(the fitted whole: fit and encode), `artifact` (its versioned, checksummed directory: save and
load), `manifest` (the sha256-manifest helper the trainer's checkpoints share), `errors` (the
`TokenizerError` root). The bottom layer: it imports nothing of the project's other packages
(the `trm tokenizer` command lives in trm/cli/tokenizer.py). Nothing heavy is imported here.
"""
