"""I/O plumbing: atomic outputs, direct I/O, streamed torch.save, page release, pipelines, safe unpickling."""
