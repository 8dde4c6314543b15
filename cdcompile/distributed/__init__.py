"""Context parallelism helpers: what torch.distributed does not provide, and nothing more.

- ``layout``: how a logical token axis is partitioned over the ranks (static, pure Python).
- ``sharding``: which dim of each graph value is a sharded token axis, and the edits that make each
  op compute its local part (analysis for the context_parallel pass).
- ``grid``: token grids, for ops that view the tokens as an image or a video (convolutions over
  the tokens): which dims hold which part of the grid, the rows and halo each rank holds.
- ``ulysses``: the functions the rewritten graph calls: token shards, gathers and halo exchanges,
  and the two all-to-alls around attention, on torch.distributed's traceable functional
  collectives.
"""
