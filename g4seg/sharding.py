"""Split a run's images between processes without any communication between them.

``torchrun`` (and ``accelerate launch`` on GPU machines) set ``RANK`` and ``WORLD_SIZE`` in each
process. Every rank sorts the same item list and takes every ``WORLD_SIZE``-th item from its rank on,
so the shares are disjoint, cover everything, and are the same in every process and on every rerun.
Each rank writes its own manifest; outputs go to one folder (stems are unique, so no file is shared).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

from g4seg.errors import G4SegError

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """This process's place in a launch: rank in ``0 .. world_size - 1``."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone shows progress and writes the run-wide files."""
        return self.rank == 0

    @property
    def manifest_name(self) -> str:
        return "manifest.jsonl" if self.world_size == 1 else f"manifest.rank{self.rank}.jsonl"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise G4SegError(f"environment variable {name}={value!r} is not an integer "
                         "(it is set by torchrun / accelerate launch; unset it for a single process)") from None


def current_shard() -> Shard:
    """The shard from ``RANK`` / ``WORLD_SIZE``; a plain ``python`` start is rank 0 of 1."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise G4SegError(f"invalid launch: RANK={rank} with WORLD_SIZE={world_size} "
                         "(need 0 <= RANK < WORLD_SIZE)")
    return Shard(rank, world_size)


def shard_items(items: Sequence[T], shard: Shard, key: Callable[[T], str]) -> list[T]:
    """This shard's share of ``items``: sorted by ``key``, then every ``world_size``-th from ``rank``.

    Striding (rather than contiguous blocks) keeps the shares within one item of each other and
    spreads images of similar size and class count over all ranks.
    """
    return sorted(items, key=key)[shard.rank::shard.world_size]
