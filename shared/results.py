"""How a deployment run's results travel from the ServerApp to the submitting CLI.

The ServerApp runs on the SuperLink host, and the only channel Flower 1.42's open-source
SuperLink gives back to whoever ran ``flwr run`` is the run's log (``flwr run --stream``,
``flwr log``); ``flwr pull`` needs an artifact provider that the open-source SuperLink
does not have. So the ServerApp prints machine-readable lines into its own log::

    @@fedaudit {"event": "clients", ...}          once, after every node described itself
    @@fedaudit {"event": "round", ...}            after every round
    @@fedaudit {"event": "error", "error": ...}   if the run failed
    @@fedaudit {"event": "bundle", "sha256": ..., "chunks": N, "bytes": B}
    @@fedaudit-chunk 0 <base64>                   N lines: the zlib-compressed bundle
    ...
    @@fedaudit {"event": "end", "status": ...}

The bundle is one JSON document: the run's rows from the server's run store (runs,
rounds, privacy ledger, clients, flags) and its files (audit log and signed head, final
model, model.json, config.toml, the public key registry), base64-encoded. The CLI checks
the SHA-256 of the reassembled bundle before writing anything.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

PREFIX = "@@fedaudit "
CHUNK_PREFIX = "@@fedaudit-chunk "
CHUNK_CHARS = 48_000


def finite_or_none(value):
    """A non-finite float (NaN, +-inf) as None: JSON has neither."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def json_safe(value):
    """``value`` with every non-finite float inside it (dicts, lists, tuples) as None."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return finite_or_none(value)


def event_line(event: str, **payload) -> str:
    return PREFIX + json.dumps({"event": event, **payload}, separators=(",", ":"), default=str, allow_nan=False)


def encode_bundle(bundle: dict) -> list[str]:
    """The lines (without newlines) that carry ``bundle``."""
    raw = zlib.compress(json.dumps(bundle, separators=(",", ":"), allow_nan=False).encode(), 6)
    text = base64.b64encode(raw).decode()
    chunks = [text[i : i + CHUNK_CHARS] for i in range(0, len(text), CHUNK_CHARS)] or [""]
    head = event_line("bundle", sha256=hashlib.sha256(raw).hexdigest(), chunks=len(chunks), bytes=len(raw))
    return [head, *(f"{CHUNK_PREFIX}{i} {c}" for i, c in enumerate(chunks))]


class BundleError(ValueError):
    """The bundle in a log is incomplete or corrupt."""


@dataclass
class LogReader:
    """Feeds on log lines; collects events and reassembles the bundle."""

    events: list[dict] = field(default_factory=list)
    other: list[str] = field(default_factory=list)
    _head: dict | None = None
    _chunks: dict[int, str] = field(default_factory=dict)

    def feed(self, line: str) -> dict | None:
        """Take one line; return the event it carried, if any."""
        line = line.rstrip("\r\n")
        start = line.find("@@fedaudit")  # tolerate a log prefix before the marker
        if start < 0:
            if line.strip():
                self.other.append(line)
            return None
        line = line[start:]
        if line.startswith(CHUNK_PREFIX):
            index, _, data = line[len(CHUNK_PREFIX) :].partition(" ")
            try:
                self._chunks[int(index)] = data.strip()
            except ValueError:
                pass
            return None
        if not line.startswith(PREFIX):
            return None
        try:
            event = json.loads(line[len(PREFIX) :])
        except ValueError:
            return None
        if not isinstance(event, dict):
            return None
        if event.get("event") == "bundle":
            self._head, self._chunks = event, {}
        self.events.append(event)
        return event

    def feed_all(self, lines: Iterable[str]) -> Iterator[dict]:
        for line in lines:
            event = self.feed(line)
            if event is not None:
                yield event

    def last(self, name: str) -> dict | None:
        return next((e for e in reversed(self.events) if e.get("event") == name), None)

    @property
    def has_bundle(self) -> bool:
        return self._head is not None and len(self._chunks) >= int(self._head.get("chunks", 0))

    def bundle(self) -> dict:
        if self._head is None:
            raise BundleError("the server sent no results bundle")
        count = int(self._head["chunks"])
        missing = [i for i in range(count) if i not in self._chunks]
        if missing:
            raise BundleError(f"results bundle incomplete: {len(missing)} of {count} chunks missing")
        try:
            raw = base64.b64decode("".join(self._chunks[i] for i in range(count)), validate=True)
        except ValueError:
            raise BundleError("results bundle is not valid base64") from None
        if hashlib.sha256(raw).hexdigest() != self._head["sha256"]:
            raise BundleError("results bundle checksum mismatch")
        try:
            return json.loads(zlib.decompress(raw))
        except (zlib.error, ValueError):
            raise BundleError("results bundle does not decompress to JSON") from None


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)
