"""A stored run's headline numbers and its full description (``fedaudit run --json``,
``runs`` and ``show``). They read the run store only, so the CLI, the deployment
import and the audit use them without a federation.
"""

from __future__ import annotations

import math

from shared import privacy
from shared.config import RunConfig
from shared.store import RunStore


def summarize(store: RunStore, run_id: str) -> dict:
    """The run's headline numbers, as ``fedaudit run --json`` prints them."""
    record = store.get_run(run_id)
    rounds = store.get_rounds(run_id)
    # A round is finished once its model is recorded (a run without a test split has no accuracy).
    finished = [r for r in rounds if r["model_sha256"] is not None]
    last = finished[-1] if finished else {}
    dp = record.config.get("dp", False)
    client_dp = record.config.get("client-dp", False)
    cap = record.config.get("max-epsilon")
    epsilon = max((r["epsilon"] for r in rounds if r["epsilon"] is not None), default=None) if dp else None
    epsilon_rdp = max((r["epsilon_rdp"] for r in rounds if r["epsilon_rdp"] is not None), default=None) if dp else None
    if dp and store.interrupted_spend(run_id):
        # A resumed run that stopped before a new round: the interrupted round's spend is
        # in no rounds row, but it was spent.
        full = store.ledger_with_interrupted(run_id).values()
        epsilon = max([e for e in [epsilon] if e is not None] + [privacy.epsilon(l, record.delta) for l in full])
        epsilon_rdp = max([e for e in [epsilon_rdp] if e is not None] + [privacy.epsilon(l, record.delta, "rdp") for l in full])
    client_epsilon, client_epsilon_rdp = store.client_epsilons(run_id) if client_dp else (None, None)
    accountant = privacy.HEADLINE_ACCOUNTANT if (dp or client_dp) else None
    notes = list(record.info.get("notes", []))
    # PRV gives up (infinity) on huge spends where RDP still bounds epsilon; both are
    # valid upper bounds, and JSON would print infinity as null, which means "no DP".
    if any(e is not None and not math.isfinite(e) for e in (epsilon, client_epsilon)):
        epsilon, client_epsilon = (e if e is None or math.isfinite(e) else r for e, r in ((epsilon, epsilon_rdp), (client_epsilon, client_epsilon_rdp)))
        accountant = "rdp"
        notes.append("the PRV accountant could not bound epsilon (it is huge); the RDP bound is reported instead")
    return {
        "run_id": run_id,
        "status": record.shown_status,
        "error": record.shown_error,
        "dataset": RunConfig.from_stored(record.config).dataset_name,
        "dp": dp,
        "rounds": len(finished),
        "accuracy": last.get("accuracy"),
        "loss": last.get("loss"),
        "f1_macro": record.info.get("f1_macro"),
        "epsilon": epsilon,
        "epsilon_rdp": epsilon_rdp,
        "client_epsilon": client_epsilon,
        "client_epsilon_rdp": client_epsilon_rdp,
        "delta": record.delta if (dp or client_dp) else None,
        "accountant": accountant,
        "privacy_unit": ", ".join(u for u, on in ((SAMPLE_UNIT, dp), (CLIENT_UNIT, client_dp)) if on) or None,
        "noise_multiplier": record.config.get("noise-multiplier") if dp else None,
        "client_noise_multiplier": record.config.get("client-noise-multiplier") if client_dp else None,
        "max_epsilon": cap,
        "budget_left": _budget_left(cap, epsilon, client_epsilon),
        "notes": notes,
        "encrypted": record.config.get("encrypt", True),
        "audit_log": str(store.run_dir(run_id) / "audit.jsonl"),
        "clients_trained": len(store.trained_clients(run_id)),
        "wall_time": record.wall_time,
        "run_dir": str(store.run_dir(run_id)),
    }


SAMPLE_UNIT = "record (one training example within one client's data)"
CLIENT_UNIT = "client (all of one client's data)"


def _budget_left(cap: float | None, *spent: float | None) -> float | None:
    used = [e for e in spent if e is not None]
    return None if cap is None or not used else max(0.0, cap - max(used))


PRIVACY_ASSUMPTIONS = (
    "Poisson sampling: each record joins each local step independently with probability q; "
    "under client-level DP each client joins each round independently with probability q",
    "add/remove-one neighbouring datasets: epsilon bounds what one record changes",
    "each client's epsilon covers its own records only; clients compose in parallel, so the run's epsilon is the largest client's",
    "epsilon composes over every round in which that client trained (listed per client)",
    "model initialisation, feature scaling and, under sample-level DP only, which clients train each round are treated as public",
    "each client's reported metrics (record count, label histogram, training loss, validation loss and accuracy) "
    "are exact and released outside epsilon, to the server and into the run store",
)


