"""Errors that mean "the user gave bad input": the CLI prints one line and exits 2."""


class FedauditError(Exception):
    """Bad input or configuration. The message is one line meant for the user."""


class BadInput(FedauditError):
    """Alias kept short for call sites: ``raise BadInput("...")``."""


def read_input(path, what: str) -> bytes:
    """The bytes of a file the user pointed at; a missing or unreadable one is :class:`BadInput`
    naming ``what`` it should have been (e.g. "key file")."""
    from pathlib import Path

    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise BadInput(f"{what} {path} not found") from None
    except OSError as exc:
        raise BadInput(f"cannot read {what} {path}: {exc.strerror}") from None
