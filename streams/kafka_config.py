"""Kafka connection settings read from the environment, so a real cluster is a setting, not a code change.

Every Kafka client the project creates (kafka-python publisher and admin, Faust workers, aiokafka
loops, the trainer's consumer) takes its connection and security settings from one `KafkaConfig`,
kept here beside the Kafka code (as quix-streams' `kafka/configuration.py`). Environment:
TRM_KAFKA_BOOTSTRAP, TRM_KAFKA_SECURITY_PROTOCOL, TRM_KAFKA_SASL_*, TRM_KAFKA_SSL_CAFILE,
TRM_TOPIC_PREFIX, TRM_KAFKA_SESSION_TIMEOUT_MS.
"""
from __future__ import annotations

import os
import ssl
from dataclasses import dataclass


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: str = "PLAINTEXT"  # PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL
    sasl_mechanism: str | None = None  # PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: str | None = None
    topic_prefix: str = ""
    session_timeout_ms: int = 8000  # Tansu makes a group join wait ~half of this

    @classmethod
    def from_env(cls, **overrides) -> "KafkaConfig":
        env = os.environ
        values = dict(
            bootstrap_servers=env.get("TRM_KAFKA_BOOTSTRAP", cls.bootstrap_servers),
            security_protocol=env.get("TRM_KAFKA_SECURITY_PROTOCOL", cls.security_protocol),
            sasl_mechanism=env.get("TRM_KAFKA_SASL_MECHANISM") or None,
            sasl_username=env.get("TRM_KAFKA_SASL_USERNAME") or None,
            sasl_password=env.get("TRM_KAFKA_SASL_PASSWORD") or None,
            ssl_cafile=env.get("TRM_KAFKA_SSL_CAFILE") or None,
            topic_prefix=env.get("TRM_TOPIC_PREFIX", ""),
            session_timeout_ms=int(env.get("TRM_KAFKA_SESSION_TIMEOUT_MS", cls.session_timeout_ms)),
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def _ssl_context(self) -> ssl.SSLContext | None:
        if "SSL" not in self.security_protocol:
            return None
        ctx = ssl.create_default_context(cafile=self.ssl_cafile)
        return ctx

    def kafka_python_kwargs(self) -> dict:
        """Settings for kafka-python's KafkaProducer / KafkaConsumer."""
        kw: dict = {"bootstrap_servers": self.bootstrap_servers.split(","),
                    "security_protocol": self.security_protocol}
        if self.sasl_mechanism:
            kw.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                      sasl_plain_password=self.sasl_password)
        if self.ssl_cafile:
            kw["ssl_cafile"] = self.ssl_cafile
        return kw

    def aiokafka_kwargs(self) -> dict:
        """Settings for aiokafka clients (the trainer's consumer, benchmarks)."""
        kw: dict = {"bootstrap_servers": self.bootstrap_servers, "security_protocol": self.security_protocol}
        if self.sasl_mechanism:
            kw.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                      sasl_plain_password=self.sasl_password)
        ctx = self._ssl_context()
        if ctx is not None:
            kw["ssl_context"] = ctx
        return kw

    def faust_kwargs(self) -> dict:
        """Settings for faust.App(...): broker URL and credentials."""
        urls = ";".join(f"kafka://{s}" for s in self.bootstrap_servers.split(","))
        kw: dict = {"broker": urls, "broker_session_timeout": self.session_timeout_ms / 1000}
        if self.sasl_mechanism or "SSL" in self.security_protocol:
            import faust  # local: only workers need Faust

            ctx = self._ssl_context()
            if self.sasl_mechanism:
                kw["broker_credentials"] = faust.SASLCredentials(
                    username=self.sasl_username, password=self.sasl_password, ssl_context=ctx,
                    mechanism=self.sasl_mechanism)
            else:
                kw["broker_credentials"] = faust.SSLCredentials(ctx)
        return kw
