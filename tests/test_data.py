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
