"""Text prompts as classes, and the processor a capture is given: ``vl.capture(model, images, text=, processor=)``.

For image–text models (CLIP) the logits of a capture are the similarities of
each image with each prompt, one column per prompt, and the class names are
the prompts; ``target`` picks a prompt by index or by its text. Prompts are
strings, tokenised by the model's own processor (the one ``vl.load_model``
found beside the weights, or ``processor=``), or ready ``input_ids`` (a
LongTensor, one row per prompt). The adapter computes the text embeddings
(:meth:`bind_text`); this module only turns what the user passed into ids, and
refuses prompts the tokenizer cannot tell apart (identical ids would give every
prompt the same logits and maps).

``processor=`` is what the user has from ``transformers``: an image processor
(it preprocesses the pictures), a tokenizer (it tokenises the prompts), or a
multimodal processor holding both (``CLIPProcessor``, ``AutoProcessor``):
:func:`bind_inputs` gives each part to what uses it.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import OptionError
from ..models.adapter import Adapter

#: base classes of transformers' image processors (by name: transformers is never imported here)
_IMAGE_PROCESSORS = ("ImageProcessingMixin", "BaseImageProcessor", "BaseImageProcessorFast")


def split_processor(processor: Any) -> tuple[Any | None, Any | None]:
    """``(image processor, tokenizer)`` of a ``processor=``: either, or both for a multimodal processor.

    Examples
    --------
    >>> import transformers
    >>> split_processor(transformers.ViTImageProcessor())[1] is None
    True
    >>> split_processor(None)
    (None, None)
    """
    if processor is None:
        return None, None
    images, tokenizer = getattr(processor, "image_processor", None), getattr(processor, "tokenizer", None)
    if images is not None or tokenizer is not None:  # CLIPProcessor, SiglipProcessor, AutoProcessor...
        return images, tokenizer
    if any(c.__name__ in _IMAGE_PROCESSORS for c in type(processor).__mro__):
        return processor, None
    return None, processor  # a tokenizer: anything that turns text=[...] into input_ids


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
        _check_distinct(text, [f"prompt {i}" for i in range(text.shape[0])], None)
        tok = _tokenizer(model, processor, required=False) if model is not None else None
        prompts = [f"prompt {i}" for i in range(text.shape[0])]
        if tok is not None and hasattr(tok, "batch_decode"):
            try:
                decoded = [p.strip() for p in tok.batch_decode(text.tolist(), skip_special_tokens=True)]
            except (OverflowError, IndexError, KeyError, TypeError, ValueError):  # ids it cannot decode:
                decoded = []  # check_token_ids names them
            if decoded and all(decoded) and len(set(decoded)) == len(decoded):
                prompts = decoded
        return text.long(), None, prompts
    prompts = [text] if isinstance(text, str) else list(text)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise OptionError("text= takes one or more non-empty prompt strings (or a LongTensor of token ids).")
    if len(set(prompts)) != len(prompts):
        raise OptionError(f"text= has repeated prompts {prompts}: each prompt is one class; pass each once.")
    tok = _tokenizer(model, processor, required=True)
    enc = tok(text=prompts, padding=True, return_tensors="pt")
    _check_distinct(enc["input_ids"], prompts, tok)
    return enc["input_ids"], enc.get("attention_mask"), prompts


def _check_distinct(ids: torch.Tensor, prompts: list[str], tokenizer: Any) -> None:
    """Refuse prompts that became the same token ids: they would be one class under several names."""
    seen: dict[tuple[int, ...], str] = {}
    for prompt, row in zip(prompts, ids.tolist(), strict=True):
        if tuple(row) in seen:
            first = seen[tuple(row)]
            if tokenizer is None:
                raise OptionError(f"text= has the same token ids in two rows ({first!r} and {prompt!r}): each row is "
                                  "one class; pass each prompt once.")
            source = getattr(tokenizer, "name_or_path", "") or "(not saved)"
            raise OptionError(
                f"the tokenizer {type(tokenizer).__name__} from {source} gives the prompts {first!r} and {prompt!r} "
                f"the same token ids {list(row)}: their logits and maps would be identical. It probably has no "
                "vocabulary (e.g. built offline without its files): save the model's real tokenizer beside the "
                "weights, pass it with processor=, or pass token ids as a LongTensor."
            )
        seen[tuple(row)] = prompt


def bind_text(adapter: Adapter, text: Any, tokenizer: Any = None) -> Adapter:
    """The adapter with ``text`` as its classes; unchanged when no text is given."""
    if text is None:
        return adapter
    if not hasattr(adapter, "bind_text"):
        raise OptionError(
            f"text= is for image-text models (CLIP); {type(adapter.model).__name__} has class logits: "
            "choose a class with target= instead."
        )
    ids, mask, prompts = tokenize(adapter.model, text, tokenizer)
    check_token_ids(adapter.model, ids, prompts, mask)
    return adapter.bind_text(ids, mask, prompts)


def bind_inputs(adapter: Adapter, text: Any = None, processor: Any = None) -> Adapter:
    """The adapter with ``processor``'s image part preprocessing and ``text`` as its classes (tokenised by
    ``processor``'s tokenizer, else the model's own); see the module docstring.

    Examples
    --------
    >>> import torch, transformers, vitlens as vl
    >>> cfg = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
    ...                              intermediate_size=32, image_size=16, patch_size=8, num_labels=2)
    >>> adapter = vl.models.adapter_for(transformers.ViTForImageClassification(cfg))
    >>> processor = transformers.ViTImageProcessor(size={"height": 16, "width": 16})
    >>> bind_inputs(adapter, processor=processor).image_processor() is processor
    True
    """
    images, tokenizer = split_processor(processor)
    if images is not None:
        if not hasattr(adapter, "with_image_processor"):
            raise OptionError(
                f"processor= takes a Hugging Face image processor for transformers models; "
                f"{type(adapter.model).__name__} preprocesses with timm's data config: pass no processor."
            )
        adapter = adapter.with_image_processor(images)
    elif tokenizer is not None and text is None:
        raise OptionError("processor= got a tokenizer, which tokenises the text= prompts: pass text=[...] too, or "
                          "an image processor to preprocess the pictures.")
    return bind_text(adapter, text, tokenizer)


def check_token_ids(model: Any, ids: torch.Tensor, prompts: list[str], mask: torch.Tensor | None = None) -> None:
    """Refuse token ids the text encoder cannot take: too many tokens, or ids outside its vocabulary.

    Examples
    --------
    >>> import torch, types
    >>> model = types.SimpleNamespace(config=types.SimpleNamespace(
    ...     text_config=types.SimpleNamespace(vocab_size=10, max_position_embeddings=4)))
    >>> check_token_ids(model, torch.tensor([[0, 3, 9]]), ["p"])
    >>> check_token_ids(model, torch.tensor([[0, 3, 10]]), ["p"])
    Traceback (most recent call last):
    ...
    vitlens.errors.OptionError: text=: prompt 0 ('p') holds token id 10, outside the text encoder's vocabulary (0..9); pass ids made by this model's tokenizer, or the prompts as strings.
    """
    config = getattr(getattr(model, "config", None), "text_config", None)
    limit = getattr(config, "max_position_embeddings", None)
    vocab = getattr(config, "vocab_size", None)
    for i, row in enumerate(ids):
        name = f"prompt {i}"
        if i < len(prompts) and prompts[i] != name:  # not tokenize's placeholder for undecodable ids
            name += f" ({prompts[i][:60]!r})"
        length = int(mask[i].sum()) if mask is not None else int(row.numel())
        if isinstance(limit, int) and row.numel() > limit and (length > limit or mask is None):
            raise OptionError(
                f"text=: {name} is {length} tokens long; the model's text encoder takes at most {limit}. "
                "Shorten the prompt."
            )
        if isinstance(vocab, int) and row.numel() and (int(row.min()) < 0 or int(row.max()) >= vocab):
            bad = int(row.min()) if int(row.min()) < 0 else int(row.max())
            raise OptionError(
                f"text=: {name} holds token id {bad}, outside the text encoder's vocabulary (0..{vocab - 1}); "
                "pass ids made by this model's tokenizer, or the prompts as strings."
            )
