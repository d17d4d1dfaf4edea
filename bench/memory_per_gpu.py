"""`python bench/memory_per_gpu.py`: memory per GPU to fine-tune Llama-2-7B and Llama-2-70B, by
technique (full fine-tuning, LoRA on an fp32 / 8-bit / nf4 base) and by parallelism (DDP; FSDP
sharded over N GPUs), COMPUTED from parameter counts, not measured. Prints the Markdown table of
README's "Memory per GPU" section. Standard library only; imports nothing from kubetune.

Why: which technique and how many GPUs a model needs is decided before a GPU is asked for, and
bench/gpu.py measures peak memory only for models of 1.5B parameters or fewer.

Method. Parameter counts come from the models' Hugging Face configs (meta-llama/Llama-2-7b-hf,
meta-llama/Llama-2-70b-hf: layers, hidden, MLP, KV heads, vocabulary); the script rebuilds them
and checks them against the published 6.74e9 and 68.98e9. Bytes per parameter:
- trained parameter: 16 = weight 4 + gradient 4 + AdamW's two moments 8, all fp32. This is what
  kubetune's Trainer holds (an unquantized base is loaded in fp32 and bf16 is autocast), and the
  same 16 as the mixed-precision accounting of ZeRO (Rajbhandari et al. 2020): bf16 weight 2 +
  bf16 gradient 2 + fp32 master copy, momentum and variance 12. LoRA adapters are fp32 too.
- frozen base, linear layers of the decoder blocks: bf16 2; LLM.int8 1 (plus one fp32 scale per
  output row, a few MB, ignored); nf4 4 bits + 0.127 bits of constants with double quantization
  (QLoRA, Dettmers et al. 2023), i.e. 0.516. Embeddings, lm_head and norms stay in bf16 (2).
- DDP keeps a whole copy per GPU; FSDP (FULL_SHARD) divides weights, gradients and optimizer
  states by N. FSDP cannot shard bitsandbytes' 8-bit weights; it shards nf4 weights only when they
  are stored in the compute dtype (bnb_4bit_quant_storage=bfloat16), which leaves their size alone.
LoRA: r=16 on q_proj and v_proj (the opt-6.7b recipe): r x (in + out) per matrix per layer.

kubetune's modeling.memory_estimate (written into each run's plan) counts the same way: weights as
loaded plus 12 bytes (gradient and two fp32 moments) per trainable parameter. It measures the
loaded weights, so it includes two things this table does not: peft's prepare_model_for_kbit_training
upcasts embeddings, lm_head and norms of a quantized base to fp32, and an unquantized base is
loaded in fp32; both are printed under the table as deltas. Not counted (on top): activations,
the CUDA context (~0.5-1 GB), allocator fragmentation, FSDP's gathered layers, and DDP's gradient
buckets (a second fp32 copy of the gradients unless gradient_as_bucket_view=True; matters for full
fine-tuning only).
"""

GIB = 2**30  # figures are GiB (2^30 bytes), as torch.cuda reports memory

# From each model's config.json on the Hugging Face hub; published = the model's parameter count
# (6,738,415,616 and 68,976,648,192 in its checkpoint). GQA (kv_heads=8) for the 70B: Llama 2 paper
# (Touvron et al. 2023), Table 1.
MODELS = {
    "Llama-2-7B": dict(layers=32, hidden=4096, mlp=11008, heads=32, kv_heads=32, vocab=32000, published=6.74e9),
    "Llama-2-70B": dict(layers=80, hidden=8192, mlp=28672, heads=64, kv_heads=8, vocab=32000, published=68.98e9),
}
GPU_COUNTS = {"Llama-2-7B": (2, 8), "Llama-2-70B": (8, 16)}  # FSDP columns

LORA_RANK = 16  # model.lora.r of examples/opt-6.7b-8bit-lora.yaml; targets q_proj and v_proj
TRAINED_BYTES = 4 + 4 + 8  # fp32 weight + fp32 gradient + AdamW momentum and variance (fp32)
BF16_BYTES = 2
INT8_BYTES = 1  # LLM.int8: one byte per weight; the per-row fp32 scales are ignored (MBs)
NF4_BYTES = (4 + 0.127) / 8  # 4-bit codes + double-quantized constants (QLoRA paper, section 3)

