"""Shares (a VM's port through the share router) and what wakes a VM on request."""
