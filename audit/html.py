"""Self-contained HTML reports for ``fedaudit audit``, ``compare`` and ``sweep``.

One file each, no external resources: plots are matplotlib figures (Agg backend)
embedded as base64 PNG in ``<img id=... alt=...>`` tags. The ids and alt texts are
listed in :data:`AUDIT_PLOTS`, :data:`COMPARE_PLOTS` and :data:`SWEEP_PLOTS`; every
plot is always present (with a short message drawn in it when there is nothing to
show, e.g. epsilon of a non-private run).
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from shared.errors import BadInput  # noqa: E402
from shared.store import atomic_write_bytes  # noqa: E402

AUDIT_PLOTS = {
    "plot-accuracy-loss": "Test accuracy and loss per round",
    "plot-epsilon": "Cumulative epsilon per round",
    "plot-confusion": "Confusion matrix on the test split",
    "plot-robustness": "Accuracy under Gaussian noise and under FGSM and PGD attacks",
    "plot-clients": "Accuracy on each client's validation split",
    "mia-roc": "mia-roc",
    "plot-canary-scores": "Canary scores on the final model: included against excluded canaries",
    "plot-canary-cosines": "Cosines of the final model change with inserted and unobserved canary-client directions",
}
COMPARE_PLOTS = {
    "plot-compare-accuracy": "Test accuracy per round, every run overlaid",
    "plot-compare-loss": "Test loss per round, every run overlaid",
    "plot-compare-epsilon": "Cumulative epsilon per round, every run overlaid",
    "plot-compare-robustness": "Accuracy under FGSM and PGD attacks, every run overlaid",
}
SWEEP_PLOTS = {
    "plot-privacy-utility": "Privacy-utility curve: final test accuracy against epsilon",
    "plot-sweep-accuracy": "Test accuracy per round for every run of the sweep",
}

CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 2rem auto; max-width: 1100px;
       color: #1b1f24; padding: 0 1rem; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #d0d7de; }
.sub { color: #57606a; margin-top: 0; }
table { border-collapse: collapse; margin: 0.6rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #d0d7de; padding: 0.25rem 0.6rem; text-align: right; }
th { background: #f6f8fa; } td:first-child, th:first-child, td.t { text-align: left; }
.pass { color: #1a7f37; font-weight: 600; } .fail { color: #cf222e; font-weight: 600; }
.cards { display: flex; flex-wrap: wrap; gap: 0.8rem; }
.card { border: 1px solid #d0d7de; border-radius: 6px; padding: 0.6rem 1rem; min-width: 9rem; }
.card .v { font-size: 1.4rem; font-weight: 600; } .card .k { color: #57606a; font-size: 0.8rem; }
img.plot { max-width: 100%; border: 1px solid #eaeef2; margin: 0.4rem 0; }
.note { color: #57606a; font-size: 0.85rem; }
code { background: #f6f8fa; padding: 0 0.2rem; }
"""

COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


# --------------------------------------------------------------------------- helpers
def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(plot_id: str, alt: str, draw: Callable[[], Any]) -> str:
    return f'<img class="plot" id="{plot_id}" alt="{html.escape(alt)}" src="data:image/png;base64,{_png(draw())}">'


def _message(fig, ax, text: str):
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=12, color="#57606a", wrap=True)
    return fig


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.{digits}g}" if (abs(value) >= 1e4 or (value != 0 and abs(value) < 1e-3)) else f"{value:.{digits}f}"
    return str(value)


_NUMBER = re.compile(r"^[-+–]?(\d|\.\d)|^–$|^∞$")


def _cell(c: Any) -> str:
    text = html.escape(_fmt(c))
    # Numbers right-aligned (the CSS default), words left-aligned.
    left = isinstance(c, bool) or (isinstance(c, str) and not _NUMBER.match(c))
    return f'<td class="t">{text}</td>' if left else f"<td>{text}</td>"


def _table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _kv(pairs: Iterable[tuple[str, Any]]) -> str:
    return _table(("", "value"), ((k, v) for k, v in pairs))


