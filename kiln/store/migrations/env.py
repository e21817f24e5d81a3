"""Alembic environment: migrate the connection ``Database.migrate`` passes in."""

from alembic import context

from kiln.store.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run Kiln's migrations through kiln.store.db.Database.migrate()")

context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
