"""The relaxation term of a declared (or built-in) torch-geometric layer.

W is one dense (or low-rank) matrix from the concatenated input fibres of a node to the
concatenated output fibres; the relaxed layer returns f(x) + θ·W·x on the declared outputs and the
untouched base outputs elsewhere. Positions never enter W as absolute coordinates: they are taken
relative to their graph (centroid via ``batch``, or neighbour mean via ``edge_index``), so W breaks
rotation symmetry only and the relaxed layer stays translation-equivariant.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from relax_plugins import LinearRelaxation, PenaltyTerms, Symmetry
from relax_plugins.irreps import Fibre, FibreGenerators, SchurProjection
from relax_plugins.lowrank import use_factors
from relax_plugins.term import may_modify_inputs, under_func_transform

from .spec import ResolvedSpec

__all__ = ["PygRelaxation", "symmetry_for", "center_positions", "center_rows"]


def symmetry_for(spec: ResolvedSpec) -> Symmetry:
    """Generators of SO(3) (and the inversion for O(3)) on the layer's input and output fibres.

    Example:
        >>> import torch
        >>> from relax_pyg.spec import LayerSpec
        >>> class L(torch.nn.Module):
        ...     def forward(self, h, pos):
        ...         return h, pos
        >>> sym = symmetry_for(LayerSpec({"h": "2x0e", "pos": "pos"}, ("2x0e", "pos")).resolve(L()))
        >>> sym.dim_in, sym.num_lie, sym.num_group
        (5, 3, 1)
    """
    fin, fout = _fibres(spec)
    # structured: the dense (k, d, d) matrices are built only if something asks for them (this
    # adapter's penalty and projection never do; at ViSNet's H = 128 they took 81 MB a layer)
    lie_in, lie_out = FibreGenerators(fin), FibreGenerators(fout)
    if spec.group == "O(3)":
        return Symmetry(fin.dim, fout.dim, lie_in, lie_out, group_in=FibreGenerators(fin, "parity"),
                        group_out=FibreGenerators(fout, "parity"), name="O(3)")
    return Symmetry(fin.dim, fout.dim, lie_in, lie_out, name="SO(3)")


def _fibres(spec: ResolvedSpec) -> tuple[Fibre, Fibre]:
    """The concatenated input and output fibres of the declared fields."""
    return (Fibre.cat([f.fibre for _, _, f in spec.inputs]),
            Fibre.cat([f.fibre for f in spec.outputs if f is not None]))


def center_positions(
    pos: Tensor, batch: Tensor | None = None, edge_index: Tensor | None = None, mode: str = "batch"
) -> Tensor:
    """Positions relative to their graph: translation-invariant, rotation-equivariant (1o).

    Args:
        pos: (N, 3) node positions.
        batch: (N,) graph index of each node (``mode="batch"``); None means a single graph.
        edge_index: (2, E) edges source → target (``mode="edges"``).
        mode: ``"batch"``: pos − centroid of its graph; ``"edges"``: mean over edges j → i of
            pos_i − pos_j (zero for nodes without incoming edges).

    Example:
        >>> import torch
        >>> pos = torch.tensor([[0., 0, 0], [2, 0, 0], [5, 5, 5], [7, 5, 5]])
        >>> center_positions(pos, torch.tensor([0, 0, 1, 1]))[:, 0].tolist()
        [-1.0, 1.0, -1.0, 1.0]
    """
    if mode == "edges":
        if edge_index is None:
            raise ValueError("center_positions(mode='edges') needs edge_index")
        src, dst = edge_index[0], edge_index[1]
        rel = pos.index_select(0, dst) - pos.index_select(0, src)
        total = torch.zeros_like(pos).index_add_(0, dst, rel)
        count = torch.zeros(pos.shape[0], dtype=pos.dtype, device=pos.device).index_add_(
            0, dst, torch.ones_like(dst, dtype=pos.dtype)
        )
        return total / count.clamp_min(1.0)[:, None]
    if batch is None:
        return pos - pos.mean(dim=0, keepdim=True)
    batch, count = _graph_sizes(batch, pos.dtype)
    total = torch.zeros(pos.shape[0], pos.shape[1], dtype=pos.dtype, device=pos.device).index_add_(0, batch, pos)
    return pos - (total / count).index_select(0, batch)


#: (batch, its version, dtype) → (dense ids, nodes per graph) of the last batch vector seen: every
#: relaxed layer of a model centres positions on the same batch vector, and models often reuse it from
#: step to step. Holds the tensor itself, so its identity cannot pass to a new one at the same address
_SIZES: dict[str, tuple] = {}


def _graph_sizes(batch: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The dense graph ids of ``batch`` (:func:`_dense_graph_ids`) and, per graph id, its node count
    as a (N, 1) column of ``dtype`` (1 for unused ids), cached for the last batch vector seen (not
    under torch.compile or torch.func, whose tensors stand for values of one trace)."""
    cacheable = not (batch.is_inference() or torch.compiler.is_compiling() or under_func_transform())
    hit = _SIZES.get("last") if cacheable else None
    if hit is not None and hit[0] is batch and hit[1] == batch._version and hit[2] == dtype:
        return hit[3], hit[4]
    # graph ids may reach past the node count (empty graphs in a Batch.from_data_list give ids
    # [0, 4] for 2 nodes): number the graphs that have nodes 0, 1, ... first. Sizes from the batch
    # vector itself (not max()+1 on the host): stays on device, no sync
    ids = _dense_graph_ids(batch)
    count = torch.zeros(batch.shape[0], dtype=dtype, device=batch.device).index_add_(
        0, ids, torch.ones_like(ids, dtype=dtype)
    )
    count = count.clamp_min(1.0)[:, None]
    if cacheable:
        _SIZES["last"] = (batch, batch._version, dtype, ids, count)
    return ids, count


