"""mailbus: a self-hosted email pipeline on Kafka."""

__version__ = "0.1.0"
