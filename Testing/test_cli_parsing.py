"""The command line parses and refuses bad arguments in plain words without torch, so these checks also
run under Python 3.9 (Slicer 5.6 / 5.8) where torch is not installed (`make test39`)."""

import ast
import importlib.util
import json
import sys
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
    "command", ["segment", "evaluate", "models", "devices"] + (["train", "preprocess"] if HAS_TORCH else [])
)
def test_each_command_has_help(command, capsys):
    assert cli.main([command, "--help"]) == 0 and "usage:" in capsys.readouterr().out


def test_devices_reports_the_pytorch_of_this_python(monkeypatch, capsys):
    assert cli.main(["devices", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    if HAS_TORCH:
        import torch

        assert found["torch"] == torch.__version__ and found["error"] is None
        assert found["auto"] == ("cuda" if torch.cuda.is_available() else found["auto"])
    else:
        assert found["torch"] is None and found["auto"] == "cpu"
    assert cli.main(["devices"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("PyTorch 2." if HAS_TORCH else "PyTorch is not installed")

    # A torch that is there but fails to load (a wrong CUDA build, a half-finished install): said, not raised.
    from SASSRSegmentLib.commands import devices

    monkeypatch.setattr(devices.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setitem(sys.modules, "torch", None)
    assert cli.main(["devices"]) == 0
    assert capsys.readouterr().out.startswith("PyTorch failed to load: ModuleNotFoundError")


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
    # numpy's cast warnings, then "does not overlap the image", had answered a NaN.
    nan_roi = ["--roi", "nan", "-135", "60", "135", "30", "90"]
    assert cli.main(["segment", str(missing), "-o", str(tmp_path / "m.nrrd"), *nan_roi]) == 2
    err = capsys.readouterr().err.strip()
    assert "--roi needs" in err and len(err.splitlines()) == 1
    assert cli.main(["segment", str(missing), "-o", str(tmp_path / "m.nrrd"), "--memory-limit", "nan"]) == 2
    assert "--memory-limit must be a positive number of GB" in capsys.readouterr().err


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
