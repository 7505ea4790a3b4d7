"""persona_jax: persona vectors (extract, monitor, steer, prevent, flag) in JAX/Flax."""
from persona_jax.errors import PersonaError
from persona_jax.forward import ForwardOutput, forward, forward_arrays
from persona_jax.models import DecoderConfig, Model, load_model
from persona_jax.sharding import make_mesh
from persona_jax.steering import Steering
from persona_jax.generate import Generation, generate, generate_arrays
from persona_jax.capture import REDUCTIONS, capture, capture_arrays
