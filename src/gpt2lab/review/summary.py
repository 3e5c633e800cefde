"""``gpt2lab review summary``: what a log of judgements says, as numbers, a table, a plot and a page.

Only a reviewer's latest judgement of an item counts (a log may hold a changed mind). Pairwise:
win rate per source = (wins + half of ties and both-bad) / comparisons, with a Wilson 95% interval;
Bradley-Terry strengths when there are more than two sources. Ratings: mean per source and criterion
with a Student-t 95% interval. Agreement: on the items two or more reviewers judged, Cohen's kappa
(two reviewers; quadratic weights for ratings) and Krippendorff's alpha (any number; nominal for
choices and decisions, ordinal for ratings).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from ..evaluation.common import json_safe
from .stats import bradley_terry, cohen_kappa, krippendorff_alpha, t_interval, wilson_interval

WIN_INTERVAL = "Wilson score interval, 95%; ties and both-bad count half a win"
RATING_INTERVAL = "Student-t interval of the mean, 95%"
OUTPUT_FILES = ("summary.json", "plot.png", "report.html")


def latest(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each reviewer's last judgement of each item, in the order first judged."""
    last: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        key = (str(r.get("reviewer")), str(r.get("item")))
        last.pop(key, None)
        last[key] = r
    return list(last.values())


def _pairwise(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    recs = [r for r in records if r.get("mode") == "pairwise"]
    if not recs:
        return None
    counts: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(("wins", "losses", "ties", "both_bad"), 0))
    wins: dict[tuple[str, str], float] = defaultdict(float)
    for r in recs:
        a, b = r["sources"]
        if r["choice"] in ("A", "B"):
            w, lo = (a, b) if r["choice"] == "A" else (b, a)
            counts[w]["wins"] += 1
            counts[lo]["losses"] += 1
            wins[(w, lo)] += 1
        else:
            key = "ties" if r["choice"] == "tie" else "both_bad"
            counts[a][key] += 1
            counts[b][key] += 1
            wins[(a, b)] += 0.5
            wins[(b, a)] += 0.5
    sources = []
    for name in sorted(counts):
        c = counts[name]
        n = c["wins"] + c["losses"] + c["ties"] + c["both_bad"]
        score = c["wins"] + 0.5 * (c["ties"] + c["both_bad"])
        low, high = wilson_interval(score, n)
        sources.append({"source": name, "comparisons": int(n), **{k: int(v) for k, v in c.items()},
                        "win_rate": score / n, "ci_low": low, "ci_high": high})
    sources.sort(key=lambda s: -s["win_rate"])
    head = [{"source": a, "opponent": b, "wins": wins[(a, b)], "comparisons": wins[(a, b)] + wins[(b, a)]}
            for a in sorted(counts) for b in sorted(counts) if a != b and (wins[(a, b)] + wins[(b, a)])]
    out: dict[str, Any] = {"interval": WIN_INTERVAL, "sources": sources, "head_to_head": head, "bradley_terry": None}
    if len(counts) > 2:
        bt = bradley_terry(wins)
        out["bradley_terry"] = {"method": "Hunter's MM algorithm, ties half a win each; strengths sum to 1",
                                "strengths": dict(sorted(bt.strengths.items(), key=lambda kv: -kv[1])),
                                "iterations": bt.iterations, "converged": bt.converged,
                                "regularised": bt.regularised}
    return out


