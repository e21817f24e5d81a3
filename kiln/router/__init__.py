"""The share router: a process of its own serving shares (and custom domains) by Host header."""
