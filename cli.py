"""fedaudit's command line. It parses arguments and prints; the work is done by
library functions in server/, audit/ and shared/ that the tests call directly."""

from __future__ import annotations

import atexit
import functools
import gc
import json
import sys
from pathlib import Path
from typing import Any, Optional

import click
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from shared.errors import FedauditError

EXIT_OK, EXIT_GATE_FAILED, EXIT_BAD_INPUT = 0, 1, 2

# Registered first, so it runs last, after Ray's and logging's exit handlers. Python's
# exit-time garbage collections walk the ~250,000 objects torch, scipy and sklearn
# leave, which frees nothing the OS would not and costs about 0.6 s per command.
atexit.register(gc.freeze)

# Typer 0.20 escapes "[required]" and "[default: ...]" for rich even with rich help off
# (rich_markup_mode=None), and click then prints the backslashes: tell it rich is absent.
typer.core.HAS_RICH = False

# Piped output gets a fixed, roomy width instead of rich's 80-column fallback.
# markup=False: what is printed holds user text (paths, names, messages) that rich would
# otherwise parse as markup, and "[/x]" in a flag would crash the print.
out = Console(highlight=False, soft_wrap=True, markup=False, width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False, width=None if sys.stderr.isatty() else 140)


class _App(typer.Typer):
    """A Typer app whose usage errors and bad input end in one line and exit code 2."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            result = typer.main.get_command(self).main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:
            err.print(exc.format_message())  # the help itself, not an error message
            sys.exit(EXIT_BAD_INPUT)
        except click.UsageError as exc:
            err.print(f"error: {exc.format_message()}")
            sys.exit(EXIT_BAD_INPUT)
        except click.Abort:
            sys.exit(130)
        except FedauditError as exc:
            err.print(f"error: {exc}")
            sys.exit(EXIT_BAD_INPUT)
        sys.exit(result if isinstance(result, int) else EXIT_OK)


app = _App(
    help="Federated training with honest differential privacy, and audits of what it leaked.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    add_completion=False,
)


def user_errors(fn):
    """Turn :class:`FedauditError` into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FedauditError as exc:
            err.print(f"error: {exc}")
            raise typer.Exit(EXIT_BAD_INPUT) from None

    return wrapper


def _print_json(obj: Any) -> None:
    from shared.results import json_safe

    # JSON has no Infinity or NaN: an unbounded estimate prints as null.
    sys.stdout.write(json.dumps(json_safe(obj), indent=2, default=str, allow_nan=False) + "\n")
    sys.stdout.flush()


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        # A delta of 1e-05 must not print as 0.0000.
        return f"{value:.{digits}f}" if value == 0 or abs(value) >= 10**-digits else f"{value:.3g}"
    return str(value)


class _NonEmptyPath(click.ParamType):
    """A path flag's value; an empty one (an unset shell variable, say) would otherwise
    mean the current folder."""

    name = "path"

    def convert(self, value: Any, param: Any, ctx: Any) -> Path:
        if isinstance(value, Path):
            return value
        if not str(value).strip():
            self.fail("is empty", param, ctx)
        return Path(value)


PATH = _NonEmptyPath()


RUNS_DIR_HELP = "Run store folder (default ./fedaudit-runs, or $FEDAUDIT_RUNS_DIR)."
# Each reference model replays the whole federation's training in the audit process.
MAX_REFERENCE_MODELS = 64


