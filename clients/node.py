"""The node config ``fedaudit supernode`` hands ``flower-supernode --node-config``."""

from __future__ import annotations

from pathlib import Path

from clients.encryption import client_keys
from shared.data import check_node_data
from shared.protocol import NODE_DATA_DIR, NODE_KEYS_DIR, NODE_KEYS_PASSPHRASE_ENV


def supernode_config(*, partition_id: int, num_partitions: int, keys: str | Path | None, keys_passphrase_env: str | None,
                     data_dir: str | Path | None, log_file: str | Path | None = None) -> dict:
    """Check a node's client id, key and data before it connects, and give its node config.

    The checks are the ones the node's ClientApp makes on its first message, so a bad
    key or data folder is named at start-up instead of failing the first round.
    """
    from shared.errors import BadInput

    if num_partitions < 1 or not 0 <= partition_id < num_partitions:
        raise BadInput(f"--partition-id must be in 0..--num-partitions-1, got {partition_id} of {num_partitions}")
    config: dict = {"partition-id": partition_id, "num-partitions": num_partitions, NODE_KEYS_DIR: "", NODE_KEYS_PASSPHRASE_ENV: keys_passphrase_env or ""}
    if keys is not None:
        keys = Path(keys).resolve()
        client_keys(str(keys), partition_id, keys_passphrase_env or "")
        config[NODE_KEYS_DIR] = str(keys)
    if data_dir is not None:
        data_dir = Path(data_dir).resolve()
        check_node_data(data_dir)
        config[NODE_DATA_DIR] = str(data_dir)
    if log_file is not None:
        from shared.processes import open_log

        open_log(Path(log_file)).close()
    return config
