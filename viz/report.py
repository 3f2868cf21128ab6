"""The report page: one self-contained HTML file that reads offline.

Plotly's JavaScript is written into the page once, before the first interactive figure
(no CDN, no network); image grids are embedded as data URIs and also written as PNG files
beside the page, each linked under its picture. Every string that comes from the study —
its name, parameter values, notes — is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

if TYPE_CHECKING:
    import plotly.graph_objects as go


@dataclass(frozen=True)
class Section:
    """One part of the page: a heading, a note, and a figure, an image or a message."""

    title: str
    note: str = ""
    figure: go.Figure | None = None
    png: str | None = None
    """File name of an image in the `images` given to `write_report`."""
    message: str | None = None
    """Shown instead of a picture that could not be drawn, saying why."""
    text: str | None = None
    """Shown as it is, in a fixed-width block (a file)."""


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px;
       padding: 0 1rem; color: #222; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.2rem; margin-top: 2.2rem;
     border-bottom: 1px solid #ddd; }
table.summary td { padding: 0.15rem 1rem 0.15rem 0; vertical-align: top; }
table.summary td:first-child { color: #555; white-space: nowrap; }
p.note { color: #444; max-width: 60rem; } p.message { color: #a33; }
img { max-width: 100%; }
pre { background: #f6f6f6; padding: 0.8rem; overflow-x: auto; font-size: 0.85rem; }
"""


def write_report(
    out_dir: Path,
    title: str,
    summary: Sequence[tuple[str, str]],
    sections: Sequence[Section],
    images: dict[str, bytes],
) -> Path:
    """Write `index.html` (and the images as PNG files) into `out_dir`; return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in images.items():
        (out_dir / name).write_bytes(data)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        '<table class="summary">',
        *(
            f"<tr><td>{html.escape(label)}</td><td>{html.escape(value)}</td></tr>"
            for label, value in summary
        ),
        "</table>",
    ]
    plotly_js_written = False
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        if section.note:
            parts.append(f'<p class="note">{html.escape(section.note)}</p>')
        if section.message:
            parts.append(f'<p class="message">{html.escape(section.message)}</p>')
        if section.text is not None:
            parts.append(f"<pre>{html.escape(section.text)}</pre>")
        if section.figure is not None:
            parts.append(
                section.figure.to_html(
                    full_html=False,
                    include_plotlyjs=not plotly_js_written,
                    include_mathjax=False,
                    config={"displaylogo": False, "responsive": True},
                )
            )
            plotly_js_written = True
        if section.png is not None:
            encoded = base64.b64encode(images[section.png]).decode("ascii")
            parts.append(
                f'<p><img alt="{html.escape(section.title)}" '
                f'src="data:image/png;base64,{encoded}"><br>'
                f'<small>also <a href="{html.escape(quote(section.png))}">'
                f"{html.escape(section.png)}</a> beside this page</small></p>"
            )
    parts.append("</body></html>")
    page = out_dir / "index.html"
    partial = out_dir / ".index.html.partial"
    partial.write_text("\n".join(parts), encoding="utf-8")
    partial.replace(page)
    return page
