"""Several facts in one command: one round trip to the host instead of one each.

An operation that needs six facts before it yields anything (a switch) waits six round trips when it asks for
them one by one: 60 ms on the sandbox, a third of a second at 50 ms of latency. `HostFacts.read_together`
asks for them in one command; each fact's own `command()` runs there and its own `process()` reads its part.
A fact it did not read, or one whose part failed or did not process, is read on its own as before, with the
same errors.
"""

from __future__ import annotations

import secrets
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyinfra.api import FactBase
from pyinfra.api.exceptions import FactProcessError

# (fact class, its keyword arguments as sorted pairs): hashable, so a read can be looked up by what was asked.
FactKey = tuple[type[FactBase], tuple[tuple[str, Hashable], ...]]


# A fact as a read names it: its class, or (its class, its arguments).
Wanted = type[FactBase] | tuple[type[FactBase], Mapping[str, Any]]


def fact_key(cls: type[FactBase], kwargs: Mapping[str, Any]) -> FactKey:
    return cls, tuple(sorted((name, _hashable(value)) for name, value in kwargs.items()))


def wanted_key(wanted: Wanted) -> FactKey:
    """WANTED's key: the class with no arguments, or the class with its arguments."""
    cls, kwargs = wanted if isinstance(wanted, tuple) else (wanted, {})
    return fact_key(cls, kwargs)


def _hashable(value: Any) -> Hashable:
    return tuple(value) if isinstance(value, list) else value


def together_command(keys: Sequence[FactKey], nonce: str) -> str:
    """Each fact's own command in turn, its output fenced by markers with NONCE (drawn for this read, so no file
    a host returns can pass for the end of a part) and its exit status.

    The trailing parts whose fact is marked `runs_long` (a `docker` or `psql` call: 25-110 ms of a host's time)
    start first, in the background, each into a file of a private temporary directory, and are printed after
    the others: a read costs the host its longest part, not the sum of them.
    """
    commands = [f"( {cls().command(**dict(kwargs))} )" for cls, kwargs in keys]
    first_long = len(keys)
    while first_long > 0 and getattr(keys[first_long - 1][0], "runs_long", False):
        first_long -= 1
    # Worth it only with something to overlap: another part, long or not.
    background = set(range(first_long, len(keys))) if len(keys) > 1 and first_long < len(keys) else set()

    def fenced(index: int, output: str, status: str) -> str:
        return f"echo '{nonce} {index}'; {output}; echo \"{nonce} {index} {status}\""

    def saved(index: int) -> str:
        return f'"$t/{index}"'

    parts = [f"{commands[i]} > {saved(i)} & p{i}=$!" for i in sorted(background)]
    parts += [fenced(i, commands[i], "$?") for i in range(len(keys)) if i not in background]
    parts += [f'wait "$p{i}"; r=$?; ' + fenced(i, f"cat {saved(i)}", "$r") for i in sorted(background)]
    if background:
        return "; ".join(["t=$(mktemp -d) || exit 1", *parts, 'rm -rf "$t"'])
    return "; ".join(parts)


def split_parts(output: Sequence[str], count: int, nonce: str) -> list[list[str]]:
    """The output lines of each of COUNT parts, in order. FactProcessError when a part is missing, out of order
    or exited non-zero."""
    parts: list[list[str]] = []
    current: list[str] | None = None
    for line in output:
        if not line.startswith(nonce):
            if current is None:
                raise FactProcessError(f"facts read together: output outside any part: {line[:80]!r}")
            current.append(line)
            continue
        words = line[len(nonce):].split()
        if len(words) == 1 and current is None and words[0] == str(len(parts)):
            current = []
        elif len(words) == 2 and current is not None and words[0] == str(len(parts)):
            if words[1] != "0":
                raise FactProcessError(f"facts read together: part {len(parts)} exited {words[1]}")
            parts.append(current)
            current = None
        else:
            raise FactProcessError(f"facts read together: unexpected marker {line[len(nonce):][:40]!r}")
    if current is not None or len(parts) != count:
        raise FactProcessError(f"facts read together: expected {count} parts, found {len(parts)}")
    return parts


@dataclass(frozen=True)
class TogetherRead:
    """Facts to read in one command: KEYS, fenced with NONCE. `command` can also run inside another command of
    the same round (the deploy lock's), when its output lines come back to `HostFacts.take`."""

    keys: tuple[FactKey, ...]
    nonce: str

    @classmethod
    def of(cls, *wanted: Wanted) -> TogetherRead:
        keys = tuple(dict.fromkeys(wanted_key(w) for w in wanted))  # a fact wanted twice is read once
        # The long parts last, so that `together_command` runs them in the background beside the others.
        keys = tuple(sorted(keys, key=lambda key: bool(getattr(key[0], "runs_long", False))))
        return cls(keys, f"--ingestctl-{secrets.token_hex(8)}--")

    @property
    def command(self) -> str:
        return together_command(self.keys, self.nonce)


# Facts read in an earlier round of this run, under the deploy lock, handed to the next `read_together` on that
# host (by name), which takes them instead of reading them again, once: see `hand_over`.
_HANDED: dict[str, dict[FactKey, Any]] = {}


def hand_over(host_name: str, values: Mapping[FactKey, Any]) -> None:
    """VALUES (processed facts) for the next `read_together` on HOST_NAME. Only for facts nothing can change
    before that read: the caller holds the deploy lock and changes nothing on the host in between."""
    _HANDED[host_name] = dict(values)


def forget_handed() -> None:
    """Drop whatever was handed over and not taken (the run ended before the operation that was to take it)."""
    _HANDED.clear()


@dataclass
class HostFacts:
    """One host's facts for one operation: those read together, then anything else read on its own."""

    host: Any
    values: dict[FactKey, Any] = field(default_factory=dict)

    def read_together(self, *wanted: Wanted) -> HostFacts:
        read = TogetherRead.of(*wanted)
        handed = _HANDED.pop(getattr(self.host, "name", None), {})
        self.values.update({key: handed[key] for key in read.keys if key in handed})
        missing = TogetherRead(tuple(key for key in read.keys if key not in self.values), read.nonce)
        if not missing.keys:
            return self
        return self.take(missing, self.host.get_fact(_RawLines, command=missing.command))

    def take(self, read: TogetherRead, lines: Sequence[str] | None) -> HostFacts:
        """READ's facts from the LINES its command printed."""
        try:
            parts = split_parts(lines or [], len(read.keys), read.nonce)
        except FactProcessError:
            return self  # a part failed: every fact is read on its own below, and fails with its own error
        for key, part in zip(read.keys, parts, strict=True):
            fact = key[0]()
            try:
                self.values[key] = fact.process(part) if part else fact.default()
            except FactProcessError:
                pass  # read on its own below: pyinfra reports it and fails only this host, as for any fact
        return self

    def get(self, cls: type[FactBase], **kwargs: Any) -> Any:
        key = fact_key(cls, kwargs)
        if key in self.values:
            return self.values[key]
        return self.host.get_fact(cls, **kwargs)

    def known(self, cls: type[FactBase], **kwargs: Any) -> bool:
        """Whether the fact was read together (`get` would not read it on its own)."""
        return fact_key(cls, kwargs) in self.values


class _RawLines(FactBase[list | None]):
    """COMMAND's stdout lines as they are (None when it printed nothing or failed)."""

    def command(self, command: str) -> str:
        return command

    def process(self, output: list[str]) -> list[str]:
        return list(output)
