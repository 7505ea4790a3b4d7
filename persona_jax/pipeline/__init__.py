"""The experiment layer: trait sources, the pipeline steps and their reports, runner setup
and CLI helpers. The only layer that reads ml_collections configs."""
