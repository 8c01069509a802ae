import re

import numpy as np
import pandas as pd
import pytest

from shared.data import DataSpec, client_data, prepare
from shared.errors import BadInput


@pytest.mark.parametrize("partition", ["iid", "dirichlet:0.5", "dirichlet:5"])
@pytest.mark.parametrize("dataset", ["digits", "breast-cancer"])
def test_partition_is_complete_and_disjoint(dataset, partition):
    prepared = prepare(DataSpec(dataset=dataset, num_clients=7, partition=partition, seed=3))
    everything = np.concatenate(prepared.client_indices)
    assert len(everything) == len(prepared.y_train)  # nothing lost
    assert len(np.unique(everything)) == len(everything)  # nothing duplicated
    assert set(everything.tolist()) == set(range(len(prepared.y_train)))


@pytest.mark.parametrize("partition", ["iid", "dirichlet:0.3"])
def test_partition_is_deterministic_for_a_seed(partition):
    a = DataSpec(num_clients=5, partition=partition, seed=11)
    b = DataSpec(num_clients=5, partition=partition, seed=11, val_fraction=0.1000001)  # new cache key, same seed
    c = DataSpec(num_clients=5, partition=partition, seed=12)
    pa, pb, pc = prepare(a), prepare(b), prepare(c)
    assert all(np.array_equal(x, y) for x, y in zip(pa.client_indices, pb.client_indices))
    assert not all(np.array_equal(x, y) for x, y in zip(pa.client_indices, pc.client_indices))


def test_dirichlet_makes_label_skew():
    spec = DataSpec(num_clients=10, partition="dirichlet:0.1", seed=0)
    prepared = prepare(spec)
    shares = [np.bincount(prepared.y_train[i], minlength=10).max() / len(i) for i in prepared.client_indices]
    assert np.mean(shares) > 0.4  # iid would be ~0.1


def test_test_split_is_stratified_and_scaling_ignores_it():
    prepared = prepare(DataSpec(dataset="breast-cancer", num_clients=3, test_fraction=0.25, seed=1))
    train_share = prepared.y_train.mean()
    test_share = prepared.y_test.mean()
    assert abs(train_share - test_share) < 0.02
    # Standardised on training records only: exact zero mean there, not on test.
    assert np.allclose(prepared.x_train.mean(axis=0), 0, atol=1e-4)
    assert not np.allclose(prepared.x_test.mean(axis=0), 0, atol=1e-4)


def test_client_validation_split_is_local_and_disjoint():
    spec = DataSpec(num_clients=4, val_fraction=0.2)
    data = client_data(spec, 2)
    assert len(data.y_val) == round(0.2 * (len(data.y_val) + len(data.y_train)))
    rows = {r.tobytes() for r in data.x_train}
    assert not any(r.tobytes() in rows for r in data.x_val)


@pytest.mark.parametrize("partition", ["iid", "dirichlet:0.5"])
def test_client_split_is_sklearns_split_of_the_records(partition):
    """The cached split positions give what train_test_split gives on the records themselves."""
    from sklearn.model_selection import train_test_split

    spec = DataSpec(num_clients=5, partition=partition, val_fraction=0.15, seed=4)
    prepared = prepare(spec)
    for pid in range(5):
        idx = prepared.client_indices[pid]
        x_tr, x_val, y_tr, y_val = train_test_split(
            prepared.x_train[idx], prepared.y_train[idx], test_size=round(0.15 * len(idx)), random_state=spec.seed + pid
        )
        data = client_data(spec, pid)
        for ours, theirs in ((data.x_train, x_tr), (data.y_train, y_tr), (data.x_val, x_val), (data.y_val, y_val)):
            assert np.array_equal(ours, theirs) and ours.dtype == theirs.dtype


def test_changing_a_clients_records_changes_nobody_elses():
    spec = DataSpec(num_clients=3)
    data = client_data(spec, 1)
    expected = client_data(spec, 1).x_train.copy()
    data.x_train[:] = 99.0
    data.y_val[:] = 0
    assert np.array_equal(client_data(spec, 1).x_train, expected)
    assert not np.any(prepare(spec).x_train == 99.0)


def test_synthetic_flags_shape_the_data():
    prepared = prepare(DataSpec(dataset="synthetic", num_clients=4, synthetic_samples=500, synthetic_features=12, synthetic_classes=3))
    assert prepared.meta.num_features == 12 and prepared.meta.num_classes == 3
    assert len(prepared.y_train) + len(prepared.y_test) == 500


