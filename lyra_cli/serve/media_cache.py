"""The server's cache of encoded media: a conversation's earlier images and clips are not encoded again.

    cache = MediaCache(max_parts=32)
    key = cache.key("image_url", "image/png", base64_text)    # request thread, before decoding
    part = cache.get(key)                                      # a hit: neither decoded nor encoded again
    cache.put(key, engine.encode(decoded))                     # a miss: the worker stores what it encoded

Each request carries its whole conversation (as OpenAI's API does), so without it every earlier medium would
pass through the ViT or Whisper again on every turn. Entries are content-addressed: the key is a digest of
the medium's base64 text as sent, with its kind and everything else that changes its encoding (the media
type or audio format the file is written under, the request's `official_audio` front end). Identical bytes
under identical options give an identical encoding, so an entry may serve any client that sends those
bytes; it never serves a part to a request that did not send the same bytes. One server has one engine, so
the engine is not part of the key.

A hit skips the decoding and its limit checks: the same bytes passed them when first seen, and the limits
are fixed for the server's life. Long recordings (over one window) are never stored here: they have the
speech-token cache on disk. A stored part is never changed afterwards (a clip keeps only its Whisper frames,
which each turn projects with its own adapter), so handing the same tensors to many turns is safe.

Lookups happen on request threads and stores on the worker's thread: one lock guards the entries.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lyra_cli.engine import Part

DEFAULT_CACHED_MEDIA = 32  # parts: a long conversation's images and clips
# a bound on the tensors held, whatever the count: on a GPU they take its memory (a 2880×2880 image is about
# 10k ViT tokens × 1536 × 2 bytes ≈ 32 MB; a 30 s clip's Whisper frames 1500 × 1280 × 2 bytes ≈ 4 MB)
MAX_CACHED_MEDIA_BYTES = 1 << 30


@dataclass(frozen=True)
class CachedMedium:
    """A content item found in the cache: the part as first encoded, and the request field naming it now."""

    part: Part
    source: str


def part_bytes(part: Any) -> int:
    """The bytes of a part's tensors."""
    return sum(value.nbytes for f in fields(part) if hasattr(value := getattr(part, f.name), "nbytes"))


class MediaCache:
    """At most `max_parts` encoded parts and `max_bytes` of their tensors, the least recently used dropped first."""

    def __init__(self, max_parts: int = DEFAULT_CACHED_MEDIA, max_bytes: int = MAX_CACHED_MEDIA_BYTES) -> None:
        self.max_parts = max_parts
        self.max_bytes = max_bytes
        self._parts: OrderedDict[str, tuple[Part, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(*options: object, payload: str) -> str:
        """The key of a medium: its base64 `payload` as sent and every option that changes its encoding."""
        digest = hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest()
        return "|".join([*(str(option) for option in options), digest])

    def get(self, key: str) -> Part | None:
        with self._lock:
            entry = self._parts.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._parts.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: str, part: Part) -> None:
        size = part_bytes(part)
        if self.max_parts == 0 or size > self.max_bytes:
            return
        with self._lock:
            old = self._parts.pop(key, None)
            self._bytes -= old[1] if old is not None else 0
            self._parts[key] = (part, size)
            self._bytes += size
            while len(self._parts) > self.max_parts or self._bytes > self.max_bytes:
                _, (_, dropped) = self._parts.popitem(last=False)
                self._bytes -= dropped

    def stats(self) -> dict[str, int]:
        """What `/health` shows."""
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "size": len(self._parts), "bytes": self._bytes,
                    "max_parts": self.max_parts}  # fmt: skip
