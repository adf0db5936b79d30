"""Small attention models shared by the capture tests (tests/attention/, tests/test_protocol.py),
and the helpers that compare captured matrices with the model's own attention weights.

Each model family is checked in float32 against attention probabilities the model itself
produces: Hugging Face ``output_attentions`` of an eager twin, the manual path of a nanoGPT block,
``nn.MultiheadAttention``'s ``need_weights``, or an explicit softmax whose output is checked
against the module's own output. The fixtures that build them live in tests/conftest.py.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from attn_probe.attention import attention_probabilities
from attn_probe.models.gpt import GPT, GPTConfig

try:
    import transformers
except ImportError:  # the Hugging Face tests skip; the rest run
    transformers = None

TOL = 1e-5


def max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape, (tuple(got.shape), tuple(want.shape))
    assert got.dtype == torch.float32
    assert not torch.isnan(got).any()
    return (got - want.float()).abs().max().item()


def padding_zeroed(attention: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """A model's own (B, H, T, T) self-attention at input positions, as ``capture`` gives it:
    the rows and columns of each sequence's padding (``attention_mask`` 0) set to zero."""
    real = attention_mask.bool()
    return torch.where(real[:, None, :, None] & real[:, None, None, :], attention, 0.0)


def assert_close_all(captured: dict, reference, label: str) -> float:
    """Compare captured matrices (in model order) with a sequence of reference matrices."""
    captured = list(captured.values())
    reference = list(reference)
    assert len(captured) == len(reference) > 0
    err = max(max_error(a, r) for a, r in zip(captured, reference))
    print(f"max-error {label}: {err:.3g}")
    assert err <= TOL, f"{label}: {err}"
    return err


def tokens(b=3, t=12, seed=1):
    return torch.randint(1, 97, (b, t), generator=torch.Generator().manual_seed(seed))


def ran_op(name: str, fn) -> bool:
    """Whether ``fn()`` dispatched the aten operator ``name`` (to see fused fast paths run)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return any(e.name == name for e in prof.events())


# --- Hugging Face models --------------------------------------------------------------------------


def hf_twins(cls, config):
    """(sdpa model, eager model) with the same weights, in eval mode. Each gets its own copy of
    the config: the attention implementation is read from the config at every forward."""
    torch.manual_seed(0)
    sdpa = cls._from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    eager = cls._from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    assert sdpa.config._attn_implementation == "sdpa", sdpa.config._attn_implementation
    eager.load_state_dict(sdpa.state_dict())
    return sdpa, eager


def gpt2_config(**kw):
    return transformers.GPT2Config(
        n_layer=2, n_head=4, n_embd=32, vocab_size=97, n_positions=64,
        bos_token_id=0, eos_token_id=0, **kw,
    )


def llama_config():
    return transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=97, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )


def bert_config():
    return transformers.BertConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=97, max_position_embeddings=64, pad_token_id=0,
    )


# --- the demo GPT (attn_probe.models.gpt) -----------------------------------------------------


def small_gpt(seed=0, **kw) -> GPT:
    """A two-block demo GPT (vocabulary 64, context 24, 4 heads of 8)."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=64, block_size=24, n_layer=2, n_head=4, n_embd=32)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg))


# --- nanoGPT --------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """A nanoGPT attention block: one c_attn Linear, flash (SDPA) or manual softmax path."""

    def __init__(self, n_embd=32, n_head=4, block_size=64, dropout=0.0, flash=True):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)
        self.n_head, self.n_embd, self.dropout, self.flash = n_head, n_embd, dropout, flash
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size))[None, None])
        self.att = None  # the manual path's probabilities, kept for the tests
        self.fail_after_attention = False

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.flash:
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
            )
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            att = F.softmax(att, dim=-1)
            self.att = att.detach()
            att = self.attn_dropout(att)
            y = att @ v
        if self.fail_after_attention:
            raise ValueError("failing on purpose")
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class NanoBlock(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.ln_1 = nn.LayerNorm(32)
        self.attn = CausalSelfAttention(**kw)
        self.ln_2 = nn.LayerNorm(32)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, n_layer=2, **kw):
        super().__init__()
        self.wte = nn.Embedding(97, 32)
        self.wpe = nn.Embedding(64, 32)
        self.blocks = nn.ModuleList(NanoBlock(**kw) for _ in range(n_layer))
        self.head = nn.Linear(32, 97)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def set_flash(self, flash: bool):
        for block in self.blocks:
            block.attn.flash = flash