def _cards(pairs: Iterable[tuple[str, Any]]) -> str:
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="v">{html.escape(_fmt(v, 3))}</div><div class="k">{html.escape(k)}</div></div>' for k, v in pairs
    ) + "</div>"


def _page(title: str, subtitle: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p class=\"sub\">{html.escape(subtitle)}</p>{body}</body></html>\n"
    )


def write_html(text: str, path: str | Path) -> Path:
    """Write a report atomically; a directory or an unwritable place is :class:`BadInput`."""
    path = Path(path)
    check_output_path(path)
    try:
        atomic_write_bytes(path, text.encode("utf-8"))
        path.chmod(0o644)  # a report to share, not a secret (the temporary file was 0600)
    except OSError as exc:
        raise BadInput(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def check_output_path(path: str | Path) -> None:
    """Fail early (before any audit work) on an output path that cannot be a file."""
    path = Path(path)
    if path.is_dir():
        raise BadInput(f"--html {path} is a directory; give a file name such as report.html")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise BadInput(f"--html {path}: {parent} is not a directory")


def _series(rounds: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["round"], r[key]) for r in rounds if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


# --------------------------------------------------------------------------- audit plots
def _plot_accuracy_loss(rounds: list[dict]):
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.4))
    x, y = _series(rounds, "accuracy")
    if not x:
        return _message(fig, a1, "no evaluated rounds")
    a1.plot(x, y, marker="o", label="server test split")
    fx, fy = _series(rounds, "federated_accuracy")
    if fx:
        a1.plot(fx, fy, marker=".", linestyle="--", label="clients' validation (weighted)")
    a1.set(xlabel="round", ylabel="accuracy", title="accuracy per round")
    a1.legend(fontsize=8)
    lx, ly = _series(rounds, "loss")
    a2.plot(lx, ly, marker="o", color=COLORS[3])
    a2.set(xlabel="round", ylabel="cross-entropy loss", title="test loss per round")
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    return fig


def _plot_epsilon(rounds: list[dict], privacy: dict):
    fig, ax = plt.subplots(figsize=(6, 3.4))
    drawn = False
    for key, label in (("epsilon", "sample-level ε (largest client)"), ("client_epsilon", "client-level ε")):
        x, y = _series(rounds, key)
        if x:
            ax.plot(x, y, marker="o", label=label)
            drawn = True
    if not drawn:
        return _message(fig, ax, "non-private run: no ε to plot (unbounded)")
    if privacy.get("max_epsilon"):
        ax.axhline(privacy["max_epsilon"], color="#cf222e", linestyle="--", label=f"cap {privacy['max_epsilon']:g}")
    delta = privacy.get("delta")
    ax.set(xlabel="round", ylabel="cumulative ε", title=f"ε per round ({privacy.get('accountant') or ''}, δ = {delta:g})" if delta else "ε per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.xaxis.get_major_locator().set_params(integer=True)
    return fig


def _plot_confusion(matrix: list[list[int]], labels: list[Any]):
    n = len(labels)
    side = min(7.0, 2.5 + 0.45 * n)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    im = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_xticks(range(n), [str(label) for label in labels])
    ax.set_yticks(range(n), [str(label) for label in labels])
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix (test split)")
    top = max((max(row) for row in matrix), default=0) or 1
    if n <= 15:
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                if v:
                    ax.text(j, i, str(v), ha="center", va="center", fontsize=8, color="white" if v > top / 2 else "#1b1f24")
    return fig


def _plot_robustness(rob: dict):
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.4))
    clean = rob["clean_accuracy"]
    a1.plot([0] + [p["level"] for p in rob["noise"]], [clean] + [p["accuracy"] for p in rob["noise"]], marker="o", color=COLORS[2])
    a1.set(xlabel="noise std (fraction of feature range)", ylabel="accuracy", title="Gaussian input noise", ylim=(-0.02, 1.02))
    for kind, marker in (("fgsm", "s"), ("pgd", "o")):
        a2.plot([0] + [p["eps"] for p in rob[kind]], [clean] + [p["accuracy"] for p in rob[kind]], marker=marker, label=kind.upper())
    steps = rob["parameters"].get("pgd_steps")
    a2.set(xlabel="L∞ eps (fraction of feature range)", ylabel="accuracy", title=f"adversarial (PGD {steps} steps)", ylim=(-0.02, 1.02))
    a2.legend(fontsize=8)
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
    return fig


