"""An LRU cache of text-encoder outputs, so a repeated prompt skips both CLIP encoders.

Servers see the same prompts again and again (a product UI's fixed prompts, retries, one prompt
with many seeds). SDXL's text encoding is deterministic and pads every prompt to 77 tokens, so a
prompt's embedding does not depend on what else is in the batch: it can be computed once and reused.
Entries are keyed by the text encoders they came from; requests with a textual-inversion embedding
bypass the cache (their tokens mean something else). One entry is ~0.3 MB in bf16 (77 x 2048 plus the
pooled 1280), so the default 512 entries hold ~160 MB of GPU memory at most.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

import torch

Encode = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]


class PromptCache:
    """``encode(key, prompts, encode_fn)``: the embeddings of ``prompts``, encoding only the ones not cached."""

    def __init__(self, capacity: int = 512) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[tuple[Hashable, str], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def encode(self, key: Hashable, prompts: Sequence[str], encode_fn: Encode) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt and pooled embeddings, one row per prompt, as ``encode_fn(prompts)`` would give them.

        The prompts missing from the cache are encoded in one call (each distinct prompt once).
        """
        if self.capacity == 0:
            self.misses += len(prompts)
            return encode_fn(list(prompts))
        with self._lock:
            found = {p: self._entries.get((key, p)) for p in dict.fromkeys(prompts)}
            for p, entry in found.items():
                if entry is not None:
                    self._entries.move_to_end((key, p))
        missing = [p for p, entry in found.items() if entry is None]
        if missing:
            embeds, pooled = encode_fn(missing)
            with self._lock:
                for i, p in enumerate(missing):
                    # Own copies (a slice would keep the whole batch's tensor alive), detached: an entry must
                    # never hold an autograd graph, whatever mode the caller encoded in.
                    entry = (embeds[i].detach().clone(), pooled[i].detach().clone())
                    found[p] = entry
                    self._entries[(key, p)] = entry
                while len(self._entries) > self.capacity:
                    self._entries.popitem(last=False)
        self.misses += len(missing)  # encoded now; every other row (repeats included) came from the cache
        self.hits += len(prompts) - len(missing)
        rows = [found[p] for p in prompts]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
