"""benchmarks/profile_scan.py reads Nsight Compute's source page; its loop accounting is checked on a small page."""

import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import profile_scan  # noqa: E402

HEADER = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed", "stall_long_sb",
          "stall_selected", "stall_long_sb (Not Issued)"]
# A kernel with an outer loop (0x10-0x60) around an inner one (0x20-0x40); the last branch goes forwards.
KERNEL = [
    ("0x1000", "MOV R1, R2", 1, 1, 0, 1),
    ("0x1010", "LDG.E R3, desc[UR4][R4.64]", 2, 4, 0, 2),
    ("0x1020", "FADD R5, R3, R5", 40, 64, 30, 10),
    ("0x1030", "MUFU.TANH R5, R5", 20, 64, 0, 20),
    ("0x1040", "@P0 BRA 0x1020", 10, 64, 0, 10),
    ("0x1050", "IADD3 R6, R6, 0x1, RZ", 3, 4, 0, 3),
    ("0x1060", "@P1 BRA 0x1010", 4, 4, 0, 4),
    ("0x1070", "@P2 BRA 0x1080", 0, 1, 0, 0),
    ("0x1080", "EXIT", 0, 1, 0, 0),
]


def write_page(path: Path):
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["Kernel Name", "scan_forward_kernel"])
        writer.writerow(HEADER)
        for address, source, total, executed, long_sb, selected in KERNEL:
            writer.writerow([address, source, total, executed, long_sb, selected, long_sb])


def test_loops_innermost_first_with_their_stall_reasons(tmp_path):
    write_page(tmp_path / "page.csv")
    (kernel,) = profile_scan.read_source_csv(tmp_path / "page.csv")
    assert kernel["name"] == "scan_forward_kernel" and len(kernel["instructions"]) == len(KERNEL)
    assert profile_scan.loops(kernel["instructions"]) == [(2, 4), (1, 6)]

    lines = profile_scan.report(kernel)
    assert lines[0] == "scan_forward_kernel: 9 instructions, 80 warp samples"
    inner = lines[1]
    assert "loop of 3 instructions, run 64 times: 88% of samples" in inner
    assert "selected 57%, long_sb 43%" in inner  # 40 of 70 samples issuing, 30 waiting on the load
    assert lines[2].split()[:2] == ["40", "FADD"]  # the instruction that collects the most samples first
    outer = next(line for line in lines if "loop of 6 instructions" in line)
    assert "run 4 times: 99% of samples" in outer
