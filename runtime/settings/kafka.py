"""What every process shares: the broker connection (``KafkaSettings``), the topic names (``TopicSettings``)
and how settings are shown (``masked``). Each process's settings class extends ``TopicSettings``.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

CommaList = Annotated[list[str], NoDecode]


def split_commas(value: Any) -> Any:
    """``"a, b,,c"`` → ``["a", "b", "c"]``: list settings are read from one comma-separated variable."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class KafkaSettings(BaseSettings):
    """Broker address and security, shared by every process."""

    model_config = SettingsConfigDict(env_prefix="SENTIMENT_", env_file=None, extra="ignore")

    kafka_bootstrap: str = Field(default="127.0.0.1:9092", description="Comma-separated host:port list.")
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = Field(default=None, description="CA bundle that signed the broker's certificate.")
    kafka_ssl_check_hostname: bool = True
    kafka_client_id: str = "sentiment"
    kafka_allow_plaintext_password: bool = Field(default=False, description=(
        "Accept SASL PLAIN over SASL_PLAINTEXT, which sends the password unencrypted; for a local test broker "
        "only. Without it that combination is refused at start."))

    @model_validator(mode="after")
    def _no_cleartext_password(self) -> KafkaSettings:
        # PLAIN sends the password as it is; without TLS anyone on the path reads it. SCRAM does not.
        if (self.kafka_sasl_mechanism == "PLAIN" and self.kafka_security_protocol == "SASL_PLAINTEXT"
                and not self.kafka_allow_plaintext_password):
            raise ValueError("SASL PLAIN over SASL_PLAINTEXT sends the password in clear text: use SASL_SSL, "
                             "SCRAM-SHA-256/512, or set SENTIMENT_KAFKA_ALLOW_PLAINTEXT_PASSWORD=true")
        return self

    def ssl_context(self) -> ssl.SSLContext | None:
        if "SSL" not in self.kafka_security_protocol:
            return None
        context = ssl.create_default_context(cafile=str(self.kafka_ssl_cafile) if self.kafka_ssl_cafile else None)
        context.check_hostname = self.kafka_ssl_check_hostname
        return context

    def aiokafka_kwargs(self) -> dict[str, Any]:
        """Connection arguments for any aiokafka client (producer, consumer, admin)."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.kafka_bootstrap,
            "security_protocol": self.kafka_security_protocol,
            "client_id": self.kafka_client_id,
        }
        if context := self.ssl_context():
            kwargs["ssl_context"] = context
        if self.kafka_sasl_mechanism:
            kwargs["sasl_mechanism"] = self.kafka_sasl_mechanism
            kwargs["sasl_plain_username"] = self.kafka_sasl_username
            kwargs["sasl_plain_password"] = (
                self.kafka_sasl_password.get_secret_value() if self.kafka_sasl_password else None
            )
        return kwargs


class TopicSettings(KafkaSettings):
    """Topic names, shared by the worker, the CLIs and the monitor so they can never disagree."""

    input_topics: CommaList = Field(default_factory=lambda: ["sentiment.requests"])
    labeled_topic: str = "sentiment.labeled"
    uncertain_topic: str = "sentiment.uncertain"
    dlq_topic: str = "sentiment.dlq"
    stats_topic: str = "sentiment.stats"
    drift_alerts_topic: str = "sentiment.drift-alerts"
    feedback_topic: str = "sentiment.feedback"
    retrain_requests_topic: str = "sentiment.retrain-requests"
    model_updates_topic: str = "sentiment.model-updates"
    app_id: str = Field(default="sentiment-worker", description=(
        "The workers' consumer group id; the drift monitor exports this group's lag as the broker sees it."))

    _split_input_topics = field_validator("input_topics", mode="before")(split_commas)


SECRET_FIELDS = frozenset({"kafka_sasl_password"})


def masked(settings: BaseSettings) -> dict[str, Any]:
    """The effective settings as JSON-able values, with every secret replaced by '**********'."""
    data = settings.model_dump(mode="json")
    for name, value in data.items():
        if value is not None and (name in SECRET_FIELDS or isinstance(getattr(settings, name), SecretStr)):
            data[name] = "**********"
    return data
