"""How much the demo's private accuracy varies from run to run.

    python -m bench.demo_accuracy [--reps 24] [--set batch_size=16,rounds=20,...]

The private run draws fresh DP noise every time, so its accuracy is a random variable.
This replays the demo's private training in-process (the same data, model, seeded
initialisation, FedAvg over every client, and DP-SGD through ``shared.training``) with
fresh noise per replica, and prints the mean, standard deviation and lowest accuracy on
the server's test split next to the demo's floor. ``--set`` changes settings, so the
defaults can be compared with alternatives; epsilon is printed for each.
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import torch

from bench.run_overhead import plain_round
from server.runner import demo_configs
from shared import planner
from shared.data import client_sizes, prepare
from shared.evaluation import evaluate
from shared.models import initial_model
from shared.weights import load_numpy, state_to_numpy

FLOOR = 0.88


def private_accuracy(cfg) -> float:
    """One replica of the demo's private run: its final test accuracy."""
    test = prepare(cfg.data_spec)
    meta = test.meta
    name = cfg.model or meta.default_model
    model = initial_model(name, meta.num_features, meta.num_classes, meta.image_side, cfg.seed)
    weights = state_to_numpy(model)
    for round_ in range(1, cfg.rounds + 1):
        _, weights = plain_round(cfg, name, weights, round_, fresh_noise=True)
    load_numpy(model, weights)
    return evaluate(model, test.x_test, test.y_test)[1]


def _value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=24)
    parser.add_argument("--set", default="", help="comma-separated key=value settings to change, e.g. batch_size=16,rounds=20")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from dataclasses import replace

    cfg = dict(demo_configs())["private"]
    changes = {k: _value(v) for k, v in (item.split("=", 1) for item in args.set.split(",") if item)}
    cfg = replace(cfg, **changes).validate()
    mechanisms = planner.sample_level_mechanisms(client_sizes(cfg.data_spec), cfg.batch_size, cfg.local_epochs, cfg.rounds)
    eps = planner.epsilon_for(mechanisms, cfg.noise_multiplier, cfg.delta)
    accs = [private_accuracy(cfg) for _ in range(args.reps)]
    print(f"settings: batch {cfg.batch_size}, rounds {cfg.rounds}, lr {cfg.lr}, clip {cfg.max_grad_norm}, sigma {cfg.noise_multiplier}")
    print(f"epsilon at delta {cfg.delta:g}: PRV {eps['epsilon_prv']:.3f}, RDP {eps['epsilon_rdp']:.3f}")
    print(f"private accuracy over {args.reps} replicas: mean {statistics.mean(accs):.4f}, sd {statistics.stdev(accs):.4f}, "
          f"lowest {min(accs):.4f}, highest {max(accs):.4f}; floor {FLOOR}, margin {(statistics.mean(accs) - FLOOR) / statistics.stdev(accs):.1f} sd")


if __name__ == "__main__":
    main()
