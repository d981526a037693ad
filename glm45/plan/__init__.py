"""Memory planning: what a GLM-4.5-family model's weights, KV cache and activations take on a GPU, and the
smallest tensor-parallel size that fits — `glm45 plan`, and the accounting the engine can log at startup.

Pure accounting: shapes come from `config.json` (and, for a local checkpoint, the stored bytes from its
safetensors headers); nothing is allocated and no weight is read. Sizes are per GPU under glm45's tensor
parallelism (parallel/tensor_parallel.py: heads, MLP and expert intermediates split; KV heads split while
there are at least as many as ranks, else one per rank; vocabulary rows split; norms and routers replicated).

    weights      Σ over tensors: linear layers by the format's rule (WEIGHT_FORMATS); the LM heads and MTP's
                 eh_proj too for int8 and int4 (glm45 packs them), in bf16 for fp8 (as the FP8 releases ship
                 and serve them; a bf16 checkpoint quantized to fp8 at load packs them, which this overstates);
                 embeddings, norms and biases in bf16; routers and their bias in fp32 (as the loader keeps
                 them). The MTP layer's embedding and head are counted as stored copies. The MTP layer is
                 resident only when speculative decoding is on. For a checkpoint served in its own format,
                 each part is scaled to the bytes its safetensors files hold.
    KV per token 2 (K, V) × layers × KV heads × head_dim × bytes, plus one layer (the MTP layer's own cache)
                 when speculative decoding is on; fp8 adds one fp32 scale per layer for K and for V.
    KV           max_num_seqs × ⌈(max_model_len + k) / 16⌉ × 16 tokens: every sequence at full length at once,
                 in 16-token blocks, with room for its k draft tokens.
    activations  T × (3·D + 2·(Hq + KV)·hd + 3·F + 2·E) × 2 bytes        one layer's live tensors for a step
                 + S × (k + 1) × V × 4 bytes × 2                        fp32 logits and sampling probabilities
                 T = max(max_num_batched_tokens, S·(k+1)), S = max_num_seqs, Hq/KV = this rank's heads,
                 F = max(intermediate, top_k·moe_intermediate + shared·moe_intermediate) / tp, E = experts.
    reserve      max(5% of the GPU, activations): room beside the weights and the KV cache for activations,
                 CUDA graphs and the CUDA context. (The engine measures its largest step's activations on one
                 GPU and keeps 5% under tensor parallelism: model_runner.kv_cache_blocks.)
    fits         weights + KV + reserve ≤ gpu_memory_utilization × GPU memory, per GPU.

GPUs: H100 79.1 GiB, H200 139.8 GiB (the totals torch reports). `--max-num-seqs` defaults to 1: one sequence
at the full context, what the engine needs to start. Quantized weights and an fp8 cache are counted as held
in their format, as the engine holds them (`--quantization`, `--kv-cache-dtype fp8`).

GLM-4.5's own hardware table (zai-org/GLM-4.5 README, July 2025: MTP on, batch ≤ 8, FP8 cache) is checked in
tests/test_plan.py with FP8 cache, k = 3 and 8 sequences: of 16K tokens each for the minimum table, which
this accounting reproduces (GLM-4.5 BF16 H100×16 / H200×8, FP8 H100×8 / H200×4; Air BF16 H100×4 / H200×2,
FP8 H100×2 / H200×1), and of 128K tokens each for the full-context table, which lists twice those counts.
The Air rows and GLM-4.5 FP8 on H200 come out as listed; three GLM-4.5 rows come out at half:
  - FP8 on H100 (8, listed 16) and BF16 on H100 (16, listed 32): GLM-4.5 has 8 KV heads, so from TP 8 on
    every GPU keeps one head and the same 23.3 GiB of cache for 8 × 128K tokens, and more GPUs shrink only
    the weights. At the smaller size 1.2 and 1.8 GiB per GPU are left; setting aside 3% more of each GPU
    (--gpu-memory-utilization 0.87) gives the listed counts.
  - BF16 on H200 (8, listed 16): an FP8 cache fits at TP 8 with 11.8 GiB to spare; a BF16 cache
    (--kv-cache-dtype auto) takes 16, as listed.
"""

from glm45.plan.accounting import (  # noqa: F401
    LABELS,
    WeightBytes,
    activation_bytes,
    block_problems,
    kv_bytes_per_token,
    kv_heads_per_rank,
    weight_bytes,
)
from glm45.plan.formats import (  # noqa: F401
    BLOCK_SIZE,
    GPUS,
    KV_CACHE_DTYPES,
    QUANTIZATIONS,
    RESERVE_FRACTION,
    TP_SIZES,
    WEIGHT_FORMATS,
    GiB,
    GpuSpec,
    WeightFormat,
)
from glm45.plan.planner import (  # noqa: F401
    GpuFit,
    MemoryPlan,
    add_plan_arguments,
    cmd_plan,
    describe,
    plan_memory,
    plan_model,
    resolve_kv_cache_dtype,
    resolve_quantization,
)
from glm45.plan.sources import (  # noqa: F401
    BUILTIN_MODELS,
    FP8_RELEASE_QUANTIZATION,
    index_bytes,
    load_model_source,
    part_of,
    stored_bytes,
)
from glm45.quant.scheme import checkpoint_format  # noqa: F401
