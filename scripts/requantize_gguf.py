#!/usr/bin/env python3
"""A GGUF file's quantized matrices in another GGML type, with the `gguf` package's reader, quantizers and writer.

    .venv/bin/python scripts/requantize_gguf.py IN.gguf OUT.gguf --type Q8_0|Q4_0|Q4_1|Q5_0|Q5_1

Every tensor already stored quantized (any GGML block type) is dequantized to float32 and quantized again
to --type; float tensors (norms, biases, float16 matrices) are copied as they are, and so is all metadata
(general.file_type set to the new type). For benchmarks that need the same model in another format
(scripts/bench_peer.py --gguf): from Q4_1 weights the result carries Q4_1's rounding plus the new type's.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter, Keys
from gguf.constants import GGMLQuantizationType as QT, LlamaFileType
from gguf.quants import dequantize, quantize

FLOAT_TYPES = {QT.F32, QT.F16, QT.BF16}
FILE_TYPES = {"Q8_0": LlamaFileType.MOSTLY_Q8_0, "Q4_0": LlamaFileType.MOSTLY_Q4_0,
              "Q4_1": LlamaFileType.MOSTLY_Q4_1, "Q5_0": LlamaFileType.MOSTLY_Q5_0,
              "Q5_1": LlamaFileType.MOSTLY_Q5_1}


def requantize(src: Path, dst: Path, target: QT) -> dict[str, int]:
    reader = GGUFReader(str(src))
    arch = reader.fields[Keys.General.ARCHITECTURE].contents()
    writer = GGUFWriter(str(dst), arch=arch)
    for field in reader.fields.values():
        # the writer adds the architecture and the GGUF.* header fields itself
        if field.name == Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value = field.contents()
        if field.name == Keys.General.FILE_TYPE:
            value = int(FILE_TYPES[target.name])
        kind = field.types[0]
        writer.add_key_value(field.name, value, kind,
                             sub_type=field.types[-1] if kind == GGUFValueType.ARRAY else None)
    if Keys.General.FILE_TYPE not in reader.fields:
        writer.add_file_type(int(FILE_TYPES[target.name]))
    counts = {"requantized": 0, "copied": 0}
    for tensor in reader.tensors:
        qtype = QT(tensor.tensor_type)
        if qtype in FLOAT_TYPES:
            writer.add_tensor(tensor.name, np.asarray(tensor.data), raw_dtype=qtype if qtype == QT.BF16 else None)
            counts["copied"] += 1
            continue
        # dequantize gives the logical shape, rows last-dimension-major as GGUF stores them
        values = dequantize(np.asarray(tensor.data), qtype).astype(np.float32)
        writer.add_tensor(tensor.name, quantize(values, target), raw_dtype=target)
        counts["requantized"] += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--type", required=True, choices=sorted(FILE_TYPES))
    args = parser.parse_args()
    counts = requantize(args.src, args.dst, QT[args.type])
    print(f"{args.dst}: {counts['requantized']} tensors as {args.type}, {counts['copied']} float tensors copied",
          file=sys.stderr)


if __name__ == "__main__":
    main()
