"""MkDocs hook: the docstrings' reST cross-reference roles read as code.

The package's docstrings use Sphinx roles (:class:`~attn_probe.Snapshot`, :meth:`step`), which
Markdown renders as the role's name followed by a code span. This hook, run on every page's
HTML, drops the role and, for a ``~`` target, keeps only the last part of the dotted name, as
Sphinx shows it; a paragraph ending in reST's ``::`` ends in one colon.
"""

import re

#: A paragraph that ends with reST's ``::`` (a literal block follows) ends with a colon.
_LITERAL = re.compile(r"::</p>")
_ROLE = re.compile(r":(?:class|meth|func|mod|attr|data|exc|obj|const):<code>(~?)([^<]*)</code>")


def _shown(match: re.Match) -> str:
    short, target = match.group(1), match.group(2)
    if short:
        target = target.rsplit(".", 1)[-1]
    return f"<code>{target}</code>"


def on_page_content(html, page, config, files):
    return _LITERAL.sub(":</p>", _ROLE.sub(_shown, html))
