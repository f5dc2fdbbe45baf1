"""Reports: check results → one JSON document → a self-contained HTML page.

:func:`build_document` (and :func:`from_audit` for ``gradcheck audit`` output)
define the document shared by the pytest plugin and the CLI; :func:`render_html` /
:func:`write_html` turn it into HTML with inline CSS and SVG charts. Only the HTML
needs Jinja2 (a core dependency); importing this package does not import it.
"""

from gradcheck.report.document import (
    SCHEMA,
    build_document,
    environment,
    from_audit,
)
from gradcheck.report.render import render_html, write_html

__all__ = [
    "SCHEMA",
    "build_document",
    "environment",
    "from_audit",
    "render_html",
    "write_html",
]
