"""glmv's inference engine: request and sampling types, the continuous-batching scheduler, the paged
KV block manager with automatic prefix caching, the vision-embedding cache, the model runner and the
asynchronous front that the server submits requests to.

The scheduling and memory-accounting modules (`sampling`, `sequence`, `block_manager`, `scheduler`,
`encoder_cache`) are pure Python with no torch import, so they can be tested fast and exhaustively.
"""
