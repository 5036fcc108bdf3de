"""benchmarks/compare_scan_variants.py's reading of its variants and its table of medians (the timing itself needs a
GPU)."""

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
