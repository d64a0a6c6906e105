"""Ingest: the authenticated REST API that turns requests into email.requested events."""
