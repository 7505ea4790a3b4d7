"""What the method does to a model: `Steering` objects (spec) turned into intervention
arrays, and the `flax.linen.intercept_methods` interceptors that read (capture) and write
(add c*v, ablate) module outputs."""
from persona_jax.steering.spec import Steering
