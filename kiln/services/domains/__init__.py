"""Custom domains: the rules (ownership, claims, states) and the issuance worker."""
