"""Errors that mean "the user gave bad input": the CLI prints one line and exits 2."""


class FedauditError(Exception):
    """Bad input or configuration. The message is one line meant for the user."""


class BadInput(FedauditError):
    """Alias kept short for call sites: ``raise BadInput("...")``."""
