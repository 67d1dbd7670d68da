"""Jacobian steering: the minimal-norm perturbation of a hidden state that raises the log-probability of
target tokens by asked amounts (docs/definitions.md, "Jacobian steering").

    steer_step(hidden, weight, targets, delta, ...) -> SteerResult   the state that feeds the unembedding
    steer_layer(model, input_ids, layer, targets, delta, ...) -> SteerResult   any layer's state (mppm_ext.models.layers)
"""

from .gauss_newton import SteerResult
from .layers import steer_layer
from .solver import steer_step

__all__ = ["steer_step", "steer_layer", "SteerResult"]
