"""Run every benchmark in turn: ``python -m bench`` (dp_step and scale in their --quick form)."""

import argparse
import subprocess
import sys

MODULES = ("bench.dp_step", "bench.run_overhead", "bench.accounting", "bench.crypto", "bench.encryption_overhead", "bench.scale",
           "bench.canary_cost", "bench.demo_accuracy")
QUICK = ("bench.dp_step", "bench.scale")  # their full runs take many minutes


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--only", nargs="+", choices=[m.split(".")[1] for m in MODULES], help="run only these benchmarks")
    args = parser.parse_args()
    for module in MODULES:
        if args.only and module.split(".")[1] not in args.only:
            continue
        print(f"=== {module}", flush=True)
        subprocess.run([sys.executable, "-m", module, *(["--quick"] if module in QUICK else [])], check=True)


if __name__ == "__main__":
    main()
