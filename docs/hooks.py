"""Build hooks of the documentation site: reStructuredText idioms in docstrings, rendered as Markdown.

bigain's docstrings use two reStructuredText idioms that Markdown does not know:

* cross-reference roles - ``:class:`TokenCompressor```, ``:meth:`Subject.fail```,
  ``:func:`~bigain.adapters.find_adapter```, ``:mod:``, ``:attr:``, ``:data:``, ``:exc:``, ``:obj:``;
* literal blocks introduced by a paragraph ending in ``::`` (``Public API::`` and an indented block).

:class:`SphinxToMarkdown` is a griffe extension (listed under the mkdocstrings handler's
``extensions`` in ``mkdocs.yml``) that rewrites them before mkdocstrings renders a docstring: a role
becomes a mkdocs-autorefs cross-reference to the object's full path (resolved the way Sphinx does,
from the docstring's own scope, through re-exports to the object's documented home), and a literal
block becomes a fenced code block. It also loads ``bigain.datamodules`` and ``bigain.plugins``,
which live outside the ``bigain/`` folder (``package-dir`` in ``pyproject.toml``) where static
analysis would not find them.

As an mkdocs hook (``hooks:`` in ``mkdocs.yml``), :func:`on_page_content` fails a strict build when
a page still shows raw role markup or a ``::`` literal-block marker.
"""

from __future__ import annotations

import ast
import logging
import re
import textwrap
from pathlib import Path
from typing import Any

import griffe

log = logging.getLogger("mkdocs.hooks.bigain")

ROLES = ("class", "meth", "func", "attr", "mod", "data", "exc", "obj", "const")
#: ``:role:`target``` and ``:py:role:`target``` (``~`` shows the last component only).
ROLE = re.compile(r":(?:py:)?(" + "|".join(ROLES) + r"):`(~?)([\w.]+)(\(\))?`")
#: Google-style section titles: ``Example::`` stays a section (``Example:``) with its block indented.
SECTION_TITLES = {"example", "examples", "note", "notes", "warning", "warnings", "usage"}
#: Packages that live outside ``bigain/`` (see ``[tool.setuptools.package-dir]`` in pyproject.toml).
OUTSIDE = {"datamodules": "datamodules", "plugins": "plugins"}


# -- griffe extension ------------------------------------------------------------------------------

