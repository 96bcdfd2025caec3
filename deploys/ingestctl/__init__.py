"""ingestctl: release automation for the bundled ingest service."""
