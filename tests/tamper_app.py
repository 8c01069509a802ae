"""TEST ONLY: fedaudit's ClientApp with one misbehaving client (see tests/tamper.py).

    from tests.tamper_app import build_app
    client_app = build_app("replay", victim=1)

The handlers are the production ones from clients.app; only the mods differ:
``[tamper_mod, *clients.app.CLIENT_MODS]``, so the tamper mod sees the sealed messages.

For a ClientApp reference string (``"tests.tamper_app:app"``) the module also exposes
``app``, built on first access from ``$FEDAUDIT_TAMPER_MODE`` and
``$FEDAUDIT_TAMPER_VICTIM`` (default 0).
"""

from __future__ import annotations

import os

from flwr.clientapp import ClientApp

from clients import app as production
from clients.app import describe, evaluate_local, train
from tests.tamper import make_tamper_mod


def build_app(mode: str, victim: int, keys_dir: str | None = None) -> ClientApp:
    """A ClientApp whose client ``victim`` misbehaves as ``mode`` (tests/tamper.py MODES)."""
    return build_multi_app({victim: mode}, keys_dir)


def build_multi_app(modes: dict[int, str], keys_dir: str | None = None) -> ClientApp:
    """A ClientApp where each client in ``modes`` misbehaves in its own way."""
    app = ClientApp(mods=[*(make_tamper_mod(mode, victim, keys_dir) for victim, mode in modes.items()), *production.CLIENT_MODS])
    app.query()(describe)
    app.train()(train)
    app.evaluate()(evaluate_local)
    # Any further query actions of the production app (e.g. ledger restore on resume).
    # They carry no model, so re-wrapping them with these mods changes nothing.
    for full_name, fn in production.app._registered_funcs.items():  # noqa: SLF001
        category, action = full_name.split(".", 1)
        if category == "query" and action != "default":
            app.query(action)(fn)
    return app


def __getattr__(name: str):
    if name == "app":
        return build_app(os.environ["FEDAUDIT_TAMPER_MODE"], int(os.environ.get("FEDAUDIT_TAMPER_VICTIM", "0")))
    raise AttributeError(name)
