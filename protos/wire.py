"""Protobuf's wire format by hand, for messages with one big bytes field.

Building a generated message copies a bytes field in, and serializing copies it again;
for a 0.43 MB group or a 1 MiB weight chunk those copies cost more than the rest of
the work. Writing the few bytes of framing (tags, lengths) in front of the payload
gives the same bytes in one join. Tests compare with SerializeToString.
"""

from __future__ import annotations


def varint(n: int) -> bytes:
    """Protobuf's base-128 varint of a non-negative int."""
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def field_head(field: int, length: int) -> bytes:
    """Tag and length of a length-delimited field (wire type 2) of `length` bytes."""
    return varint(field << 3 | 2) + varint(length)


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """(value, position after it) of the varint at `pos`; value -1 if it is cut off or longer than 5 bytes.

    5 bytes hold any length a message can have (< 2 GiB); callers hand anything longer to
    protobuf's own parser, which decides.
    """
    value, shift = 0, 0
    for i in range(pos, min(pos + 5, len(data))):
        b = data[i]
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i + 1
        shift += 7
    return -1, pos
