"""The lean decoder's step in C (`native_step.c`, whose comment says why it is written by hand): built once per
machine with the system's C compiler and loaded through ctypes, so that it needs no Python headers, no PyTorch
extension toolchain and no ninja, only `cc`.

`native_library()` compiles the source into a shared library under the user's cache
(`$XDG_CACHE_HOME/tiny-llama2-zh/native/`, named by a hash of the source, the compiler's version and the CPU's
flags, so that an edit, a new compiler or another machine builds afresh) and returns it, or None with one warning
where there is no compiler or the build fails: the decoder then runs its PyTorch step, correct and slower.
`TINY_LLAMA2_ZH_NATIVE=0` turns the C step off everywhere (`LeanDecoder(native=False)` for one decoder, as the
benchmarks do to compare both).

The library is linked against the OpenMP runtime PyTorch already loaded (libgomp, by its soname), so the C step
and PyTorch's own operations share one thread team rather than two teams spinning against each other on few cores.

`NativeStep` binds a `LeanDecoder`'s weights and cache to the C structures: pointers into the tensors the decoder
holds, nothing copied (float matrices are kept as (out, in) rows, the layout a C dot product streams). The ctypes
classes below mirror the C structures by hand; the library reports its own sizes and offsets (`tl_layout`), and a
library whose layout differs from the mirror's is not used (`layout_mismatch`).
"""

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tiny_llama2_zh.infer.decode import LeanDecoder

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native_step.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
SWITCH = "TINY_LLAMA2_ZH_NATIVE"  # "0" turns the C step off


class Matrix(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("scale", ctypes.c_void_p),
        ("out", ctypes.c_int64),
        ("in_", ctypes.c_int64),
        ("groups", ctypes.c_int64),
        ("kind", ctypes.c_int64),
    ]


class Layer(ctypes.Structure):
    _fields_ = [
        ("input_norm", ctypes.c_void_p),
        ("post_norm", ctypes.c_void_p),
        ("qkv", Matrix),
        ("o", Matrix),
        ("gate_up", Matrix),
        ("down", Matrix),
        ("keys", ctypes.c_void_p),
        ("values", ctypes.c_void_p),
    ]


class Model(ctypes.Structure):
    _fields_ = [
        ("dim", ctypes.c_int64),
        ("hidden", ctypes.c_int64),
        ("n_layers", ctypes.c_int64),
        ("n_heads", ctypes.c_int64),
        ("n_kv_heads", ctypes.c_int64),
        ("head_dim", ctypes.c_int64),
        ("max_len", ctypes.c_int64),
        ("eps", ctypes.c_float),
        ("attn_scale", ctypes.c_float),
        ("embedding", ctypes.c_void_p),
        ("embedding_int8", Matrix),
        ("final_norm", ctypes.c_void_p),
        ("cos", ctypes.c_void_p),
        ("sin", ctypes.c_void_p),
        ("head", Matrix),
        ("layers", ctypes.POINTER(Layer)),
    ]


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tiny-llama2-zh" / "native"


def _cpu_flags() -> str:
    """The CPU's feature flags (what -march=native compiles for), so a library is rebuilt on another CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _torch_openmp() -> Path | None:
    """PyTorch's own libgomp, to link against (see the module docstring), where its wheel ships one."""
    bundled = Path(torch.__file__).parent / "lib" / "libgomp.so.1"
    return bundled if bundled.exists() else None


def build(compiler: str, target: Path) -> None:
    """Compile SOURCE into the shared library `target` (written to a temporary name, then renamed into place, so
    that two processes building at once never load half a file)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    openmp = _torch_openmp()
    link = [str(openmp), f"-Wl,-rpath,{openmp.parent}"] if openmp else []
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as partial:
        partial_path = Path(partial.name)
    try:
        subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", str(partial_path), *link, "-lm"],
            check=True,
            capture_output=True,
            text=True,
        )
        partial_path.replace(target)
    finally:
        partial_path.unlink(missing_ok=True)


STRUCTURES = (Matrix, Layer, Model)  # in the order tl_layout reports them


def python_layout() -> list[tuple[str, int]]:
    """The ctypes mirror's layout as (what, bytes): each structure's size, then each field's offset, in the order
    of `tl_layout` in native_step.c."""
    layout = []
    for struct in STRUCTURES:
        layout.append((f"sizeof({struct.__name__})", ctypes.sizeof(struct)))
        layout += [(f"{struct.__name__}.{name}", getattr(struct, name).offset) for name, _ in struct._fields_]
    return layout


def layout_mismatch(library: ctypes.CDLL) -> str | None:
    """Where the compiled structures differ from the ctypes ones (the first difference), or None when they agree."""
    expected = python_layout()
    found = (ctypes.c_int64 * len(expected))()
    library.tl_layout.restype = ctypes.c_int64
    library.tl_layout.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    count = library.tl_layout(found, len(expected))
    if count != len(expected):
        return f"the C side reports {count} sizes and offsets, the ctypes side has {len(expected)}"
    for index, (what, value) in enumerate(expected):
        if found[index] != value:
            return f"{what}: {found[index]} bytes in C, {value} in ctypes"
    return None


@functools.cache
def native_library() -> ctypes.CDLL | None:
    """The compiled C step (built on first use, then reused from the cache), or None where it cannot be built
    or is switched off."""
    if os.environ.get(SWITCH, "1") == "0" or platform.system() != "Linux":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        logger.warning("no C compiler (cc, gcc) found: decoding with PyTorch's operations, not the C step")
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
        key = hashlib.sha256(
            "\n".join([SOURCE.read_text(), version, " ".join(FLAGS), _cpu_flags(), str(_torch_openmp())]).encode()
        ).hexdigest()[:16]
        target = _cache_dir() / f"native_step-{key}.so"
        if not target.exists():
            build(compiler, target)
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or error
        logger.warning("the C decode step could not be built (%s): decoding with PyTorch's operations", detail)
        return None
    mismatch = layout_mismatch(library)
    if mismatch is not None:
        logger.warning("the C decode step's structures do not match native.py's (%s): decoding with PyTorch's "
                       "operations", mismatch)  # fmt: skip
        return None
    library.tl_step.restype = None
    library.tl_step.argtypes = [
        ctypes.POINTER(Model),
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int,
    ]
    library.tl_product.restype = None
    library.tl_product.argtypes = [
        ctypes.POINTER(Matrix), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,
    ]  # fmt: skip
    library.tl_scratch_size.restype = ctypes.c_int64
    library.tl_scratch_size.argtypes = [ctypes.POINTER(Model), ctypes.c_int64]
    return library


def _pointer(tensor: torch.Tensor, keep: list[torch.Tensor]) -> int:
    """The address of a contiguous CPU tensor's data, the tensor kept alive in `keep` as long as the step."""
    if not tensor.is_contiguous():
        raise ValueError("the C step reads contiguous tensors only")
    keep.append(tensor)
    return tensor.data_ptr()


