"""One exception type per layer, each carrying the exit code the CLI contract (DESIGN section 2) gives it."""

from __future__ import annotations


class IngestctlError(Exception):
    """Base for every error ingestctl reports to its user. `exit_code` follows DESIGN section 2."""

    exit_code = 2


class ConfigError(IngestctlError):
    """Usage, inventory, config or secrets error: nothing was touched (exit 2)."""

    exit_code = 2


class EnvironmentMissing(IngestctlError):
    """A prerequisite of this machine (Docker, debootstrap) is missing or not running (exit 2)."""

    exit_code = 2


class HostError(IngestctlError):
    """A command on a host failed; the message names the host and the command (exit 2 unless wrapped)."""

    exit_code = 2


class GateFailed(IngestctlError):
    """A gate failed and the fleet was rolled back to the previous release (exit 3)."""

    exit_code = 3


class RollbackFailed(IngestctlError):
    """A rollback failed: SEV-1. The message carries every host's state (exit 4)."""

    exit_code = 4


class LockHeld(IngestctlError):
    """The deploy lock is held by someone else (exit 5)."""

    exit_code = 5


class BuildError(IngestctlError):
    """Building, saving or pushing an image on this machine failed; nothing was shipped (exit 2)."""

    exit_code = 2
