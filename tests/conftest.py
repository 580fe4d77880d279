import jax

# The cross-checks run in float64 as well as float32; arrays are cast explicitly per test.
jax.config.update("jax_enable_x64", True)
