"""I/O plumbing: atomic outputs, direct I/O, page release, pipelines, buffers, safe unpickling."""
