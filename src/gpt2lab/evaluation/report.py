"""The explorer's results (:class:`ExploreResult`: a setting's scores and samples) and its files: results.csv,
results.json, plot.png (coherence vs diversity) and report.html. :mod:`.explore` computes the results."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ..atomic import write_file
from .common import json_safe

OUTPUT_FILES = ("results.csv", "results.json", "plot.png", "report.html")
# the columns of results.csv and of the terminal table, after the setting itself
METRICS = ("perplexity", "repeated_4gram_rate", "distinct_1", "distinct_2", "distinct_3", "self_bleu",
           "mean_length", "mean_tokens")
SETTING_FIELDS = ("label", "temperature", "top_k", "top_p")


@dataclass(frozen=True)
class Setting:
    """One point of the grid."""

    temperature: float
    top_k: int
    top_p: float

    @property
    def label(self) -> str:
        return f"T={self.temperature:g} k={self.top_k} p={self.top_p:g}"


@dataclass
class Sample:
    prompt: str
    text: str  # the completion only
    tokens: int
    perplexity: float  # of this completion given its prompt, under the scoring model


@dataclass
class SettingResult:
    """A setting's scores (pooled over its samples; diversity averaged over prompts) and samples."""

    setting: Setting
    perplexity: float
    repeated_4gram_rate: float | None
    distinct_1: float | None
    distinct_2: float | None
    distinct_3: float | None
    self_bleu: float | None
    mean_length: float | None  # words
    mean_tokens: float
    samples: list[Sample] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        """The flat record of results.csv: the setting then its metrics."""
        s = self.setting
        return {"label": s.label, "temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p,
                **{m: getattr(self, m) for m in METRICS}}


@dataclass
class ExploreResult:
    model: str
    scoring_model: str
    prompts: list[str]
    max_length: int
    samples: int
    seed: int | None
    settings: list[SettingResult]

    def to_dict(self) -> dict[str, Any]:
        """results.json: the run's parameters and, per setting, its scores and samples."""
        return {"model": self.model, "scoring_model": self.scoring_model, "prompts": self.prompts,
                "max_length": self.max_length, "samples": self.samples, "seed": self.seed,
                "settings": [{**r.row(), "samples": [asdict(s) for s in r.samples]} for r in self.settings]}


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:.0f}"


def results_csv(result: ExploreResult) -> str:
    """results.csv: one row per setting, its parameters and scores (NaN and None as empty cells)."""
    fh = io.StringIO()
    writer = csv.DictWriter(fh, fieldnames=[*SETTING_FIELDS, *METRICS])
    writer.writeheader()
    for r in result.settings:
        writer.writerow({k: "" if v is None or (isinstance(v, float) and math.isnan(v)) else v
                         for k, v in r.row().items()})
    return fh.getvalue()


def plot_png(result: ExploreResult, path: Path | BinaryIO) -> None:
    """Scatter of diversity (distinct-2) against coherence (perplexity), one labelled point per setting, as
    PNG into ``path`` (a file name or a binary file)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # the object API with an Agg canvas: no pyplot, no global backend switch, works without a display
    fig = Figure(figsize=(9, 6.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    points = [(r.distinct_2, r.perplexity, r) for r in result.settings
              if r.distinct_2 is not None and math.isfinite(r.perplexity)]
    temps = [r.setting.temperature for *_, r in points]
    sc = ax.scatter([x for x, *_ in points], [y for _, y, _ in points], c=temps, cmap="coolwarm", s=60,
                    edgecolors="black", linewidths=0.5)
    for x, y, r in points:
        ax.annotate(r.setting.label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    if points and min(y for _, y, _ in points) > 0 and max(y for _, y, _ in points) / min(y for _, y, _ in points) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("diversity: distinct-2 (higher = more varied)")
    ax.set_ylabel(f"incoherence: perplexity under {result.scoring_model} (lower = more coherent)")
    ax.set_title(f"Creativity vs coherence: {result.model}, {result.samples} samples per prompt and setting")
    ax.grid(True, alpha=0.3)
    if points:
        fig.colorbar(sc, ax=ax, label="temperature")
    fig.tight_layout()
    fig.savefig(path, format="png")


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}
.grid{display:flex;gap:1em;overflow-x:auto;padding-bottom:1em;align-items:flex-start}
.card{flex:0 0 22em;border:1px solid #bbb;border-radius:6px;padding:.6em;background:#fafafa}
.card h3{margin:.1em 0 .4em;font-size:1em}.scores{font-size:.8em;color:#555;margin-bottom:.5em}
.sample{white-space:pre-wrap;font-size:.85em;border-top:1px dashed #ccc;padding:.4em 0}
.prompt{font-weight:bold;color:#444}.ppl{font-size:.75em;color:#888}
img{max-width:100%;height:auto;border:1px solid #ddd}
"""


