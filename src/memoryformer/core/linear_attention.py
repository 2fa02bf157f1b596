"""Efficient-attention replacements for the Pythia twin's softmax attention (the paper's Table 2), causal.

    ModelConfig(architecture="pythia", attention="performer" | "cosformer" | "linformer")

Each module maps rotary-embedded q (B, H, T, Dh) and k, v (B, H, S, Dh), S >= T, the queries being
the last T of the S positions (a KV cache holds the first S - T), to (B, H, T, Dh); position t sees
keys 0..t only. Written from the papers' formulas (the PyPI packages `performer-pytorch` and
`linformer` bring extra dependencies, and `linformer` is not causal); see docs/results.md.

- Performer (Choromanski et al. 2021, FAVOR+): positive orthogonal random features
  phi(x) = exp(w.x - |x|^2 / 2) / sqrt(m), x = q or k scaled by Dh^(-1/4), m = int(Dh ln Dh)
  features fixed at construction (a buffer, drawn from a generator seeded by the layer index, so it
  neither consumes nor depends on the global RNG). Causal through prefix sums of phi(k) v^T.
- cosFormer (Qin et al. 2022): phi = ReLU with the cos re-weighting cos(pi (i - j) / 2M),
  M = max_seq_len, split as cos(a_i) cos(a_j) + sin(a_i) sin(a_j) into 2 Dh features; causal through
  the same prefix sums.
- Linformer (Wang et al. 2020) projects the n keys and values to r rows with learned E, F (r x n),
  which mixes future positions. Causal variant used here: a cumulative projection: position t attends
  over r rows K~_t = t^(-1/2) sum_{j<=t} E[:, j] k_j (likewise V~_t with F), softmax over the r
  scores q_t . K~_t / sqrt(Dh). r = max(1, max_seq_len // 8) (256 at 2048, the Linformer paper's
  k for n = 2048).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from memoryformer.core.config import ATTENTIONS

LINFORMER_RATIO = 8  # sequence length / projected length r
DENOMINATOR_EPS = 1e-6  # floor of cosFormer's denominator: its ReLU features can give an all-zero row


def performer_features(head_dim: int) -> int:
    """m = int(Dh ln Dh), the Performer paper's (and performer-pytorch's) default feature count."""
    return max(1, int(head_dim * math.log(head_dim))) if head_dim > 1 else 1


def linformer_rank(max_seq_len: int) -> int:
    return max(1, max_seq_len // LINFORMER_RATIO)


def orthogonal_gaussian(rows: int, cols: int, generator: torch.Generator) -> Tensor:
    """(rows, cols) random features: blocks of orthonormal rows, each row rescaled to the norm of a
    Gaussian vector (chi-distributed), as FAVOR+ draws them."""
    blocks = []
    for _ in range(math.ceil(rows / cols)):
        q, r = torch.linalg.qr(torch.randn(cols, cols, generator=generator, dtype=torch.float64, device="cpu"))
        blocks.append((q * torch.sign(torch.diagonal(r))).T)  # the sign fix makes q Haar-distributed
    w = torch.cat(blocks)[:rows]
    norms = torch.randn(rows, cols, generator=generator, dtype=torch.float64, device="cpu").norm(dim=1, keepdim=True)
    return w * norms


def causal_linear_attention(phi_q: Tensor, phi_k: Tensor, v: Tensor, *, chunk: int = 64,
                            eps: float = DENOMINATOR_EPS) -> Tensor:
    """sum_{j<=i} (phi_q_i . phi_k_j) v_j / sum_{j<=i} phi_q_i . phi_k_j, chunked prefix sums.

    phi_q (B, H, T, F) for the last T of S positions; phi_k (B, H, S, F); v (B, H, S, Dv) -> (B, H, T, Dv).
    """
    S, T = phi_k.shape[2], phi_q.shape[2]
    past = S - T
    state = torch.einsum("bhsf,bhsd->bhfd", phi_k[:, :, :past], v[:, :, :past])  # (B, H, F, Dv)
    norm = phi_k[:, :, :past].sum(dim=2)  # (B, H, F)
    outs = []
    for start in range(0, T, chunk):
        qc = phi_q[:, :, start:start + chunk]
        kc, vc = phi_k[:, :, past + start:past + start + chunk], v[:, :, past + start:past + start + chunk]
        scores = (qc @ kc.transpose(-1, -2)).tril()  # (B, H, C, C), causal within the chunk
        num = qc @ state + scores @ vc
        den = torch.einsum("bhcf,bhf->bhc", qc, norm) + scores.sum(-1)
        outs.append(num / den.clamp_min(eps).unsqueeze(-1))
        state = state + kc.transpose(-1, -2) @ vc
        norm = norm + kc.sum(dim=2)
    return torch.cat(outs, dim=2)


def _check_length(kind: str, length: int, max_len: int) -> None:
    if length > max_len:
        raise ValueError(f"{kind} attention covers at most max_seq_len = {max_len} positions, got {length}")


class PerformerAttention(nn.Module):
    """FAVOR+ with positive orthogonal random features, causal (see the module docstring)."""

    def __init__(self, head_dim: int, layer: int, num_features: int | None = None) -> None:
        super().__init__()
        m = num_features or performer_features(head_dim)
        g = torch.Generator().manual_seed(1_000 + layer)
        w = orthogonal_gaussian(m, head_dim, g)
        self.register_buffer("features", w.float().to("cpu"))  # (m, Dh)
        # w.x - |x|^2 / 2 <= |w|^2 / 2: subtracting the largest keeps every key feature <= 1 (a constant,
        # so it cancels exactly between numerator and denominator and keeps the map causal)
        self.key_offset = float((w * w).sum(1).max() / 2)

    def feature_map(self, x: Tensor, *, is_query: bool) -> Tensor:
        """(B, H, L, Dh) -> (B, H, L, m) positive features."""
        x = x * x.shape[-1] ** -0.25
        w = self.features.to(x.dtype)
        logits = x @ w.T - (x * x).sum(-1, keepdim=True) / 2
        # a query's own offset cancels in its ratio; keys share one data-independent offset
        offset = logits.amax(-1, keepdim=True).detach() if is_query else self.key_offset
        return torch.exp(logits - offset) / math.sqrt(w.shape[0])

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # positive features: the denominator is never 0; its scale is set by the offsets, so no eps floor
        return causal_linear_attention(self.feature_map(q, is_query=True), self.feature_map(k, is_query=False), v,
                                       eps=torch.finfo(q.dtype).tiny)


class CosformerAttention(nn.Module):
    """ReLU features with cosFormer's cos re-weighting over M = max_seq_len, causal."""

    def __init__(self, max_seq_len: int) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len

    def feature_map(self, x: Tensor, positions: Tensor) -> Tensor:
        """(B, H, L, Dh), positions (L,) -> (B, H, L, 2 Dh): [relu(x) cos(a), relu(x) sin(a)], a = pi pos / 2M."""
        angle = (math.pi / 2) * positions.to(x.dtype) / self.max_seq_len
        x = torch.relu(x)
        return torch.cat([x * torch.cos(angle)[:, None], x * torch.sin(angle)[:, None]], dim=-1)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        S, T = k.shape[2], q.shape[2]
        _check_length("cosformer", S, self.max_seq_len)
        pos = torch.arange(S, device=q.device)
        return causal_linear_attention(self.feature_map(q, pos[S - T:]), self.feature_map(k, pos), v)


