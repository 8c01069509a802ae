"""Run every benchmark: python -m bench"""

import subprocess
import sys

QUICK = ("bench.dp_step", "bench.scale")  # their full runs take many minutes

for module in ("bench.dp_step", "bench.run_overhead", "bench.accounting", "bench.crypto", "bench.encryption_overhead", "bench.scale", "bench.canary_cost", "bench.demo_accuracy"):
    print(f"=== {module}", flush=True)
    subprocess.run([sys.executable, "-m", module, *(["--quick"] if module in QUICK else [])], check=True)
