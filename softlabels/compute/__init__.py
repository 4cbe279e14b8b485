"""Stage one (precompute): run the teacher once and write its soft targets (the block loop, views,
sequences, the Dask path)."""
