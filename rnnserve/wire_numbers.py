"""Numbers a request field's wire type cannot carry, and what the clients and the HTTP face send instead.

A caller can type a number its field's wire type cannot hold: a negative `top_k` (uint32), a
`max_tokens` of 10^12. Refusing it where it is found would state the wire type's range,
`[0, 4294967295]`, where the same field one past its limit gets the server's `[1, 85]`: two
messages for one field, the first of them a range no value in it passes. The server alone knows a
field's real range (the model's vocabulary, its own settings), so for the wire types whose every
request field the server bounds strictly inside the wire's range, the number is replaced by a
stand-in the server refuses in that field's own words:

- uint32 (`top_k`, `max_tokens`, `ttl_seconds`, `count`, `tokens`): the type's largest value,
  above every limit the server has (its settings are capped below it: `server/settings.py`);
- int32 (token ids): -1, never an id.

Other integer types (`seed`, `request_id`, `expected_position`) are refused where they are found,
naming the wire type's range, which is the field's. Both sides read this one table;
tests/test_range_errors.py holds the server to refusing every stand-in.
"""

from __future__ import annotations

from google.protobuf.descriptor import FieldDescriptor

RANGES = {FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
          FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1), FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1)}
STAND_INS = {FieldDescriptor.TYPE_UINT32: 2**32 - 1, FieldDescriptor.TYPE_INT32: -1}
# The most any server limit of a uint32 field may be: below the stand-in, so that the stand-in is refused.
MAX_UINT32_LIMIT = 2**32 - 2


def carried(field: FieldDescriptor, value: int) -> int:
    """`value` as the wire can carry it in `field`: itself, or the stand-in the server refuses naming the field's
    real range. ValueError naming the wire type's range for a type without a stand-in."""
    low, high = RANGES[field.type]
    if low <= value <= high:
        return value
    if field.type in STAND_INS:
        return STAND_INS[field.type]
    raise ValueError(f"must be in [{low}, {high}], got {compact(value)}")


def compact(value: float) -> str:
    """A number as an error quotes it: whole, or in scientific notation when long (1e300 is not 301 digits)."""
    if isinstance(value, int) and abs(value) < 10**16:
        return str(value)
    return f"{value:.6g}"
