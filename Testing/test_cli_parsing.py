"""The command line parses and refuses bad arguments in plain words without torch, so these checks also
run under Python 3.9 (Slicer 5.6 / 5.8) where torch is not installed (`make test39`)."""

import ast
import importlib.util
from pathlib import Path

import pytest

from SASSRSegmentLib import cli

REPO = Path(__file__).resolve().parent.parent
HAS_TORCH = importlib.util.find_spec("torch") is not None


def test_top_level_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in cli.COMMANDS)


@pytest.mark.parametrize(
    "command", ["segment", "evaluate", "models"] + (["train", "preprocess"] if HAS_TORCH else [])
)
def test_each_command_has_help(command, capsys):
    assert cli.main([command, "--help"]) == 0 and "usage:" in capsys.readouterr().out


def test_no_command_is_a_usage_error(capsys):
    assert cli.main([]) == 2
    assert "COMMAND" in capsys.readouterr().err


def test_bad_arguments_are_one_plain_line(tmp_path, capsys):
    missing = tmp_path / "nowhere.nrrd"
    assert cli.main(["segment", str(missing), "-o", str(tmp_path / "m.nrrd"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "nowhere.nrrd" in err and len(err.splitlines()) == 1
    assert cli.main(["segment", str(missing), "-o", str(tmp_path / "m.nrrd"), "--roi", "1", "2", "3"]) == 2
    assert "--roi needs" in capsys.readouterr().err


def _runtime_unions(path: Path) -> list[str]:
    """`A | B` between names inside isinstance/issubclass calls: a TypeError on Python 3.9, and a form
    vermin does not report."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "issubclass"):
            for arg in node.args[1:]:
                if isinstance(arg, ast.BinOp) and isinstance(arg.op, ast.BitOr):
                    found.append(f"{path.name}:{node.lineno}")
    return found


def test_no_python_3_10_type_unions_at_run_time(tmp_path):
    sources = sorted((REPO / "SASSRSegment").rglob("*.py"))
    assert len(sources) > 20
    assert [hit for path in sources for hit in _runtime_unions(path)] == []
    probe = tmp_path / "probe.py"
    probe.write_text("ok = isinstance(1, int | str)\n")
    assert _runtime_unions(probe) == ["probe.py:1"]
