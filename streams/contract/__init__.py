"""The wire contract: everything that crosses Kafka, in one package (docs/contracts.md).

  schemas/*.avsc, registry.py  Avro schemas and the local schema registry (id -> schema)
  codec.py                     Confluent framing (magic 0 + 4-byte id) + fastavro, schema resolution
  events.py                    typed events and their validation (what a dead letter's reason says)
  topics.py                    topic names, keys, partitions, configs, DLQ and consumer-group names,
                               and the one `create_topics`
The workers, the trainer's Kafka source, the broker helper and deploy/bootstrap.py all read it here.
"""
