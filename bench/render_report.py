"""Screenshot an HTML report with headless Chromium, to check that it renders.

    python -m bench.render_report REPORT.html OUT.png [--width 1280] [--height 4000]

Needs Debian's ``chromium`` (``apt-get install -y chromium``). Every network and
background feature is switched off and a fresh profile directory is used, so the
report must be self-contained to render fully.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def render(report: str | Path, out: str | Path, width: int = 1280, height: int = 4000, timeout: float = 120) -> Path:
    """Take a screenshot of ``report`` into ``out`` (PNG); returns ``out``."""
    report, out = Path(report).resolve(), Path(out).resolve()
    if not report.is_file():
        raise FileNotFoundError(f"no report at {report}")
    browser = find_browser()
    if browser is None:
        raise RuntimeError("no Chromium found; install it with: apt-get update && apt-get install -y chromium")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedaudit-chromium-") as profile:
        cmd = [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", f"--screenshot={out}", f"--window-size={width},{height}",
            "--hide-scrollbars", report.as_uri(),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if not out.exists() or out.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", help="HTML report to render")
    parser.add_argument("out", help="PNG file to write")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=4000)
    args = parser.parse_args(argv)
    try:
        path = render(args.report, args.out, args.width, args.height)
    except (FileNotFoundError, RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
