"""Renders the settings reference from the settings model, so the docs cannot drift from the code.

python scripts/settings_docs.py --write   # regenerate configs/sidecar.env.example + README
python scripts/settings_docs.py --check   # exit 1 if either is out of date (CI runs this)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sidecar.settings import GROUPS, env_name, render_value

ROOT = Path(__file__).resolve().parent.parent
ENV_EXAMPLE = ROOT / "configs" / "sidecar.env.example"
README = ROOT / "README.md"
BEGIN, END = "<!-- settings:begin -->", "<!-- settings:end -->"


def fields_by_group() -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(title, [(variable, default, description)]) per settings group, in the model's order."""
    return [
        (
            group.title,
            [
                (env_name(name), render_value(field.default), field.description or "")
                for name, field in group.model_fields.items()
            ],
        )
        for group in GROUPS
    ]


def render_env_example() -> str:
    lines = [
        "# Every setting of azure-drain-sidecar, with its default (commented out) and why you",
        "# might change it. Generated from sidecar/settings.py by scripts/settings_docs.py;",
        "# edit the model, then run `python scripts/settings_docs.py --write`.",
    ]
    for group, members in fields_by_group():
        lines += ["", f"# --- {group}"]
        for variable, default, text in members:
            lines += [f"# {text}", f"#{variable}={default}"]
    return "\n".join(lines) + "\n"


def render_markdown() -> str:
    lines = [BEGIN, ""]
    for group, members in fields_by_group():
        lines += [f"**{group}**", ""]
        lines += ["| Variable | Default | What it is for |", "|---|---|---|"]
        for variable, default, text in members:
            shown = f"`{default}`" if default else "(unset)"
            lines.append(f"| `{variable}` | {shown} | {text.replace('|', '/')} |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def readme_with_table(readme: str) -> str:
    start, end = readme.index(BEGIN), readme.index(END) + len(END)
    return readme[:start] + render_markdown() + readme[end:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true")
    mode.add_argument("--check", action="store_true")
    args = parser.parse_args()
    wanted = {
        ENV_EXAMPLE: render_env_example(),
        README: readme_with_table(README.read_text()),
    }
    stale = [path for path, text in wanted.items() if not path.exists() or path.read_text() != text]
    if args.write:
        for path in stale:
            path.write_text(wanted[path])
            print(f"wrote {path.relative_to(ROOT)}")
        return 0
    for path in stale:
        print(
            f"{path.relative_to(ROOT)} is out of date with sidecar/settings.py: "
            "run `python scripts/settings_docs.py --write`",
            file=sys.stderr,
        )
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