def test_user_csv_and_folder(tmp_path):
    rng = np.random.default_rng(0)
    frames = []
    for i in range(3):
        frame = pd.DataFrame(rng.normal(size=(40, 4)), columns=list("abcd"))
        frame["target"] = rng.integers(0, 2, size=40)
        frame.to_csv(tmp_path / f"client-{i}.csv", index=False)
        frames.append(frame)
    one = tmp_path / "all.parquet"
    pd.concat(frames).to_parquet(one)
    single = prepare(DataSpec(dataset=None, data=str(one), label="target", num_clients=3, seed=0))
    assert single.meta.num_features == 4 and len(single.y_train) + len(single.y_test) == 120
    folder = tmp_path / "nodes"
    folder.mkdir()
    for i in range(3):
        (tmp_path / f"client-{i}.csv").rename(folder / f"client-{i}.csv")
    per_client = prepare(DataSpec(dataset=None, data=str(folder), label="target", num_clients=3, test_fraction=0.25, seed=0))
    # client i = file i: each client keeps 75% of its own file
    assert [len(i) for i in per_client.client_indices] == [30, 30, 30]
    with pytest.raises(BadInput, match="holds 3 files"):
        prepare(DataSpec(dataset=None, data=str(folder), label="target", num_clients=4))
    with pytest.raises(BadInput, match="does not apply to a data folder"):
        prepare(DataSpec(dataset=None, data=str(folder), label="target", num_clients=3, partition="dirichlet:0.5"))


def test_folder_files_are_clients_in_natural_order(tmp_path):
    # site10 sorts before site2 as text; client i must still be file i.
    rng = np.random.default_rng(1)
    for i in range(11):
        frame = pd.DataFrame(rng.normal(size=(20 + i, 3)), columns=list("abc"))
        frame["target"] = np.arange(20 + i) % 2
        frame.to_csv(tmp_path / f"site{i}.csv", index=False)
    prepared = prepare(DataSpec(dataset=None, data=str(tmp_path), label="target", num_clients=11, test_fraction=0.0))
    assert [len(i) for i in prepared.client_indices] == [20 + i for i in range(11)]


def test_folder_with_one_file_is_one_client(tmp_path):
    frame = pd.DataFrame({"a": np.arange(40.0), "target": np.arange(40) % 2})
    frame.to_csv(tmp_path / "only.csv", index=False)
    with pytest.raises(BadInput, match="holds 1 file but --clients is 5"):
        prepare(DataSpec(dataset=None, data=str(tmp_path), label="target", num_clients=5))
    assert len(prepare(DataSpec(dataset=None, data=str(tmp_path), label="target", num_clients=1)).client_indices) == 1


def test_a_data_folder_sets_the_client_count_unless_given(tmp_path):
    from shared.config import resolve

    for i in range(4):
        pd.DataFrame({"a": np.arange(40.0), "target": np.arange(40) % 2}).to_csv(tmp_path / f"site{i}.csv", index=False)
    assert resolve(None, data=str(tmp_path), label="target").clients == 4
    (tmp_path / "run.toml").write_text("clients = 3\n")
    assert resolve(tmp_path / "run.toml", data=str(tmp_path), label="target").clients == 3  # given: checked against the files later
    assert resolve(None, data=str(tmp_path / "site0.csv"), label="target").clients == 10  # one file: the default


# ----------------------------------------------------------------------------- scale: lazy partitions

BIG = DataSpec(dataset="synthetic", num_clients=1000, synthetic_samples=20000, synthetic_features=8, seed=5)


def test_one_client_of_a_thousand_builds_only_that_client(monkeypatch):
    import sklearn.model_selection
    from shared.data import Partitions

    prepared = prepare(BIG)
    gathered, splits = [], []
    real_getitem, real_split = Partitions.__getitem__, sklearn.model_selection.train_test_split
    monkeypatch.setattr(Partitions, "__getitem__", lambda self, i: gathered.append(i) or real_getitem(self, i))
    monkeypatch.setattr(sklearn.model_selection, "train_test_split", lambda *a, **k: splits.append(1) or real_split(*a, **k))
    data = client_data(BIG, 123)
    assert gathered == [123] and len(splits) == 1  # no other client's indices or split
    idx = real_getitem(prepared.client_indices, 123)
    assert len(data.y_train) + len(data.y_val) == len(idx) == 16
    assert sorted(map(bytes, np.concatenate([data.x_train, data.x_val]))) == sorted(map(bytes, prepared.x_train[idx]))


def test_partition_memory_does_not_grow_with_the_client_count():
    import tracemalloc

    from shared.data import prepare as cached

    def retained(num_clients: int) -> int:
        tracemalloc.start()
        kept = cached.__wrapped__(DataSpec(dataset="synthetic", num_clients=num_clients, synthetic_samples=20000, synthetic_features=8, seed=5))
        size = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        assert len(kept.client_indices) == num_clients
        return size

    retained(10)  # warm-up: the first call also pays for imports and caches
    few, many = retained(10), retained(1000)
    # 990 more clients may cost their offsets (8 bytes each) and little else; one
    # array per client would cost about 100 bytes each on top of the indices.
    assert many - few < 16 * 1024, (few, many)


