"""Entry point ``vn`` of relax-plugins: relaxes vector-neuron (VN) layers, recognised structurally.

No VN library exists on PyPI; every project copies the same layer file, so this adapter does not
look at class names or types. A VN layer is any module that owns a bias-free ``nn.Linear`` (usually
``map_to_feat`` / ``map_to_dir``, ``vn_lin`` in ``VNStdFeature``) and, somewhere in its class source,
applies it to the channel axis of a ``[B, C, 3, *S]`` tensor the way all public VN code does::

    self.map_to_feat(x.transpose(1, -1)).transpose(1, -1)     # or torch.transpose(x, 1, -1)

Detection (see :func:`vn_linear_names`): when the hook sees an ``nn.Linear``, it looks up its parent
(``root.get_submodule(parent_name)``), reads the source of the parent's class (and of its bases and
mixins, so a helper method counts) and claims the Linear with :class:`VNLinearRelaxation` if some
method calls ``self.<attr>(<expr>.transpose(1, -1))`` on it and it is bias-free. Nothing is recorded
and the model is not touched. Only when the parent's source cannot be read (classes built with
``exec``) a bias-free Linear is claimed by its attribute name, one of :data:`VN_LINEAR_NAMES` (or
``adapter_options={"vn": {"vn_names": [...]}}``).

With ``relax(model, example_inputs=...)`` the adapter does not read source text for the modules it
sees at work: a probe forward (:mod:`relax_vn.probe`) finds the bias-free Linears whose inputs carry
xyz vectors (any axis, per input rank) and the VN layer modules that apply a channel matrix
functionally (``F.linear``, ``einsum``), which are relaxed as a whole (:class:`VNModuleRelaxation`).

Layout assumption of the source-text rule (documented, checked at run time): the wrapped ``nn.Linear`` receives
``x.transpose(1, -1)`` of ``[B, C, 3, *S]``, so channels are on the last axis and xyz is on axis 1
when ``S`` is empty (``[B, 3, C]``) and on axis 2 otherwise (``[B, S_last, 3, ..., C]``). A layer
called on anything else raises a ``ValueError`` naming the expected layout.

Fibre: per position, the ``3·C`` numbers ordered **xyz-major** (index ``j·C + c``): for ``[B, C, 3]``
and ``[B, C, 3, N]`` features these are the last two axes of the Linear's input, so no axis
permutation is needed (``[B, C, 3, N, k]`` edge features need one). The
so(3) generators are ``A_k ⊗ I_C`` (generator-major in the penalty), the intertwiners are
``I_3 ⊗ M`` (the same space as "M ⊗ I_3" in channel-major order) and P(W) is the block trace
average; merging adds M to the Linear's weight.

Options (``relax(model, adapter_options={"vn": {...}})``, see :func:`relax_adapter_options`):
    ``vn_group``: "SO(3)" (default, the paper) or "O(3)" (adds the mirror diag(-1, 1, 1) as a discrete
    generator; VN layers are reflection-equivariant, the intertwiner space is the same);
    ``vn_names``: extra Linear attribute names accepted by the name fallback;
    ``vn_input_axis``: the xyz axis of the example inputs for the probe (default: found by trying);
    ``vn_penalty_rows``: deprecated (``DeprecationWarning``; removed in the next release), the VN layers'
    default ``penalty_samples`` (None: all fibres); pass ``relax(model, penalty_samples=m)`` instead.

The penalties of VN layers are estimated on at most ``penalty_samples`` evenly strided fibres per
layer and step, sums rescaled to all fibres (the core's mechanism for every pointwise layer): 256 unless
``relax(model, penalty_samples=m)`` says otherwise.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from relax_plugins import AdapterOption, hookimpl
from relax_plugins._checks import check_int
from relax_plugins.irreps import so3_basis

from .detect import VN_LINEAR_NAMES, _structural_verdict, vn_linear_names
from .module_terms import VNModuleRelaxation
from .probe import VNProbe, probe_vn
from .terms import DEFAULT_PENALTY_ROWS, DEFAULT_PENALTY_SAMPLES, VNLinearRelaxation, vn_symmetry

__all__ = [
    "VN_LINEAR_NAMES",
    "DEFAULT_PENALTY_SAMPLES",
    "DEFAULT_PENALTY_ROWS",
    "VNLinearRelaxation",
    "VNModuleRelaxation",
    "so3_basis",
    "vn_symmetry",
    "vn_linear_names",
    "relax_make_term",
    "relax_observe",
    "relax_adapter_info",
]


class _Unset:
    def __repr__(self) -> str:
        return "unset"


# the default of vn_penalty_rows: None is a value of its own there (all fibres)
_UNSET = _Unset()


def _check_penalty_rows(value: Any) -> None:
    check_int(value, "vn_penalty_rows", minimum=1, none_ok=True)


def _deprecated_penalty_rows(value: Any) -> int | None:
    """The VN terms' default ``penalty_samples``: the deprecated ``vn_penalty_rows`` where given."""
    if value is _UNSET:
        return DEFAULT_PENALTY_SAMPLES
    warnings.warn(
        "adapter option vn.vn_penalty_rows is deprecated and will be removed in the next release: pass "
        "relax(model, penalty_samples=m) (it sets the same subsampling for every pointwise layer)",
        DeprecationWarning,
        stacklevel=2,
    )
    return value