# Settings that only act under another one: (setting, does it act for this config).
_ACTS_ONLY_WHEN = {
    "dataset": lambda c: not c.get("data"),  # a data file is the dataset
    "data": lambda c: bool(c.get("data")),
    "label": lambda c: bool(c.get("data")),
    "samples": lambda c: c.get("dataset") == "synthetic",
    "features": lambda c: c.get("dataset") == "synthetic",
    "classes": lambda c: c.get("dataset") == "synthetic",
    "proximal-mu": lambda c: c.get("strategy") == "fedprox",
    "server-lr": lambda c: c.get("strategy") == "fedadam",
    "noise-multiplier": lambda c: bool(c.get("dp")),
    "max-grad-norm": lambda c: bool(c.get("dp")),
    "target-epsilon": lambda c: bool(c.get("dp")),
    "reproducible-noise": lambda c: bool(c.get("dp") or c.get("client-dp")),
    "client-noise-multiplier": lambda c: bool(c.get("client-dp")),
    "client-clip": lambda c: bool(c.get("client-dp")),
    "client-sample-rate": lambda c: bool(c.get("client-dp")),
    "client-target-epsilon": lambda c: bool(c.get("client-dp")),
    "attack": lambda c: bool(c.get("malicious")),
}


def settings_in_use(config: dict, delta: float | None, model: str | None = None) -> dict:
    """A stored run's config as it acted (``fedaudit show``'s table): defaults filled
    in (the dataset, the delta chosen from the data, the model picked by the dataset) and settings that did nothing in
    this run, such as the synthetic generator's sizes on digits, left out. The full
    resolved config stays in the run store and in ``show --json``."""
    shown = {}
    for key, value in config.items():
        if key in _ACTS_ONLY_WHEN and not _ACTS_ONLY_WHEN[key](config):
            continue
        if key == "dataset":
            value = RunConfig.from_stored(config).dataset_name
        elif key == "delta" and value is None:
            value = delta
        elif key == "model" and value is None:
            value = model
        shown[key] = value
    return shown


def describe_run(store: RunStore, run_id: str) -> dict:
    """Config, per-round metrics and the privacy ledger of one run (``fedaudit show``)."""
    record = store.get_run(run_id)
    rounds = store.get_rounds(run_id)
    summary = summarize(store, run_id)
    # Where PRV could not bound epsilon (stored as null), the headline is RDP's; so is every
    # epsilon below, since null would read as "no DP".
    key = "epsilon_rdp" if summary["accountant"] == "rdp" else "epsilon"
    report = {
        "run_id": run_id,
        "status": record.shown_status,
        "error": record.shown_error,
        "config": record.config,
        "delta": record.delta,
        "model": record.info.get("model"),
        "wall_time": record.wall_time,
        "clients": store.get_clients(run_id),
        "rounds": [
            {
                "round": r["round"],
                "accuracy": r["accuracy"],
                "loss": r["loss"],
                "federated_accuracy": r["federated_accuracy"],
                "epsilon": r[key],
                "epsilon_rdp": r["epsilon_rdp"],
                "client_epsilon": r["client_epsilon"],
                "participants": r["participants"],
                "seconds": r["seconds"],
                "model_sha256": r["model_sha256"],
                "clients": [
                    {
                        "client": c["client"],
                        "epsilon": c[key],
                        "epsilon_rdp": c["epsilon_rdp"],
                        "refused": bool(c["refused"]),
                        "num_examples": c["num_examples"],
                        "train_loss": c["train_loss"],
                        "noise_multiplier": c["noise_multiplier"],
                        "sample_rate": c["sample_rate"],
                        "steps": c["steps"],
                        "val_accuracy": c["val_accuracy"],
                    }
                    for c in r["clients"]
                    if c["steps"] is not None or c["num_examples"] is not None
                ],
            }
            for r in rounds
        ],
    }
    units = []
    if record.config.get("dp"):
        trained: dict[int, list[int]] = {}
        refused: dict[int, list[int]] = {}
        for r in rounds:
            for c in r["clients"]:
                if c["steps"]:
                    trained.setdefault(c["client"], []).append(r["round"])
                elif c["refused"]:
                    refused.setdefault(c["client"], []).append(r["round"])
        units.append(
            {
                "unit": SAMPLE_UNIT,
                "mechanism": "DP-SGD on each client: Poisson-subsampled Gaussian mechanism over its records",
                "epsilon": summary["epsilon"],
                "epsilon_rdp": summary["epsilon_rdp"],
                "noise_multiplier": summary["noise_multiplier"],
                "rounds_trained": {str(k): v for k, v in sorted(trained.items())},
                "rounds_refused": {str(k): v for k, v in sorted(refused.items())},
                "interrupted_spend": {str(k): v for k, v in store.interrupted_spend(run_id).items()},
            }
        )
    if record.config.get("client-dp"):
        units.append(
            {
                "unit": CLIENT_UNIT,
                "mechanism": "DP-FedAvg at the server: each update clipped to C, N(0, z^2 C^2) added to the sum, divided by q*N",
                "epsilon": summary["client_epsilon"],
                "epsilon_rdp": summary["client_epsilon_rdp"],
                "noise_multiplier": summary["client_noise_multiplier"],
                "sample_rate": RunConfig.from_stored(record.config).participation_rate,
                "releases": store.client_releases(run_id),
            }
        )
    if units:
        report["privacy"] = {
            "accountant": summary["accountant"],
            "accountants": list(privacy.ACCOUNTANTS),
            "delta": record.delta,
            "epsilon": summary["epsilon"],
            "client_epsilon": summary["client_epsilon"],
            "max_epsilon": summary["max_epsilon"],
            "budget_left": summary["budget_left"],
            "units": units,
            "assumptions": list(PRIVACY_ASSUMPTIONS),
        }
        if record.config.get("dp"):
            report["privacy"]["rounds_trained"] = units[0]["rounds_trained"]
    return report
