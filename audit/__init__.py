"""Audits of a trained model: utility metrics and empirical privacy estimates.

The metrics (``metrics``, ``robustness``, ``empirical``, the MIA scores) are functions in
the style of ``sklearn.metrics``: arrays in, numbers (or small JSON-ready dicts) out, bad
input reported as :class:`shared.errors.BadInput`. ``report``, ``canary``, ``verify`` and
``html`` build on them: they read a stored run (and ``html`` writes the page), but never
start a federation.
"""