@hookimpl
def relax_observe(root: nn.Module, example_inputs: tuple[tuple, dict], options: dict[str, Any]) -> dict[str, Any]:
    """Run the VN probe (:func:`relax_vn.probe.probe_vn`) on the example inputs.

    Example:
        >>> import torch
        >>> from relax_vn.layers import VNLinear
        >>> found = relax_observe(torch.nn.Sequential(VNLinear(2, 3)), ((torch.randn(4, 2, 3, 5),), {}), {})
        >>> len(found["vn_probe"].linears)
        1
    """
    args, kwargs = example_inputs
    found = probe_vn(root, tuple(args), dict(kwargs), options)
    return {"vn_probe": found, "probe_notes": found.notes}


@hookimpl
def relax_make_term(
    module: nn.Module, name: str, options: dict[str, Any], root: nn.Module
) -> VNLinearRelaxation | None:
    """Claim the VN channel Linears of any VN layer file (see the module docstring).

    Example:
        >>> import torch
        >>> import relax_plugins as rp
        >>> from relax_vn.layers import VNLinearLeakyReLU
        >>> m = rp.relax(torch.nn.Sequential(VNLinearLeakyReLU(2, 4)), adapters=["vn"])
        >>> sorted(n for n, _ in rp.relaxed_modules(m))
        ['0.map_to_dir', '0.map_to_feat']
    """
    def common() -> dict[str, Any]:  # read only for layers it claims: options for absent layers are refused
        return {
            "group": options.get("vn_group", "SO(3)"),
            "rank": options.get("rank"),
            "init_std": options.get("init_std", 0.0),
            "penalty_samples": _deprecated_penalty_rows(options.get("vn_penalty_rows", _UNSET)),
        }

    probe: VNProbe | None = options.get("vn_probe")
    if probe is not None and id(module) in probe.called:
        # observed at work: what it did decides, not how its source is written
        if id(module) in probe.modules:
            return VNModuleRelaxation(probe.modules[id(module)], **common())
        if isinstance(module, nn.Linear) and module.bias is None:
            if id(module) in probe.linears:
                return VNLinearRelaxation(
                    module.in_features, module.out_features, axes=probe.linears[id(module)], **common()
                )
            if name.rsplit(".", 1)[-1] in options.get("vn_names", ()):  # the user names it: claimed anyway
                return VNLinearRelaxation(module.in_features, module.out_features, **common())
        return None
    if not isinstance(module, nn.Linear):
        return None
    verdict = _structural_verdict(module, name, root)
    if verdict is None:
        names = (*VN_LINEAR_NAMES, *options.get("vn_names", ()))
        verdict = module.bias is None and name.rsplit(".", 1)[-1] in names
    if not verdict:
        return None
    return VNLinearRelaxation(module.in_features, module.out_features, **common())


@hookimpl
def relax_adapter_options() -> dict[str, AdapterOption]:
    """The options of ``relax(model, adapter_options={"vn": {...}})`` (see the module docstring).

    Example:
        >>> sorted(relax_adapter_options())
        ['vn_group', 'vn_input_axis', 'vn_names', 'vn_penalty_rows']
    """
    return {
        "vn_group": AdapterOption(str, "SO(3)", '"SO(3)" (the paper) or "O(3)" (adds the mirror)'),
        "vn_names": AdapterOption((list, tuple), (), "extra Linear attribute names the name fallback accepts"),
        "vn_input_axis": AdapterOption(int, None, "xyz axis of the example inputs for the probe (default: tried)"),
        "vn_penalty_rows": AdapterOption(_check_penalty_rows, _UNSET,
                                         "deprecated: pass relax(model, penalty_samples=m) (None here: all fibres)"),
    }


@hookimpl
def relax_adapter_info() -> dict[str, str]:
    """What ``rp.list_adapters()`` shows for this adapter.

    Example:
        >>> sorted(relax_adapter_info())
        ['description', 'layers']
    """
    return {
        "description": "vector neurons (VN-PointNet / VN-DGCNN layer files, recognised structurally), SO(3)/O(3)",
        "layers": "bias-free nn.Linear applied as self.<map>(x.transpose(1, -1)) in VN modules "
        "(map_to_feat, map_to_dir, vn_lin); first-party layers in relax_vn.layers",
    }