# --------------------------------------------------------------------------- run
@app.command()
@user_errors
def run(
    dataset: Optional[str] = typer.Option(None, help="Built-in dataset: digits, breast-cancer or synthetic."),
    data: Optional[Path] = typer.Option(None, click_type=PATH, help="A .csv/.parquet file, or a folder with one file per client."),
    label: Optional[str] = typer.Option(None, help="Label column of --data."),
    clients: Optional[int] = typer.Option(None, help="Number of simulated clients."),
    rounds: Optional[int] = typer.Option(None, help="Federated rounds."),
    seed: Optional[int] = typer.Option(None, help="Seed for splits, partitions, sampling and training."),
    partition: Optional[str] = typer.Option(None, help="iid or dirichlet:ALPHA (label skew)."),
    test_fraction: Optional[float] = typer.Option(None, help="Share held by the server as its test split."),
    val_fraction: Optional[float] = typer.Option(None, help="Share of each client's records kept for local validation."),
    samples: Optional[int] = typer.Option(None, help="synthetic: number of samples."),
    features: Optional[int] = typer.Option(None, help="synthetic: number of features."),
    classes: Optional[int] = typer.Option(None, help="synthetic: number of classes."),
    model: Optional[str] = typer.Option(None, help="logreg, mlp or cnn (default: picked by dataset)."),
    strategy: Optional[str] = typer.Option(None, help="fedavg, fedprox or fedadam."),
    fraction: Optional[float] = typer.Option(None, help="Share of clients that train each round."),
    local_epochs: Optional[int] = typer.Option(None, help="Local epochs per round."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size (expected batch size under DP)."),
    lr: Optional[float] = typer.Option(None, help="Client learning rate."),
    optimizer: Optional[str] = typer.Option(None, help="sgd or adam."),
    proximal_mu: Optional[float] = typer.Option(None, help="FedProx proximal term."),
    server_lr: Optional[float] = typer.Option(None, help="FedAdam server learning rate."),
    cpus_per_client: Optional[float] = typer.Option(None, help="CPUs reserved for each simulated client."),
    eval_fraction: Optional[float] = typer.Option(
        None, help="Share of clients that evaluate the new model on their validation split each round (seeded sample; default 1: all)."
    ),
    ray_address: Optional[str] = typer.Option(
        None, help="Run on an existing Ray cluster: auto, HOST:PORT or ray://HOST:PORT (default: start a local Ray). Allowed with --resume."
    ),
    dp: Optional[bool] = typer.Option(None, "--dp/--no-dp", help="Sample-level DP-SGD on clients (default: on)."),
    noise_multiplier: Optional[float] = typer.Option(None, help="DP-SGD noise multiplier sigma."),
    max_grad_norm: Optional[float] = typer.Option(None, help="DP-SGD per-sample clipping norm."),
    delta: Optional[float] = typer.Option(None, help="Target delta (default: below 1/records of the smallest client, and 1/clients under client-level DP)."),
    target_epsilon: Optional[float] = typer.Option(None, help="Calibrate the DP-SGD noise multiplier so every client's epsilon ends <= this."),
    reproducible_noise: Optional[bool] = typer.Option(
        None, "--reproducible-noise/--fresh-noise",
        help="Derive DP sampling and noise from --seed, so a rerun repeats them (research only: whoever knows the config can remove the noise). Default: fresh OS entropy.",
    ),
    client_dp: Optional[bool] = typer.Option(None, "--client-dp/--no-client-dp", help="Client-level DP (DP-FedAvg) at the server."),
    client_noise_multiplier: Optional[float] = typer.Option(None, help="Client-level noise multiplier z."),
    client_clip: Optional[float] = typer.Option(None, help="Client-level clipping norm C for whole updates."),
    client_sample_rate: Optional[float] = typer.Option(None, help="Client-level DP: each client joins a round with this probability (Poisson)."),
    client_target_epsilon: Optional[float] = typer.Option(None, help="Calibrate z so the client-level epsilon ends <= this."),
    max_epsilon: Optional[float] = typer.Option(None, help="Budget cap: clients refuse rounds that would pass it; client-level checked at the server."),
    malicious: Optional[int] = typer.Option(None, help="Make this many clients malicious (robustness experiments)."),
    attack: Optional[str] = typer.Option(None, help="What malicious clients do: sign-flip, label-flip, gaussian or scale."),
    aggregator: Optional[str] = typer.Option(None, help="fedavg, median, trimmed-mean, krum, multikrum or bulyan (Flower's strategies)."),
    encrypt: Optional[bool] = typer.Option(None, "--encrypt/--no-encrypt", help="Seal every model payload with AES-256-GCM (default: on)."),
    min_replies: Optional[int] = typer.Option(None, help="Fewest valid client replies a round needs; fewer stops the run as failed."),
    canaries: Optional[int] = typer.Option(None, help="One-run audit: M mislabelled held-out canaries, each included with probability 1/2 in a random client's data."),
    canary_clients: Optional[int] = typer.Option(None, help="Client-level audit (needs --client-dp): add M canary clients that send random updates of norm C."),
    keys: Optional[Path] = typer.Option(None, "--keys", click_type=PATH, help="Key directory from `fedaudit keys init` (default: fresh keys in the run folder)."),
    keys_passphrase_env: Optional[str] = typer.Option(None, help="Environment variable holding the private keys' passphrase."),
    resume: Optional[str] = typer.Option(None, "--resume", metavar="RUN_ID", help="Continue an interrupted run from its last checkpoint."),
    owner_gone: bool = typer.Option(False, "--owner-gone", help="With --resume: the process that ran it on another host is stopped; resume it here."),
    config: Optional[Path] = typer.Option(None, "--config", click_type=PATH, help="run.toml; flags override it."),
    engine: str = typer.Option("simulation", "--engine", help="simulation (this machine, Ray) or deployment (a running SuperLink and its SuperNodes)."),
    superlink: Optional[str] = typer.Option(None, "--superlink", metavar="HOST:PORT", help="deployment: the SuperLink to submit to."),
    root_certificates: Optional[Path] = typer.Option(None, "--root-certificates", metavar="CA_FILE", click_type=PATH, help="deployment: CA certificate that signed the SuperLink's (default: the system's trusted CAs)."),
    insecure: bool = typer.Option(False, "--insecure", help="deployment: talk to a plain-text SuperLink (TLS is on by default)."),
    reply_timeout: Optional[float] = typer.Option(None, "--reply-timeout", metavar="SECONDS", help="deployment: how long the server waits for a round's replies (default 300)."),
    runs_dir: Optional[Path] = typer.Option(None, click_type=PATH, help=RUNS_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object to stdout."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Flower and Ray logs."),
) -> None:
    """Train a federated model on the Simulation Engine, or on a running SuperLink (--engine deployment), and store the run."""
    settings = {k: v for k, v in locals().items() if k not in {
        "config", "runs_dir", "as_json", "verbose", "resume", "owner_gone", "keys", "keys_passphrase_env", "engine", "superlink", "root_certificates", "insecure", "reply_timeout",
    }}
    from shared.config import resolve

    if engine not in ("simulation", "deployment"):
        raise FedauditError(f"unknown --engine {engine!r}; choose simulation or deployment")
    if owner_gone and resume is None:
        raise FedauditError("--owner-gone goes with --resume RUN_ID")
    if engine == "deployment":
        if resume is not None:
            raise FedauditError("--resume works on the Simulation Engine only")
        if keys_passphrase_env:
            raise FedauditError("--keys-passphrase-env: in deployment the server's keys live on the SuperLink host; give it to `fedaudit superlink`")
        if settings.get("ray_address"):
            raise FedauditError("--ray-address is for the simulation engine; a deployment runs on its SuperNodes")
        if settings["data"] is not None:
            settings["data"] = str(settings["data"])
        summary = _run_deployment(resolve(config, **settings), superlink, root_certificates, insecure, reply_timeout, runs_dir, keys, as_json=as_json, verbose=verbose)
    else:
        given = [flag for flag, v in (("--superlink", superlink), ("--root-certificates", root_certificates), ("--insecure", insecure or None), ("--reply-timeout", reply_timeout)) if v is not None]
        if given:
            raise FedauditError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --engine deployment")
        summary = _run_simulation(settings, config, resume, runs_dir, keys, keys_passphrase_env, as_json=as_json, verbose=verbose, owner_gone=owner_gone)
    if as_json:
        _print_json(summary)
    else:
        _print_summary(summary)
    if summary["status"] == "failed":
        raise typer.Exit(EXIT_GATE_FAILED)


def _run_simulation(settings: dict, config, resume, runs_dir, keys, keys_passphrase_env, *, as_json: bool, verbose: bool, owner_gone: bool = False) -> dict:
    from server.runner import prepare_resume, prepare_run
    from shared.config import resolve

    if resume is not None:
        given = sorted(k.replace("_", "-") for k, v in {**settings, "keys": keys, "keys_passphrase_env": keys_passphrase_env}.items()
                       if v is not None and k != "ray_address")
        if given or config:
            raise FedauditError(f"--resume takes the run's stored config; drop {', '.join('--' + g for g in given) or '--config'}")
        job = prepare_resume(resume, runs_dir, ray_address=settings["ray_address"], owner_gone=owner_gone)
    else:
        if settings["data"] is not None:
            settings["data"] = str(settings["data"])
        job = prepare_run(resolve(config, **settings), runs_dir, keys_dir=keys, keys_passphrase_env=keys_passphrase_env)
    return _run_with_progress(job, as_json=as_json, verbose=verbose)


def _run_deployment(cfg, superlink, root_certificates, insecure, reply_timeout, runs_dir, keys, *, as_json: bool, verbose: bool) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from server.deployment import DEFAULT_REPLY_TIMEOUT
    from server.submit import connection, prepare_deployment, run_deployment_job

    conn = connection(superlink, root_certificates, insecure)
    job = prepare_deployment(cfg, conn, runs_dir, keys, reply_timeout if reply_timeout is not None else DEFAULT_REPLY_TIMEOUT)
    modes = [m for m, on in (("sample-level DP", cfg.dp), ("client-level DP", cfg.client_dp)) if on]
    err.print(f"run {job.run_id}: submitting to SuperLink {conn.describe()}; " + (" + ".join(modes) if modes else "non-private (no DP)"))
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
        console=err, transient=False,
    )
    task = progress.add_task("waiting for the server", total=cfg.rounds, status="")
    clients_seen: list[dict] = []

    def on_event(event: dict) -> None:
        name = event.get("event")
        if name == "start":
            progress.update(task, description="waiting for SuperNodes")
            for note in event.get("notes", []):
                progress.console.print(f"  {note}")
        elif name == "error":
            progress.console.print(f"server: {event.get('error')}")

    on_clients, on_round = _round_callbacks(progress, task, clients_seen, as_json)

    with progress:
        summary = run_deployment_job(job, verbose=verbose, on_event=on_event, on_round=on_round, on_clients=on_clients,
                                     echo=lambda line: progress.console.print(line, highlight=False))
    summary["clients"] = clients_seen
    return summary


