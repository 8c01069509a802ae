"""A run's resolved configuration: defaults <- TOML file <- command-line flags.

Keys are spelled the same everywhere: ``noise-multiplier`` in TOML and on the command
line (``--noise-multiplier``), ``noise_multiplier`` in Python.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from shared.data import BUILTIN_DATASETS, DataSpec
from shared.errors import BadInput
from shared.models import MODELS
from shared.privacy import MAX_NOISE_MULTIPLIER, MIN_DELTA

STRATEGIES = ("fedavg", "fedprox", "fedadam")
AGGREGATORS = ("fedavg", "median", "trimmed-mean", "krum", "multikrum", "bulyan")
ATTACKS = ("sign-flip", "label-flip", "gaussian", "scale")
OPTIMIZERS = ("sgd", "adam")
MAX_ROUNDS = 100_000
MAX_SYNTHETIC_SAMPLES = 10_000_000
MAX_SYNTHETIC_FEATURES = 100_000


@dataclass(frozen=True)
class RunConfig:
    # data
    dataset: str | None = None
    data: str | None = None
    label: str | None = None
    clients: int = 10
    partition: str = "iid"
    seed: int = 0
    test_fraction: float = 0.2
    val_fraction: float = 0.1
    samples: int = 2000
    features: int = 20
    classes: int = 2
    # model and local training
    model: str | None = None
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 1.0
    optimizer: str = "sgd"
    # federation
    rounds: int = 30
    strategy: str = "fedavg"
    fraction: float = 1.0
    proximal_mu: float = 0.01
    server_lr: float = 0.1
    cpus_per_client: float = 1.0
    # share of clients that evaluate the new global model each round (seeded sample)
    eval_fraction: float = 1.0
    # an existing Ray cluster to run the simulation on (None: start a local Ray)
    ray_address: str | None = None
    # sample-level differential privacy
    dp: bool = True
    noise_multiplier: float = 1.85
    max_grad_norm: float = 1.0
    delta: float | None = None
    target_epsilon: float | None = None
    # Seed the DP randomness (Poisson batches and Gaussian noise; under client-level DP
    # also who takes part and the server's noise) from --seed instead of fresh OS
    # entropy. Anyone who knows the config can then replay the noise: no DP against them.
    reproducible_noise: bool = False
    # client-level differential privacy (DP-FedAvg)
    client_dp: bool = False
    client_noise_multiplier: float = 1.0
    client_clip: float = 1.0
    client_sample_rate: float | None = None
    client_target_epsilon: float | None = None
    # enforcement: no unit's epsilon may pass this
    max_epsilon: float | None = None
    # Byzantine experiments and robust aggregation
    malicious: int = 0
    attack: str = "sign-flip"
    aggregator: str = "fedavg"
    # exchange
    encrypt: bool = True
    min_replies: int = 1
    # empirical privacy audits (see shared/canaries.py)
    canaries: int = 0
    canary_clients: int = 0

    # ------------------------------------------------------------------ conversions
    @classmethod
    def keys(cls) -> list[str]:
        return [f.name.replace("_", "-") for f in fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    def to_toml_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.to_dict().items() if v is not None}

    @classmethod
    def from_stored(cls, stored: dict[str, Any]) -> RunConfig:
        """Rebuild a config saved with :meth:`to_dict` (keys unknown to this version are ignored)."""
        known = {f.name for f in fields(cls)}
        values = {k.replace("-", "_"): v for k, v in stored.items()}
        return cls(**{k: v for k, v in values.items() if k in known})

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    @property
    def data_spec(self) -> DataSpec:
        return DataSpec(
            dataset=None if self.data else (self.dataset or "digits"),
            data=str(Path(self.data).resolve()) if self.data else None,
            label=self.label,
            num_clients=self.clients,
            partition=self.partition,
            seed=self.seed,
            test_fraction=self.test_fraction,
            val_fraction=self.val_fraction,
            synthetic_samples=self.samples,
            synthetic_features=self.features,
            synthetic_classes=self.classes,
            canaries=self.canaries,
        )

    # ------------------------------------------------------------------ validation
    def validate(self) -> RunConfig:
        """Check everything that can be checked without loading data."""
        if self.data and self.dataset:
            raise BadInput("--data and --dataset are mutually exclusive")
        for flag, value in (("--dataset", self.dataset), ("--data", self.data), ("--label", self.label), ("--model", self.model)):
            if value is not None and not value.strip():
                raise BadInput(f"{flag} is empty")
        if self.seed < 0:
            raise BadInput(f"--seed must be >= 0, got {self.seed}")
        if not self.data and (self.dataset or "digits") not in BUILTIN_DATASETS:
            raise BadInput(f"unknown dataset {self.dataset!r}; choose one of {', '.join(BUILTIN_DATASETS)}")
        if self.model is not None and self.model not in MODELS:
            raise BadInput(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}")
        if self.strategy not in STRATEGIES:
            raise BadInput(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.optimizer not in OPTIMIZERS:
            raise BadInput(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.aggregator not in AGGREGATORS:
            raise BadInput(f"unknown aggregator {self.aggregator!r}; choose one of {', '.join(AGGREGATORS)}")
        if self.attack not in ATTACKS:
            raise BadInput(f"unknown attack {self.attack!r}; choose one of {', '.join(ATTACKS)}")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise BadInput(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")
        if self.clients < 1:
            raise BadInput(f"--clients must be >= 1, got {self.clients}")
        if not (0.0 < self.fraction <= 1.0):
            raise BadInput(f"--fraction must be in (0, 1], got {self.fraction}")
        if not (0 <= self.malicious < self.clients):
            raise BadInput(f"--malicious must be in [0, --clients), got {self.malicious}")
        if self.aggregator != "fedavg" and self.strategy == "fedadam":
            raise BadInput("--aggregator replaces FedAvg's mean; it cannot be combined with --strategy fedadam")
        if self.aggregator != "fedavg" and self.client_dp:
            # Client-level DP hands the aggregator one clipped, noised mean: a robust
            # rule would see a single update and protect nothing.
            raise BadInput(f"--aggregator {self.aggregator} cannot be combined with --client-dp, whose noised mean is the aggregate")
        per_round = max(1, round(self.clients * self.fraction))
        if self.aggregator == "bulyan" and per_round < 4 * self.malicious + 3:
            raise BadInput(f"bulyan needs at least 4 x malicious + 3 = {4 * self.malicious + 3} clients per round, got {per_round}")
        if self.aggregator in ("krum", "multikrum") and per_round < 2 * self.malicious + 3:
            raise BadInput(f"{self.aggregator} needs at least 2 x malicious + 3 = {2 * self.malicious + 3} clients per round, got {per_round}")
        if self.min_replies < 1:
            raise BadInput(f"--min-replies must be >= 1, got {self.min_replies}")
        if self.min_replies > self.clients:
            raise BadInput(f"--min-replies {self.min_replies} is more than --clients {self.clients}")
        if self.rounds < 1:
            raise BadInput(f"--rounds must be >= 1, got {self.rounds}")
        if self.local_epochs < 1:
            raise BadInput(f"--local-epochs must be >= 1, got {self.local_epochs}")
        if self.batch_size < 1:
            raise BadInput(f"--batch-size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise BadInput(f"--lr must be > 0, got {self.lr}")
        if self.proximal_mu < 0:
            raise BadInput(f"--proximal-mu must be >= 0, got {self.proximal_mu}")
        if not self.server_lr > 0:
            raise BadInput(f"--server-lr must be > 0, got {self.server_lr}")
        # Far beyond any real run; past them the accountants and arrays blow up instead.
        for flag, value, limit in (("--rounds", self.rounds, MAX_ROUNDS), ("--samples", self.samples, MAX_SYNTHETIC_SAMPLES), ("--features", self.features, MAX_SYNTHETIC_FEATURES)):
            if value > limit:
                raise BadInput(f"{flag} must be <= {limit:,}, got {value:,}")
        if not self.cpus_per_client > 0:
            raise BadInput(f"--cpus-per-client must be > 0, got {self.cpus_per_client}")
        if not (0.0 < self.eval_fraction <= 1.0):
            raise BadInput(f"--eval-fraction must be in (0, 1], got {self.eval_fraction}")
        if self.ray_address is not None and (not self.ray_address.strip() or any(ch.isspace() for ch in self.ray_address)):
            raise BadInput(f"--ray-address must be 'auto', HOST:PORT or ray://HOST:PORT, got {self.ray_address!r}")
        if self.dp:
            if not self.noise_multiplier > 0:
                raise BadInput(f"--noise-multiplier must be > 0 in private mode, got {self.noise_multiplier}")
            if not self.noise_multiplier <= MAX_NOISE_MULTIPLIER:
                raise BadInput(f"--noise-multiplier must be <= {MAX_NOISE_MULTIPLIER:g}, got {self.noise_multiplier:g}")
            if not self.max_grad_norm > 0:
                raise BadInput(f"--max-grad-norm must be > 0, got {self.max_grad_norm}")
        if self.delta is not None and not (MIN_DELTA <= self.delta < 1.0):
            raise BadInput(f"--delta must be in [{MIN_DELTA:g}, 1), got {self.delta:g}: the accountant cannot bound epsilon below {MIN_DELTA:g}")
        for flag, value in (("--target-epsilon", self.target_epsilon), ("--client-target-epsilon", self.client_target_epsilon), ("--max-epsilon", self.max_epsilon)):
            if value is not None and not value > 0:
                raise BadInput(f"{flag} must be > 0, got {value}")
        if self.target_epsilon is not None and not self.dp:
            raise BadInput("--target-epsilon calibrates sample-level DP: it needs --dp")
        if self.client_target_epsilon is not None and not self.client_dp:
            raise BadInput("--client-target-epsilon needs --client-dp")
        if self.client_dp:
            if not 0 < self.client_noise_multiplier <= MAX_NOISE_MULTIPLIER:
                raise BadInput(f"--client-noise-multiplier must be in (0, {MAX_NOISE_MULTIPLIER:g}], got {self.client_noise_multiplier:g}")
            if not self.client_clip > 0:
                raise BadInput(f"--client-clip must be > 0, got {self.client_clip}")
            q = self.participation_rate
            if not (0.0 < q <= 1.0):
                raise BadInput(f"--client-sample-rate must be in (0, 1], got {q}")
            if q * self.clients < 2:
                raise BadInput(
                    f"client-level DP needs at least 2 clients per round in expectation; "
                    f"--client-sample-rate {q:g} x --clients {self.clients} = {q * self.clients:g}"
                )
        elif self.client_sample_rate is not None:
            raise BadInput("--client-sample-rate (Poisson client sampling) needs --client-dp; use --fraction otherwise")
        if self.canaries and self.canaries < 2:
            raise BadInput(f"--canaries must be 0 or >= 2 (the audit ranks canaries against each other), got {self.canaries}")
        if self.canary_clients:
            if self.canary_clients < 2:
                raise BadInput(f"--canary-clients must be 0 or >= 2 (the audit fits a Gaussian to their cosines), got {self.canary_clients}")
            if not self.client_dp:
                raise BadInput("--canary-clients audits client-level DP: it needs --client-dp")
            if self.malicious:
                raise BadInput("--canary-clients cannot be combined with --malicious")
        return self

    @property
    def nodes(self) -> int:
        """Flower nodes the federation needs: the clients plus any canary clients."""
        return self.clients + self.canary_clients

    @property
    def dataset_name(self) -> str:
        """The built-in dataset's name, or the ``--data`` path."""
        return self.data or self.dataset or "digits"

    @property
    def participation_rate(self) -> float:
        """Client-level DP's Poisson participation probability q (defaults to --fraction)."""
        return self.client_sample_rate if self.client_sample_rate is not None else self.fraction


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a run.toml; unknown keys are an error, not silently ignored."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise BadInput(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"cannot read config file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"config file {path} is not valid TOML: {exc}") from None
    known = set(RunConfig.keys())
    unknown = sorted(k for k in raw if k.replace("_", "-") not in known)
    if unknown:
        raise BadInput(f"unknown key(s) in config file {path}: {', '.join(unknown)}")
    return {k.replace("-", "_"): v for k, v in raw.items()}


