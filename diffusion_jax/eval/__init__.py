"""Evaluation: the shapes-world parser and compositional scores (`shapes_parser`), and image metrics.

Submodules are imported explicitly (``from diffusion_jax.eval import shapes_parser``) so that importing this
package stays cheap.
"""
