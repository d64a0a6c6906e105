"""Sender: delivers email.requested through each account's transport, within its quota."""
