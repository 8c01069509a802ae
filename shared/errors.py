"""Errors that mean "the user gave bad input": the CLI prints one line and exits 2."""


class FedauditError(Exception):
    """Bad input or configuration. The message is one line meant for the user."""


class BadInput(FedauditError):
    """The input itself is wrong (a flag, a file, a stored run): ``raise BadInput("...")``."""


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


def make_dir(path, what: str, mode: int = 0o777) -> None:
    """Create the folder ``what`` at ``path`` (parents too); an OS refusal is :class:`BadInput`."""
    from pathlib import Path

    try:
        Path(path).mkdir(mode=mode, parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInput(f"cannot create {what} {path}: {exc.strerror}") from None