@pytest.mark.parametrize("partition", ["iid", "dirichlet:1"])
def test_thousand_partitions_are_disjoint_complete_and_deterministic(partition):
    spec = DataSpec(dataset="synthetic", num_clients=1000 if partition == "iid" else 200, synthetic_samples=20000, synthetic_features=8,
                    partition=partition, seed=5)
    a = prepare(spec).client_indices
    b = prepare.__wrapped__(spec).client_indices  # rebuilt from the spec, not the cache
    everything = np.concatenate(list(a))
    assert np.array_equal(np.sort(everything), np.arange(len(prepare(spec).y_train)))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError):
        a[0][0] = 1  # clients get read-only views of the shared ordering


@pytest.mark.parametrize("spec", [
    BIG,
    DataSpec(num_clients=7, partition="dirichlet:0.5", seed=3),
    DataSpec(num_clients=9, val_fraction=0.0),
    DataSpec(dataset="synthetic", num_clients=500, synthetic_samples=2000, val_fraction=0.3, seed=1),  # 3-4 records each
])
def test_client_sizes_match_the_built_client_data(spec):
    from shared.data import client_sizes

    assert client_sizes(spec) == [len(client_data(spec, i).y_train) for i in range(spec.num_clients)]


def test_dirichlet_partitions_equal_flwr_datasets_load_partition():
    import datasets as hf
    from flwr_datasets.partitioner import DirichletPartitioner

    spec = DataSpec(num_clients=6, partition="dirichlet:0.4", seed=2)
    prepared = prepare(spec)
    reference = DirichletPartitioner(num_partitions=6, partition_by="label", alpha=0.4, min_partition_size=2, self_balancing=False, shuffle=True, seed=2)
    reference.dataset = hf.Dataset.from_dict({"idx": np.arange(len(prepared.y_train)), "label": prepared.y_train})
    for i in range(6):
        assert np.array_equal(prepared.client_indices[i], np.asarray(reference.load_partition(i)["idx"]))


def test_iid_partitions_equal_flwr_datasets_iid_partitioner():
    import datasets as hf
    from flwr_datasets.partitioner import IidPartitioner

    spec = DataSpec(num_clients=9, seed=8)  # 1437 records: uneven shards
    prepared = prepare(spec)
    order = np.random.default_rng(8).permutation(len(prepared.y_train))
    reference = IidPartitioner(num_partitions=9)
    reference.dataset = hf.Dataset.from_dict({"idx": order})
    for i in range(9):
        assert np.array_equal(prepared.client_indices[i], np.asarray(reference.load_partition(i)["idx"]))


@pytest.mark.parametrize(
    "files, message",
    [
        ({"a.csv": "a,y,y\n1,0,0\n2,1,1\n"}, "repeated column name(s) in a.csv: y"),
        ({"a.csv": "\ufeffy,a,y\n0,1,0\n1,2,1\n"}, "repeated column name(s) in a.csv: y"),  # Excel's "CSV UTF-8"
        ({"a.csv": "\ny,a,y\n0,1,0\n1,2,1\n"}, "repeated column name(s) in a.csv: y"),  # pandas skips the blank line
        ({"a.csv": "a,b,y\n"}, "a.csv has no data rows"),
        ({"a.csv": "a,b,y\n1e39,1,0\n2,2,1\n"}, "beyond float32's range (about 3.4e38) in feature column(s) of a.csv: a"),
        ({"0.csv": "a,y\n1,0\n2,1\n", "1.csv": "a,y\n1,x\n2,z\n"}, "mixes numbers and text"),
        ({"a.csv": "a,y\n1,0.5\n2,1\n3,2.25\n"}, "non-integer numbers (e.g. 0.5)"),
        ({"0.csv": "a,b,y\n1,2,0\n2,3,1\n", "1.csv": "b,a,y\n1,2,0\n2,3,1\n"}, "the same columns in the same order"),
    ],
)
def test_odd_user_files_are_bad_input(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    data = tmp_path / next(iter(files)) if len(files) == 1 else tmp_path
    with pytest.raises(BadInput, match=re.escape(message)):
        prepare(DataSpec(dataset=None, data=str(data), label="y", num_clients=len(files), test_fraction=0.0))


def test_a_single_record_class_does_not_turn_off_stratification():
    from shared.data import _split_test

    y = np.array([0] * 900 + [1] * 99 + [2])
    x = np.arange(len(y), dtype=np.float32)[:, None]
    for seed in range(3):
        x_tr, y_tr, x_te, y_te = _split_test(x, y, 0.2, seed)
        assert np.bincount(y_te, minlength=3).tolist() == [180, 20, 0]
        assert sorted(np.concatenate([x_tr, x_te])[:, 0].tolist()) == x[:, 0].tolist()  # every record once


def test_unnamed_index_columns_are_not_repeated_names(tmp_path):
    (tmp_path / "a.csv").write_text(",,a,y\n" + "".join(f"{i},{i},{i},{i % 2}\n" for i in range(8)))
    prepared = prepare(DataSpec(dataset=None, data=str(tmp_path / "a.csv"), label="y", num_clients=2, test_fraction=0.0))
    assert prepared.meta.num_features == 3
