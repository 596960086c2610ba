"""relax-plugins: train equivariant networks with constraint relaxation (arXiv 2408.13242).

>>> import relax_plugins as rp
>>> sorted(n for n in ("relax", "project", "set_theta", "penalty") if hasattr(rp, n))
['penalty', 'project', 'relax', 'set_theta']
"""

from . import schedules
from .api import (
    get_theta,
    penalty,
    project,
    projected_state_dict,
    projection_report,
    relax,
    relaxation_parameters,
    relaxed_modules,
    set_theta,
)
from .diagnostics import equivariance_report, format_report, plot_history, plot_report, save_report
from .dual import DualAscentTheta
from .errors import (
    AdapterError,
    AlreadyRelaxedError,
    NonFiniteError,
    NothingToRelaxError,
    NotRelaxedError,
    PluginLoadError,
    RelaxError,
    UnknownAdapterError,
)
from .hookspecs import ENTRY_POINT_GROUP, hookimpl
from .modulation import LearnedModulation
from .options import AdapterOption
from .plugins import (
    DISABLE_AUTOLOAD_ENV,
    AdapterInfo,
    get_plugin_manager,
    list_adapters,
    register_adapter,
    reset_plugin_manager,
    unregister_adapter,
)
from .symmetry import KronGenerators, Symmetry
from .term import LinearRelaxation, PenaltyTerms, RelaxationTerm
from .training import DEFAULT_PENALTY_EVERY, RelaxedTraining
from .wrapper import RelaxedModule

__version__ = "0.1.0"

__all__ = [
    "relax",
    "project",
    "set_theta",
    "get_theta",
    "penalty",
    "relaxed_modules",
    "relaxation_parameters",
    "projection_report",
    "projected_state_dict",
    "equivariance_report",
    "format_report",
    "save_report",
    "plot_report",
    "plot_history",
    "schedules",
    "list_adapters",
    "register_adapter",
    "unregister_adapter",
    "get_plugin_manager",
    "reset_plugin_manager",
    "AdapterInfo",
    "AdapterOption",
    "hookimpl",
    "ENTRY_POINT_GROUP",
    "DISABLE_AUTOLOAD_ENV",
    "Symmetry",
    "KronGenerators",
    "RelaxationTerm",
    "LinearRelaxation",
    "PenaltyTerms",
    "RelaxedModule",
    "RelaxedTraining",
    "DEFAULT_PENALTY_EVERY",
    "DualAscentTheta",
    "LearnedModulation",
    "RelaxError",
    "AdapterError",
    "AlreadyRelaxedError",
    "NonFiniteError",
    "NothingToRelaxError",
    "NotRelaxedError",
    "PluginLoadError",
    "UnknownAdapterError",
]
