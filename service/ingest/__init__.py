"""The ingest service: an HTTP API that stores events in PostgreSQL and rate-limits with Redis."""
