"""Audits of a trained model: utility metrics and empirical privacy estimates.

Everything here is a pure function in the style of ``sklearn.metrics``: arrays in,
numbers (or small JSON-ready dicts) out, bad input reported as :class:`shared.errors.BadInput`.
"""