class SphinxToMarkdown(griffe.Extension):
    """Rewrite reStructuredText roles and literal blocks of every docstring of a loaded package."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name == "bigain" and isinstance(pkg.filepath, Path):
            _load_outside_packages(pkg, loader)
        for obj in _walk(pkg):
            if obj.docstring is not None:
                obj.docstring.value = convert(obj.docstring.value, lambda name, o=obj: resolve(o, name))
            if obj.is_module:
                _hide_reexports(obj)


def _hide_reexports(module: griffe.Module) -> None:
    """Document a re-exported name once, at its home: ``bigain.apply`` is shown on the
    ``bigain.patching`` page only (with ``filters: public``, an alias marked not public is skipped)."""
    for member in module.members.values():
        if not member.is_alias:
            continue
        try:
            target = member.final_target
        except (griffe.AliasResolutionError, griffe.CyclicAliasError):
            continue
        if target.package is module.package and target.path != member.path:
            member.public = False


def _load_outside_packages(pkg: griffe.Module, loader: griffe.GriffeLoader) -> None:
    root = pkg.filepath.parent.parent
    for name, folder in OUTSIDE.items():
        init = root / folder / "__init__.py"
        if name in pkg.members or not init.is_file():
            continue
        module = _visit(name, init, pkg, loader)
        pkg.set_member(name, module)
        for path in sorted(init.parent.glob("*.py")):
            if path.name != "__init__.py":
                module.set_member(path.stem, _visit(path.stem, path, module, loader))


def _visit(name: str, path: Path, parent: griffe.Module, loader: griffe.GriffeLoader) -> griffe.Module:
    code = path.read_text(encoding="utf-8")
    loader.lines_collection[path] = code.splitlines()
    return griffe.visit(name, filepath=path, code=code, parent=parent, extensions=loader.extensions,
                        docstring_parser=loader.docstring_parser, docstring_options=loader.docstring_options,
                        lines_collection=loader.lines_collection, modules_collection=loader.modules_collection)


def _walk(obj: griffe.Object):
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)


def resolve(obj: griffe.Object, name: str) -> str | None:
    """The full path of the object ``name`` refers to in ``obj``'s docstring, or ``None``.

    Relative names are looked up in ``obj``'s scope and its parents' (as Sphinx does), absolute ones
    from the package root; re-exports (``bigain.apply``) resolve to the object's own module path,
    where its documentation is.
    """
    name = name.lstrip(".")
    head, _, rest = name.partition(".")
    scope = obj if obj.is_class or obj.is_module else obj.parent
    candidates = []
    try:
        candidates.append(scope.resolve(head) + (f".{rest}" if rest else ""))
    except (griffe.NameResolutionError, AttributeError):
        pass
    candidates.append(name)
    root = obj.package
    for path in candidates:
        parts = path.split(".")
        if parts[0] != root.name:
            continue
        try:
            target = root.get_member(parts[1:]) if len(parts) > 1 else root
        except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            continue
        try:
            return target.final_target.path if target.is_alias else target.path
        except (griffe.AliasResolutionError, griffe.CyclicAliasError):
            return path
    return None


def convert(text: str, resolver) -> str:
    """``text`` with roles turned into cross-references and ``::`` literal blocks into fences."""
    return _roles(_literal_blocks(text), resolver)


def _roles(text: str, resolver) -> str:
    def replace(match: re.Match) -> str:
        _role, short, name, parens = match.groups()
        shown = (name.rsplit(".", 1)[-1] if short else name.lstrip(".")) + (parens or "")
        target = resolver(name)
        if target is None:  # outside the package (torch.Tensor, a Lightning class): plain code
            return f"`{shown}`"
        # "optional": a link when the target is documented on some page, plain code otherwise
        return f'<autoref identifier="{target}" optional><code>{shown}</code></autoref>'

    # roles inside code spans (``:class:`X``` shown as an example) are left alone
    parts = re.split(r"(``.*?``)", text, flags=re.S)
    return "".join(part if i % 2 else ROLE.sub(replace, part) for i, part in enumerate(parts))


def _language(block: str) -> str:
    if re.match(r"\s*\[[\w.\"-]+\]\s*$", block.splitlines()[0]):
        return "toml"
    try:
        ast.parse(block)
        return "python"
    except SyntaxError:
        pass
    if all(re.match(r"\s*(#|-\s|[\w.-]+:(\s|$))", line) for line in block.splitlines() if line.strip()):
        return "yaml"
    return "text"


def _literal_blocks(text: str) -> str:
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        indent = len(line) - len(line.lstrip())
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        if not line.rstrip().endswith("::") or j >= len(lines) or len(lines[j]) - len(lines[j].lstrip()) <= indent:
            out.append(line)
            i += 1
            continue
        end = j
        while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent):
            end += 1
        while not lines[end - 1].strip():
            end -= 1
        block = textwrap.dedent("\n".join(lines[j:end]))
        lead = line.rstrip()[:-2]
        title = lead.strip()
        pad = " " * indent
        if title.lower() in SECTION_TITLES:  # a Google section: its content stays indented under it
            out.append(f"{pad}{title}:")
            pad += "    "
        elif title:
            out.append(f"{lead.rstrip()}:" if not lead.endswith(" ") else lead.rstrip())
        out.append("")
        out.append(f"{pad}```{_language(block)}")
        out.extend(f"{pad}{b}" if b.strip() else "" for b in block.splitlines())
        out.append(f"{pad}```")
        out.append("")
        i = end
        while i < len(lines) and not lines[i].strip():
            i += 1
    return "\n".join(out).rstrip("\n") + ("\n" if text.endswith("\n") else "")


# -- mkdocs hook -----------------------------------------------------------------------------------

#: What a rendered page must not show: a role left as text, a ``::`` literal-block marker.
RAW = re.compile(r":(?:py:)?(?:" + "|".join(ROLES) + r"):(?:<code>|`)|\w::</p>|Public API::")
#: Code listings (source code, command-line help, examples) show text as it is written.
LISTING = re.compile(r"<pre\b.*?</pre>", re.S)


def raw_markup(html: str) -> list[str]:
    """The raw reStructuredText markup ``html`` shows in its prose (code listings excluded), each
    with some context."""
    prose = LISTING.sub("", html)
    return [prose[max(0, m.start() - 60):m.end() + 60].replace("\n", " ") for m in RAW.finditer(prose)]


def on_page_content(html: str, page: Any, **kwargs: Any) -> str:
    for context in raw_markup(html):
        log.warning("%s shows raw reStructuredText markup: ...%s... (docs/hooks.py converts roles and "
                    "'::' literal blocks of docstrings; write the docstring so that it converts, or in Markdown)",
                    page.file.src_uri, context)
    return html
