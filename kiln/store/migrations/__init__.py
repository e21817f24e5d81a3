"""Alembic migrations of Kiln's schema, run by ``Database.migrate`` on every start."""
