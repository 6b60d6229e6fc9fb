"""Rewrite the generated file lists in SASSRSegment/CMakeLists.txt from the files on disk.

The module's CMakeLists lists every engine script and every model and sample file explicitly (a build
ships only what is listed). Run this after adding or removing such files:

    python tools/update_cmake_lists.py          # rewrite the lists
    python tools/update_cmake_lists.py --check  # exit 1 if they are out of date (CI)
"""

import argparse
import re
import sys
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parents[1] / "SASSRSegment"
CMAKE_FILE = MODULE_DIR / "CMakeLists.txt"
BLOCK = re.compile(
    r"^(?P<indent>[ \t]*)# BEGIN GENERATED FILE LIST: (?P<name>\w+)\n.*?^[ \t]*# END GENERATED FILE LIST\n",
    re.MULTILINE | re.DOTALL,
)
SKIPPED_PARTS = {"__pycache__"}


def _files(folder: Path, pattern: str) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(
        path.relative_to(MODULE_DIR).as_posix()
        for path in folder.rglob(pattern)
        if path.is_file() and not SKIPPED_PARTS & set(path.parts) and not path.name.startswith(".")
    )


def generated_lists() -> dict[str, list[str]]:
    """The files each generated block must list, relative to the module folder."""
    resources = MODULE_DIR / "Resources"
    return {
        "slicer": _files(MODULE_DIR / "SASSRSegmentSlicer", "*.py"),
        "engine": _files(MODULE_DIR / "SASSRSegmentLib", "*.py"),
        "resources": _files(resources / "Models", "*") + _files(resources / "Samples", "*"),
    }


def render(text: str, lists: dict[str, list[str]]) -> str:
    def block(match: re.Match) -> str:
        indent, name = match["indent"], match["name"]
        if name not in lists:
            raise SystemExit(f"error: unknown generated list '{name}' in {CMAKE_FILE}")
        lines = [f"{indent}# BEGIN GENERATED FILE LIST: {name}"]
        lines += [f"{indent}{path}" for path in lists[name]]
        lines.append(f"{indent}# END GENERATED FILE LIST")
        return "\n".join(lines) + "\n"

    rendered, count = BLOCK.subn(block, text)
    if count != len(lists):
        raise SystemExit(f"error: expected {len(lists)} generated lists in {CMAKE_FILE}, found {count}")
    return rendered


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether the lists are up to date")
    args = parser.parse_args(argv)
    text = CMAKE_FILE.read_text(encoding="utf-8")
    updated = render(text, generated_lists())
    if args.check:
        if updated != text:
            print(f"{CMAKE_FILE} is out of date: run python tools/update_cmake_lists.py", file=sys.stderr)
            return 1
        return 0
    if updated != text:
        CMAKE_FILE.write_text(updated, encoding="utf-8")
        print(f"updated {CMAKE_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
