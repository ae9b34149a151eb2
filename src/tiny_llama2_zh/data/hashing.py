"""Content hashes shared by every data step: deterministic splits, exact deduplication, file checksums."""

import hashlib
from pathlib import Path


def is_validation(text: str, validation_per_mille: int) -> bool:
    """Held out by a hash of the text: the split does not depend on file order or on the number of workers."""
    digest = hashlib.sha1(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % 1000 < validation_per_mille


class ExactDuplicates:
    """Remembers 16-byte digests of the texts it has seen (not the texts), for exact deduplication."""

    def __init__(self):
        self._seen: set[bytes] = set()

    def seen_before(self, text: str) -> bool:
        """True for a text met before; otherwise records it and returns False."""
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        if digest in self._seen:
            return True
        self._seen.add(digest)
        return False


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in 4 MiB blocks (shard manifests, downloads from the hub)."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
