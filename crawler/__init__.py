"""crawler: a massive asynchronous HTTP request crawler; every outcome in PostgreSQL."""

__version__ = "0.1.0"
