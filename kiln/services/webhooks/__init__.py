"""Webhooks: endpoints, the deliveries the event stream makes for them, and the worker that sends them."""
