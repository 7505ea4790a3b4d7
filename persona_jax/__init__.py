"""persona_jax: persona vectors (extract, monitor, steer, prevent, flag) in JAX/Flax.

The ten-line session: `load_model`, `extract` a `PersonaVector` from contrastive
examples, `save_vector` / `load_vector` it (Orbax, .pt, .npy, .gguf), `steer` a model
with it (a steered model, or a `with` block), sweep a `Steering.grid` through `generate`,
`project` answers on it, `apply_module` for any linen module. The pure functions over
(config, params, arrays) underneath (`forward_arrays`, `capture_arrays`,
`generate_arrays`, `persona_jax.runtime.apply`) are for your own jitted code.
"""
from persona_jax.errors import PersonaError
from persona_jax.runtime.forward import ForwardOutput, forward, forward_arrays
from persona_jax.model import DecoderConfig, Model, load_model
from persona_jax.model.sharding import make_mesh, rename_mesh_axes
from persona_jax.steering.spec import Steering
from persona_jax.steering.control import Condition, Guard, Monitor, calibrate, whiten
from persona_jax.steering.grid import SteeringGrid
from persona_jax.steering.sites import Site
from persona_jax.steering.module import apply_module
from persona_jax.runtime.generate import Generation, generate, generate_arrays
from persona_jax.runtime.capture import REDUCTIONS, capture, capture_arrays
from persona_jax.runtime.steered import SteeredModel, steer
from persona_jax.io.vectors import PersonaVector
from persona_jax.io.vectors import load_any as load_vector
from persona_jax.io.vectors import save_any as save_vector
from persona_jax.method.examples import extract, project
from persona_jax.method.whitening import second_moment

__all__ = [
    # models
    "load_model", "Model", "DecoderConfig", "make_mesh", "rename_mesh_axes",
    # the session
    "extract", "project", "PersonaVector", "save_vector", "load_vector",
    "steer", "SteeredModel", "Steering", "SteeringGrid",
    # closed-loop control
    "Monitor", "Guard", "Condition", "whiten", "calibrate", "second_moment",
    # runners
    "generate", "Generation", "capture", "REDUCTIONS", "forward", "ForwardOutput",
    # any linen module
    "apply_module", "Site",
    # the pure jitted layer
    "forward_arrays", "capture_arrays", "generate_arrays",
    "PersonaError",
]