FP32_BYTES = 4
# technique: (bytes per frozen base linear weight or None for full fine-tuning, bytes of the other
# frozen weights, what kubetune's train.sharding: fsdp does with it)
SHARDS, REFUSED, NOT_BUILT = "shards", "refused", "not built"
TECHNIQUES = {
    "full fine-tuning": (None, None, SHARDS),
    # model.quantization: none loads the base in fp32 (bf16 only autocast)
    "LoRA, unquantized base (fp32)": (FP32_BYTES, FP32_BYTES, SHARDS),
    "LoRA, 8-bit base": (INT8_BYTES, BF16_BYTES, REFUSED),  # FSDP cannot shard Int8Params
    # FSDP could shard nf4 stored as bnb_4bit_quant_storage=bfloat16 (QLoRA-FSDP); kubetune refuses it for now
    "QLoRA (LoRA, nf4 base)": (NF4_BYTES, BF16_BYTES, NOT_BUILT),
}


def counts(m: dict) -> dict:
    """Parameters by part, as the Llama architecture lays them out (no biases, untied lm_head)."""
    kv_dim = m["hidden"] // m["heads"] * m["kv_heads"]  # k_proj and v_proj output (GQA)
    attention = 2 * m["hidden"] * m["hidden"] + 2 * m["hidden"] * kv_dim  # q, o + k, v
    mlp = 3 * m["hidden"] * m["mlp"]  # gate, up, down
    linear = m["layers"] * (attention + mlp)
    other = 2 * m["vocab"] * m["hidden"] + (2 * m["layers"] + 1) * m["hidden"]  # embed, lm_head; norms
    lora = m["layers"] * LORA_RANK * ((m["hidden"] + m["hidden"]) + (m["hidden"] + kv_dim))  # q, v
    layer = attention + mlp + 2 * m["hidden"]
    return dict(linear=linear, other=other, total=linear + other, lora=lora, layer=layer)


def state_bytes(c: dict, base_bytes, other_bytes) -> float:
    """Weights + gradients + optimizer states of one whole copy of the model."""
    if base_bytes is None:
        return c["total"] * TRAINED_BYTES
    return c["linear"] * base_bytes + c["other"] * other_bytes + c["lora"] * TRAINED_BYTES


def short(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def main() -> None:
    model_counts = {}
    for name, m in MODELS.items():
        c = counts(m)
        assert round(c["total"] / 1e7) == round(m["published"] / 1e7), (name, c["total"])
        model_counts[name] = c
    header = ["technique", "trained params (7B / 70B)"]
    for name in MODELS:
        size = name.split("-")[-1]  # 7B, 70B
        header += [f"{size} DDP"] + [f"{size} FSDP N={n}" for n in GPU_COUNTS[name]]
    rows = []
    for technique, (base_bytes, other_bytes, sharding) in TECHNIQUES.items():
        trained = [c["total"] if base_bytes is None else c["lora"] for c in model_counts.values()]
        row = [technique, " / ".join(short(t) for t in trained)]
        for name, c in model_counts.items():
            whole = state_bytes(c, base_bytes, other_bytes)
            row.append(f"{whole / GIB:.1f}")
            for n in GPU_COUNTS[name]:
                shard = f"{whole / n / GIB:.1f}"
                row.append(shard if sharding == SHARDS else "refused" if sharding == REFUSED else f"({shard}) not built")
        rows.append(row)
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * 2 + "---:|" * (len(header) - 2))
    for row in rows:
        print("| " + " | ".join(row) + " |")

    small, large = model_counts.values()  # the 7B and the 70B, the order of the table
    upcast = [c["other"] * (FP32_BYTES - BF16_BYTES) / GIB for c in (small, large)]
    gathered = [2 * c["layer"] * FP32_BYTES / GIB for c in (small, large)]  # computing + prefetched
    print("\nGiB per GPU: weights, gradients and AdamW states. Below, 7B / 70B in GiB:")
    print(f"- With 8-bit or nf4, peft upcasts embeddings, lm_head and norms to fp32: +{upcast[0]:.2f} / "
          f"+{upcast[1]:.2f} per copy.")
    print(f"- On top: activations, CUDA context (~0.5-1 GB), fragmentation; under FSDP ~2 gathered "
          f"decoder layers ({gathered[0]:.2f} / {gathered[1]:.2f} in fp32).")


if __name__ == "__main__":
    main()
