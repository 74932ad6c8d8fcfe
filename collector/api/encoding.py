"""JSON answers of the read routes written from polars frames, without a Python dict per row.

A route that returned `{"gpus": frame.to_dicts()}` let FastAPI validate that dict against its response model
(`dict`) and write it with pydantic's JSON serialiser: at 32,768 GPUs, 100 ms of `to_dicts` and 50 ms of
serialising, for 18 MB of JSON (bench/read_api.py). `json_response` writes each frame with polars' own JSON
writer instead (30 ms, no Python object per value) and the rest of the answer with pydantic's serialiser, as
before. The bytes are the same as the old path's for every dtype the read routes answer with (pinned by
tests/collector/test_api_encoding.py):

- floats as pydantic writes them (ryu's shortest form: 1980000000.0, 1e+20, 1e-7), NaN and ±inf as null;
- Float32 columns widened to Float64 first, as `to_dicts` does (0.9f32 is 0.8999999761581421: polars would
  write the float32's own shortest form, 0.9, a different value for a client);
- categorical and enum columns as strings; strings escaped alike (non-ASCII kept, control characters \\uXXXX).

A frame holding any other dtype (datetimes, which polars writes with a space where pydantic writes a "T";
binary, which polars cannot write; objects) goes the old way, through `to_dicts`.

The routes keep `response_model=dict`, so the OpenAPI document describes them as before.
"""

from __future__ import annotations

import io
from typing import Any

import polars as pl
from fastapi import Response
from pydantic import TypeAdapter

_ANY: TypeAdapter[Any] = TypeAdapter(Any)
_INTEGERS = (pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.Int128, pl.UInt8, pl.UInt16, pl.UInt32, pl.UInt64)


def _writable(dtype: pl.DataType) -> pl.DataType | None:
    """The dtype to write a column of `dtype` as with polars' JSON writer so that the bytes are pydantic's for
    `to_dicts` of the original; None when there is none (write it through `to_dicts`)."""
    if isinstance(dtype, (pl.Categorical, pl.Enum)):
        return pl.String()
    if isinstance(dtype, pl.Float32):
        return pl.Float64()
    if isinstance(dtype, (pl.Float64, pl.Boolean, pl.String, pl.Null, *_INTEGERS)):
        return dtype
    if isinstance(dtype, pl.List):
        inner = _writable(dtype.inner)
        return pl.List(inner) if inner is not None else None
    if isinstance(dtype, pl.Array):
        inner = _writable(dtype.inner)
        return pl.Array(inner, dtype.shape) if inner is not None else None
    if isinstance(dtype, pl.Struct):
        fields = [pl.Field(f.name, _writable(f.dtype)) for f in dtype.fields]
        return pl.Struct(fields) if all(f.dtype is not None for f in fields) else None
    return None


def _write_frame(frame: pl.DataFrame, out: io.BytesIO) -> None:
    casts = {}
    for name, dtype in frame.schema.items():
        target = _writable(dtype)
        if target is None:
            out.write(_ANY.dump_json(frame.to_dicts()))
            return
        if target != dtype:
            casts[name] = target
    if frame.width == 0:  # polars writes "[]" whatever the height; to_dicts, an empty object per row
        out.write(_ANY.dump_json(frame.to_dicts()))
        return
    (frame.cast(casts) if casts else frame).write_json(out)  # type: ignore[arg-type]


def frame_json(frame: pl.DataFrame) -> bytes:
    """The frame as a JSON array of row objects: the bytes pydantic writes for `frame.to_dicts()`."""
    out = io.BytesIO()
    _write_frame(frame, out)
    return out.getvalue()


def json_bytes(content: dict[str, Any]) -> bytes:
    """`content` as JSON, its frame values (top level) written as `frame_json` writes them, the others by
    pydantic (as FastAPI wrote the whole answer)."""
    out = io.BytesIO()
    out.write(b"{")
    for i, (key, value) in enumerate(content.items()):
        out.write(b'%s%s:' % (b"," if i else b"", _ANY.dump_json(key)))
        if isinstance(value, pl.DataFrame):
            _write_frame(value, out)
        else:
            out.write(_ANY.dump_json(value))
    out.write(b"}")
    return out.getvalue()


def json_response(content: dict[str, Any], status_code: int = 200) -> Response:
    """An application/json answer of `content` (see the module's docstring); its top-level values may be frames."""
    return Response(json_bytes(content), status_code=status_code, media_type="application/json")
