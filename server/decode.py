"""Adapter tensors from a client, decoded without trusting any header: the size, declared
dtype and shape are checked before the bytes are read, and the decoded array again."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedllm.untrusted import say

NPY_HEADER_SLACK = 4096  # np.save's header is < 200 bytes for our shapes


@dataclass(frozen=True)
class AdapterSpec:
    """What a valid delta looks like: key -> shape, all float32."""

    shapes: dict[str, tuple[int, ...]]

    @classmethod
    def from_state(cls, state) -> "AdapterSpec":
        return cls({k: tuple(v.shape) for k, v in state.items()})

    @property
    def num_values(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes.values())


def decode_array(array: Any, shape: tuple[int, ...]) -> tuple[np.ndarray | None, str]:
    """(the float32 array of `shape`, "") or (None, why not), without trusting any header."""
    try:
        stype, dtype, declared, data = array.stype, array.dtype, tuple(array.shape), array.data
    except Exception as exc:  # noqa: BLE001 - not an Array at all
        return None, f"not an array ({type(exc).__name__})"
    if stype != "numpy.ndarray":
        return None, f"serialisation {say(stype)}, expected numpy.ndarray"
    if dtype != "float32":
        return None, f"dtype {say(dtype)}, expected float32"
    if declared != shape:
        return None, f"shape {say(str(declared))}, expected {shape}"
    payload = math.prod(shape) * 4
    if not isinstance(data, (bytes, bytearray)) or not payload < len(data) <= payload + NPY_HEADER_SLACK:
        size = len(data) if isinstance(data, (bytes, bytearray)) else -1
        return None, f"{size} bytes for a float32 array of shape {shape}"
    try:
        buffer = io.BytesIO(data)
        version = np.lib.format.read_magic(buffer)
        if version == (1, 0):
            header_shape, fortran, header_dtype = np.lib.format.read_array_header_1_0(buffer)
        elif version == (2, 0):
            header_shape, fortran, header_dtype = np.lib.format.read_array_header_2_0(buffer)
        else:
            return None, f"unsupported npy format version {version}"
        if header_dtype != np.dtype("<f4") or tuple(header_shape) != shape or fortran:
            return None, f"encoded as {header_dtype} {tuple(header_shape)}, declared float32 {shape}"
        if len(data) - buffer.tell() != payload:
            return None, "payload length does not match its shape"
        value = np.frombuffer(data, dtype="<f4", count=math.prod(shape), offset=buffer.tell()).reshape(shape)
    except Exception as exc:  # noqa: BLE001 - undecodable bytes
        return None, f"undecodable array ({type(exc).__name__})"
    if not np.isfinite(value).all():
        return None, "non-finite values"
    return value.astype(np.float32), ""


def decode_delta(arrays: Any, spec: AdapterSpec) -> tuple[dict[str, np.ndarray] | None, str]:
    try:
        keys = set(arrays.keys())
    except Exception as exc:  # noqa: BLE001
        return None, f"arrays unreadable ({type(exc).__name__})"
    if keys != set(spec.shapes):
        unknown, missing = sorted(keys - set(spec.shapes)), sorted(set(spec.shapes) - keys)
        return None, f"adapter keys differ: unknown {[say(k, 60) for k in unknown[:3]]}, missing {missing[:3]}"
    delta = {}
    for key, shape in spec.shapes.items():
        value, why = decode_array(arrays[key], shape)
        if value is None:
            return None, f"{key}: {why}"
        delta[key] = value
    return delta, ""
