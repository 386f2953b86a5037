"""How a router decision is kept: its snapshot, as it was, in a compact record.

A record holds what was decided: the ranking, every candidate's score, cost score and
cost estimate, and what this request's own figures excluded. Nothing is computed again
when it is read, so a later change to the ranking or to a price leaves it as it was.

Two parts of a snapshot are the same for many decisions and are kept once, under their
digest: the option set's model listing (with its static exclusions), and the live figures
the models were ranked with (quality, speed, health, latency). A record names both digests.

Record layout (little-endian):

    b"P402rec1"
    u32 header length, u32 listing size n, u32 candidates m, u32 filtered b
    header: JSON [id, ts, mode, chosen, prompt_tokens, est_output_tokens, decision_us, options, reasons]
    16-byte listing digest, 16-byte live digest
    m x u16 ranked positions, m x f64 score, m x f64 cost score, m x f64 cost estimate
    b x u16 filtered positions, b x u8 index into the header's reasons
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import numpy as np

from ..core.router import DecisionSnapshot, Excluded, LiveColumns, ModelListing
from ..core.types import json_bytes

MAGIC = b"P402rec1"
DIGEST_SIZE = 16
_SIZES = struct.Struct("<IIII")

# Parts already encoded, by the identity of the snapshot object they came from (kept alive here, so
# an id is not reused while it is a key): decisions of one option set share these objects. Decisions
# are encoded in the order they were made, so a few recent parts find every repeat (at 2 as many as at
# 256, measured over 10,000 gateway requests); 256 of them held 1.1 MB (a live part and its columns
# are 8 kB at 135 models).
ENCODED_PARTS = 16
_encoded: dict[int, tuple[object, bytes, bytes]] = {}


def encode(snapshot: DecisionSnapshot) -> tuple[bytes, bytes, bytes, bytes, bytes]:
    """(record, listing digest, listing part, live digest, live part)."""
    listing_digest, listing = _part(snapshot.listing, _listing_part)
    live_digest, live = _part(snapshot.live, _live_part)
    reasons: list[str] = []
    codes = bytearray()
    for _, reason in snapshot.filtered:
        if reason not in reasons:
            reasons.append(reason)
        codes.append(reasons.index(reason))
    header = json_bytes(
        [snapshot.id, snapshot.ts, snapshot.mode, snapshot.chosen, snapshot.prompt_tokens,
         snapshot.est_output_tokens, snapshot.decision_us, snapshot.options, reasons]
    )  # fmt: skip
    record = b"".join(
        (
            MAGIC,
            _SIZES.pack(len(header), len(snapshot.listing.models), len(snapshot.ranked), len(snapshot.filtered)),
            header,
            listing_digest,
            live_digest,
            snapshot.ranked.astype("<u2").tobytes(),
            snapshot.score.astype("<f8", copy=False).tobytes(),
            snapshot.cost.astype("<f8", copy=False).tobytes(),
            snapshot.est_cost_usd.astype("<f8", copy=False).tobytes(),
            np.array([i for i, _ in snapshot.filtered], dtype="<u2").tobytes(),
            bytes(codes),
        )
    )
    return record, listing_digest, listing, live_digest, live


def decode(record: bytes | str, listing: bytes | None, live: bytes | None) -> dict[str, Any]:
    """A stored decision's `to_dict()`; a row written from a dict holds that dict as JSON."""
    if isinstance(record, str) or record[:1] == b"{":  # JSON, kept as text before and as bytes now
        return json.loads(record)
    if not record.startswith(MAGIC):
        raise ValueError("not a decision record")
    if listing is None or live is None:
        raise ValueError(f"decision record without its parts: listing {listing is not None}, live {live is not None}")
    at = len(MAGIC)
    header_len, n, m, b = _SIZES.unpack_from(record, at)
    at += _SIZES.size
    id_, ts, mode, chosen, prompt_tokens, est_output_tokens, decision_us, options, reasons = json.loads(
        record[at : at + header_len]
    )
    at += header_len + 2 * DIGEST_SIZE
    ranked = np.frombuffer(record, dtype="<u2", count=m, offset=at)
    at += 2 * m
    score, cost, est = np.frombuffer(record, dtype="<f8", count=3 * m, offset=at).reshape(3, m)
    at += 24 * m
    filtered_at = np.frombuffer(record, dtype="<u2", count=b, offset=at).tolist()
    codes = record[at + 2 * b : at + 3 * b]
    return DecisionSnapshot(
        id=id_,
        ts=ts,
        mode=mode,
        chosen=chosen,
        prompt_tokens=prompt_tokens,
        est_output_tokens=est_output_tokens,
        decision_us=decision_us,
        options=options,
        listing=_read_listing(listing),
        live=LiveColumns(*np.frombuffer(live, dtype="<f8", count=4 * n, offset=4).reshape(4, n)),
        ranked=ranked,
        score=score,
        cost=cost,
        est_cost_usd=est,
        filtered=tuple((i, reasons[code]) for i, code in zip(filtered_at, codes)),
    ).to_dict()


def _part(obj: Any, encode_part: Any) -> tuple[bytes, bytes]:
    found = _encoded.get(id(obj))
    if found is None:
        part = encode_part(obj)
        found = (obj, hashlib.blake2b(part, digest_size=DIGEST_SIZE).digest(), part)
        if len(_encoded) >= ENCODED_PARTS:
            _encoded.clear()
        _encoded[id(obj)] = found
    return found[1], found[2]


def _listing_part(listing: ModelListing) -> bytes:
    models = "\n".join("\t".join(model) for model in listing.models).encode()
    excluded = "\n".join(f"{e.id}\t{e.reason}" for e in listing.excluded).encode()
    return struct.pack("<II", len(models), len(excluded)) + models + excluded


def _read_listing(part: bytes) -> ModelListing:
    models_len, excluded_len = struct.unpack_from("<II", part, 0)
    models = part[8 : 8 + models_len].decode()
    excluded = part[8 + models_len : 8 + models_len + excluded_len].decode()
    return ModelListing(
        tuple(tuple(line.split("\t")) for line in models.split("\n")) if models else (),  # type: ignore[misc]
        tuple(Excluded(*line.split("\t", 1)) for line in excluded.split("\n")) if excluded else (),
    )


def _live_part(live: LiveColumns) -> bytes:
    columns = (live.quality, live.speed, live.health, live.latency)
    return struct.pack("<I", len(live.quality)) + b"".join(c.astype("<f8", copy=False).tobytes() for c in columns)