def _plot_clients(per_client: dict):
    fig, ax = plt.subplots(figsize=(max(5.0, min(12.0, 1 + 0.35 * len(per_client.get("accuracies", {})))), 3.4))
    acc = per_client.get("accuracies") or {}
    if not acc:
        return _message(fig, ax, per_client.get("reason") or "no client validation data")
    ids = list(acc)
    ax.bar(range(len(ids)), [acc[i] for i in ids], color=COLORS[0])
    ax.axhline(per_client["mean"], color="#1b1f24", linestyle="--", label=f"mean {per_client['mean']:.3f}")
    ax.set_xticks(range(len(ids)), ids, fontsize=8 if len(ids) > 20 else 10)
    ax.set(xlabel="client", ylabel="accuracy", title="accuracy on each client's validation split", ylim=(0, 1.05))
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, axis="y")
    return fig


def _plot_mia_roc(mia: dict | None):
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    if not mia:
        return _message(fig, ax, "no membership-inference result")
    for i, (name, a) in enumerate(mia["attacks"].items()):
        ax.plot(a["roc_fpr"], a["roc_tpr"], color=COLORS[i % len(COLORS)], label=f"{name} (AUC {a['auc']:.3f})")
    ax.plot([1e-4, 1], [1e-4, 1], color="#57606a", linestyle=":", label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    n = min(a["n_nonmembers"] for a in mia["attacks"].values())
    ax.set(xlim=(max(1e-3, 0.5 / n), 1), ylim=(max(1e-3, 0.5 / n), 1.05), xlabel="false positive rate", ylabel="true positive rate",
           title="membership-inference ROC (test half, log-log)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    return fig


def _mia_html(p: dict) -> str:
    mia = p.get("mia")
    parts = ["<h2>Membership inference</h2>"]
    if not mia:
        parts.append(f'<p class="note">{html.escape(p.get("mia_skipped") or "not run")}</p>')
        parts.append(_img("mia-roc", AUDIT_PLOTS["mia-roc"], lambda: _plot_mia_roc(None)))
        return "".join(parts)
    parts.append(
        f'<p class="note">Members: {mia["members"]} of the clients\' training records (seeded subsample); non-members: '
        f'{mia["nonmembers"]} held-out records (server test split and clients\' validation splits). Each set is split 50/50 into a '
        f'calibration half (thresholds) and a test half (metrics and counts). Reference attack: offline LiRA with '
        f'{mia["reference_models"]} reference model(s) trained on non-members with the run\'s recipe. Bounds: Clopper-Pearson, '
        f'{mia["confidence"]:.0%} confidence overall (Bonferroni over attacks), δ = {mia["delta"]:g}.</p>'
    )
    parts.append(_table(("attack", "AUC", "TPR @ 1% FPR", "TPR @ 0.1% FPR", "advantage", "ε lower bound"), [
        (name, a["auc"], a["tpr_at_1pct_fpr"], a["tpr_at_0_1pct_fpr"], a["advantage"], a["epsilon_lower_bound"]) for name, a in mia["attacks"].items()
    ]))
    theoretical = p.get("epsilon") if p.get("epsilon") is not None else p.get("client_epsilon")
    parts.append(_table(("", "ε"), [
        ("theoretical (accountant, upper bound)", theoretical if theoretical is not None else "∞ (non-private)"),
        (f"empirical lower bound ({mia['empirical_epsilon_attack']} attack)", mia["empirical_epsilon_lower_bound"]),
    ]))
    if theoretical is not None and mia["empirical_epsilon_lower_bound"] > theoretical:
        parts.append('<p class="fail">The empirical lower bound exceeds the theoretical ε: the DP implementation or the audit has a bug.</p>')
    parts.append(_img("mia-roc", AUDIT_PLOTS["mia-roc"], lambda: _plot_mia_roc(mia)))
    return "".join(parts)


def _plot_histogram(histogram: dict | None, groups: tuple[str, str], xlabel: str, title: str, empty: str):
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    if not histogram:
        return _message(fig, ax, empty)
    edges = histogram["edges"]
    width = edges[1] - edges[0]
    for i, name in enumerate(groups):
        # Each group as a share of its own size: the groups can differ 100-fold in size.
        total = max(1, sum(histogram[name]))
        ax.bar(edges[:-1], [c / total for c in histogram[name]], width=width, align="edge", alpha=0.55, color=COLORS[i], label=f"{name} ({sum(histogram[name])})")
    ax.set(xlabel=xlabel, ylabel="share of the group", title=title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return fig


def _canary_html(p: dict) -> str:
    ca, cc = p.get("canary_audit"), p.get("client_canary_audit")
    parts = ["<h2>Canary audits</h2>"]
    rows = []
    theoretical = p.get("epsilon") if p.get("epsilon") is not None else p.get("client_epsilon")
    rows.append((f"theoretical ε ({p.get('accountant') or 'no accountant'})", theoretical if theoretical is not None else "∞ (non-private)"))
    if p.get("mia"):
        rows.append(("membership inference, lower bound", p["mia"]["empirical_epsilon_lower_bound"]))
    if ca:
        rows.append((f"one-run canary audit, lower bound{'' if ca['valid'] else ' (scanned: not valid)'}", ca["epsilon_lower_bound"]))
    if p.get("canary_audit_scan"):
        rows.append(("one-run canary audit, best of a (k+, k-) scan (not a valid bound)", p["canary_audit_scan"]["epsilon_lower_bound"]))
    if cc:
        rows.append(("canary clients, estimate (not a bound)", cc["epsilon_estimate"]))
    if p.get("empirical_epsilon_lower_bound") is not None:
        rows.append((f"best valid lower bound ({p.get('empirical_epsilon_source') or 'no test beat chance'})", p["empirical_epsilon_lower_bound"]))
    parts.append(_table(("", "ε"), rows))
    if ca:
        parts.append(
            f'<p class="note">One-run audit (Steinke, Nasr and Jagielski 2023): {ca["m"]} canaries, {ca["included"]} included; '
            f'{ca["r"]} guesses (k+ = {ca["k_plus"]}, k− = {ca["k_minus"]}, {html.escape(ca["guesses"])}), {ca["v"]} correct; '
            f'ε lower bound {_fmt(ca["epsilon_lower_bound"])} at {ca["confidence"]:.0%} confidence, δ = {ca["delta"]:g}. '
            f'Theoretical ε covering every canary ({html.escape(ca.get("theoretical_source") or "non-private")}): {_fmt(ca["theoretical_epsilon"]) if ca["theoretical_epsilon"] is not None else "∞ (non-private)"}.</p>'
        )
        if ca["theoretical_epsilon"] is not None and ca["valid"] and ca["epsilon_lower_bound"] > ca["theoretical_epsilon"]:
            parts.append('<p class="fail">The canary lower bound exceeds the theoretical ε: the DP implementation or the audit has a bug.</p>')
    else:
        parts.append('<p class="note">No sample-level canaries in this run (train with <code>fedaudit run --canaries M</code>).</p>')
    parts.append(_img("plot-canary-scores", AUDIT_PLOTS["plot-canary-scores"], lambda: _plot_histogram(
        ca and ca["histogram"], ("included", "excluded"), "log(p / (1 - p)) of the canary label", "canary scores", "no canaries in this run")))
    if cc:
        parts.append(
            f'<p class="note">Canary clients (Andrew et al. 2023): {cc["canary_clients"]} inserted, {cc["unobserved"]} unobserved directions; '
            f'mean cosine {cc["mean_observed"]:.4f} against {cc["mean_unobserved"]:.4f} (pooled std {cc["std_pooled"]:.4f}); '
            f'ε estimate {_fmt(cc["epsilon_estimate"])} (pooled variance; each group its own variance, as the paper fits it: {_fmt(cc["epsilon_estimate_two_variance"])}) '
            f'at δ = {cc["delta"]:g}, next to the client-level theoretical ε {_fmt(cc["theoretical_epsilon"])}.</p>'
        )
    else:
        parts.append('<p class="note">No canary clients in this run (client-level DP runs: <code>fedaudit run --client-dp --canary-clients M</code>).</p>')
    parts.append(_img("plot-canary-cosines", AUDIT_PLOTS["plot-canary-cosines"], lambda: _plot_histogram(
        cc and cc["histogram"], ("inserted", "unobserved"), "cosine with the final model change", "canary-client cosines", "no canary clients in this run")))
    return "".join(parts)


# --------------------------------------------------------------------------- audit page
def _gates_html(gates: list[dict]) -> str:
    if not gates:
        return "<p class=\"note\">No gates requested (use --max-epsilon, --min-accuracy, --max-accuracy-drop, --min-robust-accuracy, --max-mia-auc).</p>"
    head = "".join(f"<th>{h}</th>" for h in ("gate", "threshold", "measured", "result", "detail"))
    body = "".join(
        f"<tr><td>{html.escape(g['gate'])}</td><td>{html.escape(_fmt(g['threshold']))}</td><td>{html.escape(_fmt(g['measured']))}</td>"
        f'<td class="{"pass" if g["passed"] else "fail"}">{"PASS" if g["passed"] else "FAIL"}</td><td class="t">{html.escape(g["detail"])}</td></tr>'
        for g in gates
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def audit_html(report: dict) -> str:
    """The HTML page of one ``audit_run`` report."""
    u, rob, p = report["utility"], report["robustness"], report["privacy"]
    eps = p.get("epsilon") if p.get("epsilon") is not None else p.get("client_epsilon")
    cards = _cards([
        ("test accuracy", u["accuracy"]), ("macro F1", u["f1_macro"]), ("ROC AUC", u["roc_auc"]),
        ("ε" if p["dp"] or p["client_dp"] else "ε (non-private)", eps if eps is not None else "∞"),
        ("δ", f"{p['delta']:g}" if p.get("delta") else "–"),
        (f"PGD acc @ eps {rob['strongest_pgd']['eps']:g}", rob["strongest_pgd"]["accuracy"]),
    ])
    parts = [cards]
    if report["gates"]:
        verdict = "all gates passed" if report["gates_passed"] else "some gates FAILED"
        parts.append(f'<h2>Gates: <span class="{"pass" if report["gates_passed"] else "fail"}">{verdict}</span></h2>')
    else:
        parts.append("<h2>Gates</h2>")
    parts.append(_gates_html(report["gates"]))

    parts.append("<h2>Training</h2>")
    parts.append(_img("plot-accuracy-loss", AUDIT_PLOTS["plot-accuracy-loss"], lambda: _plot_accuracy_loss(report["rounds"])))

    parts.append("<h2>Utility (server test split)</h2>")
    parts.append(_kv([
        ("accuracy", u["accuracy"]), ("balanced accuracy", u["balanced_accuracy"]), ("precision (macro)", u["precision_macro"]),
        ("recall (macro)", u["recall_macro"]), ("F1 (macro)", u["f1_macro"]),
        ("ROC AUC" + (" (binary)" if len(u["labels"]) == 2 else " (one-vs-rest, macro)"), u["roc_auc"] if u["roc_auc"] is not None else u.get("roc_auc_reason")),
        ("expected calibration error", u["expected_calibration_error"]), ("test records", u["n_samples"]),
    ]))
    labels = u["labels"]
    parts.append(_table(
        ("class", "precision", "recall", "F1", "support"),
        [(label, u["precision_per_class"][label], u["recall_per_class"][label], u["f1_per_class"][label], u["support_per_class"][label]) for label in labels],
    ))
    parts.append(_img("plot-confusion", AUDIT_PLOTS["plot-confusion"], lambda: _plot_confusion(u["confusion_matrix"], labels)))

    pc = u["per_client"]
    parts.append("<h2>Per-client accuracy (each client's local validation split)</h2>")
    if pc.get("n_clients"):
        parts.append(_kv([("clients", pc["n_clients"]), ("mean", pc["mean"]), ("worst", pc["worst"]), ("worst client", pc["worst_client"]),
                          ("best", pc["best"]), ("spread (best - worst)", pc["spread"]), ("std", pc["std"])]))
    parts.append(_img("plot-clients", AUDIT_PLOTS["plot-clients"], lambda: _plot_clients(pc)))

    g, e = u["generalisation"], u["efficiency"]
    parts.append("<h2>Generalisation gap</h2>")
    parts.append(_table(("", "training records (all clients)", "test split", "gap"), [
        ("accuracy", g["train_accuracy"], g["test_accuracy"], g["accuracy_gap"]),
        ("loss", g["train_loss"], g["test_loss"], g["loss_gap"]),
        ("records", g["n_train"], g["n_test"], None),
    ]))
    parts.append("<h2>Efficiency</h2>")
    parts.append(_kv([("model", report["model"]["name"]), ("parameters", e["parameters"]), ("parameter bytes", e["parameter_bytes"]),
                      ("model file bytes", e["file_bytes"]), ("inference latency per 1,000 records (ms)", e["latency_ms_per_1000"]),
                      ("torch threads", e["torch_threads"])]))

    parts.append("<h2>Robustness</h2>")
    params = rob["parameters"]
    parts.append(
        f'<p class="note">Evaluated on the {html.escape(rob["evaluated_on"])} ({rob["n_records"]} records). '
        f'{html.escape(params["space"])}. Bounds: {html.escape(params["bounds"])}. Noise: {html.escape(params["noise"])}. '
        f'FGSM: {html.escape(params["fgsm"])}. PGD: {params["pgd_steps"]} steps, alpha = {html.escape(params["pgd_alpha"])}, '
        f'starts: {html.escape(params["pgd_starts"])}. Library: {html.escape(params["library"])}.</p>'
    )
    eps_list = [pt["eps"] for pt in rob["fgsm"]]
    parts.append(_table(["accuracy", "clean"] + [f"eps {x:g}" for x in eps_list], [
        ["FGSM", rob["clean_accuracy"], *[pt["accuracy"] for pt in rob["fgsm"]]],
        ["PGD", rob["clean_accuracy"], *[pt["accuracy"] for pt in rob["pgd"]]],
    ]))
    parts.append(_table(["accuracy", "clean"] + [f"noise {pt['level']:g}" for pt in rob["noise"]],
                        [["Gaussian noise", rob["clean_accuracy"], *[pt["accuracy"] for pt in rob["noise"]]]]))
    parts.append(_img("plot-robustness", AUDIT_PLOTS["plot-robustness"], lambda: _plot_robustness(rob)))

    ea = report["error_analysis"]
    parts.append("<h2>Error analysis</h2>")
    parts.append("<p>Most confused class pairs (true → predicted):</p>")
    parts.append(_table(("true", "predicted", "count"), [(c["true"], c["predicted"], c["count"]) for c in ea["most_confused"]]))
    if report.get("baseline"):
        b = report["baseline"]
        parts.append(f"<p>Against baseline <code>{html.escape(b['run_id'])}</code>"
                     f"{' (non-private)' if not b['dp'] else ''}: accuracy {_fmt(b['accuracy'])} → {_fmt(u['accuracy'])} "
                     f"(drop {_fmt(b['accuracy_drop'])}), macro F1 drop {_fmt(b['f1_drop'])}.</p>")
        if b.get("note"):
            parts.append(f'<p class="note">{html.escape(b["note"])}</p>')
        parts.append("<p>Classes hurt most by privacy (per-class recall drop against the baseline):</p>")
        parts.append(_table(("class", "recall drop", "recall", "baseline recall"),
                            [(c["class"], c["recall_drop"], c["recall"], c["baseline_recall"]) for c in ea["classes_hurt_most"]]))

    parts.append("<h2>Privacy</h2>")
    parts.append(_img("plot-epsilon", AUDIT_PLOTS["plot-epsilon"], lambda: _plot_epsilon(report["rounds"], p)))
    parts.append(_kv([(k, f"{v:g}" if k == "delta" and v else v) for k, v in p.items() if not isinstance(v, (dict, list))]))
    for key, value in p.items():
        if isinstance(value, dict) and key not in ("mia", "canary_audit", "canary_audit_scan", "client_canary_audit"):
            parts.append(f"<p>{html.escape(key)}:</p>" + _kv(value.items()))
    parts.append(_mia_html(p))
    parts.append(_canary_html(p))
    if report.get("flags") is not None:
        flags = report["flags"]
        parts.append("<h2>Outlier flags (client updates flagged by the server)</h2>")
        flagged = flags["flagged"]
        parts.append(f"<p>{len(flagged)} of {flags['scored_updates']} scored client updates flagged.</p>")
        if "malicious_clients" in flags:
            parts.append(
                f"<p>Known malicious clients: {html.escape(str(flags['malicious_clients']))}. Flagged clients: "
                f"{html.escape(str(flags['flagged_clients']))}: {flags['flagged_malicious']} truly malicious, "
                f"{flags['flagged_honest']} honest.</p>"
            )
        if flagged:
            cols = [c for c in dict.fromkeys(k for f in flagged for k in f) if c != "flagged"]
            parts.append(_table(cols, [[f.get(c) if not isinstance(f.get(c), (list, dict)) else str(f.get(c)) for c in cols] for f in flagged]))
    m = report["model"]
    parts.append(f'<p class="note">Final model SHA-256 {html.escape(m["sha256"])}'
                 + ("" if m["matches_last_round"] is None else (" matches" if m["matches_last_round"] else " does NOT match"))
                 + ("" if m["matches_last_round"] is None else " the last round's digest in the run store.") + "</p>")
    d = report["data"]
    subtitle = f"{d['dataset']}, {d['clients']} clients, {d['partition']} partition, seed {d['seed']}, status {report['status']}"
    return _page(f"fedaudit audit: run {report['run_id']}", subtitle, "\n".join(parts))


# --------------------------------------------------------------------------- compare
def _overlay(runs: list[dict], key: str, ylabel: str, title: str):
    fig, ax = plt.subplots(figsize=(8, 3.6))
    drawn = False
    for i, run in enumerate(runs):
        x, y = _series(run["rounds"], key)
        if x:
            ax.plot(x, y, marker="o", color=COLORS[i % len(COLORS)], label=run.get("label") or run["run_id"])
            drawn = True
    if not drawn:
        return _message(fig, ax, f"no run has {ylabel} per round" + (" (all non-private)" if key.endswith("epsilon") else ""))
    ax.set(xlabel="round", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.xaxis.get_major_locator().set_params(integer=True)
    return fig


def _plot_compare_robustness(runs: list[dict]):
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for i, run in enumerate(runs):
        rob = run["robustness"]
        color = COLORS[i % len(COLORS)]
        for kind, style, marker in (("fgsm", "--", "s"), ("pgd", "-", "o")):
            ax.plot([0] + [p["eps"] for p in rob[kind]], [rob["clean_accuracy"]] + [p["accuracy"] for p in rob[kind]],
                    linestyle=style, marker=marker, color=color, label=f"{run['run_id']} {kind.upper()}")
    ax.set(xlabel="L∞ eps (fraction of feature range)", ylabel="accuracy", title="adversarial accuracy", ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def compare_html(report: dict) -> str:
    """The HTML page of a ``compare_reports`` result."""
    runs = report["runs"]
    header = ["metric"] + [runs[0]["run_id"] + " (reference)"] + [r["run_id"] for r in runs[1:]]
    rows = []
    for name in report["metric_names"]:
        row = [name, _fmt(runs[0]["metrics"].get(name))]
        for run, diff in zip(runs[1:], report["differences"]):
            value, delta = run["metrics"].get(name), diff["differences"].get(name)
            cell = _fmt(value) + (f" ({delta:+.4f})" if delta is not None and name != "privacy.delta" else (f" ({delta:+.2g})" if delta is not None else ""))
            row.append(cell)
        rows.append(row)
    body = [
        _table(["", *[r["run_id"] for r in runs]], [
            ["dataset", *[r["dataset"] for r in runs]], ["model", *[r["model"] for r in runs]],
            ["sample-level DP", *[r["dp"] for r in runs]], ["client-level DP", *[r["client_dp"] for r in runs]],
            ["status", *[r["status"] for r in runs]],
        ]),
        "" if report["same_data"] else '<p class="note">The runs do not share data, partition and seed: differences mix data and training effects.</p>',
        "<h2>Side by side (differences against the first run in brackets)</h2>",
        _table(header, rows),
        "<h2>Training</h2>",
        _img("plot-compare-accuracy", COMPARE_PLOTS["plot-compare-accuracy"], lambda: _overlay(runs, "accuracy", "accuracy", "test accuracy per round")),
        _img("plot-compare-loss", COMPARE_PLOTS["plot-compare-loss"], lambda: _overlay(runs, "loss", "loss", "test loss per round")),
        "<h2>Privacy</h2>",
        _img("plot-compare-epsilon", COMPARE_PLOTS["plot-compare-epsilon"], lambda: _overlay(runs, "epsilon", "cumulative ε", "sample-level ε per round")),
        "<h2>Robustness</h2>",
        _img("plot-compare-robustness", COMPARE_PLOTS["plot-compare-robustness"], lambda: _plot_compare_robustness(runs)),
    ]
    return _page(f"fedaudit compare: {len(runs)} runs", f"reference run {report['reference']}", "\n".join(body))


# --------------------------------------------------------------------------- sweep
def _plot_privacy_utility(report: dict):
    fig, ax = plt.subplots(figsize=(8, 4))
    private = [r for r in report["runs"] if r["dp"] and r["epsilon"] is not None and r["accuracy"] is not None]
    baseline = next((r for r in report["runs"] if not r["dp"] and r["accuracy"] is not None), None)
    if not private and baseline is None:
        return _message(fig, ax, "no run finished")
    if private:
        private.sort(key=lambda r: r["epsilon"])
        ax.plot([r["epsilon"] for r in private], [r["accuracy"] for r in private], marker="o", label="DP-SGD runs")
        for r in private:
            note = f"σ={r['noise_multiplier']:.2f}" + (f" (target ε {r['target_epsilon']:g})" if r.get("target_epsilon") else "")
            ax.annotate(note, (r["epsilon"], r["accuracy"]), textcoords="offset points", xytext=(5, -12), fontsize=8)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.margins(x=0.12, y=0.12)
    if baseline is not None:
        ax.axhline(baseline["accuracy"], color="#1b1f24", linestyle="--", label=f"non-private baseline ({baseline['accuracy']:.3f})")
    delta = next((r["delta"] for r in private if r.get("delta")), None)
    ax.set(xlabel="ε (sample level, largest client" + (f", δ = {delta:g})" if delta else ")"), ylabel="final test accuracy",
           title="privacy-utility curve")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    return fig


def sweep_html(report: dict) -> str:
    """The HTML page of a ``run_sweep`` result."""
    runs = report["runs"]
    labelled = [{**r, "label": r["label"]} for r in runs]
    rows = [(r["label"], r["run_id"], r["status"], r["noise_multiplier"], r["epsilon"], f"{r['delta']:g}" if r.get("delta") else None,
             r["accuracy"], r["f1_macro"], r["wall_time"]) for r in runs]
    d = report["data"]
    body = [
        _img("plot-privacy-utility", SWEEP_PLOTS["plot-privacy-utility"], lambda: _plot_privacy_utility(report)),
        _table(("run", "run id", "status", "noise multiplier", "ε", "δ", "accuracy", "macro F1", "wall time (s)"), rows),
        "<h2>Training</h2>",
        _img("plot-sweep-accuracy", SWEEP_PLOTS["plot-sweep-accuracy"], lambda: _overlay(labelled, "accuracy", "accuracy", "test accuracy per round")),
    ]
    subtitle = f"{d['dataset']}, {d['clients']} clients, {d['rounds']} rounds, {d['partition']} partition, seed {d['seed']}, model {d['model']}; varied: {report['mode']}"
    return _page("fedaudit sweep: privacy-utility curve", subtitle, "\n".join(body))
