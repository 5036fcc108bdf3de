"""Runs a Gluon kernel on the CPU in Triton's interpreter, which runs only triton.language, by reading its gl.* calls
as their triton.language equivalents with the layouts dropped.

What this checks is the kernel's logic (indexing, masks, chunks, loops, which products it takes of what) in the
logical view of its tensors. What it cannot check is that a layout does what the kernel says of it; the one place
where the kernels rely on a layout for their values, the movmatrix transpose of every 8×8 tile, is read here as the
logical transpose its docstring states (gluon_building_blocks.transpose_tiles), which benchmarks/check_scan_gpu.py
checks on the GPU. The interpreter converts and moves bf16 values rightly but computes with them wrongly (numpy has
no bf16): a kernel run here keeps bf16 to loads, stores, conversions, moves and tensor-core products (taken here in
float32, which holds 16-bit operands and their products exactly).

    kernel = interpreted(scan_forward_gluon_kernel)   # then kernel[grid](...) as for a Triton kernel

The interpreter must be on (TRITON_INTERPRET=1 before triton is imported, as the test suite sets it).
"""

import types

import triton.language as tl
from triton.experimental.gluon._runtime import GluonJITFunction
from triton.experimental.gluon.language.nvidia import ampere
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

TILE_TRANSPOSE = "movmatrix.sync.aligned.m8n8.trans.b16"


class _GluonAsTriton(types.ModuleType):
    """`gl` for an interpreted kernel: triton.language, with layouts taken and dropped."""

    def __init__(self):
        super().__init__("gluon_as_triton")

    def __getattr__(self, name):  # dtypes, program_id, load, store, where, expand_dims, reshape, permute, ...
        return getattr(tl, name)

    @staticmethod
    def arange(start, end, layout=None):
        return tl.arange(start, end)

    @staticmethod
    def full(shape, value, dtype, layout=None):
        if dtype == tl.bfloat16:
            raise NotImplementedError("bf16 constants: the interpreter computes with bf16 values wrongly")
        return tl.full(shape, value, dtype)

    @staticmethod
    def zeros(shape, dtype, layout=None):
        return tl.zeros(shape, dtype)

    @staticmethod
    def convert_layout(x, layout, assert_trivial=False):
        return x

    @staticmethod
    def SliceLayout(dim, parent):
        return None

    @staticmethod
    def inline_asm_elementwise(asm, constraints, args, dtype, is_pure, pack):
        if not asm.startswith(TILE_TRANSPOSE):
            raise NotImplementedError(f"no interpretation of inline assembly {asm!r}")
        (x,) = args
        rows, columns = x.shape
        tiles = tl.reshape(x, (rows // 8, 8, columns // 8, 8))
        return tl.reshape(tl.permute(tiles, (0, 3, 2, 1)), (rows, columns))


def _mma_v2(a, b, acc, input_precision=None):
    """The tensor-core product in float32: 16-bit operands are exact in float32, and so are their products."""
    return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")


class _InterpretedGluon(InterpretedFunction):
    def run(self, *args, **kwargs):
        # A Gluon tensor's type has a layout, which a kernel may read (x.type.layout) to build another; the
        # interpreter's tensor types have none, and the layouts are dropped anyway.
        assert not hasattr(tl.core.block_type, "layout"), "a Triton whose tensor types have layouts: revisit"
        tl.core.block_type.layout = None
        try:
            return super().run(*args, **kwargs)
        finally:
            del tl.core.block_type.layout

    def rewrite(self):
        # The interpreter reads a parameter as constexpr by its annotation, as the string "tl.constexpr" (it compiles
        # the function's source with postponed annotations): a Gluon kernel's say "gl.constexpr".
        fn = super().rewrite()
        fn.__annotations__ = {name: annotation.replace("gl.constexpr", "tl.constexpr")
                              for name, annotation in fn.__annotations__.items()}
        return fn


_GL = _GluonAsTriton()
_interpreted: dict[int, InterpretedFunction] = {}  # by the jit function's identity
_scopes: dict[int, dict] = {}  # by the identity of a module's globals


def interpreted(fn):
    """`fn` (a Gluon or Triton jit function) as an InterpretedFunction, its Gluon callees too."""
    if isinstance(fn, InterpretedFunction):
        return fn
    if id(fn) not in _interpreted:  # by identity: hashing a jit function reads its callees, which this replaces
        python_fn = fn.fn
        rebuilt = types.FunctionType(python_fn.__code__, _scope(python_fn.__globals__), python_fn.__name__,
                                     python_fn.__defaults__, python_fn.__closure__)
        _interpreted[id(fn)] = _InterpretedGluon(rebuilt)
    return _interpreted[id(fn)]


def _scope(module_globals: dict) -> dict:
    """A module's globals as its interpreted functions see them: `gl` and mma_v2 replaced, jit functions
    interpreted. Filled after it is registered, so that functions of one module may call each other."""
    if id(module_globals) not in _scopes:
        scope = _scopes[id(module_globals)] = dict(module_globals)
        scope["tl"] = tl  # the interpreter patches the triton.language it finds among a function's globals
        for name, value in module_globals.items():
            if isinstance(value, (GluonJITFunction, JITFunction)):
                scope[name] = interpreted(value)
            elif isinstance(value, tl.constexpr):  # a layout: read in the kernel's Python, ignored by _GL
                scope[name] = value.value
            elif value is ampere.mma_v2:
                scope[name] = _mma_v2
            elif getattr(value, "__name__", None) == "triton.experimental.gluon.language":
                scope[name] = _GL
    return _scopes[id(module_globals)]
