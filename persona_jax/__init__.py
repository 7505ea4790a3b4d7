"""persona_jax: persona vectors (extract, monitor, steer, prevent, flag) in JAX/Flax."""
from persona_jax.errors import PersonaError
from persona_jax.runtime.forward import ForwardOutput, forward, forward_arrays
from persona_jax.model import DecoderConfig, Model, load_model
from persona_jax.model.sharding import make_mesh, rename_mesh_axes
from persona_jax.steering.spec import Steering
from persona_jax.runtime.generate import Generation, generate, generate_arrays
from persona_jax.runtime.capture import REDUCTIONS, capture, capture_arrays
