"""MkDocs hook (mkdocs.yml `hooks:`): a figure that has not been generated yet is a note.

The pages show figures that `scripts/docs_figures.py` draws from a real run's outputs
(`docs/figures/NAME.png`). A checkout without some of them (no study run yet, a fresh
clone before `make repro`) must still build with `mkdocs build --strict`, so an image
pointing into `figures/` whose file is absent becomes one line naming the command that
makes it. Every other link, a missing page or a figure name the script does not write
included, is left to MkDocs' own checks.
"""

from __future__ import annotations

import importlib.util
import posixpath
import re
import sys
from pathlib import Path
from typing import Any

_spec = importlib.util.spec_from_file_location(
    "docs_figures", Path(__file__).with_name("docs_figures.py")
)
assert _spec is not None and _spec.loader is not None
docs_figures = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("docs_figures", docs_figures)  # dataclasses look their module up there
_spec.loader.exec_module(docs_figures)

# ![alt](figures/NAME.png) or ![alt](../figures/NAME.png), with an optional { attr list }
IMAGE = re.compile(r"!\[[^\]]*\]\(((?:\.\./)*figures/([\w.-]+\.png))\)(\{[^}]*\})?")


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    folder = posixpath.dirname(page.file.src_uri)

    def replace(match: re.Match[str]) -> str:
        target = posixpath.normpath(posixpath.join(folder, match.group(1)))
        name = match.group(2)
        if name not in docs_figures.BY_NAME or files.get_file_from_path(target) is not None:
            return match.group(0)  # present, or no figure of the script's: MkDocs checks it
        return f"*{docs_figures.missing_note(name)}*"

    return IMAGE.sub(replace, markdown)
