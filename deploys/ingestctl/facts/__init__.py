"""pyinfra facts about ingest hosts: each separates the shell `command()` from a pure `process(output)`."""
