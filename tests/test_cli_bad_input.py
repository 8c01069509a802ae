"""Every bad input named in the foundation issue: one clear line, exit 2, no
traceback, and nothing written to the run store."""

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cli import app


@pytest.fixture
def csvs(tmp_path):
    rng = np.random.default_rng(0)
    good = pd.DataFrame(rng.normal(size=(60, 3)), columns=["a", "b", "c"])
    good["y"] = rng.integers(0, 2, size=60)
    good.to_csv(tmp_path / "good.csv", index=False)
    text = good.copy()
    text["b"] = "x"
    text.to_csv(tmp_path / "text.csv", index=False)
    nan = good.copy()
    nan.loc[3, "c"] = np.nan
    nan.to_csv(tmp_path / "nan.csv", index=False)
    good.head(5).to_csv(tmp_path / "tiny.csv", index=False)
    (tmp_path / "garbage.toml").write_text("rounds = = 3\n[[[")
    (tmp_path / "unknown.toml").write_text("rounds = 2\nwarp-speed = 9\n")
    for name, line in {"sigma-text": 'noise-multiplier = "abc"', "sigma-list": "noise-multiplier = [1.0]", "partition-int": "partition = 3",
                       "clients-bool": "clients = true", "data-int": "data = 5"}.items():
        (tmp_path / f"{name}.toml").write_text(line + "\n")
    return tmp_path


