"""benchmarks/compare_scan_variants.py's reading of its variants and its table of medians (the timing itself needs a
GPU)."""

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import compare_scan_variants  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def test_variants_name_a_package_tree_and_launch_settings(tmp_path):
    variant = compare_scan_variants.parse_variant(f"wide={REPO}:backward_rows=64,gluon_backward_max_registers=255")
    assert variant == dict(name="wide", root=str(REPO),
                           config=["backward_rows=64", "gluon_backward_max_registers=255"])
    assert compare_scan_variants.parse_variant(f"main={REPO}")["config"] == []
    for text in ("main", f"={REPO}", "main=", f"main={tmp_path}"):  # no name, no root, a folder without the package
        with pytest.raises(ValueError, match="variant"):
            compare_scan_variants.parse_variant(text)


def test_table_gives_medians_against_the_first_variant():
    def figures(fwd, fwdbwd):
        return {"400m_B8": {"fwd_ms": fwd, "fwdbwd_ms": fwdbwd}, "7b_B4": {"fwd_ms": 1.0, "fwdbwd_ms": 5.0}}

    table = compare_scan_variants.summary({
        "base": [figures(2.0, 9.0), figures(1.8, 8.0), figures(1.9, 8.4)],
        "new": [figures(1.0, 6.3), figures(1.2, 6.3)],
    })
    rows = [line.split() for line in table.splitlines()[1:]]
    assert rows == [["base", "400m_B8", "1.900", "8.400", "+0.0%"], ["base", "7b_B4", "1.000", "5.000", "+0.0%"],
                    ["new", "400m_B8", "1.100", "6.300", "-25.0%"], ["new", "7b_B4", "1.000", "5.000", "+0.0%"]]


def test_a_round_runs_in_a_child_at_the_shapes_asked_for(monkeypatch):
    """What run_variant passes its child process reads back as the shapes and the launch settings."""
    commands = []

    def no_child(command, **kwargs):
        commands.append(command)
        raise subprocess.TimeoutExpired(command, 0)

    monkeypatch.setattr(subprocess, "run", no_child)
    variant = compare_scan_variants.parse_variant(f"rows64={REPO}:backward_rows=64")
    assert compare_scan_variants.run_variant(variant, True, ["7b_B4", "400m_B1"], print) is None   # no figures
    args = compare_scan_variants.arguments().parse_args(commands[0][2:])
    assert (args.one, args.check, args.shapes) == (True, True, ["7b_B4", "400m_B1"])
    assert args.variants == ["backward_rows=64"]
    with pytest.raises(SystemExit):
        compare_scan_variants.arguments().parse_args(["main=.", "--shapes", "400m_B9"])
