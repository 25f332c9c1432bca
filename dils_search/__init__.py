"""dils-search: search a network's depth by growing it with layers that inherit what it knew."""

from __future__ import annotations

from .grow import INIT_METHODS, GrowOptions, GrowthInfo, GrowthStep, check_step, grow, output_gap
from .model import build, count_params, forward_flops
from .spec import ConvSpec, MLPSpec, Spec, spec_from_json

__all__ = [
    "INIT_METHODS",
    "ConvSpec",
    "GrowOptions",
    "GrowthInfo",
    "GrowthStep",
    "MLPSpec",
    "Spec",
    "build",
    "check_step",
    "count_params",
    "forward_flops",
    "grow",
    "output_gap",
    "spec_from_json",
]
__version__ = "0.1.0"