CASES = {
    "unknown dataset": (["--dataset", "imagenet"], "unknown dataset"),
    "unknown strategy": (["--strategy", "fedmagic"], "unknown strategy"),
    "unknown model": (["--model", "resnet"], "unknown model"),
    "missing file": (["--data", "{d}/nope.csv", "--label", "y"], "not found"),
    "missing label flag": (["--data", "{d}/good.csv"], "--label"),
    "unknown label column": (["--data", "{d}/good.csv", "--label", "target"], "label column 'target' not found"),
    "non-numeric features": (["--data", "{d}/text.csv", "--label", "y"], "non-numeric feature column(s) in text.csv: b"),
    "NaN features": (["--data", "{d}/nan.csv", "--label", "y"], "NaN or infinite values in feature column(s) of nan.csv: c"),
    "fewer samples than clients": (["--data", "{d}/tiny.csv", "--label", "y", "--clients", "10", "--test-fraction", "0"], "fewer training samples (5) than clients (10)"),
    "client smaller than batch": (["--clients", "40", "--batch-size", "64"], "fewer than --batch-size 64"),
    "noise multiplier zero": (["--noise-multiplier", "0"], "--noise-multiplier must be > 0"),
    "noise multiplier negative": (["--noise-multiplier", "-1"], "--noise-multiplier must be > 0"),
    "noise multiplier vanishing": (["--noise-multiplier", "1e-300"], "too small for the PRV accountant"),
    "delta too large": (["--delta", "0.05"], "must be below 1/(smallest client's records)"),
    "rounds zero": (["--rounds", "0"], "--rounds must be >= 1"),
    "data and dataset": (["--data", "{d}/good.csv", "--dataset", "digits", "--label", "y"], "mutually exclusive"),
    "unreadable config": (["--config", "{d}/garbage.toml"], "not valid TOML"),
    "missing config": (["--config", "{d}/absent.toml"], "config file not found"),
    "unknown config keys": (["--config", "{d}/unknown.toml"], "unknown key(s) in config file"),
    "bad partition": (["--partition", "zipf"], "unknown partition"),
    "infinite dirichlet alpha": (["--partition", "dirichlet:inf"], "ALPHA must be a finite number > 0"),
    "fraction nan": (["--fraction", "nan"], "--fraction must be a finite number, got nan"),
    "lr infinite": (["--lr", "inf"], "--lr must be a finite number"),
    "clients zero named first": (["--clients", "0"], "--clients must be >= 1"),
    "negative proximal mu": (["--proximal-mu", "-1"], "--proximal-mu must be >= 0"),
    "huge synthetic": (["--dataset", "synthetic", "--samples", "100000000000000"], "--samples must be <= 10,000,000"),
    "config text for a number": (["--config", "{d}/sigma-text.toml"], "setting noise-multiplier must be a number, got 'abc'"),
    "config list for a number": (["--config", "{d}/sigma-list.toml"], "setting noise-multiplier must be a number"),
    "config int for a string": (["--config", "{d}/partition-int.toml"], "setting partition must be a string, got 3"),
    "config bool for an int": (["--config", "{d}/clients-bool.toml"], "setting clients must be an integer, got True"),
    "config int for a path": (["--config", "{d}/data-int.toml"], "setting data must be a string"),
    "empty dataset name": (["--dataset", ""], "--dataset is empty"),
    "negative seed": (["--seed", "-1"], "--seed must be >= 0"),
    "robust aggregator with client-level DP": (["--client-dp", "--aggregator", "median"], "cannot be combined with --client-dp"),
    "text rich would read as markup": (["--dataset", "[/x]"], "unknown dataset '[/x]'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_2(case, csvs, tmp_path):
    args, expected = CASES[case]
    runs = tmp_path / "runs"
    result = CliRunner().invoke(app, ["run", *[a.format(d=csvs) for a in args], "--runs-dir", str(runs)])
    message = result.stderr.strip()
    assert result.exit_code == 2, (result.exit_code, message, result.stdout)
    assert expected in message
    assert len(message.splitlines()) == 1, message
    assert message.startswith("error: ")
    assert "Traceback" not in result.output + message
    assert not (runs / "runs.db").exists() and not any(runs.glob("*")) if runs.exists() else True


def test_unknown_run_for_show(tmp_path):
    result = CliRunner().invoke(app, ["show", "nope", "--runs-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("error: no runs stored")


@pytest.mark.parametrize("command", ["run", "runs", "show", "demo", "budget", "verify", "audit", "compare", "sweep", "keys init"])
def test_every_command_has_help(command):
    result = CliRunner().invoke(app, [*command.split(), "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_a_data_flag_replaces_the_config_files_dataset_and_back(tmp_path):
    from shared.config import resolve

    (tmp_path / "builtin.toml").write_text('dataset = "breast-cancer"\n')
    (tmp_path / "file.toml").write_text('data = "x.csv"\nlabel = "y"\n')
    cfg = resolve(tmp_path / "builtin.toml", data="x.csv", label="y", dataset=None)
    assert (cfg.data, cfg.dataset) == ("x.csv", None)
    cfg = resolve(tmp_path / "file.toml", dataset="digits", data=None)
    assert (cfg.data, cfg.dataset) == (None, "digits")


@pytest.mark.parametrize("kind", ["corrupt", "db-is-a-folder", "runs-dir-is-a-file"])
def test_an_unusable_run_store_is_bad_input_and_leaves_nothing(kind, tmp_path):
    runs = tmp_path / "runs"
    if kind == "runs-dir-is-a-file":
        runs.write_text("")
    else:
        runs.mkdir()
        if kind == "corrupt":
            (runs / "runs.db").write_text("garbage")
        else:
            (runs / "runs.db").mkdir()
    before = sorted(p.name for p in runs.iterdir()) if runs.is_dir() else None
    result = CliRunner().invoke(app, ["run", "--clients", "3", "--rounds", "1", "--runs-dir", str(runs)])
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert message.startswith("error: ") and len(message.splitlines()) == 1
    assert "run store" in message or "is a file" in message
    if before is not None:
        assert sorted(p.name for p in runs.iterdir()) == before  # no run folder or keys left behind


@pytest.mark.parametrize("command", [["runs"], ["runs", "--json"], ["show", "r1"]])
@pytest.mark.parametrize("column, value", [("config", "{bad"), ("info", "[1]")])
def test_a_damaged_row_in_the_run_store_is_one_line_naming_the_run(command, column, value, tmp_path):
    import sqlite3

    from shared.store import RunStore

    RunStore(tmp_path).create_run("r1", {"rounds": 1})
    with sqlite3.connect(tmp_path / "runs.db") as conn:
        conn.execute(f"UPDATE runs SET {column} = ?", (value,))
    result = CliRunner().invoke(app, [*command, "--runs-dir", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == f"error: the run store {tmp_path / 'runs.db'} is damaged: run 'r1' has no readable {column}"


def test_a_stored_error_is_shown_without_terminal_colour_codes(tmp_path):
    import json

    from shared.store import RunStore

    store = RunStore(tmp_path)
    store.create_run("r1", {"rounds": 1})
    store.finish_run("r1", "failed", "\x1b[36m(ClientAppActor pid=1)\x1b[0m \x1b[31mRayTaskError\x1b[0m: boom")
    result = CliRunner().invoke(app, ["show", "r1", "--json", "--runs-dir", str(tmp_path)])
    assert json.loads(result.stdout)["error"] == "(ClientAppActor pid=1) RayTaskError: boom"


@pytest.mark.parametrize("args, named", [(["keys", "init", ""], "'DIRECTORY'"), (["run", "--data", "", "--label", "y"], "'--data'"),
                                         (["runs", "--runs-dir", " "], "'--runs-dir'"), (["superlink", "--insecure", "--database", ""], "'--database'")])
def test_an_empty_path_is_refused_not_read_as_the_current_folder(args, named, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and f"Invalid value for {named}: is empty" in result.stderr, result.output
    assert not any(tmp_path.iterdir())


def test_runs_json_is_one_object(tmp_path):
    import json

    result = CliRunner().invoke(app, ["runs", "--json", "--runs-dir", str(tmp_path)])
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {"runs_dir": str(tmp_path.resolve()), "runs": []}


def test_budget_refuses_both_a_noise_multiplier_and_a_target():
    result = CliRunner().invoke(app, ["budget", "--sample-rate", "0.1", "--steps", "10", "--delta", "1e-5", "--noise-multiplier", "1", "--target-epsilon", "3"])
    assert result.exit_code == 2 and "not both" in result.stderr


def test_budget_names_a_missing_step_count():
    result = CliRunner().invoke(app, ["budget", "--sample-rate", "0.1", "--delta", "1e-5", "--noise-multiplier", "1"])
    assert result.exit_code == 2 and result.stderr.strip() == "error: --steps is required with --sample-rate"


def test_paths_that_look_like_markup_print_as_they_are(tmp_path):
    keys = tmp_path / "[/x]" / "keys"
    result = CliRunner().invoke(app, ["keys", "init", str(keys), "--clients", "2"])
    assert result.exit_code == 0, result.output
    assert f"in {keys}" in result.stdout
    result = CliRunner().invoke(app, ["runs", "--runs-dir", str(tmp_path / "[bold]")])
    assert result.exit_code == 0 and "[bold]" in result.output


@pytest.mark.parametrize("extra, named", [(["--rounds", "3"], "--rounds"), (["--keys", "k"], "--keys"),
                                          (["--keys-passphrase-env", "P"], "--keys-passphrase-env")])
def test_resume_refuses_flags_that_would_change_the_stored_run(extra, named, tmp_path):
    result = CliRunner().invoke(app, ["run", "--resume", "some-run", *extra, "--runs-dir", str(tmp_path)])
    assert result.exit_code == 2 and f"drop {named}" in result.stderr, result.output


def test_a_large_federation_prints_the_head_and_tail_of_its_client_table():
    from rich.console import Console

    from cli import CLIENT_ROWS, _clients_table

    rows = [{"client": i, "num_train": 10, "num_val": 2, "label_histogram": [4, 6]} for i in range(1000)]
    console = Console(width=200, record=True)
    console.print(_clients_table(rows))
    text = console.export_text()
    assert _clients_table(rows).row_count == CLIENT_ROWS + 1
    assert "975 more clients" in text and "│    999 │" in text and "│    990 │" not in text


def test_help_shows_required_and_defaults_without_escapes():
    result = CliRunner().invoke(app, ["show", "--help"])
    assert "[required]" in result.output and "\\[" not in result.output
    result = CliRunner().invoke(app, ["superlink", "--help"])
    assert "[default: 9093]" in result.output and "\\[" not in result.output


def test_no_command_prints_the_help_not_an_error():
    from tests.conftest import run_cli

    proc = run_cli()
    assert proc.returncode == 2 and proc.stderr.startswith("Usage: ") and "error" not in proc.stderr.splitlines()[0]
    assert "Commands:" in proc.stderr and "Traceback" not in proc.stderr


def test_resume_refuses_a_run_whose_process_is_still_alive(tmp_path):
    from shared.store import RunStore, this_process

    store = RunStore(tmp_path)
    # Owned by this very process: alive, on this host.
    store.create_run("20261203-000000-abcdef", {}, info={"owner": this_process(), "keys_dir": str(tmp_path), "model": "logreg"})
    result = CliRunner().invoke(app, ["run", "--resume", "20261203-000000-abcdef", "--runs-dir", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "is still running (pid" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert store.get_run("20261203-000000-abcdef").status == "running"  # untouched


def test_resume_refuses_a_run_marked_running_on_another_host_unless_told_it_is_gone(tmp_path):
    from shared.store import RunStore, this_process

    store = RunStore(tmp_path)
    owner = {**this_process(), "host": "another-host.example"}
    store.create_run("20261206-000000-abcdef", {}, info={"owner": owner, "model": "logreg"})
    result = CliRunner().invoke(app, ["run", "--resume", "20261206-000000-abcdef", "--runs-dir", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "marked running by pid" in result.stderr and "another-host.example" in result.stderr and "--owner-gone" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert store.get_run("20261206-000000-abcdef").status == "running"  # untouched
    # Told the other host's process is gone, it goes on to the next check (this run was never set up).
    result = CliRunner().invoke(app, ["run", "--resume", "20261206-000000-abcdef", "--owner-gone", "--runs-dir", str(tmp_path)])
    assert result.exit_code == 2 and "stopped before it was set up" in result.stderr, result.output
    result = CliRunner().invoke(app, ["run", "--owner-gone", "--runs-dir", str(tmp_path)])
    assert result.exit_code == 2 and "--owner-gone goes with --resume" in result.stderr, result.output


@pytest.mark.parametrize("args", [["keys", "init", "KEYS", "--clients", "2", "--passphrase-env", ""],
                                  ["run", "--keys", "KEYS", "--keys-passphrase-env", ""]])
def test_an_empty_passphrase_variable_name_is_refused_not_read_as_none(args, tmp_path):
    args = [str(tmp_path / "k") if a == "KEYS" else a for a in args]
    if args[0] == "run":
        assert CliRunner().invoke(app, ["keys", "init", str(tmp_path / "k"), "--clients", "10"]).exit_code == 0
        args += ["--runs-dir", str(tmp_path / "runs")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "names no variable" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    if args[0] == "keys":
        assert not (tmp_path / "k").exists()
    assert not (tmp_path / "runs" / "runs.db").exists()


def test_more_cpus_per_client_than_this_machine_has_is_refused(tmp_path):
    # Ray would start no actor and the simulation would crash after the run was stored.
    result = CliRunner().invoke(app, ["run", "--cpus-per-client", "1000", "--runs-dir", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "--cpus-per-client 1000" in result.stderr and "CPUs" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs.db").exists()


def test_audit_caps_the_reference_models(tmp_path):
    result = CliRunner().invoke(app, ["audit", "some-run", "--reference-models", "100000", "--runs-dir", str(tmp_path)])
    assert result.exit_code == 2 and "--reference-models must be in 0..64" in result.stderr, result.output
