"""The compressed checkpoint format (version 1): a fairseq checkpoint whose ``model`` state is replaced by
integer weights, sparsity bitmasks and scales.

A 2-D weight (linear layer, embedding, output projection) is stored per output row, symmetric: integer
levels ``q`` with ``w = scale[row] * q`` (the grid of :mod:`~fairseq_accel.compression.quantization_grid`, so
ADMM-finalized weights are stored losslessly), as int8, or int4 two to a byte. Where it is smaller, only the
non-zero levels are stored, with a 1-bit mask of their positions (row-major). Other tensors (biases, layer
norms, convolution kernels) stay float32. Tensors that share storage in the checkpoint (tied embeddings,
shared layers) are stored once with an alias. Everything is plain tensors, numbers and strings, so the file
loads with ``torch.load(weights_only=True)``.

Size arithmetic (``../shared/design.md`` §5): fp32 4 bytes per weight; int8 1 byte (4x); int8 at 75 %
sparsity with its mask 0.25 + 0.125 = 0.375 bytes (10.7x).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from fairseq_accel.compat.checkpoint_files import COMPRESSED_KEY
from fairseq_accel.compression.quantization_grid import SUPPORTED_BITS, quantize_to_levels

FORMAT_VERSION = 1
FP32_BYTES = 4


class CompressedFormatError(ValueError):
    """One line naming the checkpoint (and tensor) whose compressed state cannot be read or written."""


def _pack_nibbles(levels: Tensor) -> Tensor:
    """int4 levels in [-7, 7] as two's-complement nibbles, two per byte (the first in the low nibble)."""
    nibbles = (levels.to(torch.int16) & 0xF).to(torch.uint8)
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
    pairs = nibbles.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def _unpack_nibbles(packed: Tensor, count: int) -> Tensor:
    nibbles = torch.stack([packed & 0xF, packed >> 4], dim=1).flatten()[:count].to(torch.int16)
    return torch.where(nibbles > 7, nibbles - 16, nibbles).to(torch.int8)


def _pack_bits(mask: Tensor) -> Tensor:
    return torch.from_numpy(np.packbits(mask.flatten().numpy().astype(np.uint8)))


def _unpack_bits(packed: Tensor, count: int) -> Tensor:
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=count).astype(bool))


@dataclass
class PackedTensor:
    """One 2-D weight: ``bits``-bit levels (all, or the non-zero ones with ``mask``) and per-row scales."""

    shape: Tuple[int, int]
    bits: int
    scales: Tensor  # float32 [rows]
    values: Tensor  # int8 levels (bits 8) or uint8 nibble pairs (bits 4), row-major, non-zeros only with a mask
    mask: Optional[Tensor]  # uint8 packed bits of the non-zero positions, or None: every position stored

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        mask_bytes = 0 if self.mask is None else self.mask.numel()
        return self.values.numel() + mask_bytes + self.scales.numel() * FP32_BYTES

    def _stored_count(self) -> int:
        return self.numel if self.mask is None else int(_unpack_bits(self.mask, self.numel).sum())

    def levels(self) -> Tensor:
        """The dense int8 levels ``q`` (zeros where the mask has none)."""
        count = self._stored_count()
        stored = self.values if self.bits == 8 else _unpack_nibbles(self.values, count)
        if self.mask is None:
            return stored.view(self.shape)
        dense = torch.zeros(self.numel, dtype=torch.int8)
        dense[_unpack_bits(self.mask, self.numel)] = stored
        return dense.view(self.shape)

    def dequantize(self) -> Tensor:
        """float32 ``scale[row] * q``."""
        return self.levels().float() * self.scales.view(-1, 1)

    def to_state(self) -> Dict[str, Any]:
        state: Dict[str, Any] = {"shape": list(self.shape), "bits": self.bits, "scales": self.scales,
                                 "values": self.values}
        if self.mask is not None:
            state["mask"] = self.mask
        return state

    @classmethod
    def from_state(cls, name: str, state: Dict[str, Any]) -> "PackedTensor":
        try:
            rows, columns = (int(size) for size in state["shape"])
            packed = cls((rows, columns), int(state["bits"]), state["scales"], state["values"], state.get("mask"))
        except (KeyError, TypeError, ValueError) as error:
            raise CompressedFormatError(f"{name}: malformed packed tensor ({error!r})") from None
        if packed.bits not in SUPPORTED_BITS or packed.scales.numel() != rows:
            raise CompressedFormatError(f"{name}: {packed.bits}-bit levels with {packed.scales.numel()} scales for "
                                        f"{rows} rows")
        return packed


def pack(weight: Tensor, bits: int) -> PackedTensor:
    """``weight`` on its per-row ``bits``-bit grid; only the non-zero levels and a mask when that is smaller."""
    if weight.dim() != 2:
        raise CompressedFormatError(f"only 2-D weights are packed, got shape {list(weight.shape)}")
    levels, scales = quantize_to_levels(weight.detach().float().cpu(), bits)
    flat = levels.flatten()
    nonzero = flat != 0
    dense_bytes = flat.numel() * bits / 8
    masked_bytes = int(nonzero.sum()) * bits / 8 + flat.numel() / 8
    mask = _pack_bits(nonzero) if masked_bytes < dense_bytes else None
    stored = flat[nonzero] if mask is not None else flat
    values = stored.clone() if bits == 8 else _pack_nibbles(stored)
    return PackedTensor((weight.shape[0], weight.shape[1]), bits, scales.flatten().float(), values, mask)


