"""Large simulations: sampled per-client evaluation, an existing Ray cluster, and one
small real run that checks the sample end to end. The design rule (lazy partitions,
memory flat in the client count) is tested in test_data.py."""

import pytest
from flwr.serverapp.strategy import FedAvg
from typer.testing import CliRunner

from cli import app
from server.runner import ray_init_args
from server.strategies import ParticipatingClients
from shared.config import RunConfig, resolve
from shared.errors import BadInput


def _clients(n: int, fraction: float = 0.1, eval_fraction: float = 1.0, seed: int = 0) -> ParticipatingClients:
    return ParticipatingClients(FedAvg(), {pid: 1000 + pid for pid in range(n)}, fraction, seed, eval_fraction=eval_fraction)


def test_every_client_evaluates_by_default():
    assert _clients(50).evaluators(3) == list(range(50))


def test_eval_fraction_samples_a_seeded_fixed_size_set_apart_from_training():
    wrapped = _clients(1000, eval_fraction=0.1)
    first = wrapped.evaluators(1)
    assert len(first) == len(set(first)) == 100 and first == sorted(first)
    assert first == _clients(1000, eval_fraction=0.1).evaluators(1)  # same seed, same set
    assert first != wrapped.evaluators(2)  # a fresh sample each round
    assert first != _clients(1000, eval_fraction=0.1, seed=1).evaluators(1)
    assert first != wrapped.participants(1)  # its own stream, not the trained clients
    assert _clients(30, eval_fraction=0.001).evaluators(1).__len__() == 1  # at least one


@pytest.mark.parametrize("value", [0.0, -0.5, 1.5])
def test_eval_fraction_out_of_range_is_bad_input(value):
    with pytest.raises(BadInput, match="--eval-fraction"):
        resolve(None, eval_fraction=value)


@pytest.mark.parametrize("value", ["", "  ", "ray:// host:10001"])
def test_blank_ray_address_is_bad_input(value):
    with pytest.raises(BadInput, match="--ray-address"):
        resolve(None, ray_address=value)


def test_toml_keys_and_ray_init_args(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('eval-fraction = 0.25\nray-address = "ray://head:10001"\n')
    config = resolve(path)
    assert (config.eval_fraction, config.ray_address) == (0.25, "ray://head:10001")
    args = ray_init_args(config)
    assert args["address"] == "ray://head:10001" and args["log_to_driver"] is False
    assert "address" not in ray_init_args(RunConfig())  # default: Flower starts a local Ray


def test_cli_rejects_a_bad_eval_fraction_before_writing(tmp_path):
    result = CliRunner().invoke(app, ["run", "--eval-fraction", "2", "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "--eval-fraction must be in (0, 1]" in result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.simulation
def test_sampled_evaluation_end_to_end(tmp_path):
    """Each round stores exactly the sampled clients' validation accuracy; the audit's
    per-client accuracy still covers every client (it re-evaluates the final model)."""
    from audit.report import load_run, per_client_accuracy
    from clients.app import app_for_job
    from server.runner import prepare_run, run_simulation_job
    from shared.store import RunStore

    config = resolve(None, dataset="synthetic", samples=1200, clients=20, fraction=0.1, eval_fraction=0.25, rounds=2, seed=4)
    job = prepare_run(config, tmp_path)
    outcome = run_simulation_job(job, app_for_job(job))
    assert outcome.status == "completed", outcome.error
    store = RunStore(tmp_path)
    rounds = store.get_rounds(job.run_id)
    wanted = ParticipatingClients(FedAvg(), {pid: pid for pid in range(20)}, 0.1, 4, eval_fraction=0.25)
    for r in rounds:
        evaluated = sorted(c["client"] for c in r["clients"] if c["val_accuracy"] is not None)
        assert evaluated == wanted.evaluators(r["round"])
        assert r["federated_accuracy"] is not None
    run = load_run(store, job.run_id)
    assert per_client_accuracy(run.model, run.spec, run.config.clients)["n_clients"] == 20
