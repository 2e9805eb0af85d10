"""The llama family's Config, apart from its Model so that it loads without PyTorch: a recipe names it, and
`lmkit chat` runs a standard fp32 llama in numpy (toolkit.models.llama_cpu) without importing torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from toolkit.errors import check, check_choice


@dataclass(frozen=True)
class Config:
    family: ClassVar[str] = "llama"
    dim: int = 288
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int = 0  # 0 = n_heads
    vocab_size: int = 0  # 0 = the tokenizer's
    hidden_dim: int = 0  # 0 = multiple_of-rounded 2/3 * 4 * dim (llama2.c)
    multiple_of: int = 32
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 256
    dropout: float = 0.0
    # dropout on the attention probabilities; -1 = `dropout` (llama2.c: one p for both). On a CPU it costs a
    # random number per probability (B x heads x T x T a layer), more than the residual dropout's B x T x dim
    attention_dropout: float = -1.0
    tie_embeddings: bool = True
    # modern small-model switches (recipes/llama_fast.toml); the defaults are llama2.c's model
    qk_norm: bool = False  # RMS-normalise queries and keys per head after RoPE (no gain), as nanochat
    # with qk_norm: a learnt gain per head dimension (q_norm, k_norm: Qwen3's and OLMo 2's), normalised before
    # RoPE; without it a normalised q.k / sqrt(head_dim) cannot pass +-sqrt(head_dim) (6.9 for head size 48)
    qk_norm_gain: bool = False
    # modded-nanogpt's value embeddings: N token tables of the values' width, table j added to the values of
    # layer j and of layer n_layers - N + j; they start at zero (the model starts as without them); 0 = off
    value_embeddings: int = 0
    mlp: str = "swiglu"  # swiglu (w2(silu(w1 x) * w3 x)) | relu2 (w2(relu(w1 x)^2), no w3)
    zero_init_out: bool = False  # attention and MLP output projections (wo, w2) start at zero
    logit_softcap: float = 0.0  # logits -> cap * tanh(logits / cap); 0 = off
    # how attention is computed, not what: sdpa (torch's fused kernels) | matmul (two matmuls around a softmax)
    # | auto (matmul in bf16 on CPU up to 1,024 keys, where it is the faster, sdpa elsewhere);
    # toolkit.models.common.attention
    attention: str = "sdpa"

    def __post_init__(self):
        check(self.dim > 0 and self.n_layers > 0 and self.n_heads > 0, "dim", "positive dim, n_layers, n_heads")
        check(self.dim % self.n_heads == 0, "n_heads", f"a divisor of dim={self.dim}, got {self.n_heads}")
        check((self.dim // self.n_heads) % 2 == 0, "n_heads", "an even head size (dim / n_heads) for RoPE")
        check(self.kv_heads > 0 and self.n_heads % self.kv_heads == 0, "n_kv_heads",
              f"a divisor of n_heads={self.n_heads} (or 0 for n_heads), got {self.n_kv_heads}")
        check(self.vocab_size >= 0, "vocab_size", "0 (the tokenizer's) or a positive size")
        check(self.multiple_of > 0, "multiple_of", "a positive integer")
        check(self.max_seq_len > 0, "max_seq_len", "a positive length")
        check(0.0 <= self.dropout < 1.0, "dropout", "a probability in [0, 1)")
        check(self.attention_dropout == -1.0 or 0.0 <= self.attention_dropout < 1.0, "attention_dropout",
              "a probability in [0, 1), or -1 for dropout's")
        check_choice(self.mlp, "mlp", ("swiglu", "relu2"))
        check_choice(self.attention, "attention", ("sdpa", "matmul", "auto"))
        check(self.logit_softcap >= 0, "logit_softcap", "0 (off) or a positive cap")
        check(0 <= 2 * self.value_embeddings <= self.n_layers, "value_embeddings",
              f"0 (off) to n_layers / 2 = {self.n_layers // 2} tables, got {self.value_embeddings}")
        check(self.qk_norm or not self.qk_norm_gain, "qk_norm_gain", "qk_norm = true as well (the gain is the norm's)")

    def runtime_blockers(self) -> list[str]:
        """The switches that llama2.c's run.c, transformers' LlamaForCausalLM and llama.cpp's llama cannot run:
        exporters refuse a model that has any."""
        return [name for name, on in (("qk_norm", self.qk_norm), ("mlp = relu2", self.mlp != "swiglu"),
                                      ("logit_softcap", self.logit_softcap > 0),
                                      ("value_embeddings", self.value_embeddings > 0)) if on]

    @property
    def standard(self) -> bool:
        return not self.runtime_blockers()

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.hidden_dim:
            return self.hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


def tensor_shapes(c) -> dict[str, tuple[int, ...]]:
    """The shape of each weight of a llama by parameter name (toolkit.models.llama's, llama2.c's), output.weight
    only when untied: what a .bin, a run folder and the numpy decoder hold."""
    d, hd = c.dim, c.head_dim
    shapes = {"tok_embeddings.weight": (c.vocab_size, d), "norm.weight": (d,)}
    for i in range(c.n_layers):
        p = f"layers.{i}."
        shapes.update({p + "attention_norm.weight": (d,), p + "attention.wq.weight": (c.n_heads * hd, d),
                       p + "attention.wk.weight": (c.kv_heads * hd, d), p + "attention.wv.weight": (c.kv_heads * hd, d),
                       p + "attention.wo.weight": (d, c.n_heads * hd), p + "ffn_norm.weight": (d,),
                       p + "feed_forward.w1.weight": (c.ffn_dim, d), p + "feed_forward.w2.weight": (d, c.ffn_dim),
                       p + "feed_forward.w3.weight": (c.ffn_dim, d)})
    if not c.tie_embeddings:
        shapes["output.weight"] = (c.vocab_size, d)
    return shapes
