"""Checkpoints ↔ `Glm4MoeForCausalLM`: build on the meta device, assign tensors read from the files; save.

Loading builds the model on the meta device and assigns tensors read straight from memory-mapped files
(`checkpoint.py`), so peak memory stays about one copy of the weights. It accepts one `model.safetensors`
or shards with an index, per-expert or fused expert tensors (`state_dict.py` maps the names), and FP8
weights, which it dequantises. Any missing, unexpected, mis-shaped or damaged tensor is an error naming it.

Tensor and expert parallelism hook in through `from_pretrained(..., parallelize=fn)`: `fn` reshapes the meta
model to one rank's shard and returns a `ShardSpec` per sharded parameter; the loader then cuts each
memory-mapped tensor (and its FP8 scale) to that shard before copying, so no rank reads or holds the whole
model.

The MTP layer's embedding and head are the main model's (DeepSeek-V3's design, which GLM-4.5 follows): GLM-4.5's
checkpoints store copies of them, later ones of the architecture (GLM-4.6) leave them out. A missing one is taken
from the main model; a stored copy identical to it is, with `share_mtp_copies`, not loaded a second time (the
engine's choice: a copy of GLM-4.5-Air's head alone is 1.2 GB in bf16), while training keeps a copy it can train
apart.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from glm45.config import ModelConfig
from glm45.model.checkpoint import Checkpoint, CheckpointError, some_names, stack_stored_packed, stored_packed
from glm45.model.memory import check_fits
from glm45.model.shard import ShardPlan
from glm45.model.state_dict import (
    EXPERT_STACK,
    FLOAT32_PARAMS,
    IGNORABLE,
    checkpoint_name,
    checkpoint_tensors,
    has_mtp_tensors,
    is_skipped_mtp,
    stack_experts,
)
from glm45.quant.loading import install, pack, to_device
from glm45.quant.packed import STORED_SUFFIXES as PACKED_SUFFIXES
from glm45.quant.packed import PackedWeight
from glm45.quant.scheme import (
    LM_HEAD,
    check_packable,
    checkpoint_format,
    served_format,
    served_head_format,
    stored_head_format,
    tensor_format,
)

logger = logging.getLogger(__name__)

EMBEDDING = re.compile(r"(^|\.)embed_tokens\.weight$")  # kept in the checkpoint's dtype (quant/scheme.py)
MTP_COPIES = {"mtp.embed_tokens.weight": "model.embed_tokens.weight", "mtp.shared_head.head.weight": "lm_head.weight"}
# A weight and what a packed one is stored with (glm45's own names, and FP8 releases' block scales).
STORED_SUFFIXES = (*PACKED_SUFFIXES.values(), "_scale_inv")


def resolve_dtype(dtype: torch.dtype | str | None, config: ModelConfig) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = config.torch_dtype if dtype in (None, "auto") else dtype
    allowed = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16,
               "bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16, "half": torch.float16,
               "float": torch.float32}
    if name not in allowed:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of 'auto', {sorted(allowed)}")
    return allowed[name]


def load_model(
    model_class: type[torch.nn.Module],
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    load_mtp: bool = True,
    progress: bool = True,
    parallelize: Callable[[torch.nn.Module], ShardPlan] | None = None,
    quantization: str | None = None,
    share_mtp_copies: bool = False,
    lm_head_quantization: str | None = None,
):
    """Build a `model_class` (Glm4MoeForCausalLM) on the meta device and assign its tensors from the checkpoint.

    `parallelize(meta_model)` (tensor/expert parallelism) turns the model into this rank's shard and returns
    the `ShardSpec` of every parameter it cut; those parameters are read shard by shard. `quantization` (fp8,
    int8, int4; default: the checkpoint's own format) keeps weights packed (glm45.quant.scheme says which), the LM
    heads in `lm_head_quantization` (a format, or none for `dtype`; default: as the checkpoint keeps them, else
    like the other weights).
    `share_mtp_copies`: the MTP layer's stored copies of the embedding and head, when identical to the main
    model's, are not loaded: the modules share the main model's parameters."""
    config = ModelConfig.from_pretrained(path)
    dtype = resolve_dtype(dtype, config)
    device = torch.device(device)
    fmt = served_format(quantization, config)
    head_fmt = served_head_format(lm_head_quantization, fmt, config)
    checkpoint = Checkpoint(path)
    with_mtp = load_mtp and config.num_nextn_predict_layers > 0 and has_mtp_tensors(checkpoint, config)
    with torch.device("meta"):
        model = model_class(config, with_mtp=with_mtp)
    plan: ShardPlan = parallelize(model) if parallelize is not None else {}
    check_packable(model.state_dict(), fmt, device, head_fmt)
    check_fits(model, dtype, device, path, fmt, head_fmt)

    reader = _Reader(checkpoint, config, dtype, device, plan, fmt, head_fmt, lm_head_quantization is not None,
                     share_mtp_copies)
    bar = tqdm(model.state_dict().items(), desc="Loading weights", unit="tensor", disable=not progress, leave=False)
    for internal, meta in bar:
        reader.read(internal, meta)
    unexpected = [
        n for n in checkpoint.names()
        if n not in reader.consumed and not IGNORABLE.match(n) and not is_skipped_mtp(n, config, with_mtp)
    ]
    problems = []
    if reader.missing:
        problems.append(f"missing tensors: {some_names(reader.missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {some_names(unexpected)}")
    if reader.wrong_shape:
        problems.append(f"wrong shapes: {some_names(reader.wrong_shape)}")
    if problems:
        raise CheckpointError(f"cannot load {path}: " + "; ".join(problems))

    install(model, reader.packed, reader.state)
    model.load_state_dict(reader.state, strict=False, assign=True)
    for internal, main in reader.shared.items():  # the main model's module in both places
        owner, leaf = internal.removesuffix(".weight").rsplit(".", 1)
        setattr(model.get_submodule(owner), leaf, model.get_submodule(main.removesuffix(".weight")))
    if fmt is not None:
        checkpoint.release_pages()
    left = [n for n, t in model.state_dict().items() if t.device.type == "meta"]
    if left:
        raise CheckpointError(f"cannot load {path}: tensors left unassigned: {some_names(left)}")
    model.eval()
    weights = f", weights in {fmt}" if fmt else ""
    if fmt is not None and head_fmt != fmt:
        weights += f" (LM heads in {head_fmt or 'the compute dtype'})"
    logger.info("loaded %s (%s%s, %s%s)", path, dtype, weights, device, ", with MTP layer" if with_mtp else "")
    return model


class FloatReader:
    """A checkpoint's tensors by model name, unpacked in `dtype`, a few at a time (GPTQ calibration reads one layer
    at a time). An MTP copy the checkpoint leaves to the main model's tensor is not in what `read` returns."""

    def __init__(self, path: str | Path, config: ModelConfig, dtype: torch.dtype, device: torch.device):
        self._reader = _Reader(Checkpoint(path), config, dtype, device, {}, None, None, False)

    def read(self, metas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        reader = self._reader
        for internal, meta in metas.items():
            reader.read(internal, meta)
        if reader.missing or reader.wrong_shape:
            raise CheckpointError(f"cannot read {some_names(reader.missing + reader.wrong_shape)}")
        tensors, reader.state = reader.state, {}
        return tensors

    def release_pages(self) -> None:
        """Drop the pages of the tensors read so far from this process (once they are no longer used)."""
        self._reader.checkpoint.release_pages()


class _Reader:
    """Reads each model tensor from the checkpoint: plain, or packed in the served format."""

    def __init__(self, checkpoint: Checkpoint, config: ModelConfig, dtype: torch.dtype, device: torch.device,
                 plan: ShardPlan, fmt: str | None, head_fmt: str | None, head_requested: bool,
                 share_mtp_copies: bool = False):
        self.checkpoint, self.config, self.dtype, self.device, self.plan, self.fmt = (
            checkpoint, config, dtype, device, plan, fmt)
        self.head_fmt, self.head_requested = head_fmt, head_requested
        self.share_mtp_copies = share_mtp_copies
        self.shared: dict[str, str] = {}  # MTP parameter → the main model's parameter it is
        stored = checkpoint_format(config)
        self.stored = stored
        self.stored_head = stored_head_format(config) or stored
        # A checkpoint served in its own packed format keeps what it stores (FP8 releases: bf16 embeddings and
        # heads as shipped), unless the heads' format is asked for; one quantized at load follows glm45's policy
        # for every weight.
        self.as_shipped = fmt is not None and (stored == fmt or (fmt == "fp8" and stored.startswith("fp8")))
        self.consumed: set[str] = set()
        self.missing: list[str] = []
        self.wrong_shape: list[str] = []
        self.state: dict[str, torch.Tensor] = {}
        self.packed: dict[str, PackedWeight] = {}

    def read(self, internal: str, meta: torch.Tensor) -> None:
        if self._take_from_main(internal):
            return
        ckpt_name = checkpoint_name(internal, self.config)
        stack = EXPERT_STACK.match(ckpt_name)
        shard = self.plan.get(internal)
        packed_in = tensor_format(internal, self.fmt, self.head_fmt)
        if packed_in is not None and self._read_packed(internal, ckpt_name, stack, shard, meta, packed_in):
            return
        target_dtype = torch.float32 if FLOAT32_PARAMS.match(internal) else self.dtype
        if self.stored in ("int8", "int4") and shard is None and (
                found := self._stored(internal, ckpt_name, stack, meta)):
            packed, names = found  # glm45's own int8/int4, served dequantized ("none")
            self.consumed.update(names)
            self.state[internal] = packed.dequantize(target_dtype).to(self.device)
            return
        if ckpt_name in self.checkpoint:
            shape = self.checkpoint.shape(ckpt_name)
            local_shape = shard.local_shape(shape) if shard else shape
            if local_shape != list(meta.shape):
                what = f"whose shard {shard} is {local_shape}" if shard else ""
                self.wrong_shape.append(f"{ckpt_name} is {shape}{what}, expected {list(meta.shape)}")
                return
            tensor, names = self.checkpoint.weight(ckpt_name, target_dtype, shard)
        elif stack:
            tensor, names, problems = stack_experts(self.checkpoint, stack["prefix"], stack["kind"], meta,
                                                     target_dtype, shard)
            self.missing += problems["missing"]
            self.wrong_shape += problems["wrong_shape"]
            if tensor is None:
                return
        else:
            self.missing.append(ckpt_name)
            return
        self.consumed.update(names)
        # An FP8 tensor that could not be taken as stored (a shard, or an expert stack whose gate and up rows
        # would share scale blocks) is kept dequantized: exact, at the cost of its memory.
        if packed_in is not None and (not self.as_shipped or (self.head_requested and LM_HEAD.search(internal))):
            self.packed[internal] = pack(tensor, packed_in, self.device)
        else:
            # Plain loads keep zero-copy views of the memory map. A quantized load copies the small tensors it
            # keeps as they are (norms, routers, biases) and keeps the embedding tables as views: after the load
            # the map's pages are released (`Checkpoint.release_pages`), so of a table only the rows of tokens in
            # use become resident again, and the pages the quantizer read do not stay with the process.
            keep_view = self.fmt is None or EMBEDDING.search(internal) is not None
            self.state[internal] = tensor.to(self.device, copy=not keep_view)

    def _take_from_main(self, internal: str) -> bool:
        """Give an MTP embedding or head the main model's tensor when the checkpoint leaves it out, or (sharing
        asked for) stores an identical copy; False to read it as stored."""
        main = MTP_COPIES.get(internal)
        if main is None or self.plan.get(internal) != self.plan.get(main):
            return False
        main_value = self.packed.get(main, self.state.get(main))
        if main_value is None:
            return False
        own, theirs = checkpoint_name(internal, self.config), checkpoint_name(main, self.config)
        stored = [own + suffix for suffix in STORED_SUFFIXES if own + suffix in self.checkpoint]
        if not stored:  # left out of the checkpoint: the main model's
            if isinstance(main_value, PackedWeight) or self.share_mtp_copies:
                self.shared[internal] = main
            else:
                self.state[internal] = main_value.clone()
            return True
        if not self.share_mtp_copies or not self._identical(stored, own, theirs):
            return False
        self.consumed.update(stored)
        self.shared[internal] = main
        return True

    def _identical(self, names: list[str], own: str, theirs: str) -> bool:
        """Whether the stored tensors `names` (a weight and its scales) equal the main model's, byte for byte."""
        ckpt = self.checkpoint
        if {n.removeprefix(own) for n in names} != {s for s in STORED_SUFFIXES if theirs + s in ckpt}:
            return False
        for name in names:
            other = theirs + name.removeprefix(own)
            if ckpt.shape(name) != ckpt.shape(other):
                return False
            a, b = ckpt.raw(name), ckpt.raw(other)
            same = a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
            # Comparing read both whole; their pages need not stay with the process (a plain load's views read
            # them back from the page cache when they are used).
            ckpt.release_tensor_pages(name)
            ckpt.release_tensor_pages(other)
            if not same:
                return False
        return True

    def _read_packed(self, internal: str, ckpt_name: str, stack, shard, meta: torch.Tensor, fmt: str) -> bool:
        """Take a weight the checkpoint stores in its served format `fmt` as it is; False to read it plainly."""
        if shard is not None or not self.as_shipped:
            return False
        found = self._stored(internal, ckpt_name, stack, meta)
        if found is None:
            return False
        packed, names = found
        if packed.format != fmt:  # an FP8 head asked for in int8 or int4: read dequantized, then packed
            return False
        if list(packed.shape) != list(meta.shape):
            self.wrong_shape.append(f"{ckpt_name} is {list(packed.shape)}, expected {list(meta.shape)}")
            return True
        self.packed[internal] = to_device(packed, self.device)
        self.consumed.update(names)
        return True

    def _stored(self, internal: str, ckpt_name: str, stack, meta: torch.Tensor):
        """(PackedWeight, names) of a weight the checkpoint stores packed, or None."""
        if ckpt_name in self.checkpoint:
            stored = self.stored_head if LM_HEAD.search(internal) else self.stored
            return stored_packed(self.checkpoint, ckpt_name, stored)
        if stack and self.stored.startswith("fp8"):
            return stack_stored_packed(self.checkpoint, stack["prefix"], stack["kind"], meta.shape[0], self.stored)
        return None


def save_model(model, path: str | Path, max_shard_bytes: int = 4 << 30) -> None:
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config: ModelConfig = model.config
    hf_config = config.to_hf_dict()
    hf_config["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    hf_config["num_nextn_predict_layers"] = config.num_nextn_predict_layers if model.mtp is not None else 0
    if not any(name.endswith("_scale") for name in model.state_dict()):
        hf_config.pop("quantization_config", None)  # plain weights: an FP8 checkpoint loaded with "none"
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if config.eos_token_id:
        generation = {"eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id}
        (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    shard_bytes = 0
    for name, tensor in checkpoint_tensors(model):
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append((name, tensor))
        shard_bytes += size
    for stale in folder.glob("model*.safetensors*"):
        stale.unlink()
    if len(shards) == 1:
        file_names = ["model.safetensors"]
    else:
        file_names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    total = 0
    for file_name, shard in zip(file_names, shards, strict=True):
        # Per-expert pieces are views of a stack; safetensors wants each tensor to own its memory.
        tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in shard}
        save_file(tensors, str(folder / file_name), metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = file_name
            total += t.numel() * t.element_size()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
