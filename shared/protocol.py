"""What travels in Flower messages between fedaudit's server and clients.

Flower records hold no None, so absent values are encoded as "" (strings) or 0.
"""

from __future__ import annotations

from typing import Any

from flwr.app import RecordDict

from shared.data import DataSpec

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"

# Reply metric keys.
NUM_EXAMPLES = "num-examples"
PARTITION_ID = "partition-id"
# Set to 1 in a train reply when the client's privacy budget cannot cover the round:
# such a reply carries no model.
REFUSED_KEY = "refused"

# The sealed model payload (encrypted exchange) and the config keys that turn it on.
SEALED_KEY = "sealed"
BLOB_KEY = "blob"
KEYS_DIR = "keys-dir"
KEYS_PASSPHRASE_ENV = "keys-passphrase-env"

# Node config (``flower-supernode --node-config``, set by ``fedaudit supernode``): a real
# node's own key directory and data. Their presence overrides what a message says.
NODE_KEYS_DIR = "keys-dir"
NODE_KEYS_PASSPHRASE_ENV = "keys-passphrase-env"
NODE_DATA_DIR = "data-dir"


def spec_to_record(spec: DataSpec) -> dict[str, Any]:
    return {f"data.{k}": ("" if v is None else v) for k, v in spec.to_dict().items()}


def spec_from_record(record: Any) -> DataSpec:
    values = {}
    for key in DataSpec.__dataclass_fields__:
        value = record[f"data.{key}"]
        values[key] = None if value == "" else value
    return DataSpec(**values)


def replace_record(content: RecordDict, old_key: str, new_key: str, record) -> RecordDict:
    """A new RecordDict: ``content`` with ``old_key`` replaced in place by ``new_key: record``."""
    out = RecordDict()
    for name, value in content.items():
        if name == old_key:
            out[new_key] = record
        elif name != new_key:
            out[name] = value
    if old_key not in content:
        out[new_key] = record
    return out
