"""ModernBERT forward pass run from the weights of a loaded `ModernBertForMaskedLM`.

Why our own forward: the engine needs (1) hidden states without the LM head, (2) the head on chosen
rows only, and (3) a partial forward in which only some positions are recomputed while the keys and
values of the others come from a cache. The weights are the HF module's own tensors (no copy).

The arithmetic mirrors transformers' implementation op for op (embedding -> LayerNorm; pre-norm
layers with RoPE in float32, bidirectional SDPA with key padding and a +-local_attention/2 window on
sliding layers; gated GELU MLP; final norm; head dense -> GELU -> LayerNorm -> decoder), so logits
agree with `ModernBertForMaskedLM` to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..backends import Ops


@dataclass
class _Layer:
    attn_norm: torch.nn.Module  # LayerNorm, or Identity for layer 0
    wqkv: torch.nn.Linear
    wo: torch.nn.Linear
    mlp_norm: torch.nn.Module
    wi: torch.nn.Linear
    mlp_wo: torch.nn.Linear
    is_global: bool


def _layer_types(cfg) -> list[str]:
    types = getattr(cfg, "layer_types", None)
    if types:
        return list(types)
    n = cfg.global_attn_every_n_layers
    return ["full_attention" if i % n == 0 else "sliding_attention" for i in range(cfg.num_hidden_layers)]


def _rope_theta(cfg, layer_type: str) -> float:
    params = getattr(cfg, "rope_parameters", None)
    if isinstance(params, dict) and layer_type in params and params[layer_type]:
        if params[layer_type].get("rope_type", "default") != "default":
            raise NotImplementedError(f"rope_type {params[layer_type]['rope_type']!r} is not supported")
        return float(params[layer_type]["rope_theta"])
    if layer_type == "full_attention":
        return float(cfg.global_rope_theta)
    return float(getattr(cfg, "local_rope_theta", None) or cfg.global_rope_theta)


class KVPool:
    """Per-layer key/value slots, one slot per request row: [slots, heads, positions + 1, head_dim].

    The extra last position is a trash slot: padded query rows write there and it is never a valid key.
    """

    def __init__(self, n_layers: int, slots: int, positions: int, heads: int, head_dim: int, dtype, device):
        shape = (slots, heads, positions + 1, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.positions = positions


class ModernBert:
    """The forward of a loaded HF ModernBertForMaskedLM's weights, with row selection and K/V reuse."""

    def __init__(self, hf_model, ops: Ops | None = None):
        """ops: the backends (diffutron_engine.backends.Ops) the forward's attention runs on, chosen once
        by the caller (the engine's runner selects all of its ops together); None selects the attention's
        for the model's device and dtype."""
        cfg = hf_model.config
        if getattr(cfg, "model_type", None) != "modernbert":
            raise ValueError(f"ModernBert needs a ModernBERT model, got {getattr(cfg, 'model_type', None)!r}")
        base = hf_model.model
        self.config = cfg
        self.hidden = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.half_window = cfg.local_attention // 2
        self.embed = base.embeddings.tok_embeddings
        self.embed_norm = base.embeddings.norm
        types = _layer_types(cfg)
        self.layers = [
            _Layer(l.attn_norm, l.attn.Wqkv, l.attn.Wo, l.mlp_norm, l.mlp.Wi, l.mlp.Wo, types[i] == "full_attention")
            for i, l in enumerate(base.layers)
        ]
        self.final_norm = base.final_norm
        self.head_dense, self.head_norm = hf_model.head.dense, hf_model.head.norm
        self.decoder = hf_model.decoder
        self.hidden_act = _activation(cfg.hidden_activation)
        self.head_act = _activation(cfg.classifier_activation)
        self.device = self.embed.weight.device
        self.dtype = self.embed.weight.dtype
        self.vocab_size = self.decoder.weight.shape[0]
        if ops is None:
            ops = Ops.select(self.device, self.dtype, only=("attention",))
        if ops.attention_backend is None:
            raise ValueError("ModernBert needs Ops with an attention backend (Ops.select with 'attention')")
        self.ops = ops
        # cos/sin tables per layer type, computed like transformers (float32 freqs, then cast)
        self._rope = {}
        for t in ("full_attention", "sliding_attention"):
            theta = _rope_theta(cfg, t)
            inv = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim))
            self._rope[t] = inv.to(self.device)
        self._tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.rope_version = 0

    # ------------------------------------------------------------------ pieces
    def ensure_rope(self, n: int) -> None:
        """cos/sin tables for positions < n (grown by doubling; `rope_version` counts the growths, since
        a captured CUDA graph reads the tables it was captured with)."""
        for kind in ("full_attention", "sliding_attention"):
            table = self._tables.get(kind)
            if table is None or table[0].shape[0] < n:
                size = max(n, 2 * table[0].shape[0] if table is not None else 256)
                freqs = torch.arange(size, device=self.device, dtype=torch.float)[:, None] * self._rope[kind][None, :]
                emb = torch.cat((freqs, freqs), dim=-1)
                # transformers casts cos/sin to the activations' dtype, then rotates in float32
                self._tables[kind] = (emb.cos().to(self.dtype).float(), emb.sin().to(self.dtype).float())
                self.rope_version += 1

    def _rope_tables(self, positions: torch.Tensor, n: int) -> dict[bool, tuple[torch.Tensor, torch.Tensor]]:
        """cos, sin [B, 1, Q, head_dim] (float32, as transformers applies them) for integer positions
        [B, Q] < n, per layer kind (keyed by is_global). Tables grow on demand."""
        self.ensure_rope(n)
        out = {}
        for is_global, kind in ((True, "full_attention"), (False, "sliding_attention")):
            table = self._tables[kind]
            out[is_global] = (table[0][positions].unsqueeze(1), table[1][positions].unsqueeze(1))
        return out

    @staticmethod
    def _rotate(x, cos, sin):
        xf = x.float()
        half = x.shape[-1] // 2
        rot = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
        return ((xf * cos) + (rot * sin)).to(x.dtype)

    def _qkv(self, layer: _Layer, h: torch.Tensor, rope):
        B, Q, _ = h.shape
        qkv = layer.wqkv(layer.attn_norm(h)).view(B, Q, 3, self.heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(dim=2))
        cos, sin = rope[layer.is_global]
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin), v

    def _attend(self, layer: _Layer, q, k_store, v_store, slots, q_pos, key_valid, masks: dict):
        """Attention of queries q [B, H, Q, D] at positions q_pos [B, Q] over keys 0..T-1 (T =
        key_valid.shape[1]) held in k_store/v_store: per row ([B, H, T, D], slots None) or in the pool's
        slots [S, H, P, D] (ops.attention: the Triton kernel reads the pool in place; the torch path
        gathers the rows and needs an explicit mask, built once per layer kind and forward, in `masks`)."""
        window = None if layer.is_global else self.half_window
        if layer.is_global not in masks:
            masks[layer.is_global] = self.ops.attention_mask(q_pos, key_valid, window)
        return self.ops.attention(q, k_store, v_store, slots, q_pos, key_valid, window, self.head_dim**-0.5,
                                  masks[layer.is_global])

    def _finish_layer(self, layer: _Layer, h, attn):
        B, Q, _ = h.shape
        h = h + layer.wo(attn.transpose(1, 2).reshape(B, Q, self.hidden))
        a, g = layer.wi(layer.mlp_norm(h)).chunk(2, dim=-1)
        return h + layer.mlp_wo(self.hidden_act(a) * g)

    # ------------------------------------------------------------------ forwards
    @torch.no_grad()
    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor, pool: KVPool | None = None,
                slots: torch.Tensor | None = None) -> torch.Tensor:
        """Full forward of canvases [B, T] -> final hidden states [B, T, H].

        With a pool, every layer's keys/values are also stored in the rows' slots (a cache refresh).
        """
        B, T = ids.shape
        positions = torch.arange(T, device=ids.device)
        pos_b = positions.expand(B, T)
        key_valid = attention_mask.bool()
        h = self.embed_norm(self.embed(ids))
        rope = self._rope_tables(pos_b, T)
        masks = {}
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, h, rope)
            if pool is not None:
                pool.k[i][slots, :, :T] = k
                pool.v[i][slots, :, :T] = v
            attn = self._attend(layer, q, k, v, None, pos_b, key_valid, masks)
            h = self._finish_layer(layer, h, attn)
        return self.final_norm(h)

    @torch.no_grad()
    def forward_partial(self, ids_q: torch.Tensor, pos_q: torch.Tensor, key_valid: torch.Tensor,
                        pool: KVPool, slots: torch.Tensor) -> torch.Tensor:
        """Recompute only positions `pos_q` [B, Q] (tokens `ids_q`) of rows in `slots`; every other
        key/value comes from the pool. Padded query entries must point at the trash position
        (pool.positions). `key_valid` [B, T] marks real keys (T <= pool.positions).

        Returns hidden states [B, Q, H] of the recomputed positions; their fresh keys/values are
        written to the pool."""
        B, Q = ids_q.shape
        h = self.embed_norm(self.embed(ids_q))
        rows = slots[:, None, None].expand(B, self.heads, Q)
        heads = torch.arange(self.heads, device=ids_q.device)[None, :, None].expand(B, self.heads, Q)
        cols = pos_q[:, None, :].expand(B, self.heads, Q)
        rope = self._rope_tables(pos_q, pool.positions + 1)
        masks = {}
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, h, rope)
            pool.k[i][rows, heads, cols] = k
            pool.v[i][rows, heads, cols] = v
            attn = self._attend(layer, q, pool.k[i], pool.v[i], slots, pos_q, key_valid, masks)
            h = self._finish_layer(layer, h, attn)
        return self.final_norm(h)

    @torch.no_grad()
    def head_transform(self, hidden_rows: torch.Tensor) -> torch.Tensor:
        """The head before the decoder (dense -> activation -> LayerNorm): [N, H] -> [N, H]."""
        return self.head_norm(self.head_act(self.head_dense(hidden_rows)))

    @torch.no_grad()
    def lm_head(self, hidden_rows: torch.Tensor) -> torch.Tensor:
        """Logits [N, V] for hidden states [N, H] (only the rows that need a prediction); possibly a
        non-contiguous view."""
        h = self.head_transform(hidden_rows)
        if h.device.type == "cpu" and h.shape[0] <= 64:
            # Few rows: the product as [V, H] x [H, N] streams the 256k x 768 weight about twice as fast
            # through MKL as linear() does (measured: 16 rows, 155 vs 300 ms in float32).
            # The result is returned as a transposed view, not copied: the sampler reads it in small row
            # chunks, so no second N x V buffer is ever made.
            w, b = self.decoder.weight, self.decoder.bias
            out = w @ h.T if b is None else torch.addmm(b[:, None], w, h.T)
            return out.T
        return self.decoder(h)

    def new_pool(self, slots: int, positions: int) -> KVPool:
        return KVPool(len(self.layers), slots, positions, self.heads, self.head_dim, self.dtype, self.device)


def _activation(name: str):
    if name in ("gelu", "gelu_python"):
        return lambda x: F.gelu(x)  # exact (erf) GELU, as transformers' "gelu"
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "silu":
        return F.silu
    if name == "relu":
        return F.relu
    raise NotImplementedError(f"activation {name!r} is not supported by ModernBert")
