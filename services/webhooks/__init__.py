"""Outbound webhooks: every outcome of a message, signed, to its key's HTTPS endpoints."""
