"""The one root exception of mailbus, and its one-line subclasses."""


class MailbusError(Exception):
    """Root of every error mailbus raises on purpose."""


class ConfigError(MailbusError):
    """Settings are missing, malformed or unsafe for this environment."""


class SchemaError(MailbusError):
    """A schema file is missing or invalid."""


class DecodeError(MailbusError):
    """A record is not valid single-object Avro of a known mailbus schema."""


class EncodeError(MailbusError):
    """A record does not match the schema it was to be written with."""


class UnavailableError(MailbusError):
    """A dependency (Kafka, PostgreSQL) cannot take the request right now."""


class ProvisioningError(MailbusError):
    """Topics, principals or ACLs could not be put in place."""
