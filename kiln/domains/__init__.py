"""Custom domains, the host side: DNS records (plugins that publish them, lookups
that check them), ACME DNS-01 certificates, and the certificate files the share
router serves. Nothing here knows users, rows or HTTP (see README.md)."""
