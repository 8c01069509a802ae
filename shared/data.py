"""Datasets, splits and client partitions.

Everything here is deterministic for a given :class:`DataSpec` (it carries the seed),
so the server and every client rebuild exactly the same split from the spec alone,
without shipping data over the federation.

Partitions are lazy: :func:`prepare` keeps one permutation of the training records and
the offsets where each client's share starts (:class:`Partitions`), and a client's
records are gathered only when :func:`client_data` asks for that client. Memory is the
training set plus one integer per client, whatever the number of clients.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from shared.errors import BadInput

BUILTIN_DATASETS = ("digits", "breast-cancer", "synthetic")
DATA_SUFFIXES = (".csv", ".parquet")


@dataclass(frozen=True)
class DataSpec:
    """What a node needs to rebuild its data: hashable, so partitions can be cached."""

    dataset: str | None = "digits"
    data: str | None = None
    label: str | None = None
    num_clients: int = 10
    partition: str = "iid"
    seed: int = 0
    test_fraction: float = 0.2
    val_fraction: float = 0.1
    synthetic_samples: int = 2000
    synthetic_features: int = 20
    synthetic_classes: int = 2
    # One-run audit: this many records of the test split become the canary pool.
    canaries: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DataMeta:
    num_features: int
    num_classes: int
    image_side: int | None
    default_model: str


class Partitions(Sequence):
    """Every client's indices into the training records, built on demand.

    Stored as one ordering of the training records and ``N + 1`` offsets: client ``i``
    holds ``order[starts[i]:starts[i + 1]]``. Indexing returns a read-only view, so
    asking for one client copies nothing and builds no other client's share.

    Parameters
    ----------
    order : numpy.ndarray
        Indices into the training records, grouped client by client.
    starts : numpy.ndarray
        ``N + 1`` non-decreasing offsets into ``order``, from 0 to ``len(order)``.
    """

    def __init__(self, order: np.ndarray, starts: np.ndarray):
        self._order = np.asarray(order, dtype=np.int64)
        self._starts = np.asarray(starts, dtype=np.int64)
        self._order.flags.writeable = False
        if self._starts[0] != 0 or self._starts[-1] != len(self._order) or (np.diff(self._starts) < 0).any():
            raise ValueError("partition offsets must rise from 0 to the number of records")

    def __len__(self) -> int:
        return len(self._starts) - 1

    def __getitem__(self, partition_id: int) -> np.ndarray:
        # Sequence iteration stops at IndexError; negative ids are not client ids.
        if not 0 <= partition_id < len(self):
            raise IndexError(partition_id)
        return self._order[self._starts[partition_id]:self._starts[partition_id + 1]]

    def sizes(self) -> np.ndarray:
        """Records per client, read from the offsets (no client's indices are built)."""
        return np.diff(self._starts)


@dataclass
class Prepared:
    meta: DataMeta
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    client_indices: Partitions  # indices into x_train, one read-only array per client, built on demand
    # The canary pool (see carve_canaries): records taken out of the test split, with
    # the wrong label each canary is trained on. Which canaries are used is secret.
    canary_x: np.ndarray | None = None
    canary_y: np.ndarray | None = None


@dataclass
class ClientData:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


# ----------------------------------------------------------------------------- loading


def _builtin(spec: DataSpec) -> tuple[np.ndarray, np.ndarray, DataMeta]:
    from sklearn import datasets

    if spec.dataset == "digits":
        bunch = datasets.load_digits()
        # Pixel intensities are 0..16 by construction: a fixed, data-independent map
        # to [-1, 1] leaks nothing about any record (centred inputs train far better).
        x = bunch.data.astype(np.float32) / 8.0 - 1.0
        return x, bunch.target.astype(np.int64), DataMeta(64, 10, 8, "logreg")
    if spec.dataset == "breast-cancer":
        bunch = datasets.load_breast_cancer()
        return bunch.data.astype(np.float32), bunch.target.astype(np.int64), DataMeta(30, 2, None, "logreg")
    if spec.dataset == "synthetic":
        if spec.synthetic_classes < 2 or spec.synthetic_features < 2 or spec.synthetic_samples < 2:
            raise BadInput("synthetic data needs >= 2 samples, >= 2 features and >= 2 classes")
        informative = max(2, min(spec.synthetic_features, int(np.ceil(np.log2(spec.synthetic_classes))) + 2))
        x, y = datasets.make_classification(
            n_samples=spec.synthetic_samples,
            n_features=spec.synthetic_features,
            n_informative=informative,
            n_redundant=0,
            n_classes=spec.synthetic_classes,
            n_clusters_per_class=1,
            random_state=spec.seed,
        )
        return x.astype(np.float32), y.astype(np.int64), DataMeta(spec.synthetic_features, spec.synthetic_classes, None, "mlp")
    raise BadInput(f"unknown dataset {spec.dataset!r}; choose one of {', '.join(BUILTIN_DATASETS)}")


def _read_frame(path: Path):
    """``path`` as a pandas frame, refused with one clear line if it cannot serve as data."""
    import pandas as pd

    if not path.exists():
        raise BadInput(f"data file not found: {path}")
    if path.suffix not in DATA_SUFFIXES:
        raise BadInput(f"unsupported data file {path.name}: use .csv or .parquet")
    try:
        frame = pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)
    except Exception as exc:  # pandas raises many types for unreadable files
        raise BadInput(f"cannot read data file {path}: {str(exc).splitlines()[0]}") from None
    if path.suffix == ".csv":
        # pandas renames a repeated header (y, y.1): a second label column would turn
        # into a feature and leak the label into training.
        import csv

        try:
            # As pandas reads it: a BOM dropped, blank lines skipped, empty names unnamed.
            with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
                header = next((row for row in csv.reader(f) if any(cell.strip() for cell in row)), [])
        except csv.Error as exc:
            raise BadInput(f"cannot read the header of {path.name}: {exc}") from None
        names = [c.strip() for c in header if c.strip()]
        repeated = sorted({c for c in names if names.count(c) > 1})
        if repeated:
            raise BadInput(f"repeated column name(s) in {path.name}: {', '.join(repeated)}")
    if frame.empty:
        raise BadInput(f"{path.name} has no data rows")
    return frame


