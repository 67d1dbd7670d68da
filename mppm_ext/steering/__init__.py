"""Jacobian steering: the minimal-norm steering step, steered generation and its evaluation."""
