"""Alembic environment and revisions. Run programmatically through `db.engine.upgrade_to_head(url)`;
developers can also use `alembic -c migrations/alembic.ini -x url=sqlite:///path/dmad.db ...`."""
