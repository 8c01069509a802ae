"""Run every benchmark: python -m bench"""

import subprocess
import sys

for module in ("bench.dp_step", "bench.run_overhead", "bench.crypto", "bench.encryption_overhead", "bench.canary_cost"):
    print(f"=== {module}", flush=True)
    subprocess.run([sys.executable, "-m", module, *(["--quick"] if module == "bench.dp_step" else [])], check=True)
