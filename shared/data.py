"""Datasets, splits and client partitions.

Everything here is deterministic for a given :class:`DataSpec` (it carries the seed),
so the server and every client rebuild exactly the same split from the spec alone,
without shipping data over the federation.
"""

from __future__ import annotations

import logging
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

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DataMeta:
    num_features: int
    num_classes: int
    image_side: int | None
    default_model: str


@dataclass
class Prepared:
    meta: DataMeta
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    client_indices: list[np.ndarray]  # indices into x_train, one array per client


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


def _read_table(path: Path, label: str | None) -> tuple[np.ndarray, np.ndarray]:
    import pandas as pd

    if not path.exists():
        raise BadInput(f"data file not found: {path}")
    if path.suffix not in DATA_SUFFIXES:
        raise BadInput(f"unsupported data file {path.name}: use .csv or .parquet")
    try:
        frame = pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)
    except Exception as exc:  # pandas raises many types for unreadable files
        raise BadInput(f"cannot read data file {path}: {str(exc).splitlines()[0]}") from None
    if not label:
        raise BadInput("--label COLUMN is required with --data")
    if label not in frame.columns:
        raise BadInput(f"label column {label!r} not found in {path.name}; columns are: {', '.join(map(str, frame.columns))}")
    features = frame.drop(columns=[label])
    if features.shape[1] == 0:
        raise BadInput(f"{path.name} has no feature columns besides the label {label!r}")
    non_numeric = [str(c) for c in features.columns if not pd.api.types.is_numeric_dtype(features[c])]
    if non_numeric:
        raise BadInput(f"non-numeric feature column(s) in {path.name}: {', '.join(non_numeric)}")
    x = features.to_numpy(dtype=np.float32)
    if not np.isfinite(x).all():
        bad = [str(c) for c in features.columns if not np.isfinite(features[c].to_numpy(dtype=np.float64)).all()]
        raise BadInput(f"NaN or infinite values in feature column(s) of {path.name}: {', '.join(bad)}")
    labels = frame[label]
    if labels.isna().any():
        raise BadInput(f"missing values in label column {label!r} of {path.name}")
    return x, labels.to_numpy()


def data_files(data: str) -> list[Path]:
    """The files behind ``--data``: one file, or one file per client in a folder."""
    path = Path(data)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in DATA_SUFFIXES)
        if not files:
            raise BadInput(f"no .csv or .parquet files in data folder {path}")
        return files
    if not path.exists():
        raise BadInput(f"data file not found: {path}")
    return [path]


def _encode_labels(raw: list[np.ndarray]) -> tuple[list[np.ndarray], int]:
    classes = np.unique(np.concatenate(raw))
    if len(classes) < 2:
        raise BadInput("the label column holds fewer than 2 classes")
    return [np.searchsorted(classes, r).astype(np.int64) for r in raw], len(classes)


# ----------------------------------------------------------------------------- splitting


def _split_test(x: np.ndarray, y: np.ndarray, fraction: float, seed: int):
    from sklearn.model_selection import train_test_split

    if fraction <= 0:
        return x, y, x[:0], y[:0]
    counts = np.bincount(y)
    stratify = y if counts[counts > 0].min() >= 2 else None
    try:
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=fraction, random_state=seed, stratify=stratify)
    except ValueError as exc:
        raise BadInput(f"cannot make a test split of {fraction}: {exc}") from None
    return x_tr, y_tr, x_te, y_te


