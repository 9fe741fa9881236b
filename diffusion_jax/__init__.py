"""diffusion_jax: DiffiT, ECLIPSE, CoDi, Prompt Diffusion and MT-Diffusion in JAX/Flax."""

__version__ = "0.1.0"