def matrix_struct(m: object) -> Matrix:
    """The C view of a decoder matrix (a FloatMatrix's float32 (out, in) rows, or an Int8Matrix's values and
    scales (out, groups)), made once and kept on the matrix, whose own attributes hold the tensors it points into.
    Its products (`native_product`) and the C step's layers (`NativeStep`) read the same one."""
    from tiny_llama2_zh.infer.decode import Int8Matrix

    if m._native is not None:
        return m._native
    keep: list[torch.Tensor] = []  # the matrix holds them
    if isinstance(m, Int8Matrix):
        struct = Matrix(
            _pointer(m.qdata, keep), _pointer(m.scale, keep), m.out_features, m.in_features, m.scale.shape[1], 1
        )
    elif m.rows.dtype != torch.float32:
        raise ValueError(f"the C step multiplies float32 or int8 weights, not {m.rows.dtype}")
    else:
        struct = Matrix(_pointer(m.rows, keep), None, m.out_features, m.in_features, 1, 0)
    m._native = struct
    return struct


def native_product_runs(x: torch.Tensor, matrix: object) -> bool:
    """Whether `native_product` takes x times this matrix: float32 rows on a CPU, float32 or int8 weights, and
    the library built."""
    if not getattr(matrix, "native", True) or x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2:
        return False
    if not hasattr(matrix, "qdata") and matrix.rows.dtype != torch.float32:  # a FloatMatrix of another dtype
        return False
    return native_library() is not None


def native_product(matrix: object, x: torch.Tensor) -> torch.Tensor:
    """x (rows, in) times the matrix, (rows, out), by the C library on PyTorch's thread count."""
    struct = matrix_struct(matrix)
    x = x.contiguous()
    y = torch.empty(x.shape[0], struct.out)
    native_library().tl_product(ctypes.byref(struct), x.data_ptr(), y.data_ptr(), x.shape[0], torch.get_num_threads())
    return y


class NativeStep:
    """A LeanDecoder's step run by the C library: `step(tokens, positions)` feeds one token per running row (rows
    0..batch-1 of the cache, each at its own position) and returns the next-token logits (batch, vocab)."""

    def __init__(self, decoder: "LeanDecoder", library: ctypes.CDLL) -> None:
        from tiny_llama2_zh.infer.decode import Int8Matrix

        self.library = library
        self._keep: list[torch.Tensor] = []  # the tensors the structures point into, beside the matrices' own
        keep = self._keep

        layers = (Layer * len(decoder.layers))()
        for index, weights in enumerate(decoder.layers):
            layers[index] = Layer(
                _pointer(weights.input_norm, keep),
                _pointer(weights.post_norm, keep),
                matrix_struct(weights.qkv),
                matrix_struct(weights.o),
                matrix_struct(weights.gate_up),
                matrix_struct(weights.down),
                _pointer(decoder.keys[index], keep),
                _pointer(decoder.values[index], keep),
            )
        self._layers = layers
        config = decoder.config
        embedding = decoder._embedding
        self.model = Model(
            config.hidden_size,
            config.intermediate_size,
            len(decoder.layers),
            decoder.n_heads,
            decoder.n_kv_heads,
            decoder.head_dim,
            decoder.max_len,
            decoder.eps,
            decoder.scale,
            None if isinstance(embedding, Int8Matrix) else _pointer(embedding, keep),
            matrix_struct(embedding) if isinstance(embedding, Int8Matrix) else Matrix(),
            _pointer(decoder.final_norm, keep),
            _pointer(decoder.cos, keep),
            _pointer(decoder.sin, keep),
            matrix_struct(decoder.head),
            layers,
        )
        self.vocab = decoder.head.out_features
        self._scratch = torch.empty(library.tl_scratch_size(ctypes.byref(self.model), decoder.max_batch))

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        batch = tokens.shape[0]
        tokens = tokens.to(torch.int64).contiguous()
        positions = positions.to(torch.int64).contiguous()
        logits = torch.empty(batch, self.vocab)
        self.library.tl_step(
            ctypes.byref(self.model),
            tokens.data_ptr(),
            positions.data_ptr(),
            batch,
            logits.data_ptr(),
            self._scratch.data_ptr(),
            torch.get_num_threads(),
        )
        return logits
