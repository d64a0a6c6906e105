"""Confirm: joins sent with delivered into confirmations, and projects every event into PostgreSQL."""