def _round_callbacks(progress, task, clients_seen: list[dict], as_json: bool, first_round: int = 0):
    """The engines' callbacks: the clients table once, then one bar step per round."""

    def on_clients(summaries: list[dict]) -> None:
        clients_seen.extend(summaries)
        progress.update(task, description="rounds")
        if not as_json:
            progress.console.print(_clients_table(summaries))

    def on_round(report) -> None:
        eps = f"  eps {report.epsilon:.3f}" if report.epsilon is not None else ""
        if report.client_epsilon is not None:
            eps += f"  client eps {report.client_epsilon:.3f}"
        acc = f"acc {report.accuracy:.3f}" if report.accuracy is not None else ""
        progress.update(task, completed=report.round - first_round, status=f"{acc}{eps}")

    return on_clients, on_round


def _run_with_progress(job, *, as_json: bool, verbose: bool, label: str = "") -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from clients.app import app_for_job
    from server.runner import run_simulation_job

    cfg = job.config
    clients_seen: list[dict] = []
    modes = [m for m, on in (("sample-level DP", cfg.dp), ("client-level DP", cfg.client_dp)) if on]
    err.print(f"run {job.run_id}{label}: " + (" + ".join(modes) + f", delta = {job.delta:g}" if modes else "non-private (no DP)"))
    for note in job.notes:
        err.print(f"  {note}")
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    )
    task = progress.add_task("starting engine", total=cfg.rounds - job.resume_from, status="")

    on_clients, on_round = _round_callbacks(progress, task, clients_seen, as_json, first_round=job.resume_from)

    with progress:
        outcome = run_simulation_job(job, app_for_job(job), verbose=verbose, on_round=on_round, on_clients=on_clients)
    summary = dict(outcome.summary)
    summary["clients"] = clients_seen
    return summary


CLIENT_ROWS = 25


def _clients_table(summaries: list[dict]) -> Table:
    table = Table(title="clients: training records and label histogram", title_justify="left")
    table.add_column("client", justify="right")
    table.add_column("train", justify="right")
    table.add_column("val", justify="right")
    table.add_column("labels (count per class)")
    # A thousand-client run would print a thousand rows: the head and tail, and the count.
    shown = summaries if len(summaries) <= CLIENT_ROWS else summaries[: CLIENT_ROWS - 5] + [None] + summaries[-5:]
    for s in shown:
        if s is None:
            hidden = len(summaries) - CLIENT_ROWS
            table.add_row("...", "", "", f"{hidden} more client{'s' if hidden != 1 else ''} (all of them in `--json` and `show --json`)")
        else:
            table.add_row(str(s["client"]), str(s["num_train"]), str(s["num_val"]), " ".join(map(str, s["label_histogram"])))
    return table


def _print_summary(summary: dict) -> None:
    table = Table(title=f"run {summary['run_id']}", show_header=False, title_justify="left")
    for key in ("engine", "superlink", "status", "rounds", "accuracy", "f1_macro", "epsilon", "epsilon_rdp", "client_epsilon", "client_epsilon_rdp", "delta",
                "accountant", "privacy_unit", "max_epsilon", "budget_left", "wall_time", "run_dir"):
        if key in summary:
            value = summary[key]
            table.add_row(key, f"{value:g}" if key == "delta" and value is not None else _fmt(value))
    if summary.get("error"):
        table.add_row("error", summary["error"])
    out.print(table)