def _ratings(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    recs = [r for r in records if r.get("mode") == "ratings"]
    if not recs:
        return None
    values: dict[tuple[str, str], list[float]] = defaultdict(list)
    criteria: list[str] = []
    for r in recs:
        for crit, score in r["scores"].items():
            if crit not in criteria:
                criteria.append(crit)
            values[(r["source"], crit)].append(float(score))
    rows = []
    for (source, crit), vals in sorted(values.items(), key=lambda kv: (kv[0][0], criteria.index(kv[0][1]))):
        mean, low, high = t_interval(vals)
        rows.append({"source": source, "criterion": crit, "n": len(vals), "mean": mean, "ci_low": low, "ci_high": high})
    return {"interval": RATING_INTERVAL, "criteria": criteria, "rows": rows}


def _curation(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    recs = [r for r in records if r.get("mode") == "curation"]
    if not recs:
        return None
    decisions: dict[str, int] = defaultdict(int)
    flags: dict[str, int] = defaultdict(int)
    for r in recs:
        decisions[r["decision"]] += 1
        for f in r.get("flags") or ():
            flags[f] += 1
    items = {r["item"] for r in recs}
    dropped = {r["item"] for r in recs if r["decision"] == "reject"}
    return {"decisions": dict(decisions), "flags": dict(flags), "items": len(items),
            "items_kept": len(items - dropped), "items_dropped": len(dropped)}


def _agreement_one(what: str, labels: dict[tuple[str, str], Any], level: str,
                   kappa_weights: str | None) -> dict[str, Any] | None:
    """Agreement over the items judged by two or more reviewers; ``labels[(reviewer, item)]``."""
    by_item: dict[str, dict[str, Any]] = defaultdict(dict)
    for (reviewer, item), v in labels.items():
        by_item[item][reviewer] = v
    shared = sorted(i for i, d in by_item.items() if len(d) >= 2)
    if not shared:
        return None
    reviewers = sorted({rv for i in shared for rv in by_item[i]})
    out: dict[str, Any] = {"what": what, "reviewers": reviewers, "items": len(shared), "level": level,
                           "cohen_kappa": None, "krippendorff_alpha": None}
    if len(reviewers) == 2:
        a, b = reviewers
        both = [i for i in shared if a in by_item[i] and b in by_item[i]]
        out["cohen_kappa"] = cohen_kappa([by_item[i][a] for i in both], [by_item[i][b] for i in both], kappa_weights)
        out["kappa_weights"] = kappa_weights
    codes = {v: k for k, v in enumerate(sorted({str(v) for d in by_item.values() for v in d.values()}))}
    table = [[(by_item[i][rv] if level == "ordinal" else codes[str(by_item[i][rv])]) if rv in by_item[i] else None
              for i in shared] for rv in reviewers]
    try:
        out["krippendorff_alpha"] = krippendorff_alpha(table, level)
    except (ValueError, ZeroDivisionError):  # one value only: agreement is undefined
        out["krippendorff_alpha"] = None
    return out


def _agreement(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    # the winner as the first or second of the item's two sources in name order (not the source's name: with
    # three or more sources an item's pair offers only two of them, and pooling names across items would
    # make chance look like agreement; nor the A/B position, which differs between reviewers)
    pair = {(r["reviewer"], r["item"]): (("first", "second")[sorted(r["sources"]).index(r["winner"])]
                                         if r.get("winner") in r["sources"] else r["choice"])
            for r in records if r.get("mode") == "pairwise"}
    out.append(_agreement_one("pairwise choice", pair, "nominal", None))
    ratings = [r for r in records if r.get("mode") == "ratings"]
    criteria = list(dict.fromkeys(c for r in ratings for c in r["scores"]))
    for crit in criteria:
        labels = {(r["reviewer"], r["item"]): int(r["scores"][crit]) for r in ratings if crit in r["scores"]}
        out.append(_agreement_one(f"rating: {crit}", labels, "ordinal", "quadratic"))
    cur = {(r["reviewer"], r["item"]): ("drop" if r["decision"] == "reject" else "keep")
           for r in records if r.get("mode") == "curation"}
    out.append(_agreement_one("curation keep/drop", cur, "nominal", None))
    return [a for a in out if a is not None]


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The summary of a log's records (see the module docstring); plain JSON-able values, NaN as None."""
    last = latest(records)
    return json_safe({
        "judgements": len(records), "counted": len(last),
        "reviewers": sorted({str(r.get("reviewer")) for r in last}),
        "items": len({r.get("item") for r in last}),
        "pairwise": _pairwise(last), "ratings": _ratings(last), "curation": _curation(last),
        "agreement": _agreement(last),
        "comments": [{"reviewer": r.get("reviewer"), "item": r.get("item"), "comment": r["comment"]}
                     for r in last if r.get("comment")],
    })


# -- presentation ---------------------------------------------------------------------------------------
def _f(v: Any, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def tables(summary: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of each table, shared by the terminal and the HTML page."""
    out = []
    pw = summary.get("pairwise")
    if pw:
        bt = (pw.get("bradley_terry") or {}).get("strengths", {})
        head = ["source", "comparisons", "wins", "losses", "ties", "both bad", "win rate", "95% CI"]
        rows = [[s["source"], str(s["comparisons"]), str(s["wins"]), str(s["losses"]), str(s["ties"]),
                 str(s["both_bad"]), _f(s["win_rate"]), f"{_f(s['ci_low'])}-{_f(s['ci_high'])}"]
                for s in pw["sources"]]
        if bt:
            head.append("Bradley-Terry")
            for row, s in zip(rows, pw["sources"]):
                row.append(_f(bt.get(s["source"])))
        out.append((f"Pairwise ({pw['interval']})", head, rows))
        names = [s["source"] for s in pw["sources"]]
        if len(names) > 2:
            cell = {(h["source"], h["opponent"]): h for h in pw["head_to_head"]}
            out.append(("Head to head: wins of the row's source over the column's / comparisons", ["", *names],
                        [[a, *("" if a == b or (a, b) not in cell else
                               f"{cell[(a, b)]['wins']:g}/{cell[(a, b)]['comparisons']:g}" for b in names)]
                         for a in names]))
    rt = summary.get("ratings")
    if rt:
        out.append((f"Ratings 1-5 ({rt['interval']})", ["source", "criterion", "n", "mean", "95% CI"],
                    [[r["source"], r["criterion"], str(r["n"]), _f(r["mean"], 2),
                      f"{_f(r['ci_low'], 2)}-{_f(r['ci_high'], 2)}"] for r in rt["rows"]]))
    cu = summary.get("curation")
    if cu:
        rows = [[k, str(v)] for k, v in cu["decisions"].items()] + [[f"flag: {k}", str(v)] for k, v in
                                                                    cu["flags"].items()]
        rows += [["items kept", str(cu["items_kept"])], ["items dropped", str(cu["items_dropped"])]]
        out.append(("Curation", ["", "count"], rows))
    if summary.get("agreement"):
        out.append(("Agreement between reviewers (items judged by two or more)",
                    ["judgement", "reviewers", "items", "Cohen's kappa", "Krippendorff's alpha"],
                    [[a["what"] + (f" ({a['kappa_weights']} weights)" if a.get("kappa_weights") else ""),
                      ", ".join(a["reviewers"]), str(a["items"]), _f(a["cohen_kappa"]),
                      f"{_f(a['krippendorff_alpha'])} ({a['level']})"] for a in summary["agreement"]]))
    if summary.get("comments"):
        out.append(("Comments", ["item", "reviewer", "comment"],
                    [[c["item"], c["reviewer"], c["comment"]] for c in summary["comments"]]))
    return out


def plot_png(summary: dict[str, Any], path: Path | BinaryIO) -> bool:
    """Win rates with their intervals and mean ratings with theirs, as PNG into ``path`` (a file name or a
    binary file); False when there is nothing to plot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pw, rt = summary.get("pairwise"), summary.get("ratings")
    panels = [p for p in (pw, rt) if p]
    if not panels:
        return False
    fig = Figure(figsize=(6 * len(panels), 4.2), dpi=110)
    FigureCanvasAgg(fig)
    k = 1
    if pw:
        ax = fig.add_subplot(1, len(panels), k)
        k += 1
        src = pw["sources"]
        y = range(len(src))
        rates = [s["win_rate"] for s in src]
        err = [[r - (s["ci_low"] if s["ci_low"] is not None else r) for r, s in zip(rates, src)],
               [(s["ci_high"] if s["ci_high"] is not None else r) - r for r, s in zip(rates, src)]]
        ax.barh(list(y), rates, xerr=err, color="#2f6fde", alpha=0.8, capsize=4)
        ax.set_yticks(list(y), [s["source"] for s in src])
        ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
        ax.set_xlim(0, 1)
        ax.invert_yaxis()
        ax.set_xlabel("win rate (ties half), 95% Wilson interval")
        ax.set_title("Pairwise preference")
    if rt:
        ax = fig.add_subplot(1, len(panels), k)
        crits, sources = rt["criteria"], sorted({r["source"] for r in rt["rows"]})
        width = 0.8 / max(1, len(sources))
        for s_i, source in enumerate(sources):
            rows = {r["criterion"]: r for r in rt["rows"] if r["source"] == source}
            xs = [c_i + s_i * width for c_i, c in enumerate(crits) if c in rows]
            means = [rows[c]["mean"] for c in crits if c in rows]
            err = [[m - (rows[c]["ci_low"] if rows[c]["ci_low"] is not None else m) for m, c in
                    zip(means, [c for c in crits if c in rows])],
                   [(rows[c]["ci_high"] if rows[c]["ci_high"] is not None else m) - m for m, c in
                    zip(means, [c for c in crits if c in rows])]]
            ax.bar(xs, means, width, yerr=err, capsize=3, label=source)
        ax.set_xticks([c_i + 0.4 - width / 2 for c_i in range(len(crits))], crits)
        ax.set_ylim(0, 5.5)
        ax.set_ylabel("mean rating (1-5), 95% t interval")
        ax.set_title("Ratings")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return True


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em;color:#222;max-width:1100px}
table{border-collapse:collapse;font-size:.9em;margin-bottom:1.2em}th,td{border:1px solid #ccc;padding:.25em .6em;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
img{max-width:100%;height:auto;border:1px solid #ddd}.note{color:#555;font-size:.9em}
"""


def render_html(summary: dict[str, Any], png: bytes | None = None, title: str = "review") -> str:
    """A self-contained page (inline CSS, the plot as a data: URI, every text escaped)."""
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>gpt2lab review: {e(title)}</title><style>{_CSS}</style></head><body>",
           f"<h1>Human review: {e(title)}</h1>",
           f"<p>{summary['counted']} judgements counted ({summary['judgements']} in the log; a reviewer's latest "
           f"judgement of an item counts) of {summary['items']} items by {len(summary['reviewers'])} reviewer(s): "
           f"{e(', '.join(summary['reviewers']))}.</p>"]
    if png is not None:
        out.append(f'<img alt="win rates and ratings" src="data:image/png;base64,{base64.b64encode(png).decode()}">')
    for caption, head, rows in tables(summary):
        out.append(f"<h2>{e(caption)}</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>")
        out += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows]
        out.append("</table>")
    bt = (summary.get("pairwise") or {}).get("bradley_terry")
    if bt:
        out.append(f'<p class="note">Bradley-Terry: {e(bt["method"])}; {bt["iterations"]} iterations'
                   + ("; regularised with half a win each way per compared pair (one source never won or never "
                      "lost)" if bt["regularised"] else "") + ".</p>")
    out.append("</body></html>")
    return "\n".join(out)


def write_outputs(summary: dict[str, Any], out: str | Path, title: str = "review") -> dict[str, Path]:
    """summary.json, plot.png (when there is something to plot) and report.html in directory ``out``."""
    from ..atomic import write_file

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    paths = {"summary.json": write_file(out / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")}
    buffer = io.BytesIO()
    png = buffer.getvalue() if plot_png(summary, buffer) else None
    if png is not None:
        paths["plot.png"] = write_file(out / "plot.png", png)
    paths["report.html"] = write_file(out / "report.html", render_html(summary, png, title))
    return paths
