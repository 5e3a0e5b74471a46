"""Sharpness definitions: one configuration of the core's public API each, its stable key, the
presets and the configs that list them, fitted to a zoo's data.

A definition is everything that changes a value: the kind, the norm and radius, adaptive or not,
logit normalization, ``m`` (the m-sharpness batch size), the number of examples and the
estimator's settings. ``Definition(kind, ...)`` builds the class of its kind:

==================  =========================================  ==========================
kind                class                                       evaluated by
==================  =========================================  ==========================
avg, max, geodesic  :class:`AverageCase`, :class:`WorstCase`,  ``sharpfast.evaluate_sharpness``
                    :class:`Geodesic` (:mod:`.sharpness`)       with the core's settings
trace, lambda_max,  :class:`Curvature` (:mod:`.curvature`)     ``sharpfast.curvature``
adam, renyi
measure             :class:`Measure` (:mod:`.measure`)          ``sharpfast.study.measures``
==================  =========================================  ==========================
"""
from __future__ import annotations

from .base import DEFAULT_EXAMPLES, LOGIT_NORMS, ConfigError, Definition, kinds
from .sharpness import AverageCase, Geodesic, Sharpness, WorstCase
from .curvature import Curvature
from .measure import Measure
from .presets import PRESETS, preset
from .config import dedupe, load_config, parse_config, with_overrides
from .data import check_data, fit_to_data

from sharpfast import NORMS
from sharpfast.geodesic import METRICS
from sharpfast.settings import INITS, SOLVERS

# The kinds, named as the paper and the published code name them; definition names and keys of
# existing stores carry these spellings (DESIGN.md §7).
SHARPNESS_KINDS = AverageCase.kinds + WorstCase.kinds
GEODESIC_KIND, = Geodesic.kinds
CURVATURE_KINDS = Curvature.kinds
MEASURE_KIND, = Measure.kinds
KINDS = kinds()

__all__ = ["Definition", "Sharpness", "AverageCase", "WorstCase", "Geodesic", "Curvature", "Measure", "ConfigError",
           "PRESETS", "preset", "parse_config", "load_config", "dedupe", "with_overrides", "fit_to_data", "check_data",
           "KINDS", "SHARPNESS_KINDS", "GEODESIC_KIND", "CURVATURE_KINDS", "MEASURE_KIND", "DEFAULT_EXAMPLES",
           "LOGIT_NORMS", "NORMS", "METRICS", "SOLVERS", "INITS"]
