"""What one step of each scan kernel costs in machine instructions, without a GPU.

    python benchmarks/sass_report.py                                  # default KernelConfig, 400M shape
    python benchmarks/sass_report.py --backward-rows 64 --backward-products tf32 --kernels backward
    python benchmarks/sass_report.py --kernels backward gluon-backward   # the Triton and the Gluon backward
    python benchmarks/sass_report.py --kernels forward gluon-forward     # the Triton and the Gluon forward

Compiles the forward and backward kernels (and their Gluon twins, see modeling_m2rnn/kernels/m2rnn_scan/fast_path.py)
for sm_90 with Triton's own compiler and ptxas, the way a launch on the GPU would (bf16 inputs, the 400M
shape: N=84, Nq=Nk=1, K=64, V=16), disassembles them with the cuobjdump Triton ships, and prints for every loop its
instruction count and the instructions that set a step's pace: shared-memory loads and stores and barriers (each
layout change of a tensor in the step), tensor-core products (HMMA), tanh (MUFU), warp shuffles (row sums),
in-register transposes (MOVM), global loads and stores, and register spills (LDL/STL), and for an innermost loop the
fewest instructions between a global load and the first read of its value. The innermost loops are the time steps:
in the forward, the step loop; in the backward, the replay and the walk of a chunk. A step loads the next step's
inputs; where ptxas schedules a load near the end of the body and the next step reads it at its top, that distance is
a few tens of instructions, and each step waits for the memory.

The kernel's time on the GPU follows these counts only roughly (latency and the warps in flight decide the
rest), but a change that adds shared-memory round trips or spills shows here first, at no GPU time. For
example, `--backward-rows 64 --backward-products tf32` against `--backward-rows 64` shows the backward walk going
from 1,088 to 975 instructions and from 55 to 19 shared loads per step with bf16 gradient products; on the H200
that change made forward+backward 9% faster (benchmarks/RESULTS.md).
"""

import argparse
import re
import subprocess
from collections import Counter
from dataclasses import fields, replace
from tempfile import NamedTemporaryFile
from typing import NamedTuple

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.experimental.gluon._runtime import GluonASTSource

from modeling_m2rnn.kernels.m2rnn_scan.gluon_backward import scan_backward_gluon_kernel
from modeling_m2rnn.kernels.m2rnn_scan.gluon_forward import scan_forward_gluon_kernel
from modeling_m2rnn.kernels.m2rnn_scan.triton_backward import scan_backward_kernel
from modeling_m2rnn.kernels.m2rnn_scan.triton_forward import scan_forward_kernel
from modeling_m2rnn.kernels.m2rnn_scan.triton_scan import KernelConfig, ScanShape, dot_constants, gradient_constants

TARGET = GPUTarget("cuda", 90, 32)
SHAPE = ScanShape(batch=8, seq_len=4096, num_heads=84, nq=1, nk=1, nv=84, nf=84, nw=84, key_dim=64, value_dim=16,
                  num_states=8, varlen=False)
SHOWN = ("LDS", "STS", "BAR", "HMMA", "MUFU", "SHFL", "MOVM", "LDG", "STG", "LDL", "STL")
# Integer arguments that a launch at the 400M shape passes as multiples of 16, which Triton specialises on.
ALIGNED_INTEGERS = {"seq_len", "segment_start", "segment_end", "segment_steps", "row_block_steps", "y_partial_stride"}


def signature(kernel, constants: dict, pointer_types: dict) -> tuple[dict, dict]:
    """Triton's signature of `kernel` and the 16-alignment attributes a GPU launch would give its arguments."""
    types, attributes = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constants:
            types[name] = "constexpr"
        elif name.endswith("_ptr"):
            types[name] = pointer_types.get(name, "*fp32")
            attributes[(i,)] = [["tt.divisibility", 16]]
        else:
            types[name] = "fp32" if name == "clip" else "i32"
            if name in ALIGNED_INTEGERS:
                attributes[(i,)] = [["tt.divisibility", 16]]
    return types, attributes


def compile_sm90(kernel, constants: dict, pointer_types: dict, num_warps: int, max_registers=None):
    types, attributes = signature(kernel, constants, pointer_types)
    source_type = GluonASTSource if kernel in (scan_forward_gluon_kernel, scan_backward_gluon_kernel) else ASTSource
    source = source_type(fn=kernel, signature=types, constexprs=constants, attrs=attributes)
    options = dict(num_warps=num_warps, **({"maxnreg": max_registers} if max_registers is not None else {}))
    return triton.compile(source, target=TARGET, options=options)


def gpu_constants(config: KernelConfig) -> dict:
    """The dtype constants a CUDA launch with bf16 inputs gets."""
    return dict(**dot_constants(torch.bfloat16, True, config, config.backward_warps,
                              config.backward_max_heads_per_program),
                **gradient_constants(torch.bfloat16, True, config))


def forward(config: KernelConfig, store_checkpoints: bool, kernel=scan_forward_kernel):
    constants = dict(**SHAPE.head_constants(), HP=config.forward_heads_per_program,
                     BR=SHAPE.block_rows(config.forward_rows), CHUNK=config.chunk, HAS_H0=False, VARLEN=False,
                     STORE_CHECKPOINTS=store_checkpoints,
                     **dot_constants(torch.bfloat16, True, config, config.forward_warps,
                                    config.forward_heads_per_program))
    pointers = {name: "*bf16" for name in ("q_ptr", "k_ptr", "v_ptr", "W_ptr", "y_ptr")}
    pointers.update(checkpoint_ptr="*fp16", cu_seqlens_ptr="*i32")  # f, h0 and the final state: float32
    return compile_sm90(kernel, constants, pointers, config.forward_warps)


