"""Jobs: the parent side that starts and watches a worker, and the worker process. No torch."""