# --------------------------------------------------------------------------- runs / show
@app.command("runs")
@user_errors
def list_runs(
    runs_dir: Optional[Path] = typer.Option(None, click_type=PATH, help=RUNS_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON to stdout."),
) -> None:
    """List stored runs."""
    from shared.summary import summarize
    from shared.store import RunStore

    store = RunStore(runs_dir)
    rows = [summarize(store, r.run_id) for r in store.list_runs()]
    if as_json:
        _print_json({"runs_dir": str(store.root), "runs": rows})
        return
    if not rows:
        out.print(f"no runs in {store.root}")
        return
    table = Table(title=f"runs in {store.root}", title_justify="left")
    for col in ("run_id", "status", "dataset", "dp", "rounds", "accuracy", "epsilon", "delta", "wall_time"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["run_id"], r["status"], str(r["dataset"]), str(r["dp"]), str(r["rounds"]),
            _fmt(r["accuracy"]), _fmt(r["epsilon"], 3), _fmt(r["delta"]), _fmt(r["wall_time"], 1),
        )
    out.print(table)


@app.command()
@user_errors
def show(
    run_id: str = typer.Argument(..., help="Run id, as listed by `fedaudit runs`."),
    runs_dir: Optional[Path] = typer.Option(None, click_type=PATH, help=RUNS_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON to stdout."),
) -> None:
    """Show a run's config, per-round metrics and privacy ledger."""
    from shared.summary import describe_run, settings_in_use
    from shared.store import RunStore

    report = describe_run(RunStore(runs_dir), run_id)
    if as_json:
        _print_json(report)
        return
    out.print(Text.assemble((f"run {run_id}", "bold"), f"  status: {report['status']}"))
    if report["error"]:
        out.print(f"error: {report['error']}")
    cfg = Table(title="config (settings that acted in this run)", show_header=False, title_justify="left")
    for k, v in settings_in_use(report["config"], report["delta"], report["model"]).items():
        cfg.add_row(k, _fmt(v))
    out.print(cfg)
    if report.get("privacy"):
        p = report["privacy"]
        out.print(f"accountant: {p['accountant']} (headline; RDP also shown), delta = {p['delta']:g}")
        for unit in p["units"]:
            out.print(f"privacy unit: {unit['unit']}: epsilon {_fmt(unit['epsilon'], 3)} ({p['accountant'].upper()}), {_fmt(unit['epsilon_rdp'], 3)} (RDP)")
        if p["max_epsilon"] is not None:
            out.print(f"budget: max epsilon {p['max_epsilon']:g}, left {_fmt(p['budget_left'], 3)}")
        out.print("assumptions:")
        for line in p["assumptions"]:
            out.print(f"  - {line}")
    rounds = Table(title="rounds", title_justify="left")
    for col in ("round", "accuracy", "loss", "epsilon", "clients (eps)"):
        rounds.add_column(col)
    for r in report["rounds"]:
        per_client = " ".join(
            f"{c['client']}:{_fmt(c['epsilon'], 2)}" if c["epsilon"] is not None else str(c["client"]) for c in r["clients"]
        )
        rounds.add_row(str(r["round"]), _fmt(r["accuracy"]), _fmt(r["loss"]), _fmt(r["epsilon"], 3), per_client)
    out.print(rounds)


# --------------------------------------------------------------------------- budget
@app.command()
@user_errors
def budget(
    sample_rate: Optional[float] = typer.Option(None, help="Raw mechanism: sampling rate q."),
    steps: Optional[int] = typer.Option(None, help="Raw mechanism: number of steps T."),
    noise_multiplier: Optional[float] = typer.Option(None, help="Noise multiplier sigma (sample level): gives epsilon."),
    target_epsilon: Optional[float] = typer.Option(None, help="Target epsilon (sample level): gives the smallest sigma reaching it."),
    delta: Optional[float] = typer.Option(None, help="Delta."),
    rounds: Optional[int] = typer.Option(None, help="Run shape: rounds."),
    clients: Optional[int] = typer.Option(None, help="Run shape: number of clients."),
    clients_per_round: Optional[float] = typer.Option(None, help="Run shape: expected clients per round (q = this / clients)."),
    local_epochs: Optional[int] = typer.Option(None, help="Run shape: local epochs."),
    batch_size: Optional[int] = typer.Option(None, help="Run shape: batch size."),
    dataset_size: Optional[int] = typer.Option(None, help="Run shape: total training records, split evenly over clients."),
    client_noise_multiplier: Optional[float] = typer.Option(None, help="Client level: z, gives epsilon."),
    client_target_epsilon: Optional[float] = typer.Option(None, help="Client level: target epsilon, gives z."),
    config: Optional[Path] = typer.Option(None, "--config", click_type=PATH, help="Take the run shape from a run.toml (its data is loaded for exact client sizes)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON to stdout."),
) -> None:
    """Plan a privacy budget: epsilon for a noise level, or the noise for a target epsilon."""
    from server.budget import plan_budget

    report = plan_budget(
        config=config, sample_rate=sample_rate, steps=steps, noise_multiplier=noise_multiplier, target_epsilon=target_epsilon, delta=delta,
        rounds=rounds, clients=clients, clients_per_round=clients_per_round, local_epochs=local_epochs, batch_size=batch_size,
        dataset_size=dataset_size, client_noise_multiplier=client_noise_multiplier, client_target_epsilon=client_target_epsilon,
    )
    if as_json:
        _print_json(report)
        return
    table = Table(show_header=False, title="privacy budget (headline accountant: PRV)", title_justify="left")
    for key, value in report.items():
        if isinstance(value, dict):
            for k, v in value.items():
                table.add_row(f"{key}.{k}", _fmt(v) if not isinstance(v, float) else f"{v:.6g}")
        else:
            table.add_row(key, f"{value:.6g}" if isinstance(value, float) else str(value))
    out.print(table)


# --------------------------------------------------------------------------- keys / verify
keys_app = typer.Typer(help="Key management for encrypted model exchange and signed audit logs.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(keys_app, name="keys")


@keys_app.command("init")
@user_errors
def keys_init(
    directory: Path = typer.Argument(..., click_type=PATH, help="Folder to create the keys in."),
    clients: int = typer.Option(..., help="Number of clients (ids 0..N-1)."),
    passphrase_env: Optional[str] = typer.Option(None, help="Encrypt private keys with the passphrase in this environment variable."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON to stdout."),
) -> None:
    """Create X25519 key pairs for the server and each client, and the server's Ed25519 signing key."""
    from shared.crypto import init_keys

    if clients < 1:
        raise FedauditError(f"--clients must be >= 1, got {clients}")
    path = init_keys(directory, clients, passphrase_env)
    report = {"keys_dir": str(path), "clients": clients, "encrypted_private_keys": bool(passphrase_env), "registry": str(path / "registry.json")}
    if as_json:
        _print_json(report)
    else:
        out.print(f"created keys for the server and {clients} clients in {path} (public keys: {path / 'registry.json'})")


@app.command()
@user_errors
def verify(
    run_id: str = typer.Argument(..., help="Run whose audit log to verify."),
    keys: Optional[Path] = typer.Option(None, "--keys", click_type=PATH, help="Key directory holding the registry (default: the one the run used)."),
    runs_dir: Optional[Path] = typer.Option(None, click_type=PATH, help=RUNS_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON to stdout."),
) -> None:
    """Check a run's audit log: hash chain, every entry, and the signed head."""
    from audit.verify import verify_run
    from shared.store import RunStore

    result = verify_run(RunStore(runs_dir), run_id, keys)
    if as_json:
        _print_json({"ok": result.ok, "entries": result.entries, "first_bad": result.first_bad, "reason": result.reason})
    elif result.ok:
        out.print(f"verified {result.entries} entries")
    else:
        where = f"entry {result.first_bad}" if result.first_bad else "signed head"
        out.print(f"audit log FAILED at {where}: {result.reason}")
    if not result.ok:
        raise typer.Exit(EXIT_GATE_FAILED)


# --------------------------------------------------------------------------- deployment engine
certs_app = typer.Typer(help="TLS certificates for a deployment (SuperLink and SuperNodes).", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(certs_app, name="certs")


@certs_app.command("init")
@user_errors
def certs_init(
    directory: Path = typer.Argument(..., click_type=PATH, help="Folder to create ca.crt, ca.key, server.pem and server.key in."),
    host: Optional[list[str]] = typer.Option(None, "--host", help="Name or IP address clients use to reach the SuperLink; repeat for several (default: 127.0.0.1 and localhost)."),
    days: int = typer.Option(365, help="Validity in days."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON to stdout."),
) -> None:
    """Create a CA and a SuperLink server certificate signed by it."""
    from shared.certs import DEFAULT_HOSTS, certificate_hosts, init_certs

    paths = init_certs(directory, host or list(DEFAULT_HOSTS), days)
    report = {"certs_dir": str(paths.directory), "ca_cert": str(paths.ca_cert), "server_cert": str(paths.server_cert),
              "server_key": str(paths.server_key), "hosts": certificate_hosts(paths.server_cert)}
    if as_json:
        _print_json(report)
    else:
        out.print(f"created a CA and a server certificate for {', '.join(report['hosts'])} in {paths.directory}")
        out.print(f"give {paths.ca_cert} to every SuperNode and to `fedaudit run --root-certificates`; keep ca.key and server.key private")


def _serve(cmd: list[str], env: dict, name: str, verbose: bool, log_file: Optional[Path], banner: str) -> None:
    from shared.processes import run_foreground

    err.print(banner)
    if not verbose:
        err.print(f"{name} output goes to {log_file}" if log_file else f"{name} output is hidden; add --verbose to see it")
    code = run_foreground(cmd, env, quiet=not verbose, log_path=log_file)
    err.print(f"{name} stopped (exit code {code})")
    raise typer.Exit(code if 0 <= code < 256 else 1)


@app.command()
@user_errors
def superlink(
    certs: Optional[Path] = typer.Option(None, "--certs", metavar="DIR", click_type=PATH, help="Certificates from `fedaudit certs init DIR` (TLS, the default)."),
    insecure: bool = typer.Option(False, "--insecure", help="Plain text instead of TLS: only on a network you trust."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on; 0.0.0.0 for every interface (SuperNodes on other hosts)."),
    port: int = typer.Option(9093, help="Port for the SuperNodes and `fedaudit run` (Fleet, Control and ServerAppIo APIs)."),
    keys: Optional[Path] = typer.Option(None, "--keys", metavar="DIR", click_type=PATH, help="Server keys from `fedaudit keys init` (needed for encrypted runs, the default)."),
    keys_passphrase_env: Optional[str] = typer.Option(None, help="Environment variable holding the server keys' passphrase."),
    runs_dir: Optional[Path] = typer.Option(None, click_type=PATH, help="Run store of the server side (default ./fedaudit-runs, or $FEDAUDIT_RUNS_DIR)."),
    database: Optional[Path] = typer.Option(None, click_type=PATH, help="Flower's state database (default: <runs-dir>/superlink.db)."),
    log_file: Optional[Path] = typer.Option(None, click_type=PATH, help="Write Flower's output here instead of hiding it."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Flower's output."),
) -> None:
    """Start a Flower SuperLink in the foreground; SIGTERM or Ctrl-C stops it and its children."""
    from server.deployment import superlink_launch
    from shared.processes import flower_env

    launch = superlink_launch(certs=certs, insecure=insecure, host=host, port=port, keys=keys, keys_passphrase_env=keys_passphrase_env,
                              runs_dir=runs_dir, database=database, log_file=log_file if not verbose else None)
    _serve(launch.command, flower_env(launch.environment), "SuperLink", verbose, log_file.resolve() if log_file else None, launch.banner)


@app.command()
@user_errors
def supernode(
    superlink_address: str = typer.Option(..., "--superlink", metavar="HOST:PORT", help="The SuperLink to connect to."),
    root_certificates: Optional[Path] = typer.Option(None, "--root-certificates", metavar="CA_FILE", click_type=PATH, help="CA certificate that signed the SuperLink's (from `fedaudit certs init`)."),
    insecure: bool = typer.Option(False, "--insecure", help="Plain text instead of TLS: only on a network you trust."),
    partition_id: int = typer.Option(..., help="This node's client id (0..N-1): which key and, without --data-dir, which partition it uses."),
    num_partitions: int = typer.Option(..., help="Number of clients in the federation."),
    port: int = typer.Option(9094, help="Local port for this node's ClientApp API; every SuperNode on one host needs its own."),
    keys: Optional[Path] = typer.Option(None, "--keys", metavar="DIR", click_type=PATH, help="Holds this client's private key (client-<id>.x25519.pem) and registry.json; without it the node takes unencrypted runs only."),
    keys_passphrase_env: Optional[str] = typer.Option(None, help="Environment variable holding this client's key passphrase."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", metavar="PATH", click_type=PATH, help="This node's own data: one .csv/.parquet file, or a folder holding one (default: its partition of the run's dataset)."),
    log_file: Optional[Path] = typer.Option(None, click_type=PATH, help="Write Flower's output here instead of hiding it."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Flower's output."),
) -> None:
    """Start a Flower SuperNode in the foreground; SIGTERM or Ctrl-C stops it and its children."""
    from clients.node import supernode_config
    from server.submit import TLSMismatch, Unreachable, connection, probe
    from shared.processes import flower_env, supernode_command

    config = supernode_config(partition_id=partition_id, num_partitions=num_partitions, keys=keys, keys_passphrase_env=keys_passphrase_env,
                              data_dir=data_dir, log_file=log_file if not verbose else None)
    conn = connection(superlink_address, root_certificates, insecure)
    try:
        probe(conn)
    except TLSMismatch:
        raise
    except Unreachable as exc:
        err.print(f"warning: {exc}; the SuperNode keeps retrying")
    cmd = supernode_command(superlink=conn.address, root_certificates=conn.root_certificates, insecure=insecure, port=port, config=config)
    banner = (f"SuperNode for client {partition_id} of {num_partitions}, SuperLink {conn.describe()}, "
              + ("encrypted runs only" if keys else "no --keys: unencrypted runs only") + (f", data {config['data-dir']}" if data_dir else ""))
    _serve(cmd, flower_env(), "SuperNode", verbose, log_file.resolve() if log_file else None, banner)


# --------------------------------------------------------------------------- audit / compare / sweep
def _check_html_path(html_path: Optional[Path]) -> None:
    if html_path is not None:
        from audit.html import check_output_path

        check_output_path(html_path)


def _write_report(html_path: Optional[Path], render, report: dict) -> None:
    if html_path is not None:
        from audit.html import write_html

        path = write_html(render(report), html_path)
        err.print(f"HTML report written to {path}")


def _table_of(title: str, pairs) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    for key, value in pairs:
        table.add_row(key, f"{value:g}" if key.startswith("delta") and isinstance(value, float) else _fmt(value))
    return table


def _print_audit(report: dict) -> None:
    u, rob, p = report["utility"], report["robustness"], report["privacy"]
    d = report["data"]
    out.print(Text.assemble((f"audit of run {report['run_id']}", "bold"), f"  ({d['dataset']}, {d['clients']} clients, model {report['model']['name']}, status {report['status']})"))
    out.print(_table_of("utility (server test split)", [
        ("accuracy", u["accuracy"]), ("balanced accuracy", u["balanced_accuracy"]), ("precision macro", u["precision_macro"]),
        ("recall macro", u["recall_macro"]), ("F1 macro", u["f1_macro"]), ("ROC AUC", u["roc_auc"]),
        ("expected calibration error", u["expected_calibration_error"]),
    ]))
    per_class = Table(title="per class", title_justify="left")
    for col in ("class", "precision", "recall", "F1", "support"):
        per_class.add_column(col, justify="right")
    for label in u["labels"]:
        per_class.add_row(str(label), _fmt(u["precision_per_class"][label]), _fmt(u["recall_per_class"][label]), _fmt(u["f1_per_class"][label]), str(u["support_per_class"][label]))
    out.print(per_class)
    pc, g, e = u["per_client"], u["generalisation"], u["efficiency"]
    if pc.get("n_clients"):
        out.print(_table_of("per-client accuracy (local validation splits)", [
            ("mean", pc["mean"]), ("worst", pc["worst"]), ("worst client", pc["worst_client"]), ("spread", pc["spread"]),
        ]))
    out.print(_table_of("generalisation (training records vs test split)", [
        ("train accuracy", g["train_accuracy"]), ("test accuracy", g["test_accuracy"]), ("accuracy gap", g["accuracy_gap"]),
        ("train loss", g["train_loss"]), ("test loss", g["test_loss"]), ("loss gap", g["loss_gap"]),
    ]))
    out.print(_table_of("efficiency", [
        ("parameters", e["parameters"]), ("parameter bytes", e["parameter_bytes"]), ("model file bytes", e["file_bytes"]),
        ("latency ms / 1,000 records", e["latency_ms_per_1000"]),
    ]))
    params = rob["parameters"]
    table = Table(title=f"robustness on the {rob['evaluated_on']} ({rob['n_records']} records; eps and noise are fractions of each feature's range)", title_justify="left")
    table.add_column("attack")
    table.add_column("clean", justify="right")
    for point in rob["fgsm"]:
        table.add_column(f"eps {point['eps']:g}", justify="right")
    table.add_row("FGSM", _fmt(rob["clean_accuracy"]), *[_fmt(x["accuracy"]) for x in rob["fgsm"]])
    table.add_row(f"PGD ({params['pgd_steps']} steps)", _fmt(rob["clean_accuracy"]), *[_fmt(x["accuracy"]) for x in rob["pgd"]])
    out.print(table)
    out.print("Gaussian noise: " + ", ".join(f"{x['level']:g} -> {x['accuracy']:.4f}" for x in rob["noise"]))
    out.print(f"PGD: alpha = {params['pgd_alpha']}; starts: {params['pgd_starts']}")
    ea = report["error_analysis"]
    out.print("most confused (true -> predicted: count): " + ", ".join(f"{c['true']} -> {c['predicted']}: {c['count']}" for c in ea["most_confused"]))
    if report.get("baseline"):
        b = report["baseline"]
        out.print(f"baseline {b['run_id']}: accuracy {b['accuracy']:.4f}, drop {b['accuracy_drop']:+.4f}" + (f" ({b['note']})" if b["note"] else ""))
        out.print("classes hurt most (recall drop): " + ", ".join(f"{c['class']}: {c['recall_drop']:+.3f}" for c in ea["classes_hurt_most"][:5]))
    out.print(_table_of("privacy", [(k, p[k]) for k in ("epsilon", "delta", "client_epsilon", "accountant", "noise_multiplier") if k in p]))
    if p.get("mia"):
        mia = p["mia"]
        table = Table(title=f"membership inference ({mia['members']} members vs {mia['nonmembers']} non-members; metrics on the test half)", title_justify="left")
        for col in ("attack", "AUC", "TPR@1%FPR", "TPR@0.1%FPR", "advantage", "eps lower bound"):
            table.add_column(col, justify="right")
        for name, a in mia["attacks"].items():
            table.add_row(name, _fmt(a["auc"]), _fmt(a["tpr_at_1pct_fpr"]), _fmt(a["tpr_at_0_1pct_fpr"]), _fmt(a["advantage"]), _fmt(a["epsilon_lower_bound"]))
        out.print(table)
        out.print(f"strongest attack: {mia['mia_attack']} (AUC {mia['mia_auc']:.4f}); empirical epsilon lower bound "
                  f"{mia['empirical_epsilon_lower_bound']:.4f} ({mia['confidence']:.0%} confidence, delta {mia['delta']:g})")
    for key in ("canary_audit", "canary_audit_scan"):
        if p.get(key):
            ca = p[key]
            out.print(f"canary audit: {ca['m']} canaries ({ca['included']} included), {ca['r']} guesses, {ca['v']} correct: epsilon lower bound "
                      f"{ca['epsilon_lower_bound']:.4f}" + (f" ({ca['confidence']:.0%} confidence)" if ca["valid"] else
                                                            f" (SCANNED, best k+ {ca['k_plus']}, k- {ca['k_minus']}: not a valid bound)")
                      + f"; theoretical epsilon {_fmt(ca['theoretical_epsilon'])} ({ca.get('theoretical_source') or 'non-private'})")
    if p.get("client_canary_audit"):
        cc = p["client_canary_audit"]
        out.print(f"canary clients: {cc['canary_clients']} inserted vs {cc['unobserved']} unobserved directions: epsilon estimate "
                  f"{_fmt(cc['epsilon_estimate'])} (Gaussian fit, not a bound; with two variances as in the paper {_fmt(cc['epsilon_estimate_two_variance'])}); client-level theoretical epsilon {_fmt(cc['theoretical_epsilon'])}")
    if p.get("empirical_epsilon_lower_bound") is not None:
        source = p.get("empirical_epsilon_source")
        out.print(f"best valid empirical epsilon lower bound: {p['empirical_epsilon_lower_bound']:.4f} "
                  + (f"from {source}" if source else f"(no test beat chance at {p.get('empirical_epsilon_confidence', 0.95):.0%} confidence, every test counted)"))
    if report.get("flags"):
        flags = report["flags"]
        per_client = ", ".join(f"client {c}: {n}" for c, n in flags["flagged_per_client"].items())
        out.print(f"outlier flags: {len(flags['flagged'])} of {flags['scored_updates']} client updates flagged" + (f" ({per_client})" if per_client else ""))
    if report["gates"]:
        gates = Table(title="gates", title_justify="left")
        for col in ("gate", "threshold", "measured", "result"):
            gates.add_column(col)
        for gate in report["gates"]:
            gates.add_row(gate["gate"], _fmt(gate["threshold"]), _fmt(gate["measured"]), "pass" if gate["passed"] else "FAIL")
        out.print(gates)


@app.command("audit")
@user_errors
def audit_command(
    run_id: str = typer.Argument(..., help="Run to audit (its stored final model)."),
    baseline: Optional[str] = typer.Option(None, "--baseline", metavar="RUN_ID", help="Run to measure the accuracy drop and per-class recall drop against (usually non-private)."),
    html_path: Optional[Path] = typer.Option(None, "--html", metavar="PATH", click_type=PATH, help="Also write a self-contained HTML report."),
    max_epsilon: Optional[float] = typer.Option(None, help="Gate: every privacy unit's epsilon <= this (a non-private run fails)."),
    min_accuracy: Optional[float] = typer.Option(None, help="Gate: test accuracy >= this."),
    max_accuracy_drop: Optional[float] = typer.Option(None, help="Gate: baseline accuracy - this run's accuracy <= this (needs --baseline)."),
    min_robust_accuracy: Optional[float] = typer.Option(None, help="Gate: PGD accuracy at the strongest eps >= this."),
    max_mia_auc: Optional[float] = typer.Option(None, help="Gate: AUC of the strongest membership-inference attack <= this."),
    reference_models: int = typer.Option(2, "--reference-models", metavar="K", help="Reference models for the membership-inference reference attack (0 disables it)."),
    canary_scan: bool = typer.Option(False, "--canary-scan", help="Canary audit: also scan (k+, k-) for the best guesses, shown beside the fixed-k bound; flagged, and not a valid bound."),
    runs_dir: Optional[Path] = typer.Option(None, click_type=PATH, help=RUNS_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object to stdout."),
) -> None:
    """Audit a stored run: utility, robustness, error analysis, privacy, and optional gates."""
    from audit.html import audit_html
    from audit.report import Gates, audit_run
    from shared.store import RunStore

    gates = Gates(max_epsilon, min_accuracy, max_accuracy_drop, min_robust_accuracy, max_mia_auc).validate(baseline is not None)
    if not 0 <= reference_models <= MAX_REFERENCE_MODELS:
        raise FedauditError(f"--reference-models must be in 0..{MAX_REFERENCE_MODELS}, got {reference_models}")
    _check_html_path(html_path)
    report = audit_run(RunStore(runs_dir), run_id, baseline_id=baseline, gates=gates, reference_models=reference_models, canary_scan=canary_scan)
    if report.get("audited", True):
        _write_report(html_path, audit_html, report)
    if as_json:
        _print_json(report)
    elif report.get("audited", True):
        _print_audit(report)
    else:
        out.print(f"run {run_id} (status {report['status']}) has no final model; nothing was measured" + (" and no HTML report was written" if html_path else ""))
    failed = [g for g in report["gates"] if not g["passed"]]
    for gate in failed:
        err.print(f"gate failed: {gate['gate']}: measured {_fmt(gate['measured'])}, threshold {_fmt(gate['threshold'])} ({gate['detail']})")
    if failed:
        raise typer.Exit(EXIT_GATE_FAILED)


@app.command("compare")
@user_errors
def compare_command(
    run_ids: list[str] = typer.Argument(..., metavar="RUN_A RUN_B [RUN_C...]", help="Runs to compare; differences are against the first."),
    html_path: Optional[Path] = typer.Option(None, "--html", metavar="PATH", click_type=PATH, help="Also write a self-contained HTML report."),
    runs_dir: Optional[Path] = typer.Option(None, click_type=PATH, help=RUNS_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object to stdout."),
) -> None:
    """Audit several runs and show them side by side, with differences against the first."""
    from audit.html import compare_html
    from audit.report import compare_runs
    from shared.store import RunStore

    _check_html_path(html_path)
    report = compare_runs(RunStore(runs_dir), list(run_ids))
    _write_report(html_path, compare_html, report)
    if as_json:
        _print_json(report)
        return
    runs = report["runs"]
    names = [chr(ord("A") + i) if i < 26 else str(i + 1) for i in range(len(runs))]
    for name, r in zip(names, runs):
        privacy = "sample-level DP" if r["dp"] else "non-private"
        out.print(f"{name} = {r['run_id']} ({r['dataset']}, {r['model']}, {privacy}{', client-level DP' if r['client_dp'] else ''})")

    def cell(metric: str, value: Any) -> str:
        return "-" if value is None else (f"{value:g}" if metric.endswith("delta") else _fmt(value))

    table = Table(title="compare: differences against A in brackets", title_justify="left")
    table.add_column("metric", no_wrap=True)
    for name in names:
        table.add_column(name, justify="right")
    for metric in report["metric_names"]:
        cells = [cell(metric, runs[0]["metrics"][metric])]
        for r, diff in zip(runs[1:], report["differences"]):
            delta = diff["differences"][metric]
            cells.append(cell(metric, r["metrics"][metric]) + ("" if delta is None else f" ({delta:+.3g})"))
        table.add_row(metric, *cells)
    out.print(table)
    if not report["same_data"]:
        out.print("note: the runs do not share data, partition and seed")


@app.command("sweep")
@user_errors
def sweep_command(
    noise_multipliers: Optional[str] = typer.Option(None, help="Comma-separated DP-SGD noise multipliers, e.g. 0.8,1.2,2.0."),
    target_epsilons: Optional[str] = typer.Option(None, help="Comma-separated target epsilons, e.g. 1,3,8 (sigma calibrated per run)."),
    dataset: Optional[str] = typer.Option(None, help="Built-in dataset: digits, breast-cancer or synthetic."),
    data: Optional[Path] = typer.Option(None, click_type=PATH, help="A .csv/.parquet file, or a folder with one file per client."),
    label: Optional[str] = typer.Option(None, help="Label column of --data."),
    clients: Optional[int] = typer.Option(None, help="Number of simulated clients."),
    rounds: Optional[int] = typer.Option(None, help="Federated rounds."),
    seed: Optional[int] = typer.Option(None, help="Seed shared by every run of the sweep."),
    partition: Optional[str] = typer.Option(None, help="iid or dirichlet:ALPHA (label skew)."),
    model: Optional[str] = typer.Option(None, help="logreg, mlp or cnn (default: picked by dataset)."),
    samples: Optional[int] = typer.Option(None, help="synthetic: number of samples."),
    features: Optional[int] = typer.Option(None, help="synthetic: number of features."),
    classes: Optional[int] = typer.Option(None, help="synthetic: number of classes."),
    local_epochs: Optional[int] = typer.Option(None, help="Local epochs per round."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size (expected batch size under DP)."),
    lr: Optional[float] = typer.Option(None, help="Client learning rate."),
    max_grad_norm: Optional[float] = typer.Option(None, help="DP-SGD per-sample clipping norm."),
    delta: Optional[float] = typer.Option(None, help="Target delta (default as in `fedaudit run`)."),
    config: Optional[Path] = typer.Option(None, "--config", click_type=PATH, help="run.toml; flags override it."),
    html_path: Optional[Path] = typer.Option(None, "--html", metavar="PATH", click_type=PATH, help="Also write an HTML report with the privacy-utility curve."),
    runs_dir: Optional[Path] = typer.Option(None, click_type=PATH, help=RUNS_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object to stdout."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Flower and Ray logs."),
) -> None:
    """Privacy-utility curve: a non-private baseline plus DP-SGD runs at several noise levels."""
    settings = {k: v for k, v in locals().items() if k not in {"noise_multipliers", "target_epsilons", "config", "html_path", "runs_dir", "as_json", "verbose"}}
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from audit.html import sweep_html
    from clients.app import app_for_job
    from server.sweep import NOISE_MODE, TARGET_MODE, parse_values, run_sweep, sweep_points
    from shared.config import resolve

    if (noise_multipliers is None) == (target_epsilons is None):
        raise FedauditError("give exactly one of --noise-multipliers and --target-epsilons")
    _check_html_path(html_path)
    if settings["data"] is not None:
        settings["data"] = str(settings["data"])
    base = resolve(config, **settings)
    if noise_multipliers is not None:
        mode, points = NOISE_MODE, sweep_points(base, noise_multipliers=parse_values(noise_multipliers, "--noise-multipliers"))
    else:
        mode, points = TARGET_MODE, sweep_points(base, target_epsilons=parse_values(target_epsilons, "--target-epsilons"))

    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
        console=err, transient=False,
    )
    runs_task = progress.add_task("sweep runs", total=len(points), status="")
    rounds_task = progress.add_task("rounds", total=base.rounds, status="")

    def on_run_start(i: int, point, job) -> None:
        # Shown from the first run on: run_sweep checks every point first, and bad input
        # found there must stay the one line on stderr.
        progress.start()
        progress.update(runs_task, status=f"now: {point.label}")
        progress.reset(rounds_task, total=job.config.rounds, status="starting engine")
        progress.console.print(f"run {i + 1}/{len(points)} {job.run_id}: {point.label}" + "".join(f"; {n}" for n in job.notes if "keys" not in n))

    def on_round(report) -> None:
        eps = f"  eps {report.epsilon:.3f}" if report.epsilon is not None else ""
        progress.update(rounds_task, completed=report.round, status=f"acc {report.accuracy:.3f}{eps}")

    def on_run_end(i: int, row: dict) -> None:
        eps = f", eps {row['epsilon']:.3f}" if row["epsilon"] is not None else ""
        progress.update(runs_task, advance=1, status=f"last: {row['label']} {row['status']}, acc {_fmt(row['accuracy'], 3)}{eps}")

    try:
        report = run_sweep(points, runs_dir, mode=mode, client_app_for=app_for_job, verbose=verbose, on_run_start=on_run_start, on_round=on_round,
                           on_run_end=on_run_end)
    finally:
        progress.stop()
    _write_report(html_path, sweep_html, report)
    if as_json:
        _print_json(report)
    else:
        from rich import box

        d = report["data"]
        delta = next((r["delta"] for r in report["runs"] if r["delta"] is not None), None)
        title = f"privacy-utility sweep: {d['dataset']}, {d['clients']} clients, {d['rounds']} rounds, seed {d['seed']}, model {d['model']}"
        table = Table(title=title + (f"; delta = {delta:g}" if delta is not None else ""), title_justify="left", box=box.SIMPLE_HEAD)
        for col in ("run", "run id", "sigma", "epsilon", "accuracy", "macro F1", "time (s)"):
            table.add_column(col, no_wrap=True, justify="left" if col in ("run", "run id") else "right")
        for r in report["runs"]:
            label = r["label"] + ("" if r["status"] == "completed" else f" ({r['status']})")
            table.add_row(label, r["run_id"], _fmt(r["noise_multiplier"], 3), _fmt(r["epsilon"], 3), _fmt(r["accuracy"]), _fmt(r["f1_macro"]), _fmt(r["wall_time"], 1))
        out.print(table)
        out.print(f"runs are stored in {report['runs_dir']}")
    if any(r["status"] == "failed" for r in report["runs"]):
        raise typer.Exit(EXIT_GATE_FAILED)


# --------------------------------------------------------------------------- demo
@app.command()
@user_errors
def demo(
    runs_dir: Optional[Path] = typer.Option(None, click_type=PATH, help=RUNS_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON to stdout."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Flower and Ray logs."),
) -> None:
    """Train on digits with 10 clients twice, non-private and private, and compare."""
    from server.runner import demo_configs, prepare_run

    summaries = []
    for name, cfg in demo_configs():
        summaries.append(_run_with_progress(prepare_run(cfg, runs_dir), as_json=True, verbose=verbose, label=f" ({name})"))
    if as_json:
        _print_json({"runs": [{"run": name, **s} for (name, _), s in zip(demo_configs(), summaries)]})
        return
    table = Table(title="digits, 10 clients, same seed", title_justify="left")
    for col in ("run", "run id", "status", "accuracy", "macro F1", "epsilon", "delta"):
        table.add_column(col, no_wrap=True)
    for (name, _), s in zip(demo_configs(), summaries):
        table.add_row(name, s["run_id"], s["status"], _fmt(s["accuracy"]), _fmt(s.get("f1_macro")), _fmt(s["epsilon"], 3), "-" if s["delta"] is None else f"{s['delta']:g}")
    out.print(table)
    out.print(f"runs are stored in {Path(summaries[0]['run_dir']).parent}")
    if any(s["status"] == "failed" for s in summaries):
        raise typer.Exit(EXIT_GATE_FAILED)


if __name__ == "__main__":
    app()
