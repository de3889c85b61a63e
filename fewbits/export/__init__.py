"""Deployable low-bit files (``.fewbits``): bit packing, Huffman coding and the container."""

from typing import Any

from .container import (
    ENCODINGS,
    FORMAT_VERSION,
    MAGIC,
    FormatError,
    decode_tensor,
    dumps,
    encode_tensor,
    loads,
    read_container,
    write_container,
)
from .huffman import MAX_CODE_LENGTH, huffman_decode, huffman_encode
from .packed import ExportReport, TensorEntry, export_packed, load_packed, packed_info
from .packing import code_dtype, pack_bits, packed_size, unpack_bits


def compile_for_cpu(path: Any, **kwargs: Any) -> Any:
    """The fastest exact CPU form of a ``.fewbits`` file, model, run folder or checkpoint:
    :func:`fewbits.runtime.compile_for_cpu` (imported on use: it needs ONNX)."""
    from ..runtime import compile_for_cpu as _compile

    return _compile(path, **kwargs)


__all__ = [
    "ENCODINGS",
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_CODE_LENGTH",
    "ExportReport",
    "FormatError",
    "TensorEntry",
    "code_dtype",
    "compile_for_cpu",
    "decode_tensor",
    "dumps",
    "encode_tensor",
    "export_packed",
    "huffman_decode",
    "huffman_encode",
    "load_packed",
    "loads",
    "pack_bits",
    "packed_info",
    "packed_size",
    "read_container",
    "unpack_bits",
    "write_container",
]
