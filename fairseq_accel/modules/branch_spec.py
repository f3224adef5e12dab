"""Parsing and validation of LSRA branch specifications.

Lite Transformer (Wu et al., 2020, arXiv:2004.11886) splits each layer's channels between branches; the
reference configs (mit-han-lab/lite-transformer ``configs/*/multibranch_v2/*.yml``) write one branch as
``type:kernel:dim:heads``, e.g. ``attn:1:80:4`` or ``lightweight:default:80:4``, where ``default`` takes
the kernel size of the layer from ``--{encoder,decoder}-kernel-size-list``.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence

BRANCH_TYPES = ("attn", "lightweight", "dynamic")
# Per-layer kernel sizes of the paper's 6-layer models (lite-transformer transformer_multibranch_v2.py).
PAPER_KERNEL_SIZES = (3, 7, 15, 31, 31, 31)


@dataclass(frozen=True)
class BranchSpec:
    """One branch of an LSRA layer; ``kernel_size`` is resolved (None for attention)."""

    type: str
    kernel_size: Optional[int]
    dim: int
    heads: int


def _positive_int(text: str, field: str, spec: str, option: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"{option}: branch '{spec}': {field} must be a positive integer, got '{text}'")
    return value


def parse_branch(spec: str, layer_kernel: Optional[int], option: str) -> BranchSpec:
    """Parse one ``type:kernel:dim:heads`` string for a layer whose default kernel is ``layer_kernel``."""
    fields = str(spec).split(":")
    if len(fields) != 4:
        raise ValueError(
            f"{option}: branch '{spec}' has {len(fields)} field(s); expected 4 as type:kernel:dim:heads "
            f"(e.g. attn:1:80:4 lightweight:default:80:4)"
        )
    branch_type, kernel_text, dim_text, heads_text = fields
    if branch_type not in BRANCH_TYPES:
        raise ValueError(
            f"{option}: branch '{spec}' has unknown type '{branch_type}'; expected one of {', '.join(BRANCH_TYPES)}"
        )
    dim = _positive_int(dim_text, "dim", spec, option)
    heads = _positive_int(heads_text, "heads", spec, option)
    if dim % heads:
        raise ValueError(f"{option}: branch '{spec}': dim {dim} is not divisible by heads {heads}")
    if branch_type == "attn":
        kernel = None  # the reference writes attn:1:...; the field carries no meaning for attention
    elif kernel_text == "default":
        kernel = layer_kernel
    else:
        kernel = _positive_int(kernel_text, "kernel", spec, option)
    return BranchSpec(branch_type, kernel, dim, heads)


def convolution_branches(branch_specs: Sequence[str], option: str) -> List[BranchSpec]:
    """The convolution branches of ``branch_specs`` (validated); ``kernel_size`` is None where the spec
    says ``default``, i.e. where the layer's entry of the kernel-size list applies."""
    branches = [parse_branch(spec, None, option) for spec in branch_specs]
    return [branch for branch in branches if branch.type != "attn"]


def default_kernel_sizes(num_layers: int) -> List[int]:
    """The paper's kernel schedule [3, 7, 15, 31, 31, 31], cut or extended with 31 to ``num_layers``."""
    return (list(PAPER_KERNEL_SIZES) + [PAPER_KERNEL_SIZES[-1]] * num_layers)[:num_layers]


def even_split(embed_dim: int, conv_type: str, heads: int) -> List[str]:
    """The paper's layout: half the channels to attention, half to a convolution of ``conv_type``."""
    half = embed_dim // 2
    return [f"attn:1:{half}:{heads}", f"{conv_type}:default:{embed_dim - half}:{heads}"]


def resolve_layer_branches(
    branch_specs: Sequence[str],
    kernel_sizes: Sequence[int],
    num_layers: int,
    embed_dim: int,
    side: str,
) -> List[List[BranchSpec]]:
    """Validate the branch specs of one side (``encoder``/``decoder``) and resolve them per layer.

    Raises ValueError naming the option and what was expected for every malformed input.
    """
    option = f"--{side}-branch-type"
    if not branch_specs:
        raise ValueError(f"{option}: at least one branch is required (e.g. attn:1:80:4 lightweight:default:80:4)")
    if len(kernel_sizes) != num_layers:
        raise ValueError(
            f"--{side}-kernel-size-list has {len(kernel_sizes)} entries {list(kernel_sizes)} but "
            f"--{side}-layers is {num_layers}; give one kernel size per layer"
        )
    layers = []
    for index, kernel in enumerate(kernel_sizes):
        kernel = _positive_int(str(kernel), f"kernel size of layer {index}", str(kernel), f"--{side}-kernel-size-list")
        layers.append([parse_branch(spec, kernel, option) for spec in branch_specs])
    dims = [branch.dim for branch in layers[0]]
    if sum(dims) != embed_dim:
        raise ValueError(
            f"{option}: branch dims {'+'.join(map(str, dims))}={sum(dims)} do not sum to "
            f"--{side}-embed-dim {embed_dim}"
        )
    return layers
