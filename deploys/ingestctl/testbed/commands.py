"""`ingestctl testbed up|down|status`. Placeholder until the testbed lands."""

import click


@click.group("testbed")
def testbed() -> None:
    """Local sandbox hosts (db1, app2, app3) reachable over SSH."""
