"""HTML rendering shared by the coordinator's pages and ``rev report``.

One Jinja environment (autoescaped) over ``web/templates``; the charts arrive as SVG strings
that :mod:`rev_tasks.report` built with every text escaped, so they are marked safe here.
Pages the coordinator serves link ``/ui/static/report.css`` (the CSP allows ``'self'``
styles only); a report written to a file carries the same stylesheet inline.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"


@lru_cache(maxsize=1)
def environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(("html",)),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["short"] = lambda v, n=12: (str(v)[:n] + "\u2026") if v and len(str(v)) > n else v
    env.filters["num"] = _num
    return env


def _num(v: Any, digits: int = 4) -> str:
    if v is None:
        return "\u2014"
    if isinstance(v, float):
        return f"{v:.{digits}f}".rstrip("0").rstrip(".") if v else "0"
    return str(v)


@lru_cache(maxsize=1)
def stylesheet() -> str:
    return (STATIC / "report.css").read_text(encoding="utf-8")


def render(template: str, *, standalone: bool = False, **context: Any) -> str:
    """Render a page; ``standalone`` inlines the stylesheet and drops the navigation."""
    charts = context.get("report", {}).get("charts") if "report" in context else None
    if charts:
        context["report"]["charts"] = {k: Markup(v) for k, v in charts.items()}  # noqa: S704
    css = Markup(stylesheet()) if standalone else None  # noqa: S704 - our own file
    return environment().get_template(template).render(standalone=standalone, css=css, **context)
