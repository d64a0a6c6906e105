"""The hooks service: public action, unsubscribe and open-tracking links."""