class LinformerAttention(nn.Module):
    """Linformer's low-rank projection made causal by a cumulative projection (module docstring)."""

    def __init__(self, max_seq_len: int, rank: int | None = None) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        r = rank or linformer_rank(max_seq_len)
        self.key_projection = nn.Parameter(torch.randn(r, max_seq_len))  # E (r, n)
        self.value_projection = nn.Parameter(torch.randn(r, max_seq_len))  # F (r, n)

    @staticmethod
    def cumulative(x: Tensor, proj: Tensor, T: int) -> Tensor:
        """x (B, H, S, Dh), proj (r, S) -> (B, H, T, r, Dh): t^(-1/2) sum_{j<=t} proj[:, j] x_j, last T of S."""
        S = x.shape[2]
        prefix = torch.cumsum(proj.T[None, None, :, :, None] * x[:, :, :, None, :], dim=2)[:, :, S - T:]
        counts = torch.arange(S - T + 1, S + 1, device=x.device, dtype=x.dtype)
        return prefix * counts.rsqrt()[:, None, None]

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        S, T = k.shape[2], q.shape[2]
        _check_length("linformer", S, self.max_seq_len)
        keys = self.cumulative(k, self.key_projection[:, :S].to(k.dtype), T)  # (B, H, T, r, Dh)
        values = self.cumulative(v, self.value_projection[:, :S].to(v.dtype), T)
        scores = torch.einsum("bhtd,bhtrd->bhtr", q, keys) / math.sqrt(q.shape[-1])
        return torch.einsum("bhtr,bhtrd->bhtd", scores.softmax(-1), values)


def make_attention(kind: str, *, head_dim: int, max_seq_len: int, layer: int) -> nn.Module | None:
    """The module for `kind`; None for "softmax" (the model's own scaled-dot-product path)."""
    if kind == "softmax":
        return None
    if kind == "performer":
        return PerformerAttention(head_dim, layer)
    if kind == "cosformer":
        return CosformerAttention(max_seq_len)
    if kind == "linformer":
        return LinformerAttention(max_seq_len)
    raise ValueError(f"attention must be one of {ATTENTIONS}, got {kind!r}")


def attention_macs(kind: str, seq_len: int, d_model: int, n_heads: int, max_seq_len: int | None = None) -> int:
    """Multiply-adds of one block's attention over s = seq_len tokens (paper convention: 1 MAC = 1 FLOP).

    softmax 2 s^2 d (QK^T and AV over the full s x s, as the paper's Table 1); Performer 4 s m d
    (features of q and k, the prefix state phi(k) v^T, its product with phi(q)) + 2 s m H (denominators);
    cosFormer the same with 2 Dh features: 4 s d Dh + 4 s Dh H; Linformer 4 s r d (projections of k and
    v, scores, weighted values), r = max_seq_len // 8 (max_seq_len defaults to seq_len)."""
    s, d, h = seq_len, d_model, n_heads
    dh = d // h
    if kind == "softmax":
        return 2 * s * s * d
    if kind == "performer":
        m = performer_features(dh)
        return 4 * s * m * d + 2 * s * m * h
    if kind == "cosformer":
        return 4 * s * d * dh + 2 * s * 2 * dh * h
    if kind == "linformer":
        return 4 * s * linformer_rank(max_seq_len or seq_len) * d
    raise ValueError(f"attention must be one of {ATTENTIONS}, got {kind!r}")
