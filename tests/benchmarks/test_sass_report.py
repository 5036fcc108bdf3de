"""benchmarks/sass_report.py's reading of SASS, checked on a few lines of cuobjdump's format."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import sass_report  # noqa: E402

# An outer loop (0x10-0x80) around an inner one (0x20-0x60). In the inner loop R10, loaded at 0x30, is read by the
# HMMA's B fragment (R9, R10) two instructions later; R3, loaded at 0x40, by the FADD at the loop's top, three
# instructions later around the back edge.
SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;                  /* 0x00000a0000017a02 */
        /*0010*/                   IADD3 R6, R6, 0x1, RZ ;                 /* 0x0000000106067810 */
        /*0020*/                   FADD R5, R3, R5 ;                       /* 0x0000000305057221 */
        /*0030*/                   LDG.E R10, desc[UR4][R12.64] ;          /* 0x000000040c0a7981 */
        /*0040*/                   LDG.E.U16 R3, desc[UR4][R12.64+0x2] ;   /* 0x000002040c037981 */
        /*0050*/                   HMMA.16816.F32 R20, R24, R9, R20 ;      /* 0x000000091814723c */
        /*0060*/               @P0 BRA 0x20 ;                              /* 0xfffffffc00000947 */
        /*0070*/                   STG.E desc[UR4][R14.64], R5 ;           /* 0x000000050e007986 */
        /*0080*/              @!P1 BRA 0x10 ;                              /* 0xfffffff800000947 */
        /*0090*/                   EXIT ;                                  /* 0x000000000000794d */
"""


def test_instructions_and_loops():
    instructions = sass_report.parse_sass(SASS)
    assert [i.opcode for i in instructions] == ["MOV", "IADD3", "FADD", "LDG", "LDG", "HMMA", "BRA", "STG", "BRA",
                                                "EXIT"]
    assert [i.target for i in instructions if i.opcode == "BRA"] == [0x20, 0x10]
    inner, outer = sass_report.loops(instructions)
    assert (inner[0].address, inner[-1].address, len(outer)) == (0x20, 0x60, 8)


def test_registers_read():
    by_address = {i.address: i for i in sass_report.parse_sass(SASS)}
    assert sass_report.registers_read(by_address[0x20]) == {3, 5}            # FADD R5, R3, R5: R5 written, then read
    assert sass_report.registers_read(by_address[0x30]) == {12, 13}          # a 64-bit address
    assert sass_report.registers_read(by_address[0x50]) == {24, 25, 26, 27, 9, 10, 20, 21, 22, 23}  # A, B, C
    assert sass_report.registers_read(by_address[0x70]) == {14, 15, 5}       # a store reads every operand


def test_load_use_distances():
    inner, outer = sass_report.loops(sass_report.parse_sass(SASS))
    # R10 (0x30) is read by the HMMA two instructions later; R3 (0x40) by the FADD at the top, three later.
    assert sass_report.load_use_distances(inner) == [2, 3]
    assert sass_report.load_use_distances(outer) == []  # a loop around another loop
