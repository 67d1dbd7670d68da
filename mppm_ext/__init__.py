"""mppm_ext: fused kernels for the momentum / point-perplexity mechanics of language models.

Public API:
    energy(hidden, logits, tokens, ...) -> EnergyResult
    steer_step(hidden, weight, targets, delta, ...) -> SteerResult
    energy_from_hidden(hidden, weight, tokens, ...) -> EnergyResult   (never holds the [B, T, V] logits)
    build_info() -> dict
    set_cpu_isa(name), cpu_isas()
"""

from ._dispatch import BackendUnavailableError
from .from_hidden import energy_from_hidden
from .from_logits import energy
from .steering import SteerResult, steer_step
from .results import STAT_QUANTITIES, TOKEN_QUANTITIES, EnergyResult, EnergyStats

__version__ = "0.1.0"


def build_info() -> dict:
    """What the compiled module holds: version, compiler, CPU instruction sets (compiled, supported,
    active), OpenMP, and CUDA (runtime version, architectures, visible devices)."""
    from ._dispatch import compiled

    return dict(compiled().build_info())


def cpu_isas() -> list[str]:
    """CPU instruction sets this build holds and this CPU supports, best first."""
    from ._dispatch import compiled

    return list(compiled().cpu_isas())


def set_cpu_isa(name: str) -> None:
    """Pin the CPU kernels to one instruction set from :func:`cpu_isas` (default: the best). The
    environment variable ``MPPM_EXT_CPU_ISA`` sets the initial choice."""
    from ._dispatch import compiled

    compiled().set_cpu_isa(name)


__all__ = ["energy", "energy_from_hidden", "steer_step", "SteerResult", "EnergyResult", "EnergyStats",
           "TOKEN_QUANTITIES", "STAT_QUANTITIES",
           "BackendUnavailableError", "build_info", "cpu_isas", "set_cpu_isa", "__version__"]