COPY_MIN_ELEMENTS = 4096  # equal tensors at least this large are copies of one (a tied embedding), not chance


def storage_aliases(model: Dict[str, Tensor]) -> Dict[str, str]:
    """For every tensor that shares its storage with an earlier one (tied embeddings, shared layers), or is an
    element-for-element copy of one of at least :data:`COPY_MIN_ELEMENTS` (checkpoint averaging writes a tied
    embedding as three separate copies), the name of that first tensor: the name under which the compressed
    section stores both."""
    first_of_storage: Dict[Tuple[int, int, Tuple[int, ...]], str] = {}
    first_of_content: Dict[Tuple[Any, ...], List[str]] = {}
    aliases = {}
    for name, tensor in model.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        first = first_of_storage.setdefault(key, name)
        if first == name and tensor.numel() >= COPY_MIN_ELEMENTS:
            fingerprint = (tuple(tensor.shape), tensor.dtype, float(tensor.double().sum()))
            copies = first_of_content.setdefault(fingerprint, [])
            first = next((other for other in copies if torch.equal(model[other], tensor)), name)
            if first == name:
                copies.append(name)
        aliases[name] = first
    return {name: first for name, first in aliases.items() if name != first}


def compress_model_state(model: Dict[str, Tensor], bits_of: Callable[[str, Tensor], Optional[int]],
                         activations: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The compressed section of a checkpoint for the fairseq ``model`` state: every tensor packed at
    ``bits_of(name, tensor)`` bits (None: kept float32), tensors sharing storage stored once, and the
    calibration record ``activations`` (method, batches, the input scale of each int8 linear layer and the
    output ranges of the decoder's attention projections, by stored weight name) when the activations were
    calibrated."""
    packed: Dict[str, Any] = {}
    kept: Dict[str, Tensor] = {}
    aliases = storage_aliases(model)
    for name, tensor in model.items():
        if name in aliases:
            continue
        bits = bits_of(name, tensor) if tensor.dim() == 2 and tensor.is_floating_point() else None
        if bits is None:
            kept[name] = tensor.detach().clone()
        else:
            packed[name] = pack(tensor, bits).to_state()
    section = {"version": FORMAT_VERSION, "packed": packed, "float": kept, "aliases": aliases,
               "order": list(model.keys())}
    if activations is not None:
        section["activations"] = activations
    return section


def check_version(section: Dict[str, Any], source: str) -> None:
    version = section.get("version") if isinstance(section, dict) else None
    if version != FORMAT_VERSION:
        raise CompressedFormatError(f"{source}: compressed checkpoint format version {version!r}; this fairseq_accel "
                                    f"reads version {FORMAT_VERSION} (compress it again with this version, or "
                                    "install the version that wrote it)")


def packed_tensors(section: Dict[str, Any]) -> Dict[str, PackedTensor]:
    return {name: PackedTensor.from_state(name, state) for name, state in section["packed"].items()}


def decompress_model_state(section: Dict[str, Any], source: str) -> Dict[str, Tensor]:
    """The float32 fairseq ``model`` state of a compressed section (aliases point at the same tensor)."""
    check_version(section, source)
    tensors: Dict[str, Tensor] = dict(section["float"])
    tensors.update({name: packed.dequantize() for name, packed in packed_tensors(section).items()})
    for alias, target in section["aliases"].items():
        tensors[alias] = tensors[target]
    return {name: tensors[name] for name in section["order"]}


@dataclass
class SizeRow:
    name: str
    shape: List[int]
    storage: str  # "int8", "int4", "int8+mask", ..., or "fp32"
    sparsity: float
    nbytes: int
    fp32_nbytes: int


OUTPUT_RANGES_ROW = "(calibrated output ranges)"  # size row of the int8 attention path's per-channel ranges


def size_rows(section: Dict[str, Any]) -> List[SizeRow]:
    """Bytes of every stored tensor (aliases cost nothing) beside its fp32 size, and of the calibrated
    output ranges (which the float32 model does not have)."""
    rows = []
    for name, packed in packed_tensors(section).items():
        levels = packed.levels()
        storage = f"int{packed.bits}" + ("+mask" if packed.mask is not None else "")
        rows.append(SizeRow(name, list(packed.shape), storage, float((levels == 0).float().mean()), packed.nbytes,
                            packed.numel * FP32_BYTES))
    for name, tensor in section["float"].items():
        size = tensor.numel() * tensor.element_size()
        rows.append(SizeRow(name, list(tensor.shape), "fp32", 0.0, size, tensor.numel() * FP32_BYTES))
    ranges = list(section.get("activations", {}).get("output_absmax", {}).values())
    if ranges:
        count = sum(r.numel() for r in ranges)
        rows.append(SizeRow(OUTPUT_RANGES_ROW, [count], "fp16", 0.0, count * ranges[0].element_size(), 0))
    return rows


def read_compressed_checkpoint(path: str, state: Dict[str, Any]) -> Dict[str, Any]:
    """The fairseq state of a compressed checkpoint: its packed section replaced by the float32 ``model``
    state that fairseq loads (the checkpoint loader calls this once the plugin is imported). The section
    itself goes to the task (``task_state``), whose generator runs the int8 layers on it."""
    state = dict(state)
    section = state.pop(COMPRESSED_KEY)
    state["model"] = decompress_model_state(section, path)
    state["task_state"] = {**(state.get("task_state") or {}), COMPRESSED_KEY: section}
    return state
