"""The report page shell: HTML escaping, number formatting, tables, embedded PNG figures, CSS."""

from __future__ import annotations

import base64
import html
import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

__all__ = ["FLOOR", "png", "img", "fmt", "table", "page", "esc", "plt", "position"]

FLOOR = 1e-32  # exact zeros drawn at this height on log axes

CSS = """
body{font-family:system-ui,sans-serif;margin:24px;max-width:1400px;color:#222}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:12px;margin:8px 0;max-width:100%}
th,td{border:1px solid #ddd;padding:3px 5px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left;white-space:nowrap}
td.text,td.text:first-child{text-align:left;white-space:normal;min-width:8em;max-width:28em}
tr.fail td{background:#fde2e2}
.v-global_optimum,.v-dnc,.v-holds{color:#126b12;font-weight:600}
.v-below_dnc_low_rank{color:#7a4cc2;font-weight:600}
.v-dnc_local_minimum,.v-above_dnc,.v-partly{color:#b36b00;font-weight:600}
.v-not_converged,.v-does_not_hold{color:#b00;font-weight:600}
.v-not_tested,.v-no_theory{color:#777}
img{max-width:100%}details{margin:4px 0}.note{color:#555;font-size:13px}
"""


def esc(text: object) -> str:
    return html.escape(str(text))


def png(fig) -> str:
    """Base64 PNG of a matplotlib figure (closed afterwards)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def img(b64: str) -> str:
    return f"<img src='data:image/png;base64,{b64}'>"


def position(layer: int, rep: str) -> float:
    """x position of a representation in depth plots: pre-activation of layer l at l - 0.25."""
    return layer - 0.25 if rep == "pre" else float(layer)


def fmt(v) -> str:
    """Compact cell text: 6 significant digits, scientific below 1e-3, blanks for NaN and None."""
    if isinstance(v, float | np.floating):
        if math.isnan(v):
            return ""
        return f"{v:.6g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"
    if v is None:
        return ""
    return esc(v)


def table(df: pd.DataFrame, verdict_col: str | None = None, code_col: str | None = None,
          text_cols: tuple[str, ...] = ()) -> str:
    """An HTML table of df. Rows whose 'pass' is False are shaded; the cell of verdict_col gets the
    CSS class v-<value of code_col>; text_cols wrap instead of widening the table."""
    cols = [c for c in df.columns if c != code_col]
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = []
    for _, row in df.iterrows():
        tr = ' class="fail"' if "pass" in row and row["pass"] is False else ""
        cells = []
        for c in cols:
            cls = []
            if c == verdict_col and code_col is not None:
                cls.append(f"v-{row[code_col]}")
            if c in text_cols or c == verdict_col:
                cls.append("text")
            attr = f' class="{" ".join(cls)}"' if cls else ""
            cells.append(f"<td{attr}>{fmt(row[c])}</td>")
        body.append(f"<tr{tr}>{''.join(cells)}</tr>")
    return f'<table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def page(title: str, parts: list[str]) -> str:
    """The whole self-contained HTML document."""
    return "\n".join([f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
                      f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1>", *parts, "</body></html>"])