def _dense_graph_ids(batch: Tensor) -> Tensor:
    """The graph ids of ``batch`` renumbered 0, 1, ... in increasing order (each below the node count),
    on device: ``[0, 0, 4]`` → ``[0, 0, 1]``; any order of the nodes.

    Example:
        >>> _dense_graph_ids(torch.tensor([0, 0, 4])).tolist(), _dense_graph_ids(torch.tensor([3, 0, 3])).tolist()
        ([0, 0, 1], [1, 0, 1])
    """
    if batch.device.type == "cpu" and (batch.numel() == 0 or int(batch.max()) < batch.numel()):
        return batch  # ids that fit need no renumbering: one reduction (a host read costs nothing on CPU)
    ids, order = batch.sort()
    new = torch.ones_like(ids, dtype=torch.bool)
    new[1:] = ids[1:] != ids[:-1]
    return torch.empty_like(batch).scatter_(0, order, new.long().cumsum(0) - 1)


def center_rows(pos: Tensor, mask: Tensor | None = None) -> Tensor:
    """Batch-first positions ``[B, N, 3]`` relative to their own row's centroid (one graph per row).

    Args:
        pos: (B, N, 3) positions.
        mask: (B, N) boolean, False for padding nodes (excluded from the centroid); None: all nodes.

    Example:
        >>> import torch
        >>> pos = torch.tensor([[[0., 0, 0], [2, 0, 0], [9, 9, 9]]])
        >>> center_rows(pos, torch.tensor([[True, True, False]]))[0, :, 0].tolist()
        [-1.0, 1.0, 8.0]
    """
    if pos.dim() < 2:
        raise ValueError(f"batch-first positions need shape [B, N, 3], got {tuple(pos.shape)}")
    if mask is None:
        return pos - pos.mean(dim=1, keepdim=True)
    if mask.shape != pos.shape[:2]:
        raise ValueError(f"node mask of shape {tuple(mask.shape)} does not match positions {tuple(pos.shape)}")
    w = mask.to(pos.dtype).reshape(*mask.shape, *([1] * (pos.dim() - 2)))
    centroid = (pos * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True).clamp_min(1.0)
    return pos - centroid


