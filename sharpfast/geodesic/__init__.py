"""Geodesic sharpness (da Silva, Dangel, Oore, ICML 2025; GEODESIC.md): worst-case sharpness on the
quotient of the weights by attention's GL(h) symmetry."""
from .blocks import GLBlock, GLFactor, find_gl_blocks

__all__ = ["GLBlock", "GLFactor", "find_gl_blocks"]
