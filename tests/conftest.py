"""Shared fixtures, registered once for every test module (no test imports another test module).

  tests/services.py           native Redis / PostgreSQL / S3 (moto) servers on 127.0.0.1
  tests/streams_fixtures.py   the embedded broker, a Kafka config, a Feast repo, a MovieLens slice, a tiny tokenizer
  tests/tokenizer_fixtures.py a fitted tokenizer on a MovieLens subset and its saved artifact
Plain helpers (no fixtures) are imported by name: tests/stream_checks.py (reference computations),
tests/fault_checks.py (end-state checks after a fault), tests/trainer_fixtures.py (synthetic events,
small configs, a Feast repo filled with feature rows).
"""
pytest_plugins = ["tests.services", "tests.streams_fixtures", "tests.tokenizer_fixtures"]
