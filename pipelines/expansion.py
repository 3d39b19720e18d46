"""``expand_prompt``: extend the prompt with a small causal LM, sampled with the request's seed."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .loading import frozen
from .specs import ExpansionSpec


def clean(text: str) -> str:
    """One line, single spaces, no dangling separators."""
    text = text.splitlines()[0] if text.strip() else ""
    return re.sub(r"\s+", " ", text).strip(" ,.\t")


class PromptExpander:
    def __init__(self, folder: Path, spec: ExpansionSpec, device: torch.device) -> None:
        self.spec = spec
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = frozen(AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True), device)

    @torch.no_grad()
    def expand(self, prompt: str, seed: int) -> str:
        """The prompt followed by the model's continuation; the same prompt and seed give the same text."""
        base = clean(prompt)
        inputs = self.tokenizer(base + ",", return_tensors="pt").to(self.device)
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed % 2**32)
            out = self.model.generate(
                **inputs,
                do_sample=True,
                top_k=self.spec.top_k,
                max_new_tokens=self.spec.max_new_tokens,
                pad_token_id=self.tokenizer.eos_token_id,
            )
        continuation = clean(self.tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True))
        return f"{base}, {continuation}" if continuation else base
