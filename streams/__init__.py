"""Event streams: publish items/interactions to Kafka, tokenize and aggregate them in a Faust-hosted
worker, write features to Feast (online + offline) — see docs/contracts.md for the wire contract.

Modules, one concept each:
  schemas/*.avsc, registry.py  Avro schemas and the local schema registry (id -> schema)
  codec.py                     Confluent framing (magic 0 + 4-byte id) + fastavro, schema resolution
  events.py                    typed events, validation, worker counters
  broker.py                    embedded Tansu broker (`EmbeddedBroker`), explicit topic creation
  publisher.py                 kafka-python publisher (event-time order, speed-up, acked sends only)
  batch_loop.py                aiokafka getmany loop: process -> produce -> save -> commit
  item_agent.py                item events -> tokens -> Feast + `item_tokens`
  interaction_agent.py         user history as tokens, co-like pairs, parking; forwards accepted
                               interactions to `interactions_by_item` (keyed by item)
  item_stats_agent.py          item counters from `interactions_by_item` (exact with any number of workers)
  state.py                     per-partition durable state with a high-water mark (users; items)
  token_cache.py               item gen-tokens read from `item_tokens`
  pairs.py                     co-interaction pair part files for the tokenizer's alignment
  dlq.py                       dead letters (original bytes + reason headers)
  feast_sink.py                online (provider write) + offline (parquet part files) writes
  feature_repo_tools.py        copy + apply feature_repo/ into a work dir
  app.py                       Faust app / `StreamWorker`; cli.py: `trm broker|topics|publish|worker|feast-repo`
"""
