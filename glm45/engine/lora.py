"""LoRA adapters served per request: several fine-tunes of one base model in one batch, without merging or reloading.

    engine = LLMEngine(EngineConfig(model=BASE, enable_lora=True, max_loras=4))
    engine.add_request("r1", prompt, params, lora_request=LoRARequest("sql", 1, "/adapters/sql"))

Each adapter (a PEFT LoRA folder, as `glm45 train --lora-rank` writes it) gets a slot. The linear layers it adapts
in the main stack are wrapped once by `MultiLoRALinear`, which holds every slot's factors stacked — A [S, r, in],
B [S, out, r] (stored transposed) pre-multiplied by the adapter's scale α/r, ranks zero-padded to `max_lora_rank` —
and computes

    y = base(x);  y[rows of slot s] += scale_s · (x[rows] · A_sᵀ) · B_sᵀ      for each slot s in the batch

Punica's two kernels, in torch: for a few rows (decoding) each row gathers its own slot's factors and one batched
matmul pair serves them all ("bgmv", a fixed handful of ops whatever the adapters); for many rows (prefill) the rows
of each slot are multiplied as one group ("sgmv", a loop over the adapters present, no per-row copies of the
factors). Rows with no adapter use an all-zero slot in the first form and are skipped in the second. Which row uses
which slot is set once per forward by the model runner (`begin`/`end`), from the step's per-token adapter ids;
wrapped modules share that one `AdapterRows` object.

What is not served this way: adapters on the routed experts or the MTP layer (merge those with `glm45 merge`), and
tensor parallelism. On CPUs the captured decode step serves adapter rows too (one C op after each product that has
adapted layers, `captured_cpu.py`; the programs are rebuilt when an adapter adapts a layer no earlier one did); on
GPUs, and for steps too large to be captured, batches with adapter rows run the eager forward. Prefix-cache blocks
are keyed by the adapter too (`Sequence.cache_salt`), since K/V depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

NO_ADAPTER = -1


@dataclass(frozen=True)
class LoRARequest:
    """vLLM's fields: the adapter's name, a positive integer id, and its folder."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not self.lora_name or self.lora_int_id < 1:
            raise ValueError(f"a LoRA request needs a name and a positive integer id, got {self.lora_name!r}, "
                             f"{self.lora_int_id}")


GATHER_ROWS = 32  # up to this many rows, each row gathers its slot's factors (bgmv); above, rows go by slot (sgmv)


class AdapterRows:
    """Which rows of the current forward use which slot: per row (`slots`, the zero slot for base rows, when there
    are at most GATHER_ROWS rows) or as [(slot, row indices)] (`groups`); both empty for a base-only batch."""

    def __init__(self):
        self.groups: list[tuple[int, torch.Tensor]] = []
        self.slots: torch.Tensor | None = None


class MultiLoRALinear(nn.Module):
    """A linear layer (any module with `forward(x)`: plain or quantized) plus per-slot LoRA factors."""

    def __init__(self, base: nn.Module, rows: AdapterRows, max_loras: int, max_rank: int, in_features: int,
                 out_features: int):
        super().__init__()
        self.base = base
        self.rows = rows
        device = next(base.buffers(), next(base.parameters(), torch.empty(0))).device
        # One slot more than adapters: the last stays zero, for base rows among gathered ones.
        slots = max_loras + 1
        self.register_buffer("lora_A", torch.zeros(slots, max_rank, in_features, device=device), persistent=False)
        # B is held transposed, [S, r, out], so the captured CPU step adds r rows of it (contiguous) to the output
        self.register_buffer("lora_Bt", torch.zeros(slots, max_rank, out_features, device=device), persistent=False)
        self.present: set[int] = set()  # slots whose adapter adapts this layer

    @property
    def lora_B(self) -> torch.Tensor:
        """[S, out, r]: a view of `lora_Bt`."""
        return self.lora_Bt.transpose(1, 2)

    def __getattr__(self, name: str):
        # The captured decode step and the quantized kernels read the base layer's weight, bias, packed format…
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base"], name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        slots = self.rows.slots
        if slots is None and not self.rows.groups:
            return y
        x_rows = x.reshape(-1, x.shape[-1]).float()
        y_rows = y.view(-1, y.shape[-1])
        if slots is not None:  # bgmv: [N, r, in] · [N, in, 1] → [N, r, 1]; [N, out, r] · that → [N, out, 1]
            shrunk = torch.bmm(self.lora_A[slots], x_rows[:, :, None])
            y_rows += torch.bmm(self.lora_B[slots], shrunk).squeeze(-1).to(y.dtype)
            return y
        for slot, rows in self.rows.groups:  # sgmv
            if slot in self.present:
                delta = (x_rows[rows] @ self.lora_A[slot].mT) @ self.lora_B[slot].mT
                y_rows.index_add_(0, rows, delta.to(y.dtype))
        return y


