"""Running a model: the pure apply functions, batching onto a mesh, forward, capture with
on-device reductions, and the KV-cache sampler."""