class PygRelaxation(LinearRelaxation):
    """f_θ = f + θ·W·x for a layer described by a :class:`~relax_pyg.spec.ResolvedSpec`.

    Merges (``can_merge``) exactly when the declaration has a ``merge`` function.

    Args:
        spec: the layer's fields and argument positions.
        rank: low-rank W (see :class:`relax_plugins.LinearRelaxation`).
        init_std: std of a random initial dense W.

    Example:
        >>> import torch, relax_plugins as rp, relax_pyg
        >>> class Shift(torch.nn.Module):
        ...     def forward(self, h, pos, batch=None):
        ...         return h, pos + 1.0
        >>> _ = relax_pyg.declare(Shift, {"h": "2x0e", "pos": "pos"}, ("2x0e", "pos"), batch="batch")
        >>> m = rp.relax(torch.nn.Sequential(Shift()), adapters=["pyg"])
        >>> m[0].term.weight.shape
        torch.Size([5, 5])
        >>> relax_pyg.undeclare(Shift)
    """

    # narrow fibres: the core's second-moment penalty, batched over layers of equal shape (one bmm
    # for all of EGNN's layers: 2.3x faster than the per-node form there); wide fibres (ViSNet):
    # the structured per-node form below, which never builds the dense (k, d, d) generators
    batched_penalty = True
    #: widest fibre (input or output) that takes the second-moment path
    moment_max_dim = 128

    def __init__(self, spec: ResolvedSpec, rank: int | None = None, init_std: float = 0.0) -> None:
        super().__init__(symmetry_for(spec), rank=rank, init_std=init_std)
        self.spec = spec
        self.can_merge = spec.merge is not None  # declare(..., merge=fn)
        self._out_sizes = [f.dim for f in spec.outputs if f is not None]
        # structured generators for the penalty (relax_plugins.irreps.Fibre, per irrep block); the
        # dense (k, d, d) matrices cost O(d²) per node and dominated the step time of wide layers
        self._fibre_in, self._fibre_out = _fibres(spec)
        self._schur = SchurProjection(self._fibre_in, self._fibre_out, parity=spec.group == "O(3)")
        self.register_buffer("_sign_in", self._fibre_in.parity(), persistent=False)
        self.register_buffer("_sign_out", self._fibre_out.parity(), persistent=False)
        self.register_buffer("_cols_in", torch.tensor(self._fibre_in.nonscalar_index(), dtype=torch.long),
                             persistent=False)

    # -- argument access (positions fixed at relax time: no inspect in the hot path) ---------
    @staticmethod
    def _arg(args: tuple, kwargs: dict, name: str, pos: int | None) -> Any:
        if name in kwargs:
            return kwargs[name]
        if pos is not None and pos < len(args):
            return args[pos]
        return None

    def _per_node(self, t: Tensor) -> Tensor:
        """(nodes, features) view of a node-major ``[N, ...]`` or batch-first ``[B, N, ...]`` tensor."""
        k = self.spec.node_axes
        if t.dim() < k:
            raise ValueError(f"a node tensor of this layer needs at least {k} axes (nodes), got shape {tuple(t.shape)}")
        return t.reshape(math.prod(t.shape[:k]), math.prod(t.shape[k:]))

    def take_input(self, args: tuple, kwargs: dict) -> Tensor:
        spec = self.spec
        tensors = []
        for name, pos, f in spec.inputs:
            t = self._arg(args, kwargs, name, pos)
            if not isinstance(t, Tensor):
                raise ValueError(f"relaxed layer input {name!r} is {type(t).__name__}, expected a tensor")
            if f.is_pos:
                if spec.node_axes == 2:
                    mask = None if spec.mask is None else self._arg(args, kwargs, *spec.mask)
                    t = center_rows(t, mask)
                else:
                    batch = None if spec.batch is None else self._arg(args, kwargs, *spec.batch)
                    edges = None if spec.edge_index is None else self._arg(args, kwargs, *spec.edge_index)
                    t = center_positions(t, batch, edges, spec.pos_center)
            tensors.append(self._per_node(t))
            if tensors[-1].shape[1] != f.dim:
                raise ValueError(
                    f"input {name!r} has {tensors[-1].shape[1]} features per node, but its field "
                    f"{f.irreps!r} ({f.layout}) has dimension {f.dim}"
                )
        if len({t.shape[0] for t in tensors}) > 1:
            counts = {name: t.shape[0] for (name, _, _), t in zip(spec.inputs, tensors)}
            raise ValueError(f"the declared inputs have different node counts {counts}: W acts on each node's "
                             "fibre, so every declared input must be node-level (edge features cannot be "
                             "declared next to node features)")
        return torch.cat(tensors, dim=-1) if len(tensors) > 1 else tensors[0]

    def to_fibre(self, x: Tensor) -> Tensor:
        return x

    def forward(self, base: nn.Module, theta: Tensor, *args: Any, **kwargs: Any) -> Any:
        # inputs are read BEFORE the base layer runs: layers such as the official EGNN's E_GCL_vel
        # update coord in place, and W must act on x, not on g(x). Concatenated or centred inputs are
        # fresh tensors already; only a lone uncentred input is a view of the argument and is cloned
        x = self.take_input(args, kwargs)
        if len(self.spec.inputs) == 1 and not self.spec.inputs[0][2].is_pos and may_modify_inputs(base):
            x = x.clone()
        out = base(*args, **kwargs)
        wx = self.apply_weight(x, theta)  # θ·W·x: θ scales the small matrix
        outs = list(out) if self.spec.is_tuple else [out]
        if len(outs) != len(self.spec.outputs):
            raise ValueError(f"layer returned {len(outs)} outputs, the declaration lists {len(self.spec.outputs)}")
        deltas = iter(wx.split(self._out_sizes, dim=-1))
        new_flat = []
        for i, f in enumerate(self.spec.outputs):
            if f is None:
                continue
            y = outs[i]
            if not isinstance(y, Tensor):
                raise ValueError(f"output {i} of {type(base).__name__} is a {type(y).__name__}, not a tensor: declare "
                                 "outputs as a sequence matching the returned tuple (None for outputs that are "
                                 "not relaxed)")
            delta = next(deltas)
            if self._per_node(y).shape != delta.shape:
                raise ValueError(f"output {i} has shape {tuple(y.shape)}, not {f.dim} features per node ({f.irreps!r}) "
                                 f"for the {delta.shape[0]} nodes of the inputs")
            outs[i] = y + delta.reshape(y.shape)
            new_flat.append(self._per_node(outs[i]))
        # only detached tensors are kept (the core's penalty recomputes W·x on them, so that its
        # gradient reaches W only; a non-leaf here would also break deepcopy of the model)
        self.record(x, torch.cat(new_flat, dim=-1))
        if not self.spec.is_tuple:
            return outs[0]
        if hasattr(out, "_fields"):  # a namedtuple: keep its type
            return type(out)(*outs)
        return outs if isinstance(out, list) else tuple(outs)

    # -- penalty -------------------------------------------------------------------------------
    def batchable_penalty(self) -> tuple | None:
        """The core's batching key where the fibres are narrow enough (``moment_max_dim``) for the
        dense generators and more samples than input dimensions were recorded; None otherwise."""
        sym = self.symmetry
        if max(sym.dim_in, sym.dim_out) > self.moment_max_dim:
            return None
        return super().batchable_penalty()

    def _apply_columns(self, v: Tensor, cols: Tensor) -> Tensor:
        """W[:, cols] applied to the last axis of ``v``."""
        sym = self.symmetry
        if self.rank is None or not use_factors(sym.dim_in, sym.dim_out, self.rank):
            return v @ self.dense()[:, cols].T  # narrow low-rank layers too: B·A once is cheaper there
        return (v @ self.lora_a[:, cols].T) @ self.lora_b.T

    def penalty_terms(self) -> PenaltyTerms:
        """Σ_k ||W dρ_in(A_k) x − dρ_out(A_k) W x||² (+ ||W ρ_in(−I) x − ρ_out(−I) W x||² for O(3))
        and ||W x||², summed over nodes: the numbers of the core's dense ``lie_defect`` and
        ``group_defect``, computed with the small per-irrep generators (O(d) per node, not the
        O(d²) of dense (k, d, d) matrices) and only the columns of W that see non-scalar inputs.
        Narrow layers with more samples than input dimensions take the second-moment form (same
        numbers, see :meth:`batchable_penalty`)."""
        x, n = self.penalty_input()
        if self.batchable_penalty() is not None:
            return self._penalty_from_moments(x, n)
        wx = self.apply_weight(x)  # on the detached input: the penalty trains W only
        if self._cols_in.numel():
            rot_x = self._fibre_in.lie(x, compact=True)
            defect = self._apply_columns(rot_x, self._cols_in)
        else:
            defect = wx.new_zeros(3, x.shape[0], wx.shape[-1])
        defect = defect - self._fibre_out.lie(wx)
        lie = defect.square().sum()
        if self.spec.group == "O(3)":
            s_in, s_out = self._sign_in.to(x.dtype), self._sign_out.to(x.dtype)
            lie = lie + (self.apply_weight(x * s_in) - wx * s_out).square().sum()
        return PenaltyTerms(lie, wx.square().sum(), n)

    # -- projection -----------------------------------------------------------------------------
    def project_dense(self, W: Tensor) -> Tensor:
        """Closed-form orthogonal projection onto the intertwiners: by Schur's lemma (every real
        SO(3) irrep is of real type) Hom is spanned by c_oi · I_{2l+1} between copies of the same
        irrep, so P keeps, for each such pair of copies, the mean of the diagonal of their block.

        Example:
            >>> import torch
            >>> from relax_pyg.spec import LayerSpec
            >>> class L(torch.nn.Module):
            ...     def forward(self, v):
            ...         return v
            >>> term = PygRelaxation(LayerSpec({"v": "1o"}, "1o").resolve(L()))
            >>> W = torch.arange(9.).reshape(3, 3)
            >>> term.project_dense(W).diagonal().tolist()   # tr(W)/3 · I
            [4.0, 4.0, 4.0]
        """
        return self._schur(W)

    def dense_delta(self, base: nn.Module, delta: Tensor) -> dict[str, Tensor] | None:
        return None if self.spec.merge is None else self.spec.merge(base, delta, self)

    def extra_repr(self) -> str:
        ins = ", ".join(f"{n}: {f.irreps}" for n, _, f in self.spec.inputs)
        outs = ", ".join("-" if f is None else f.irreps for f in self.spec.outputs)
        return f"{self.spec.group}, ({ins}) -> ({outs})" + ("" if self.rank is None else f", rank={self.rank}")
