"""Kiln: self-hosted microVM sandboxes."""
