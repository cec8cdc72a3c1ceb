"""Event streams: publish items/interactions to Kafka, tokenize and aggregate them in a Faust-hosted
worker, write features to Feast (online + offline) — see docs/contracts.md for the wire contract.

Modules, one concept each:
  contract/                    the wire contract: schemas + registry, codec, events, topics (names,
                               partitions, configs, DLQ and group names, the one `create_topics`)
  kafka_config.py              Kafka connection and security settings (`KafkaConfig`)
  errors.py                    `StreamsError`, the root of every error raised here
  movielens.py                 MovieLens-layout directory -> Item / Interaction records (the replay source)
  broker.py                    embedded Tansu broker (`EmbeddedBroker`)
  publisher.py                 kafka-python publisher (event-time order, speed-up, acked sends only)
  batch_loop.py                aiokafka getmany loop; `BatchLoop._process_and_commit` is the commit ordering
  processor.py                 the typed processor interface the loop drives, `BatchResult`
  item_agent.py                item events -> tokens -> Feast + `item_tokens`
  interaction_agent.py         user history as tokens, co-like pairs, parking; forwards accepted
                               interactions to `interactions_by_item` (keyed by item)
  item_stats_agent.py          item counters from `interactions_by_item` (exact with any number of workers)
  partitioned.py, state/       per-partition durable state with a high-water mark: the SQLite store,
                               user history, item counts — each owning its rules
  token_cache.py               item gen-tokens read from `item_tokens`
  pairs.py                     co-interaction pair part files for the tokenizer's alignment
  dlq.py                       dead letters (original bytes + reason headers)
  feast_sink.py                online (provider write) + offline (parquet part files) writes
  feature_repo_tools.py        copy + apply feature_repo/ into a work dir
  compaction.py                merge offline part files (`trm compact`)
  failpoints.py                named kill points for the fault tests (imports nothing of the project)
  app.py                       Faust app / `StreamWorker`
The commands (`trm broker|topics|publish|worker|feast-repo|compact`) live in trm/cli/.
"""
