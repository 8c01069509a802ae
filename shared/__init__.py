"""Code shared by fedaudit's server and clients: data, models, privacy ledger, run store."""

__version__ = "0.1.0"
