"""Geodesic sharpness (da Silva, Dangel, Oore, ICML 2025; DESIGN.md §2c): worst-case sharpness on the
quotient of the weights by attention's GL(h) symmetry. ``sharpfast.geodesic_sharpness`` is the entry
point; the names here are what the study and users building blocks by hand need."""
from .blocks import GLBlock, GLFactor, find_gl_blocks
from .metric import METRICS
from .settings import GEODESIC_EPS, GeodesicSettings
from .solver import CORRECTION_WARNING, WARNING_TEXT, GeodesicCorrectionWarning, NoGLBlockWarning

__all__ = ["GLBlock", "GLFactor", "find_gl_blocks", "METRICS", "GEODESIC_EPS", "GeodesicSettings", "CORRECTION_WARNING", "WARNING_TEXT",
           "NoGLBlockWarning", "GeodesicCorrectionWarning"]
