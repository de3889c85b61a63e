"""Deployable low-bit files (``.fewbits``): bit packing, Huffman coding and the container."""

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

__all__ = [
    "ENCODINGS",
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_CODE_LENGTH",
    "ExportReport",
    "FormatError",
    "TensorEntry",
    "code_dtype",
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
