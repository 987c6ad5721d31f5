"""A tiny decoder-only transformer (GPT) for byte-level language modelling.

Used as the default teacher and student of ``divergent distill-lm`` and as the
policy of the RL trainers: small enough to train on two CPU cores in minutes,
built from a config so nothing is downloaded.

Architecture: token + learned position embeddings, ``n_layers`` pre-norm blocks
(causal multi-head self-attention, GELU MLP with 4x width), a final LayerNorm
and an untied output layer ``lm_head`` (``nn.Linear(d_model, vocab_size,
bias=False)``). The hidden state returned with ``return_hidden=True`` is the
input of ``lm_head`` (after the final LayerNorm), so that
``logits == hidden @ lm_head.weight.T``; that is what
:class:`divergent.losses.linear.LinearDistillationLoss` consumes.

>>> import torch
>>> model = TinyGPT(GPTConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=2, max_seq_len=8))
>>> hidden, logits = model(torch.zeros(2, 5, dtype=torch.long), return_hidden=True)
>>> tuple(hidden.shape), tuple(logits.shape)
((2, 5, 32), (2, 5, 16))
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["GPTConfig", "TinyGPT"]

_CONFIG_FILE = "config.json"
_WEIGHTS_FILE = "model.safetensors"


@dataclass
class GPTConfig:
    """Shape of a :class:`TinyGPT`.

    vocab_size: number of token ids (256 for raw bytes).
    d_model: width of the residual stream; must be divisible by ``n_heads``.
    n_layers: number of transformer blocks.
    n_heads: attention heads per block.
    max_seq_len: longest sequence the learned position embedding covers.
    dropout: dropout probability on attention and residual branches (0 = off).
    """

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    max_seq_len: int = 256
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for field in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{field} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"GPTConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")


class _CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=-1)
        # [B, T, H*D] -> [B, H, T, D]
        q, k, v = (t.view(batch, seq, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        attended = attended.transpose(1, 2).reshape(batch, seq, width)
        return self.resid_dropout(self.proj(attended))


class _Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(config.d_model)
        self.attn = _CausalSelfAttention(config)
        self.ln_mlp = nn.LayerNorm(config.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(config.d_model, 4 * config.d_model),
            nn.GELU(),
            nn.Linear(4 * config.d_model, config.d_model),
            nn.Dropout(config.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x))
        return x + self.mlp(self.ln_mlp(x))


class TinyGPT(nn.Module):
    """Decoder-only transformer over ``config.vocab_size`` tokens.

    ``forward(input_ids)`` returns next-token logits ``[B, T, V]``; with
    ``return_hidden=True`` it returns ``(hidden [B, T, H], logits)`` where
    ``logits = hidden @ lm_head.weight.T``.
    """

    def __init__(self, config: GPTConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else GPTConfig()
        cfg = self.config
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.position_embedding = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layers))
        self.ln_final = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2 scaling: residual projections shrink with depth so the stream's
        # variance does not grow with the number of blocks.
        for block in self.blocks:
            for layer in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(layer.weight, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def num_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def _check_input_ids(self, input_ids: torch.Tensor) -> None:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must have shape [batch, seq], got shape {tuple(input_ids.shape)}"
            )
        if input_ids.shape[1] > self.config.max_seq_len:
            raise ValueError(
                f"input_ids has sequence length {input_ids.shape[1]}, more than "
                f"max_seq_len={self.config.max_seq_len}"
            )
        if input_ids.numel() and (
            int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size
        ):
            raise ValueError(
                f"input_ids must lie in [0, {self.config.vocab_size}), got values in "
                f"[{int(input_ids.min())}, {int(input_ids.max())}]"
            )

    @staticmethod
    def _check_right_padding(attention_mask: torch.Tensor, input_ids: torch.Tensor) -> None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask must be a tensor of the shape of input_ids {tuple(input_ids.shape)}, got "
                f"{tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__}"
            )
        mask = attention_mask.bool()
        # Right padding: once a row's mask is 0 it stays 0.
        if (mask[:, 1:] & ~mask[:, :-1]).any():
            raise ValueError(
                "attention_mask has padding before a real token (left padding); TinyGPT supports right "
                "padding only (pad at the end of each row)"
            )

    def forward(
        self,
        input_ids: torch.Tensor,
        return_hidden: bool = False,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Next-token logits ``[B, T, V]`` (and the final hidden state if asked).

        ``attention_mask`` (``[B, T]``, 1 = real token, 0 = padding) is accepted so that a
        TinyGPT is called like a Hugging Face model. Only right padding is supported: under
        the causal mask a real token never attends to the padding after it, so the mask
        changes nothing for real tokens. A mask with padding before a real token (left
        padding) raises, since positions would then be shifted.
        """
        self._check_input_ids(input_ids)
        if attention_mask is not None:
            self._check_right_padding(attention_mask, input_ids)
        input_ids = input_ids.long()
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.dropout(self.token_embedding(input_ids) + self.position_embedding(positions))
        for block in self.blocks:
            x = block(x)
        hidden = self.ln_final(x)
        logits = self.lm_head(hidden)
        if return_hidden:
            return hidden, logits
        return logits

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to every row of ``input_ids``.

        Sampling draws from softmax(logits / temperature), restricted to the
        ``top_k`` most likely tokens when given; ``temperature == 0`` is greedy
        (argmax). Once a row emits ``eos_id`` every later position of that row
        is ``eos_id``. The context fed to the model is the last
        ``max_seq_len`` tokens. Returns ``[B, T + max_new_tokens]`` int64 ids.
        """
        self._check_input_ids(input_ids)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        if eos_id is not None and not 0 <= eos_id < self.config.vocab_size:
            raise ValueError(f"eos_id must lie in [0, {self.config.vocab_size}), got {eos_id!r}")
        was_training = self.training
        self.eval()
        ids = input_ids.long()
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        try:
            for _ in range(max_new_tokens):
                context = ids[:, -self.config.max_seq_len :]
                logits = self(context)[:, -1, :].float()
                if temperature == 0:
                    next_ids = logits.argmax(dim=-1)
                else:
                    logits = logits / temperature
                    if top_k is not None and top_k < logits.shape[-1]:
                        kth = logits.topk(top_k, dim=-1).values[:, -1:]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    probs = torch.softmax(logits, dim=-1)
                    next_ids = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                if eos_id is not None:
                    next_ids = torch.where(finished, torch.full_like(next_ids, eos_id), next_ids)
                    finished |= next_ids == eos_id
                ids = torch.cat([ids, next_ids[:, None]], dim=1)
                if eos_id is not None and bool(finished.all()):
                    remaining = input_ids.shape[1] + max_new_tokens - ids.shape[1]
                    if remaining:
                        pad = torch.full(
                            (ids.shape[0], remaining), eos_id, dtype=ids.dtype, device=ids.device
                        )
                        ids = torch.cat([ids, pad], dim=1)
                    break
        finally:
            self.train(was_training)
        return ids

    def save_pretrained(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory``.

        ``state_dict``: the weights to write instead of this module's own (e.g. the full state
        gathered from FSDP shards), as Hugging Face's ``save_pretrained`` takes it.
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / _CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2))
        source = self.state_dict() if state_dict is None else state_dict
        state = {k: v.detach().contiguous().cpu() for k, v in source.items()}
        save_file(state, str(directory / _WEIGHTS_FILE))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str = "cpu") -> TinyGPT:
        """Load a model written by :meth:`save_pretrained`."""
        from safetensors.torch import load_file

        directory = Path(directory)
        config_path, weights_path = directory / _CONFIG_FILE, directory / _WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"TinyGPT.from_pretrained: expected {path.name} in {directory}, not found "
                    "(write one with TinyGPT.save_pretrained)"
                )
        try:
            config = GPTConfig(**json.loads(config_path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
            raise ValueError(f"TinyGPT.from_pretrained: {config_path} is not a TinyGPT config ({exc})") from None
        model = cls(config)
        try:
            state = load_file(str(weights_path), device=map_location)
        except Exception as exc:  # safetensors raises its own error types on damaged files
            raise ValueError(f"TinyGPT.from_pretrained: cannot read {weights_path} (damaged or not safetensors: "
                             f"{str(exc).splitlines()[0][:200]})") from None
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"TinyGPT.from_pretrained: {weights_path} does not match {config_path} "
                             f"({str(exc).splitlines()[0][:200]})") from None
        return model.to(map_location)
