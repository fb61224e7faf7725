"""Text prompts as classes: ``vl.capture(clip_model, images, text=[...])``.

For image–text models (CLIP) the logits of a capture are the similarities of
each image with each prompt, one column per prompt, and the class names are
the prompts; ``target`` picks a prompt by index or by its text. Prompts are
strings, tokenised by the model's own processor (the one ``vl.load_model``
found beside the weights, or ``processor=``), or ready ``input_ids`` (a
LongTensor, one row per prompt). The adapter computes the text embeddings
(:meth:`bind_text`); this module only turns what the user passed into ids.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import OptionError
from ..models.adapter import Adapter


def _tokenizer(model: Any, processor: Any, required: bool) -> Any | None:
    if processor is not None:
        return processor
    tok = getattr(model, "vitlens_text_processor", None)
    if tok is not None:
        return tok
    source = getattr(getattr(model, "config", None), "_name_or_path", "")
    if source:
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(source, local_files_only=True)
        except Exception:  # not saved with the model: say what to do below
            pass
    if required:
        raise OptionError(
            f"no tokenizer found for {type(model).__name__}: pass the model's processor, e.g. "
            "vl.capture(model, images, text=prompts, processor=AutoProcessor.from_pretrained(...)), "
            "or token ids as a LongTensor (one row per prompt)."
        )
    return None


def tokenize(model: Any, text: Any, processor: Any = None) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """``(input_ids, attention_mask, prompts)`` for ``text`` (strings or a LongTensor of ids).

    Examples
    --------
    >>> import torch
    >>> ids, mask, prompts = tokenize(None, torch.tensor([[1, 5, 2], [1, 7, 2]]))
    >>> ids.shape, mask, prompts
    (torch.Size([2, 3]), None, ['prompt 0', 'prompt 1'])
    """
    if isinstance(text, torch.Tensor):
        if text.dtype not in (torch.int64, torch.int32) or text.ndim != 2 or text.shape[0] == 0:
            raise OptionError(
                f"text= as a tensor takes token ids: a LongTensor (prompts, tokens); got {text.dtype} "
                f"of shape {tuple(text.shape)}."
            )
        tok = _tokenizer(model, processor, required=False) if model is not None else None
        prompts = [f"prompt {i}" for i in range(text.shape[0])]
        if tok is not None and hasattr(tok, "batch_decode"):
            decoded = [p.strip() for p in tok.batch_decode(text.tolist(), skip_special_tokens=True)]
            if all(decoded) and len(set(decoded)) == len(decoded):
                prompts = decoded
        return text.long(), None, prompts
    prompts = [text] if isinstance(text, str) else list(text)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise OptionError("text= takes one or more non-empty prompt strings (or a LongTensor of token ids).")
    if len(set(prompts)) != len(prompts):
        raise OptionError(f"text= has repeated prompts {prompts}: each prompt is one class; pass each once.")
    tok = _tokenizer(model, processor, required=True)
    enc = tok(text=prompts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc.get("attention_mask"), prompts


def bind_text(adapter: Adapter, text: Any, processor: Any = None) -> Adapter:
    """The adapter with ``text`` as its classes; unchanged when no text is given."""
    if text is None:
        if processor is not None:
            raise OptionError("processor= tokenises the text= prompts; pass text=[...] too.")
        return adapter
    if not hasattr(adapter, "bind_text"):
        raise OptionError(
            f"text= is for image-text models (CLIP); {type(adapter.model).__name__} has class logits: "
            "choose a class with target= instead."
        )
    ids, mask, prompts = tokenize(adapter.model, text, processor)
    return adapter.bind_text(ids, mask, prompts)