def _features(module: nn.Module) -> tuple[int, int]:
    return int(module.in_features), int(module.out_features)


class AdapterSet:
    """The adapters an engine serves: slots, their factors in the wrapped layers, and the rows of each forward."""

    def __init__(self, model: nn.Module, max_loras: int, max_lora_rank: int):
        if max_loras < 1 or max_lora_rank < 1:
            raise ValueError(f"max_loras and max_lora_rank must be ≥ 1, got {max_loras} and {max_lora_rank}")
        self.model, self.max_loras, self.max_rank = model, max_loras, max_lora_rank
        self.rows = AdapterRows()
        self.slots: dict[str, int] = {}          # adapter name → slot
        self.requests: dict[str, LoRARequest] = {}
        self.wrapped: dict[str, MultiLoRALinear] = {}

    def slot_of(self, request: LoRARequest | None) -> int:
        """The slot of a request's adapter, loading it into a free slot on first use."""
        if request is None:
            return NO_ADAPTER
        known = self.requests.get(request.lora_name)
        if known is not None:
            if Path(known.lora_path).resolve() != Path(request.lora_path).resolve():
                raise ValueError(f"LoRA adapter {request.lora_name!r} is already loaded from {known.lora_path}")
            return self.slots[request.lora_name]
        if len(self.slots) >= self.max_loras:
            raise ValueError(f"{len(self.slots)} LoRA adapters are loaded, the most this engine holds "
                             f"(--max-loras {self.max_loras}): {', '.join(self.slots)}")
        slot = len(self.slots)
        self._load(request.lora_path, slot)
        self.slots[request.lora_name], self.requests[request.lora_name] = slot, request
        return slot

    @torch.no_grad()
    def _load(self, path: str, slot: int) -> None:
        from safetensors.torch import load_file

        from glm45.train import lora_io

        config = lora_io.read_adapter_config(path)
        rank, alpha = int(config["r"]), float(config["lora_alpha"])
        if rank > self.max_rank:
            raise ValueError(f"{path}: LoRA rank {rank} is above --max-lora-rank {self.max_rank}")
        if "experts" in lora_io.adapter_targets(config) or (Path(path) / lora_io.GLM45_CONFIG).is_file():
            raise ValueError(f"{path}: adapters on the routed experts or the MTP layer cannot be served per request; "
                             "merge them into the base with `glm45 merge`")
        state = load_file(str(Path(path) / lora_io.ADAPTER_WEIGHTS))
        prefix = lora_io.PEFT_PREFIX
        names = sorted({key[len(prefix):].rsplit(".lora_", 1)[0] for key in state})
        for name in names:
            module = self._wrap(name, path)
            a, b = state[f"{prefix}{name}.lora_A.weight"], state[f"{prefix}{name}.lora_B.weight"]
            if a.shape[1] != module.lora_A.shape[2] or b.shape[0] != module.lora_B.shape[1]:
                raise ValueError(f"{path}: the factors of {name} are {tuple(a.shape)}, {tuple(b.shape)}; the base "
                                 f"layer is {module.lora_A.shape[2]} → {module.lora_B.shape[1]}")
            module.lora_A[slot].zero_()
            module.lora_B[slot].zero_()
            module.lora_A[slot, :rank] = a.float()
            module.lora_B[slot, :, :rank] = b.float() * (alpha / rank)
            module.present.add(slot)

    def _wrap(self, name: str, path: str) -> MultiLoRALinear:
        if name in self.wrapped:
            return self.wrapped[name]
        try:
            module = self.model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path}: the adapter adapts {name}, which the base model does not have") from None
        if name.startswith("mtp.") or not hasattr(module, "in_features"):
            raise ValueError(f"{path}: {name} is not a linear layer of the main stack")
        wrapper = MultiLoRALinear(module, self.rows, self.max_loras, self.max_rank, *_features(module))
        parent, _, child = name.rpartition(".")
        setattr(self.model.get_submodule(parent), child, wrapper)
        self.wrapped[name] = wrapper
        return wrapper

    # ------------------------------------------------------------------ per forward
    def begin(self, adapter_ids: list[int] | None, device: torch.device) -> bool:
        """Set the rows of each slot for the next forward; False (nothing set) when no row uses an adapter."""
        if not adapter_ids or all(a == NO_ADAPTER for a in adapter_ids):
            return False
        ids = torch.tensor(adapter_ids)
        if len(adapter_ids) <= GATHER_ROWS:
            self.rows.slots = torch.where(ids == NO_ADAPTER, self.max_loras, ids).to(device)
        else:
            self.rows.groups = [(int(slot), (ids == slot).nonzero().squeeze(1).to(device))
                                for slot in ids.unique().tolist() if slot != NO_ADAPTER]
        return True

    def end(self) -> None:
        self.rows.groups, self.rows.slots = [], None
