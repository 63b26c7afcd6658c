"""What `fedllm audit` prints and writes: a table of checks per client, and
`audit/report.md` / `audit/report.html` with the epsilon plots."""

from __future__ import annotations

import base64
import html
import statistics
from pathlib import Path

from fedllm.audit.evidence import Audit
from fedllm.audit.records import CHECKS, RUN_CHECKS
from fedllm.audit.user import SUBJECT, USER_CHECKS

SHORT = {"fields": "fields", "versions": "vers", "privacy-unit": "unit", "sampling": "poisson", "chain": "chain",
         "delta": "delta", "epsilon-pld": "pld", "epsilon-rdp": "rdp", "target": "target", "rounds": "rounds",
         "device-ledger": "device", "signature": "signed", "records": "records", "select": "select",
         "summary": "summary"}
MARK = {"pass": "ok", "fail": "FAIL", "skip": "-"}
EXPLAIN = {
    "fields": "every required field present with the right type (mechanism, delta, target, history, chain)",
    "versions": "library versions recorded (fedllm, opacus, torch, dp-accounting)",
    "privacy-unit": "the privacy unit is stated",
    "sampling": "Poisson sampling, one rate, equal to 1/ceil(records / batch size)",
    "chain": "the ledger's hash chain is intact: nothing edited, deleted, inserted or reordered",
    "delta": "delta below 1/n for the client's record count",
    "epsilon-pld": "claimed epsilon equals dp-accounting's PLD epsilon of the recorded history (within tolerance)",
    "epsilon-rdp": "neither claim nor PLD exceeds dp-accounting's RDP upper bound",
    "target": "the target epsilon was never exceeded (claim, and recomputation within tolerance)",
    "rounds": "rounds and steps charged agree with the server's metrics.jsonl for this client",
    "device-ledger": "the device's own ledger extends the chain the server was shown",
    "signature": "the report is signed with the device's own key (from --keys or its state store), not re-signed",
    "records": "each record-count change states its count, its rate is the one that count gives, and the count "
               "in force in this run is the one the device declared at discovery",
    "select": "every hive round whose specialists differed charged a choice before training, at the pinned noise",
    "summary": "privacy/summary.json agrees with the client reports",
}


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _rows(audit: Audit) -> list[list[str]]:
    rows = []
    for client in audit.clients:
        e = audit.epsilons.get(client)
        rows.append([client, _fmt(e.claimed if e else None), _fmt(e.pld if e else None), _fmt(e.rdp if e else None),
                     _fmt(e.target if e else None)] + [MARK[audit.status(client, c)] for c in CHECKS])
    return rows


def run_line(audit: Audit) -> str:
    """The checks of the run as a whole, when a run directory was audited."""
    if not any(f.client == "run" for f in audit.findings):
        return ""
    return "run: " + ", ".join(f"{c} {MARK[audit.status('run', c)]}" for c in RUN_CHECKS)


HEADER = ["client", "claimed", "pld-eps", "rdp-eps", "target-eps"] + [SHORT[c] for c in CHECKS]


def user_line(audit: Audit) -> str:
    """The user-level claim (privacy/user_level.json), when the run has one."""

    if not any(f.client == SUBJECT for f in audit.findings):
        return ""
    e = audit.user_level
    eps = (f"claimed {_fmt(e.claimed)}, pld {_fmt(e.pld)}, rdp {_fmt(e.rdp)}; " if e else "")
    return "user-level: " + eps + ", ".join(f"{c} {MARK[audit.status(SUBJECT, c)]}" for c in USER_CHECKS)


def failure_lines(audit: Audit) -> list[str]:
    return [f"FAIL  client {f.client}  check {f.check}  field {f.field or '-'}: {f.message}" for f in audit.failures]


def table(audit: Audit) -> str:
    rows = [HEADER] + _rows(audit)
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    user = " and the user-level claim" if user_line(audit) else ""
    verdict = (f"{len(audit.failures)} failed check(s)" if audit.failures
               else f"all checks passed for {len(audit.clients)} client(s){user}")
    return "\n".join([*lines, "", *filter(None, [run_line(audit), user_line(audit)]), verdict, *failure_lines(audit)])


