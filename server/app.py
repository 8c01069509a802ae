"""fedaudit's Flower ServerApp.

``flwr run .`` loads ``server.app:app``, which reads its settings from the Flower run
config. The CLI's simulation path builds its own app with :func:`make_server_app`,
binding a fully resolved :class:`~server.federation.ServerJob`.
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from flwr.app import Context  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from server.deployment import is_deployment, run_deployment  # noqa: E402
from server.federation import ServerJob, run_federation  # noqa: E402
from shared.store import RunStore  # noqa: E402


def make_server_app(job: ServerJob | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if job is not None:
            run_federation(grid, job)  # the CLI's runner records how the run ended
            return
        run_config = dict(context.run_config)
        if is_deployment(run_config):
            # `fedaudit run --engine deployment`: results go back through the log.
            run_deployment(grid, run_config)
            return
        # `flwr run`: nobody else will record the outcome, so do it here.
        the_job = job_from_run_config(run_config)
        store = RunStore(the_job.runs_dir)
        try:
            result = run_federation(grid, the_job)
        except Exception as exc:
            store.finish_run(the_job.run_id, "failed", f"{type(exc).__name__}: {exc}")
            raise
        store.finish_run(the_job.run_id, result["status"])

    return app


def job_from_run_config(run_config: dict, run_id: str | None = None, keys_dir: str | None = None, keys_passphrase_env: str | None = None) -> ServerJob:
    """Build a job from ``[tool.flwr.app.config]`` values (the ``flwr run`` path)."""
    from server.runner import prepare_run
    from shared.config import resolve
    from shared.errors import BadInput

    runs_dir = run_config.pop("runs-dir", None) or None
    settings = {k.replace("-", "_"): v for k, v in run_config.items()}
    for key in ("dataset", "data", "label", "model"):
        if settings.get(key) == "":
            settings[key] = None
    if settings.get("delta") == 0.0:
        settings["delta"] = None
    config = resolve(None, **settings)
    if config.canaries or config.canary_clients:
        # The canary secret must reach the clients without passing through the server,
        # which only the CLI's own simulation can arrange.
        raise BadInput("canaries need the fedaudit CLI's simulation: use `fedaudit run --canaries/--canary-clients`")
    return prepare_run(config, runs_dir, run_id=run_id, keys_dir=keys_dir, keys_passphrase_env=keys_passphrase_env)


app = make_server_app()
