"""What travels in Flower messages between fedaudit's server and clients.

Flower records hold no None, so absent values are encoded as "" (strings) or 0.
"""

from __future__ import annotations

from typing import Any

from shared.data import DataSpec

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"

# Reply metric keys.
NUM_EXAMPLES = "num-examples"
PARTITION_ID = "partition-id"


def spec_to_record(spec: DataSpec) -> dict[str, Any]:
    return {f"data.{k}": ("" if v is None else v) for k, v in spec.to_dict().items()}


def spec_from_record(record: Any) -> DataSpec:
    values = {}
    for key in DataSpec.__dataclass_fields__:
        value = record[f"data.{key}"]
        values[key] = None if value == "" else value
    return DataSpec(**values)