def _non_numeric(frame) -> list[str]:
    import pandas as pd

    return [str(c) for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]


def _flagged_columns(columns, flags: np.ndarray) -> list[str]:
    """Names of the columns with any flagged value (``flags``: rows x columns)."""
    return [str(c) for c, hit in zip(columns, flags.any(axis=0)) if hit]


def _read_table(path: Path, label: str | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    frame = _read_frame(path)
    if not label:
        raise BadInput("--label COLUMN is required with --data")
    if label not in frame.columns:
        raise BadInput(f"label column {label!r} not found in {path.name}; columns are: {', '.join(map(str, frame.columns))}")
    features = frame.drop(columns=[label])
    if features.shape[1] == 0:
        raise BadInput(f"{path.name} has no feature columns besides the label {label!r}")
    non_numeric = _non_numeric(features)
    if non_numeric:
        raise BadInput(f"non-numeric feature column(s) in {path.name}: {', '.join(non_numeric)}")
    wide = features.to_numpy(dtype=np.float64)
    for problem, bad_values in (("NaN or infinite values", ~np.isfinite(wide)), ("values beyond float32's range (about 3.4e38)", np.abs(np.nan_to_num(wide)) > np.finfo(np.float32).max)):
        bad = _flagged_columns(features.columns, bad_values)
        if bad:
            raise BadInput(f"{problem} in feature column(s) of {path.name}: {', '.join(bad)}")
    labels = frame[label]
    if labels.isna().any():
        raise BadInput(f"missing values in label column {label!r} of {path.name}")
    return wide.astype(np.float32), labels.to_numpy(), [str(c) for c in features.columns]


def _natural_key(path: Path) -> list:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", path.name)] + [(2, 0, path.name)]


def data_files(data: str) -> list[Path]:
    """The files behind ``--data``: one file, or one file per client in a folder."""
    path = Path(data)
    if path.is_dir():
        # Natural order, so that client i is file i for site2 before site10.
        files = sorted((p for p in path.iterdir() if p.suffix in DATA_SUFFIXES), key=_natural_key)
        if not files:
            raise BadInput(f"no .csv or .parquet files in data folder {path}")
        return files
    if not path.exists():
        raise BadInput(f"data file not found: {path}")
    return [path]


def _encode_labels(raw: list[np.ndarray]) -> tuple[list[np.ndarray], int]:
    try:
        classes = np.unique(np.concatenate(raw))
    except TypeError:
        raise BadInput("the label column mixes numbers and text (across files or rows); use one kind of label") from None
    if len(classes) < 2:
        raise BadInput("the label column holds fewer than 2 classes")
    if classes.dtype.kind == "f" and not np.all(classes == np.round(classes)):
        # A regression target would otherwise become one class per distinct value.
        example = classes[classes != np.round(classes)][0]
        raise BadInput(f"the label column holds non-integer numbers (e.g. {example:g}); fedaudit trains classifiers, so labels must be classes")
    return [np.searchsorted(classes, r).astype(np.int64) for r in raw], len(classes)


# ----------------------------------------------------------------------------- splitting


def _split_test(x: np.ndarray, y: np.ndarray, fraction: float, seed: int):
    from sklearn.model_selection import train_test_split

    if fraction <= 0:
        return x, y, x[:0], y[:0]
    # A class with a single record cannot be stratified; it stays in training and the
    # other classes are still stratified (instead of dropping stratification for all).
    counts = np.bincount(y)
    rare = counts[y] < 2
    keep = np.flatnonzero(~rare)
    try:
        tr, te = train_test_split(keep, test_size=fraction, random_state=seed, stratify=y[keep])
    except ValueError as exc:
        raise BadInput(f"cannot make a test split of {fraction}: {exc}") from None
    tr = np.concatenate([tr, np.flatnonzero(rare)])
    return x[tr], y[tr], x[te], y[te]


def _standardize(x_train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    # Fitted on training records only, never on the server's test split.
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std[std == 0] = 1.0
    return [((a - mean) / std).astype(np.float32) for a in (x_train, *others)]


def _shard_starts(n: int, num_clients: int) -> np.ndarray:
    """Offsets of ``num_clients`` contiguous shards of ``n`` records.

    The first ``n % num_clients`` shards get one record more: the same shards as
    flwr-datasets' IidPartitioner (``Dataset.shard(contiguous=True)``), so partitions
    did not change when they became lazy.
    """
    div, mod = divmod(n, num_clients)
    ids = np.arange(num_clients + 1, dtype=np.int64)
    return div * ids + np.minimum(ids, mod)


def _dirichlet(y: np.ndarray, spec: DataSpec, alpha: float) -> Partitions:
    # A Dirichlet split is one joint draw over all clients (each class's records are
    # divided among every client at once), so it cannot be computed per client. It is
    # drawn once and kept in the same compact form as an IID split: one ordering of the
    # records plus offsets, never one table per client.
    import datasets as hf
    from flwr_datasets.partitioner import DirichletPartitioner

    hf.disable_progress_bars()
    logging.getLogger("datasets").setLevel(logging.ERROR)
    partitioner = DirichletPartitioner(
        num_partitions=spec.num_clients,
        partition_by="label",
        alpha=alpha,
        min_partition_size=2,
        self_balancing=False,
        shuffle=True,
        seed=spec.seed,
    )
    partitioner.dataset = hf.Dataset.from_dict({"idx": np.arange(len(y)), "label": y})
    try:
        with warnings.catch_warnings():
            # It warns on every retry of a draw with an empty client; the error says enough.
            warnings.simplefilter("ignore", UserWarning)
            first = np.asarray(partitioner.load_partition(0)["idx"], dtype=np.int64)
    except ValueError as exc:
        raise BadInput(f"cannot partition {len(y)} samples into {spec.num_clients} clients with {spec.partition}: {exc}") from None
    # The first load drew the whole assignment; reading it directly avoids building one
    # Dataset per client (seconds at thousands of clients). The table's idx column is
    # arange(n), so these are exactly the indices load_partition returns (tested).
    assignment = getattr(partitioner, "_partition_id_to_indices", None)
    if assignment is None or len(assignment) != spec.num_clients:
        parts = [first] + [np.asarray(partitioner.load_partition(i)["idx"], dtype=np.int64) for i in range(1, spec.num_clients)]
    else:
        parts = [np.asarray(assignment[i], dtype=np.int64) for i in range(spec.num_clients)]
    starts = np.zeros(spec.num_clients + 1, dtype=np.int64)
    np.cumsum([len(p) for p in parts], out=starts[1:])
    return Partitions(np.concatenate(parts) if parts else np.zeros(0, np.int64), starts)


def _partition(y: np.ndarray, spec: DataSpec) -> Partitions:
    n = len(y)
    if n < spec.num_clients:
        raise BadInput(f"fewer training samples ({n}) than clients ({spec.num_clients})")
    kind, _, arg = spec.partition.partition(":")
    if kind == "iid" and not arg:
        # Shuffle once, then contiguous shards: a client's share is a slice of the permutation.
        order = np.random.default_rng(spec.seed).permutation(n)
        return Partitions(order, _shard_starts(n, spec.num_clients))
    if kind == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            raise BadInput(f"bad partition {spec.partition!r}: use dirichlet:ALPHA with a number ALPHA > 0") from None
        if not 0 < alpha < math.inf:
            raise BadInput(f"bad partition {spec.partition!r}: ALPHA must be a finite number > 0")
        return _dirichlet(y, spec, alpha)
    raise BadInput(f"unknown partition {spec.partition!r}; use iid or dirichlet:ALPHA")


# ----------------------------------------------------------------------------- public


@lru_cache(maxsize=8)
def prepare(spec: DataSpec) -> Prepared:
    """Load, split, scale and partition the data described by ``spec``."""
    if spec.num_clients < 1:
        raise BadInput(f"--clients must be >= 1, got {spec.num_clients}")
    if not (0.0 <= spec.test_fraction < 1.0):
        raise BadInput(f"--test-fraction must be in [0, 1), got {spec.test_fraction}")
    if not (0.0 <= spec.val_fraction < 1.0):
        raise BadInput(f"--val-fraction must be in [0, 1), got {spec.val_fraction}")
    if spec.data and spec.dataset:
        raise BadInput("--data and --dataset are mutually exclusive")

    if spec.data:
        files = data_files(spec.data)
        tables = [_read_table(f, spec.label) for f in files]
        widths = {t[0].shape[1] for t in tables}
        if len(widths) != 1:
            raise BadInput(f"the files in {spec.data} have different numbers of feature columns: {sorted(widths)}")
        for f, t in zip(files[1:], tables[1:]):
            if t[2] != tables[0][2]:
                raise BadInput(f"{f.name} has feature columns {', '.join(t[2])}, but {files[0].name} has {', '.join(tables[0][2])}: every file needs the same columns in the same order")
        labels, num_classes = _encode_labels([t[1] for t in tables])
        meta = DataMeta(widths.pop(), num_classes, None, "mlp")
        if Path(spec.data).is_dir():
            if spec.num_clients != len(files):
                raise BadInput(f"data folder {spec.data} holds {len(files)} file{'s' if len(files) != 1 else ''} but --clients is {spec.num_clients}")
            if spec.partition != "iid":
                raise BadInput(f"--partition {spec.partition} does not apply to a data folder: each file is one client's data")
            # One file per client: each file keeps its records; the server's test split
            # takes the same stratified fraction from every file.
            parts = [_split_test(t[0], lab, spec.test_fraction, spec.seed) for t, lab in zip(tables, labels)]
            x_train = np.concatenate([p[0] for p in parts])
            y_train = np.concatenate([p[1] for p in parts])
            x_test = np.concatenate([p[2] for p in parts])
            y_test = np.concatenate([p[3] for p in parts])
            bounds = np.cumsum([0] + [len(p[1]) for p in parts])
            client_indices = Partitions(np.arange(len(y_train)), bounds)
            x_train, x_test = _standardize(x_train, x_test)
            x_test, y_test, canary_x, canary_y = carve_canaries(x_test, y_test, spec, meta.num_classes)
            return Prepared(meta, x_train, y_train, x_test, y_test, client_indices, canary_x, canary_y)
        x, y = tables[0][0], labels[0]
    else:
        x, y, meta = _builtin(spec)

    x_train, y_train, x_test, y_test = _split_test(x, y, spec.test_fraction, spec.seed)
    if spec.dataset != "digits":
        x_train, x_test = _standardize(x_train, x_test)
    client_indices = _partition(y_train, spec)
    x_test, y_test, canary_x, canary_y = carve_canaries(x_test, y_test, spec, meta.num_classes)
    return Prepared(meta, x_train, y_train, x_test, y_test, client_indices, canary_x, canary_y)


def carve_canaries(x_test: np.ndarray, y_test: np.ndarray, spec: DataSpec, num_classes: int):
    """Take ``spec.canaries`` records out of the test split as the canary pool.

    Canaries are mislabelled held-out records (Steinke et al. 2023): a record nobody
    trains on, given a seeded wrong label, is memorised only if it is included, so its
    score on the final model says whether it was. The pool and labels follow from the
    public seed; only which canaries are included (and where) is secret.

    Returns
    -------
    x_test, y_test, canary_x, canary_y
        The test split without the pool, the pool, and its wrong labels.
    """
    m = spec.canaries
    if not m:
        return x_test, y_test, None, None
    if m > len(y_test) // 2:
        raise BadInput(f"--canaries {m} is more than half of the {len(y_test)}-record test split; lower it or raise --test-fraction")
    rng = np.random.default_rng([spec.seed, 0xCA7A])
    order = rng.permutation(len(y_test))
    pool, rest = order[:m], np.sort(order[m:])
    wrong = (y_test[pool] + rng.integers(1, num_classes, size=m)) % num_classes
    return x_test[rest], y_test[rest], x_test[pool], wrong.astype(np.int64)


def _val_count(records: int, val_fraction: float) -> int:
    """How many of a client's ``records`` go to its validation split (0: none)."""
    n_val = int(round(records * val_fraction))
    return n_val if n_val >= 1 and records - n_val >= 1 else 0


def client_sizes(spec: DataSpec) -> list[int]:
    """Every client's number of training records, without building any client's data.

    Equal to ``len(client_data(spec, i).y_train)`` for every ``i``, computed from the
    partition offsets alone, so the server can check sizes and derive delta for
    thousands of clients cheaply.
    """
    sizes = prepare(spec).client_indices.sizes()
    return [int(n) - _val_count(int(n), spec.val_fraction) for n in sizes]


def client_data(spec: DataSpec, partition_id: int) -> ClientData:
    """A client's local training and validation records (only this client's are gathered)."""
    prepared = prepare(spec)
    if not 0 <= partition_id < len(prepared.client_indices):
        raise BadInput(f"partition id {partition_id} out of range for {len(prepared.client_indices)} clients")
    idx = prepared.client_indices[partition_id]
    train, val = _validation_split(len(idx), spec.val_fraction, spec.seed + partition_id)
    train, val = idx[train], idx[val]
    return ClientData(prepared.x_train[train], prepared.y_train[train], prepared.x_train[val], prepared.y_train[val])


@lru_cache(maxsize=1024)
def _validation_split(records: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the training and validation records among ``records`` (seeded).

    The split ``train_test_split`` makes of the records themselves. A simulated client
    asks for its data twice a round; sklearn's argument checks took 0.4 ms of each, so
    the positions are kept (read-only) and only the gathering is repeated.
    """
    from sklearn.model_selection import train_test_split

    n_val = _val_count(records, val_fraction)
    positions = np.arange(records)
    train, val = train_test_split(positions, test_size=n_val, random_state=seed) if n_val else (positions, positions[:0])
    train.flags.writeable = val.flags.writeable = False
    return train, val


def _with_validation(x: np.ndarray, y: np.ndarray, val_fraction: float, seed: int) -> ClientData:
    """A client's records with a seeded validation split taken out (none if too few)."""
    train, val = _validation_split(len(y), val_fraction, seed)
    return ClientData(x[train], y[train], x[val], y[val])


def label_histogram(y: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(y, minlength=num_classes).astype(int).tolist()


def node_data_file(data_dir: str | Path) -> Path:
    """A node's one data file: ``data_dir`` itself, or the only .csv/.parquet file in it."""
    files = data_files(str(data_dir))
    if len(files) != 1:
        raise BadInput(f"node data folder {data_dir} holds {len(files)} data files; give it exactly one")
    return files[0]


def check_node_data(data_dir: str | Path) -> Path:
    """Check a node's data file as far as it can be without a run, and return it.

    Which column is the label is the run's to say, so this checks what holds for every
    column of a usable file: it reads, it has rows, no header repeats, and every column
    (features and the integer label alike) is numeric with no missing or infinite value.
    :func:`local_client_data` checks the label and class range when a run starts.
    """
    file = node_data_file(data_dir)
    frame = _read_frame(file)
    non_numeric = _non_numeric(frame)
    if non_numeric:
        raise BadInput(f"non-numeric column(s) in {file.name}: {', '.join(non_numeric)} (a node's columns are numeric features and an integer label)")
    bad = _flagged_columns(frame.columns, ~np.isfinite(frame.to_numpy(dtype=np.float64)))
    if bad:
        raise BadInput(f"NaN or infinite values in column(s) of {file.name}: {', '.join(bad)}")
    return file


def local_client_data(data_dir: str, label: str | None, val_fraction: float, seed: int, num_classes: int) -> ClientData:
    """A real node's own records (``fedaudit supernode --data-dir``).

    ``data_dir`` is one .csv/.parquet file, or a folder holding exactly one. The label
    column is the run's ``--label`` (``label`` if the run names none) and must hold
    integer class ids ``0 .. num_classes-1``, the same on every node. Features are used
    as given: scale them the same way on every node and in the server's test data.
    """
    file = node_data_file(data_dir)
    x, raw, _ = _read_table(file, label or "label")
    if not np.issubdtype(raw.dtype, np.number) or not np.all(np.mod(raw, 1) == 0):
        raise BadInput(f"labels in {file.name} must be integer class ids")
    y = raw.astype(np.int64)
    if y.min() < 0 or y.max() >= num_classes:
        raise BadInput(f"labels in {file.name} must lie in 0..{num_classes - 1} (the run's classes), found {y.min()}..{y.max()}")
    return _with_validation(x, y, val_fraction, seed)
