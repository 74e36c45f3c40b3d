"""A griffe extension for the API reference: fmaml's docstrings are Google style with a few
reStructuredText forms, which this turns into Markdown before they are rendered.

- ``Example:`` becomes ``Examples:``, so the doctest in it renders as code (griffe treats the
  singular as an admonition, whose ``[...]`` output lines Markdown reads as links);
- ``:func:`name``` and the other roles become a code span ``name``;
- a ``.. math::`` block becomes a ``$$ ... $$`` block.

The docstrings themselves are not changed.
"""

import re

import griffe

_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|exc|obj):`~?([^`]+)`")
_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_MATH = re.compile(r"^(\s*)\.\. math::[ \t]*(.*)$")


def _math(text: str) -> str:
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        match = _MATH.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent, body = match.group(1), [match.group(2)] if match.group(2).strip() else []
        i += 1
        while i < len(lines) and (not lines[i].strip() or lines[i].startswith(indent + " ")):
            body.append(lines[i].strip())
            i += 1
        out += [f"{indent}$$", *(f"{indent}{b}" for b in body if b), f"{indent}$$", ""]
    return "\n".join(out)


class RstToMarkdown(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            text = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
            obj.docstring.value = _math(_ROLE.sub(r"`\1`", text))