def resolve(config_file: str | Path | None = None, **overrides: Any) -> RunConfig:
    """Defaults, then the TOML file, then flags that were actually given (not None)."""
    values: dict[str, Any] = load_toml(config_file) if config_file else {}
    given = {k: v for k, v in overrides.items() if v is not None}
    # --data and --dataset name one thing: a flag for either replaces the file's choice.
    if "data" in given and "dataset" not in given:
        values.pop("dataset", None)
    if "dataset" in given and "data" not in given:
        values.pop("data", None)
    values.update(given)
    if "clients" not in values and isinstance(values.get("data"), str) and Path(values["data"]).is_dir():
        # A folder of client files is the federation: client i is file i.
        from shared.data import data_files

        values["clients"] = len(data_files(values["data"]))
    types = {f.name: f.type for f in fields(RunConfig)}
    for key, value in values.items():
        if key not in types:
            raise BadInput(f"unknown setting {key!r}")
        values[key] = _typed(key, value, types[key])
    return replace(RunConfig(), **values).validate()


def _typed(key: str, value: Any, expected: str) -> Any:
    """``value`` checked against the field's annotation (a TOML file can hold anything)."""
    name = key.replace("_", "-")
    base = expected.replace(" | None", "")
    if value is None and base != expected:
        return value
    if base == "bool":
        if not isinstance(value, bool):
            raise BadInput(f"setting {name} must be true or false, got {value!r}")
    elif base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadInput(f"setting {name} must be an integer, got {value!r}")
    elif base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BadInput(f"setting {name} must be a number, got {value!r}")
        return float(value)
    elif base == "str" and not isinstance(value, str):
        raise BadInput(f"setting {name} must be a string, got {value!r}")
    return value