def _plots(audit: Audit, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = {c: e for c, e in audit.epsilons.items() if e.pld is not None}
    if not eps:
        return []
    paths = []
    order = sorted(eps, key=lambda c: eps[c].pld)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    xs = range(len(order))
    claimed = [eps[c].claimed for c in order]
    if any(v is not None for v in claimed):
        ax.bar(xs, [v or 0.0 for v in claimed], color="#9ecae1", label="claimed (client's Opacus accountant)")
    ax.plot(xs, [eps[c].pld for c in order], "k.", label="recomputed: dp-accounting PLD")
    ax.plot(xs, [eps[c].rdp for c in order], "_", color="#d62728", label="dp-accounting RDP (upper bound)")
    targets = {e.target for e in eps.values() if e.target is not None}
    for t in targets:
        ax.axhline(t, color="grey", ls="--", lw=1)
    ax.set_xlabel(f"client (sorted by epsilon; {len(order)} clients)")
    ax.set_ylabel("epsilon")
    ax.set_title("Epsilon across clients" + (f" (target {', '.join(f'{t:g}' for t in sorted(targets))})"
                                             if targets else ""))
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    paths.append(out / "epsilon_clients.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 3.5))
    for c in order:
        series = eps[c].by_round
        rounds = [r for r, _ in series]
        x = rounds if rounds == sorted(rounds) else list(range(1, len(series) + 1))
        ax.step([0, *x], [0.0, *(v for _, v in series)], where="post", color="#3182bd", alpha=0.35, lw=1)
    for t in targets:
        ax.axhline(t, color="grey", ls="--", lw=1)
    ax.set_xlabel("round (ledger entries; personalisation is charged in the last round)")
    ax.set_ylabel("epsilon spent (PLD)")
    ax.set_ylim(bottom=0)
    ax.set_title("Epsilon over rounds, one line per client")
    fig.tight_layout()
    paths.append(out / "epsilon_rounds.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def _summary_lines(audit: Audit) -> list[str]:
    pld = [e.pld for e in audit.epsilons.values() if e.pld is not None]
    lines = [f"- Audited: `{audit.source}` ({audit.kind}), {len(audit.clients)} client(s); tolerance "
             f"{audit.tolerance:.1%} between the client's accountant and dp-accounting PLD."]
    if user_line(audit):
        lines.append(f"- {user_line(audit)}")
    if pld:
        lines.append(f"- Recomputed epsilon (PLD): min {min(pld):.3f}, median {statistics.median(pld):.3f}, "
                     f"max {max(pld):.3f}.")
    lines.append(f"- Verdict: **{'FAIL' if audit.failures else 'PASS'}** "
                 f"({len(audit.failures)} failed check(s)).")
    return lines


def write_markdown(audit: Audit, out: Path, plots: list[Path]) -> Path:
    rows = _rows(audit)
    lines = ["# Privacy audit", "", *_summary_lines(audit), "", "## Checks per client", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", run_line(audit)] if run_line(audit) else []
    lines += ["", "## Failures", ""] + ([f"- `{f.client}` **{f.check}** `{f.field or '-'}`: {f.message}"
                                        for f in audit.failures] or ["None."])
    skipped = sorted({(f.check, f.message) for f in audit.findings if f.status == "skip"})
    if skipped:
        lines += ["", "## Skipped", ""] + [f"- {c}: {m}" for c, m in skipped]
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    lines += ["", "## What each check means", ""] + [f"- **{SHORT[c]}** ({c}): {EXPLAIN[c]}"
                                                   for c in (*CHECKS, "summary")]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_html(audit: Audit, out: Path, plots: list[Path]) -> Path:
    esc = html.escape
    cells = {"ok": "#e5f5e0", "FAIL": "#fcbba1"}
    head = "".join(f"<th>{esc(h)}</th>" for h in HEADER)
    body = "".join("<tr>" + "".join(f'<td style="background:{cells.get(c, "")}">{esc(c)}</td>' for c in row)
                   + "</tr>" for row in _rows(audit))
    failures = "".join(f"<li><code>{esc(f.client)}</code> <b>{esc(f.check)}</b> <code>{esc(f.field or '-')}</code>: "
                       f"{esc(f.message)}</li>" for f in audit.failures) or "<li>None.</li>"
    images = "".join(f'<p><img alt="{esc(p.stem)}" src="data:image/png;base64,'
                     f'{base64.b64encode(p.read_bytes()).decode()}"></p>' for p in plots)
    summary = "".join(f"<li>{esc(line[2:]).replace('**', '')}</li>" for line in _summary_lines(audit))
    meaning = "".join(f"<li><b>{esc(SHORT[c])}</b> ({esc(c)}): {esc(EXPLAIN[c])}</li>" for c in (*CHECKS, "summary"))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>Privacy audit</title>"
            f"<style>body{{font-family:sans-serif;max-width:80em}}td,th{{padding:2px 6px;font-size:12px;"
            f"border-bottom:1px solid #ddd}}</style></head><body><h1>Privacy audit</h1><ul>{summary}</ul>"
            f"<h2>Checks per client</h2><table><tr>{head}</tr>{body}</table><p>{esc(run_line(audit))}</p><h2>Failures</h2><ul>{failures}</ul>"
            f"<h2>Plots</h2>{images}<h2>What each check means</h2><ul>{meaning}</ul></body></html>\n")
    path = out / "report.html"
    path.write_text(page)
    return path


def write_reports(audit: Audit, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(audit, out)
    return [write_markdown(audit, out, plots), write_html(audit, out, plots), *plots]
