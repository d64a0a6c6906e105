"""Confirm: joins sent with delivered into confirmations; projects events into PostgreSQL."""