def _standardize(x_train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    # Fitted on training records only, never on the server's test split.
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std[std == 0] = 1.0
    return [((a - mean) / std).astype(np.float32) for a in (x_train, *others)]


def _partition(y: np.ndarray, spec: DataSpec) -> list[np.ndarray]:
    import datasets as hf
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    hf.disable_progress_bars()
    logging.getLogger("datasets").setLevel(logging.ERROR)
    n = len(y)
    if n < spec.num_clients:
        raise BadInput(f"fewer training samples ({n}) than clients ({spec.num_clients})")
    rng = np.random.default_rng(spec.seed)
    kind, _, arg = spec.partition.partition(":")
    if kind == "iid" and not arg:
        # IidPartitioner shards contiguously: shuffle first so shards are random.
        order = rng.permutation(n)
        table = hf.Dataset.from_dict({"idx": order, "label": y[order]})
        partitioner = IidPartitioner(num_partitions=spec.num_clients)
    elif kind == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            raise BadInput(f"bad partition {spec.partition!r}: use dirichlet:ALPHA with a number ALPHA > 0") from None
        if not alpha > 0:
            raise BadInput(f"bad partition {spec.partition!r}: ALPHA must be > 0")
        table = hf.Dataset.from_dict({"idx": np.arange(n), "label": y})
        partitioner = DirichletPartitioner(
            num_partitions=spec.num_clients,
            partition_by="label",
            alpha=alpha,
            min_partition_size=2,
            self_balancing=False,
            shuffle=True,
            seed=spec.seed,
        )
    else:
        raise BadInput(f"unknown partition {spec.partition!r}; use iid or dirichlet:ALPHA")
    partitioner.dataset = table
    try:
        return [np.asarray(partitioner.load_partition(i)["idx"], dtype=np.int64) for i in range(spec.num_clients)]
    except ValueError as exc:
        raise BadInput(f"cannot partition {n} samples into {spec.num_clients} clients with {spec.partition}: {exc}") from None


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
        labels, num_classes = _encode_labels([t[1] for t in tables])
        meta = DataMeta(widths.pop(), num_classes, None, "mlp")
        if len(files) > 1:
            if spec.num_clients != len(files):
                raise BadInput(f"data folder {spec.data} holds {len(files)} files but --clients is {spec.num_clients}")
            # One file per client: each file keeps its records; the server's test split
            # takes the same stratified fraction from every file.
            parts = [_split_test(t[0], lab, spec.test_fraction, spec.seed) for t, lab in zip(tables, labels)]
            x_train = np.concatenate([p[0] for p in parts])
            y_train = np.concatenate([p[1] for p in parts])
            x_test = np.concatenate([p[2] for p in parts])
            y_test = np.concatenate([p[3] for p in parts])
            bounds = np.cumsum([0] + [len(p[1]) for p in parts])
            client_indices = [np.arange(bounds[i], bounds[i + 1]) for i in range(len(parts))]
            x_train, x_test = _standardize(x_train, x_test)
            return Prepared(meta, x_train, y_train, x_test, y_test, client_indices)
        x, y = tables[0][0], labels[0]
    else:
        x, y, meta = _builtin(spec)

    x_train, y_train, x_test, y_test = _split_test(x, y, spec.test_fraction, spec.seed)
    if spec.dataset != "digits":
        x_train, x_test = _standardize(x_train, x_test)
    client_indices = _partition(y_train, spec)
    return Prepared(meta, x_train, y_train, x_test, y_test, client_indices)


def client_data(spec: DataSpec, partition_id: int) -> ClientData:
    """A client's local training and validation records."""
    from sklearn.model_selection import train_test_split

    prepared = prepare(spec)
    if not 0 <= partition_id < len(prepared.client_indices):
        raise BadInput(f"partition id {partition_id} out of range for {len(prepared.client_indices)} clients")
    idx = prepared.client_indices[partition_id]
    x, y = prepared.x_train[idx], prepared.y_train[idx]
    n_val = int(round(len(y) * spec.val_fraction))
    if n_val < 1 or len(y) - n_val < 1:
        return ClientData(x, y, x[:0], y[:0])
    x_tr, x_val, y_tr, y_val = train_test_split(x, y, test_size=n_val, random_state=spec.seed + partition_id)
    return ClientData(x_tr, y_tr, x_val, y_val)


def label_histogram(y: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(y, minlength=num_classes).astype(int).tolist()


def local_client_data(data_dir: str, label: str | None, val_fraction: float, seed: int, num_classes: int) -> ClientData:
    """A real node's own records (``fedaudit supernode --data-dir``).

    ``data_dir`` is one .csv/.parquet file, or a folder holding exactly one. The label
    column is the run's ``--label`` (``label`` if the run names none) and must hold
    integer class ids ``0 .. num_classes-1``, the same on every node. Features are used
    as given: scale them the same way on every node and in the server's test data.
    """
    from sklearn.model_selection import train_test_split

    files = data_files(data_dir)
    if len(files) != 1:
        raise BadInput(f"node data folder {data_dir} holds {len(files)} data files; give it exactly one")
    x, raw = _read_table(files[0], label or "label")
    if not np.issubdtype(raw.dtype, np.number) or not np.all(np.mod(raw, 1) == 0):
        raise BadInput(f"labels in {files[0].name} must be integer class ids")
    y = raw.astype(np.int64)
    if y.min() < 0 or y.max() >= num_classes:
        raise BadInput(f"labels in {files[0].name} must lie in 0..{num_classes - 1} (the run's classes), found {y.min()}..{y.max()}")
    n_val = int(round(len(y) * val_fraction))
    if n_val < 1 or len(y) - n_val < 1:
        return ClientData(x, y, x[:0], y[:0])
    x_tr, x_val, y_tr, y_val = train_test_split(x, y, test_size=n_val, random_state=seed)
    return ClientData(x_tr, y_tr, x_val, y_val)