def _scores_line(r: SettingResult) -> str:
    return (f"perplexity {_fmt(r.perplexity, 1)} · rep-4 {_fmt(r.repeated_4gram_rate)} · distinct-2 "
            f"{_fmt(r.distinct_2)} · self-BLEU {_fmt(r.self_bleu, 1)} · {_fmt(r.mean_length, 1)} words")


def render_html(result: ExploreResult, png: bytes | None = None) -> str:
    """A self-contained page (inline CSS, plot embedded as data: URI, every text escaped)."""
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>gpt2lab explore: {e(result.model)}</title><style>{_CSS}</style></head><body>",
           f"<h1>Sampling explorer: {e(result.model)}</h1>",
           f"<p>{len(result.settings)} settings × {len(result.prompts)} prompt(s) × {result.samples} samples, "
           f"max_length {result.max_length}, seed {e(str(result.seed))}. Coherence: perplexity of the samples "
           f"under {e(result.scoring_model)} (lower is more coherent) and repeated-4-gram rate. Creativity: "
           "distinct-n (higher is more varied) and self-BLEU (lower is more varied).</p>"]
    if png is not None:
        out.append(f'<img alt="coherence vs diversity" src="data:image/png;base64,{base64.b64encode(png).decode()}">')
    out.append('<h2>Scores</h2><table><tr><th class="l">label</th>' + "".join(
        f"<th>{e(c)}</th>" for c in (*SETTING_FIELDS[1:], *METRICS)) + "</tr>")
    for r in result.settings:
        row = r.row()
        cells = [f'<td class="l">{e(row["label"])}</td>'] + [
            f"<td>{e(str(row[c]))}</td>" for c in SETTING_FIELDS[1:]] + [f"<td>{_fmt(row[m])}</td>" for m in METRICS]
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    for p, prompt in enumerate(result.prompts):
        out.append(f"<h2>Prompt {p + 1}: <span class=\"prompt\">{e(prompt)}</span></h2><div class=\"grid\">")
        for r in result.settings:
            out.append(f'<div class="card"><h3>{e(r.setting.label)}</h3><div class="scores">{e(_scores_line(r))}'
                       "</div>")
            for s in r.samples:
                if s.prompt == prompt:
                    out.append(f'<div class="sample"><span class="prompt">{e(s.prompt)}</span>{e(s.text)} '
                               f'<span class="ppl">(ppl {_fmt(s.perplexity, 1)})</span></div>')
            out.append("</div>")
        out.append("</div>")
    out.append("</body></html>")
    return "\n".join(out)


def write_outputs(result: ExploreResult, out: str | Path) -> dict[str, Path]:
    """Write the four files into directory ``out`` (created if needed), each atomically; their paths by name."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    plot_png(result, png)
    return {"results.csv": write_file(out / "results.csv", results_csv(result)),
            "results.json": write_file(out / "results.json",
                                       json.dumps(json_safe(result.to_dict()), indent=2, ensure_ascii=False) + "\n"),
            "plot.png": write_file(out / "plot.png", png.getvalue()),
            "report.html": write_file(out / "report.html", render_html(result, png.getvalue()))}
