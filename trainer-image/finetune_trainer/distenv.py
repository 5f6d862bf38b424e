"""Where this process sits in a torchrun job, read from the environment torchrun sets (importable without torch).

The trainer decides who downloads, who uploads and who reports from these numbers before any process group exists,
so the answer must not depend on torch.distributed being initialised.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Ranks:
    """Global and node-local position of this process; a plain `python -m` run is rank 0 of 1."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0

    @property
    def nnodes(self) -> int:
        # torchrun runs the same number of processes on every node.
        return max(1, self.world_size // max(1, self.local_world_size))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Ranks:
        """Read RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE and GROUP_RANK (the node rank) as torchrun sets them."""
        env = os.environ if env is None else env
        rank = int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", "0"))
        world_size = int(env.get("WORLD_SIZE", "1"))
        local_world_size = int(env.get("LOCAL_WORLD_SIZE", str(world_size)))
        node_rank = int(env.get("GROUP_RANK", str(rank // max(1, local_world_size))))
        return cls(rank, local_rank, world_size, local_world_size, node_rank)
