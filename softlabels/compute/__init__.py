"""Stage one (precompute): run the teacher once and write its soft targets. `blocks` is the one
block loop; what differs by kind of row is a `rows.RowKind` (`examples`: one row per example or
view; `positions`: one row per token position); then views, the Dask path (`cluster`)."""
