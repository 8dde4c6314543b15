"""Context parallelism helpers: what torch.distributed does not provide, and nothing more.

- ``layout``: how a logical token axis is partitioned over the ranks (static, pure Python).
- ``sharding``: which dim of each graph value is a sharded token axis, and the edits that make each
  op compute its local part (analysis for the context_parallel pass).
- ``ulysses``: the functions the rewritten graph calls: token shards and gathers, and the two
  all-to-alls around attention, on torch.distributed's traceable functional collectives.
"""
