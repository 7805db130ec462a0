"""Flask-Migrate's environment, reduced to the online upgrade `flask db upgrade` runs."""
from alembic import context
from flask import current_app

db = current_app.extensions["migrate"].db


def run_migrations_online():
    with db.engine.connect() as connection:
        context.configure(connection=connection, target_metadata=db.metadata)
        with context.begin_transaction():
            context.run_migrations()


run_migrations_online()