def nano_reference(model, x):
    model.set_flash(False)
    try:
        with torch.no_grad():
            model(x)
        return [b.attn.att for b in model.blocks]
    finally:
        model.set_flash(True)


# --- modded-nanogpt: merged qkvo_w, QK RMS norm, rotary, flex_attention ---------------------------


class Rotary(nn.Module):
    """Rotates the two halves of each head's channels by position-dependent angles."""

    def __init__(self, head_dim: int, max_len: int):
        super().__init__()
        half = head_dim // 2
        freq = 1.0 / (1000.0 ** (torch.arange(half, dtype=torch.float32) / half))
        angle = torch.outer(torch.arange(max_len, dtype=torch.float32), freq)
        self.register_buffer("cos", angle.cos(), persistent=False)
        self.register_buffer("sin", angle.sin(), persistent=False)

    def forward(self, x):  # (B, T, H, D)
        cos = self.cos[None, : x.size(-3), None, :]
        sin = self.sin[None, : x.size(-3), None, :]
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


class MergedAttention(nn.Module):
    def __init__(self, dim=32, num_heads=4, max_len=64):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkvo_w = nn.Parameter(torch.randn(4, dim, dim) / math.sqrt(dim))
        self.rotary = Rotary(self.head_dim, max_len)
        self.attn_scale = 0.12

    def forward(self, x, block_mask):
        from torch.nn.attention.flex_attention import flex_attention

        B, T = x.shape[:2]
        q, k, v = (
            F.linear(x, self.qkvo_w[:3].flatten(end_dim=1))
            .view(B, T, 3 * self.num_heads, self.head_dim)
            .chunk(3, dim=-2)
        )
        q = F.rms_norm(q, (q.size(-1),))
        k = F.rms_norm(k, (k.size(-1),))
        q, k = self.rotary(q), self.rotary(k)
        y = flex_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            block_mask=block_mask, scale=self.attn_scale,
        )
        return F.linear(y.transpose(1, 2).reshape(B, T, -1), self.qkvo_w[3])


class MergedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(MergedAttention() for _ in range(2))

    def forward(self, x, block_mask):
        for layer in self.layers:
            x = x + layer(x, block_mask)
        return x


# --- nn.TransformerEncoderLayer -------------------------------------------------------------------


class EncoderStack(nn.Module):
    def __init__(self, norm_first: bool, batch_first: bool = True, dropout: float = 0.1):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(32, 4, 64, dropout=dropout, batch_first=batch_first,
                                       norm_first=norm_first)
            for _ in range(2)
        )

    def forward(self, x, padding=None):
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=padding)
        return x


# --- attention no kernel call reveals -------------------------------------------------------------


class ExpAttention(nn.Module):
    """Attention normalised by hand (exp / sum): no kernel call that can be intercepted."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.wq, self.wk, self.wv = (nn.Linear(dim, dim) for _ in range(3))
        self.weights = None

    def scores(self, x):
        B, T, C = x.shape
        q = self.wq(x).view(B, T, self.heads, -1).transpose(1, 2)
        k = self.wk(x).view(B, T, self.heads, -1).transpose(1, 2)
        return q, k, (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))

    def forward(self, x):
        B, T, C = x.shape
        _, _, s = self.scores(x)
        e = torch.exp(s - s.amax(-1, keepdim=True))
        self.weights = (e / e.sum(-1, keepdim=True)).detach()
        v = self.wv(x).view(B, T, self.heads, -1).transpose(1, 2)
        return (self.weights @ v).transpose(1, 2).reshape(B, T, C)


def exp_adapter(module, args, kwargs, *, batch_rows, crop):
    q, k, _ = module.scores(args[0])
    return attention_probabilities(q, k, batch_rows=batch_rows, crop=crop)
