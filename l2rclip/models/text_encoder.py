"""Encoding prompt embeddings with CLIP's frozen text transformer, truncated at EOT.

The prompt for rank k is `[SOT] R_k . [EOT]` as word embeddings (not token ids), so open_clip's
`encode_text` (which starts from ids) cannot be used directly; this module reproduces its steps
from the embedding onwards: add positional embeddings, run the transformer with the causal mask,
final LayerNorm, take the EOT position, project.

Truncation: the text transformer is causal, so tokens after EOT cannot influence the EOT output.
Running only the first EOT+1 positions (L + 3 instead of 77) gives the same prototypes at a
fraction of the cost. `truncate=False` pads to the full context length with the padding token's
embedding, exactly as CLIP would see a tokenised prompt; it exists as the reference the tests
and benchmarks compare against.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from open_clip import CLIP  # untyped package: `Any` to mypy


class PromptTextEncoder(nn.Module):
    """CLIP's text tower from word embeddings to L2-normalised prototypes; all weights frozen.

    Args:
        clip: an open_clip `CLIP` model (its text modules are shared, not copied).
        tokenizer: the architecture's tokenizer (for the SOT, ".", EOT and padding embeddings).
    """

    causal_mask: torch.Tensor  # buffers, registered in __init__
    sot_embedding: torch.Tensor
    suffix_embedding: torch.Tensor
    pad_embedding: torch.Tensor

    def __init__(self, clip: CLIP, tokenizer: Any):
        super().__init__()
        if getattr(clip, "text_pool_type", "argmax") != "argmax":
            raise ValueError(
                f"text pooling {clip.text_pool_type!r} is not supported: rank prompts need "
                "CLIP's EOT pooling ('argmax')"
            )
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.positional_embedding = clip.positional_embedding
        self.context_length = int(clip.positional_embedding.shape[0])
        self.register_buffer("causal_mask", clip.attn_mask.clone(), persistent=False)

        tokens = tokenizer(["."])[0]  # [SOT] . [EOT] pad...
        eot = int(tokens.argmax())
        weight = clip.token_embedding.weight.detach()
        with torch.no_grad():
            # Persistent, so a saved model needs no token-embedding table to rebuild its prompts.
            self.register_buffer("sot_embedding", weight[tokens[0]].clone())  # (D,)
            self.register_buffer("suffix_embedding", weight[tokens[1 : eot + 1]].clone())  # (2, D): ". [EOT]"
            self.register_buffer("pad_embedding", weight[tokens[eot + 1]].clone())  # (D,)
        for param in self.parameters():
            param.requires_grad_(False)

    def assemble(self, prompts: torch.Tensor, truncate: bool = True) -> tuple[torch.Tensor, int]:
        """Place the learnable block in the template `[SOT] R . [EOT] (pad...)`.

        Args:
            prompts: R, shape (M, L, D).
            truncate: stop right after EOT (True) or pad to the full context length.

        Returns:
            The embedded sequences (M, S, D) and the EOT position.
        """
        n_ranks, length, width = prompts.shape
        eot = length + 2
        if eot + 1 > self.context_length:
            raise ValueError(
                f"prompt of {length} learnable tokens + 3 fixed does not fit the text "
                f"context of {self.context_length} tokens; use fewer context/rank tokens"
            )
        sot = self.sot_embedding.to(prompts.dtype).expand(n_ranks, 1, width)  # (M, 1, D)
        suffix = self.suffix_embedding.to(prompts.dtype).expand(n_ranks, -1, -1)  # (M, 2, D)
        parts = [sot, prompts, suffix]
        if not truncate:
            pad = self.context_length - (eot + 1)
            parts.append(self.pad_embedding.to(prompts.dtype).expand(n_ranks, pad, width))  # (M, P, D)
        return torch.cat(parts, dim=1), eot  # (M, S, D)

    def forward(self, prompts: torch.Tensor, truncate: bool = True) -> torch.Tensor:
        """Prototypes t_k from prompt block R (M, L, D): (M, E), L2-normalised."""
        x, eot = self.assemble(prompts, truncate)  # (M, S, D)
        length = x.shape[1]
        cast = self.transformer.get_cast_dtype()
        x = x.to(cast) + self.positional_embedding[:length].to(cast)
        x = self.transformer(x, attn_mask=self.causal_mask[:length, :length])
        x = self.ln_final(x[:, eot])  # (M, D): only the EOT position is needed
        if isinstance(self.text_projection, nn.Linear):
            x = self.text_projection(x)
        elif self.text_projection is not None:
            x = x @ self.text_projection  # (M, E)
        return F.normalize(x.float(), dim=-1)
