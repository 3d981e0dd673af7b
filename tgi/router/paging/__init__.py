"""Paged KV bookkeeping owned by the router: the block pool, block tables, prefix cache.

The backend only stores blocks (see the paged contract in `tgi.backend.contract`); which
sequence owns which block, which blocks are shared and which are cached is decided here.
"""

from tgi.router.paging.pool import BlockPool, NoFreeBlocks
from tgi.router.paging.prefix import block_hashes
from tgi.router.paging.table import BlockTable

__all__ = ["BlockPool", "BlockTable", "NoFreeBlocks", "block_hashes"]
