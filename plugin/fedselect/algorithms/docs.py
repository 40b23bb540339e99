"""The option tables of docs/ALGORITHMS.md, generated from the options dataclasses.

Each built-in algorithm has one marked block in the document::

    <!-- options:fedrep -->
    ...generated: the summary and a table of the options...
    <!-- /options -->

``python -m fedselect.algorithms.docs --write docs/ALGORITHMS.md`` rewrites every block;
``--check`` exits 1 naming the blocks that differ from the dataclasses (and built-ins without a
block), so the tables cannot drift (tests/test_algorithms_catalog.py runs the check).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from fedselect.algorithms.catalog import describe_options
from fedselect.registry import BUILTINS, algorithm_info

__all__ = ["check", "render_block", "update"]

BLOCK = re.compile(r"(<!-- options:(?P<name>[A-Za-z0-9_]+) -->\n)(?P<body>.*?)(<!-- /options -->)", re.DOTALL)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_block(name: str) -> str:
    """The generated body of ``name``'s block: its summary, then its options table."""
    info = algorithm_info(name)
    lines = [f"`fedselect algorithms {name}`: {info.summary}", ""]
    options = describe_options(info.options_cls)
    if not options:
        lines.append("No options: `algo:` stays empty.")
    else:
        lines += ["| option | type | default | meaning |", "|---|---|---|---|"]
        lines += [f"| `{o.name}` | `{_cell(o.type)}` | `{_cell(o.default_text)}` | {_cell(o.help)} |"
                  for o in options]
    return "\n".join(lines) + "\n"


def update(text: str) -> str:
    """``text`` with every options block regenerated (a block naming an unknown algorithm is an error)."""
    def replace(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in BUILTINS:
            raise ValueError(f"options block for unknown built-in algorithm '{name}'")
        return f"{match.group(1)}{render_block(name)}{match.group(4)}"

    return BLOCK.sub(replace, text)


def check(text: str) -> list[str]:
    """What is out of date in ``text``: one line per stale, missing or duplicated block ([] if none)."""
    problems = []
    names = [match["name"] for match in BLOCK.finditer(text)]
    for match in BLOCK.finditer(text):
        name = match["name"]
        if name not in BUILTINS:
            problems.append(f"block options:{name}: no built-in algorithm of that name")
        elif match["body"] != render_block(name):
            problems.append(f"block options:{name}: differs from {BUILTINS[name].options}")
    problems += [f"block options:{name}: appears {names.count(name)} times"
                 for name in sorted(set(names)) if names.count(name) > 1]
    problems += [f"no block <!-- options:{name} --> for built-in algorithm '{name}'"
                 for name in BUILTINS if name not in names]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedselect.algorithms.docs",
                                     description="Check or rewrite the generated option tables of a Markdown "
                                                 "file (blocks <!-- options:NAME --> ... <!-- /options -->).")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", type=Path, metavar="FILE", help="exit 1 if a block is stale or missing")
    mode.add_argument("--write", type=Path, metavar="FILE", help="rewrite every block in place")
    ns = parser.parse_args(argv)
    path: Path = ns.check or ns.write
    text = path.read_text(encoding="utf-8")
    if ns.write:
        path.write_text(update(text), encoding="utf-8")
        text = path.read_text(encoding="utf-8")
    problems = check(text)
    for problem in problems:
        print(f"{path}: {problem}", file=sys.stderr)
    if problems and ns.check:
        print(f"regenerate with: python -m fedselect.algorithms.docs --write {path}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
