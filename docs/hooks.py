"""MkDocs hook: the docstrings' reST cross-reference roles read as code.

The package's docstrings use Sphinx roles (:class:`~attn_probe.Snapshot`, :meth:`step`), which
Markdown renders as the role's name followed by a code span. This hook, run on every page's
HTML, drops the role and, for a ``~`` target, keeps only the last part of the dotted name, as
Sphinx shows it; a paragraph ending in reST's ``::`` ends in one colon. In table cells, long
code (TensorBoard tags such as ``entropy_norm_full/mean/Lxx``) may break after a ``/``
only, not inside a name (``extra.css`` keeps code from breaking anywhere else).
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


#: A table cell, and code in it.
_CELL = re.compile(r"<td[^>]*>.*?</td>", re.S)
_CODE = re.compile(r"<code>([^<]*)</code>")


def _breakable(cell: re.Match) -> str:
    return _CODE.sub(lambda code: "<code>" + code.group(1).replace("/", "/<wbr>")
                     + "</code>", cell.group(0))


def on_page_content(html, page, config, files):
    html = _LITERAL.sub(":</p>", _ROLE.sub(_shown, html))
    return _CELL.sub(_breakable, html)
