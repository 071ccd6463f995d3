"""The Ling model: Flax modules, the MoE layer, grouped matmul, KV cache, parameters and sharding rules.

Axis letters, one set for the whole package (einsum subscripts and the
`# [B, T, D]` shape comments; every other module refers here):

    B  batch                     T  query time            S  key time / cache slots
    D  model (hidden)            N  query heads           K  kv heads
    G  query heads per kv head   H  head dim              V  vocab
    E  experts                   F  ffn (expert ffn in the MoE layer)
    L  layers of a stack         X  tokens, B * T flattened
    M  routed rows, X * k (k: experts per token, the top-k slot)
    P  multi-token-prediction layers (Ling 2.0)

A suffix `_l` marks one device's share under a mesh (X_l, M_l). The grouped
matmul (`grouped_matmul`, and `pallas_kernels` in lower case) is generic over
its operands and uses matrix letters instead: lhs [M, K] times one of G (L
local) weights [K, N].

Modules: `layers` (RMSNorm, SwiGLU MLP, RoPE, embeddings, NormHead),
`attention`, `kv_cache`, `routing` (softmax or Ling 2.0 sigmoid group-limited
router), `experts` (the routed-expert FFN), `moe` (the MoE module),
`expert_parallel`, `grouped_matmul`, `decoder` (the decoder layer and its
scanned stack), `mtp` (Ling 2.0 multi-token prediction), `transformer`
(`LingForCausalLM`), `params` (initialisation and the abstract tree) and
`sharding` (mesh, logical-axis rules, validation).
"""
