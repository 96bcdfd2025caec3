"""`ingestctl setup ENV [--dry] [--json]`: bare Debian 12/13 hosts -> deploy targets (DESIGN section 2).

Attached to the `ingestctl` group in `cli._attach_optional_groups()`:

    from ingestctl.setup_cli import setup
    main.add_command(setup)

Also runnable on its own: `python -m ingestctl.setup_cli ENV [--dry] [--json]`.
"""

from __future__ import annotations

import time

import click

from ingestctl.clikit import json_option, reporting
from ingestctl.errors import HostError
from ingestctl.output import Reporter


@click.command("setup")
@click.argument("env")
@click.option("--dry", is_flag=True, help="Show what would change on each host; change nothing.")
@click.option("--host", "hosts", multiple=True, help="Only this host (repeatable). Default: every host.")
@json_option
@reporting
def setup(env: str, dry: bool, hosts: tuple[str, ...], reporter: Reporter) -> None:
    """Make ENV's hosts deploy targets: Docker engine, CLI and Compose from Debian's packages, enabled and
    running; log rotation; the service's uid and directories; the db host's nftables firewall.

    Connects as the inventory's SSH user (root, or a user with passwordless sudo: `sudo: True`). A second run
    changes nothing and says so. Exit 0 when every host is set up, 2 when one could not be (each named).
    """
    from ingestctl import hostsetup

    started = time.monotonic()
    selected = list(hosts) or None
    setup_plan = hostsetup.plan_for(env)  # inventory and firewall sources: a ConfigError touches no host
    reporter.event(
        "plan",
        f"setup {env}: {', '.join(selected or setup_plan.hosts)}" + (" (dry run: nothing changes)" if dry else ""),
        env=env,
        hosts=list(selected or setup_plan.hosts),
        dry=dry,
    )
    outcomes = hostsetup.run_setup(env, hosts=selected, dry=dry)
    verb = "would change" if dry else "changed"
    for name, outcome in sorted(outcomes.items()):
        if not outcome.success:
            reporter.event("host", f"{name}: FAILED: {outcome.error}", host=name, success=False,
                           changed=list(outcome.changed), error=outcome.error)
            continue
        if outcome.changed:
            message = f"{name}: {verb}: {', '.join(outcome.changed)}"
        else:
            message = f"{name}: no change (already set up)"
        reporter.event("host", message, host=name, success=True, changed=list(outcome.changed),
                       unchanged=list(outcome.unchanged), noops=list(outcome.noops))
    failed = sorted(name for name, outcome in outcomes.items() if not outcome.success)
    elapsed = round(time.monotonic() - started, 1)
    if failed:
        raise HostError(
            f"setup {env}: {len(failed)} host(s) not set up: "
            + "; ".join(outcomes[name].error or name for name in failed)
            + f". Fix the cause and run `ingestctl setup {env}` again (it resumes where it stopped)"
        )
    changed = sorted(name for name, outcome in outcomes.items() if outcome.changed)
    if dry:
        message = (f"setup {env} (dry run): {len(changed)} of {len(outcomes)} host(s) would change"
                   if changed else f"setup {env} (dry run): every host already set up; nothing would change")
    elif changed:
        message = f"setup {env}: {len(changed)} of {len(outcomes)} host(s) changed, all set up ({elapsed}s)"
    else:
        message = f"setup {env}: no change, every host already set up ({elapsed}s)"
    reporter.event(
        "summary",
        message,
        env=env,
        outcome="noop" if not changed else ("dry-run" if dry else "changed"),
        changed_hosts=changed,
        hosts=sorted(outcomes),
        dry=dry,
        elapsed_s=elapsed,
    )


if __name__ == "__main__":  # pragma: no cover - `python -m ingestctl.setup_cli ENV`
    setup()