def backward(config: KernelConfig, kernel=scan_backward_kernel):
    constants = dict(**SHAPE.head_constants(), HP=config.backward_max_heads_per_program,
                     BR=SHAPE.block_rows(config.backward_rows), CHUNK=config.chunk, VARLEN=False, CLIP=True,
                     **gpu_constants(config))
    pointers = {name: "*bf16" for name in ("q_ptr", "k_ptr", "v_ptr", "W_ptr", "dy_ptr", "dv_ptr", "dq_ptr", "dk_ptr")}
    pointers.update(checkpoint_ptr="*fp16", scratch_ptr="*fp16", cu_seqlens_ptr="*i32")
    cap = config.gluon_backward_max_registers if kernel is scan_backward_gluon_kernel else config.backward_max_registers
    return compile_sm90(kernel, constants, pointers, config.backward_warps, cap)


class Instruction(NamedTuple):
    address: int
    opcode: str  # without modifiers: LDG, HMMA, ...
    text: str  # the whole instruction, modifiers and operands, without its predicate
    target: int | None  # a branch's target


def disassemble(compiled) -> tuple[list[Instruction], str]:
    """Every instruction, and the registers line of cuobjdump's resource usage."""
    cuobjdump = triton.knobs.nvidia.cuobjdump.path
    with NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        sass = subprocess.run([cuobjdump, "-sass", cubin.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([cuobjdump, "-res-usage", cubin.name], capture_output=True, text=True).stdout
    registers = re.search(r"REG:\d+.*?LOCAL:\d+", usage)
    return parse_sass(sass), registers.group(0) if registers else "?"


def parse_sass(sass: str) -> list[Instruction]:
    instructions = []
    for line in sass.splitlines():
        match = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?(([A-Z0-9_]+)[^;]*?(0x[0-9a-f]+)?)\s*;", line)
        if match:
            address, text, opcode, target = match.groups()
            branch = int(target, 16) if opcode == "BRA" and target else None
            instructions.append(Instruction(int(address, 16), opcode, text, branch))
    return instructions


def loops(instructions: list[Instruction]) -> list[list[Instruction]]:
    """The body of every backward branch, innermost (shortest) first."""
    bodies = [[i for i in instructions if branch.target <= i.address <= branch.address]
              for branch in instructions if branch.target is not None and branch.target < branch.address]
    return sorted(bodies, key=len)


# Registers an operand names: R12, and the pair R12.64 (an address) or the HMMA.16816 fragments (4, 2, 4 registers).
FRAGMENT_SIZES = {"HMMA": (4, 4, 2, 4)}  # D, A, B, C


def registers_read(instruction: Instruction) -> set[int]:
    """The general registers the instruction reads (stores read every operand; others write their first)."""
    operands = instruction.text.split(None, 1)[1].split(",") if " " in instruction.text else []
    sizes = FRAGMENT_SIZES.get(instruction.opcode)
    read = set()
    for index, operand in enumerate(operands):
        if index == 0 and not instruction.opcode.startswith("ST"):
            continue
        for number, wide in re.findall(r"\bR(\d+)(\.64)?", operand):
            count = sizes[index] if sizes else 2 if wide else 1
            read.update(range(int(number), int(number) + count))
    return read


def load_use_distances(body: list[Instruction]) -> list[int]:
    """For each global load of an innermost loop's body, how many instructions later (around the back edge) its first
    register is first read: a load whose value the next iteration reads at its top, a few instructions after the
    load, makes that iteration wait for the memory. Empty for a loop around other loops."""
    if any(i.target is not None and i.target < i.address for i in body[:-1]):
        return []
    distances = []
    for index, instruction in enumerate(body):
        if instruction.opcode != "LDG":
            continue
        loaded = int(re.match(r"LDG\S*\s+R(\d+)", instruction.text).group(1))
        for step in range(1, len(body) + 1):
            if loaded in registers_read(body[(index + step) % len(body)]):
                distances.append(step)
                break
    return distances


def report(name: str, compiled) -> str:
    instructions, registers = disassemble(compiled)
    lines = [f"{name}: {len(instructions)} instructions, {registers}"]
    for body in loops(instructions):
        counts = Counter(instruction.opcode for instruction in body)
        shown = "  ".join(f"{op} {counts[op]}" for op in SHOWN)
        distances = load_use_distances(body)
        nearest = f"  first use of a load after >= {min(distances)}" if distances else ""
        lines.append(f"  loop {body[0].address:#07x}-{body[-1].address:#07x}: {len(body):5d} instructions  {shown}"
                     + nearest)
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernels", nargs="+", choices=["forward", "backward", "gluon-forward", "gluon-backward"],
                        default=["forward", "backward"])
    for field in fields(KernelConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.type in (bool, "bool"):
            parser.add_argument(flag, type=lambda text: text.lower() in ("1", "true", "yes"), default=field.default)
        else:
            parser.add_argument(flag, type=type(field.default), default=field.default)
    args = parser.parse_args()
    config = replace(KernelConfig(), **{field.name: getattr(args, field.name) for field in fields(KernelConfig)})
    print(f"sm_90, bf16 inputs, 400M shape; {config}")
    if "forward" in args.kernels:
        print(report("forward, inference", forward(config, store_checkpoints=False)))
        print(report("forward, training (checkpoints)", forward(config, store_checkpoints=True)))
    if "gluon-forward" in args.kernels:
        print(report("Gluon forward, inference", forward(config, False, scan_forward_gluon_kernel)))
        print(report("Gluon forward, training (checkpoints)", forward(config, True, scan_forward_gluon_kernel)))
    if "backward" in args.kernels:
        print(report("backward", backward(config)))
    if "gluon-backward" in args.kernels:
        print(report("Gluon backward", backward(config, scan_backward_gluon_kernel)))


if __name__ == "__main__":
    main()
