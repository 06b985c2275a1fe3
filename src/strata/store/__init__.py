"""Every piece of durable state, through SQLAlchemy 2 (async): SQLite embedded, PostgreSQL in production."""
