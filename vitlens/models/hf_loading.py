"""``vl.load_model("hf:<repo id or local dir>")``: Hugging Face ``transformers`` models.

Weights and config come through ``from_pretrained``, class names from the
config's ``id2label`` and preprocessing from the model's own image processor
(``AutoImageProcessor``), never from constants written here. ``transformers``
is an optional extra (``pip install "vitlens[hf]"``): nothing here imports it
before a ``hf:`` name is loaded.

Offline, a repository that is not in the local Hugging Face cache fails at once
with a :class:`~vitlens.errors.ModelLoadError` that says how to pass a local
directory: the cache is tried first with ``local_files_only=True``, and the hub
is contacted only when one connection to it (or to the configured proxy)
succeeds, so no minute of download retries is spent on a machine without a
network.

Nothing is silent: a configuration asking for absurd sizes (thousands of layers)
is refused before anything is built, weights missing from the directory are
named — an error for the backbone's (transformers would fill them with random
values and only log it), a :class:`~vitlens.errors.RandomWeightsWarning` for a
classifier head or pooler.
"""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from torch import nn

from ..errors import ModelLoadError, RandomWeightsWarning

#: Prefix of model names loaded through ``transformers``.
HF_PREFIX = "hf:"

#: How to install the optional dependency, quoted in every error that needs it.
HF_EXTRA = 'pip install "vitlens[hf]"'


def require_transformers(what: str = "Hugging Face models") -> Any:
    """The ``transformers`` module, or a :class:`ModelLoadError` naming the extra.

    Examples
    --------
    >>> require_transformers().__name__
    'transformers'
    """
    try:
        import transformers
    except ImportError as exc:
        raise ModelLoadError(
            f"{what} need the optional dependency 'transformers', which is not installed. "
            f"Install it with: {HF_EXTRA}"
        ) from exc
    return transformers


def is_hf_name(name: str) -> bool:
    """Whether ``name`` asks for a ``transformers`` model (``"hf:..."``).

    Examples
    --------
    >>> is_hf_name("hf:google/vit-base-patch16-224"), is_hf_name("vit_tiny_patch16_224")
    (True, False)
    """
    return isinstance(name, str) and name.startswith(HF_PREFIX)


def _offline() -> bool:
    flags = (os.environ.get(v, "") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f.strip().upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the hub endpoint (or the HTTPS proxy): no retries.

    Returns False at once in offline mode (``HF_HUB_OFFLINE=1``).
    """
    if _offline():
        return False
    proxy = next((os.environ[v] for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
                  if os.environ.get(v)), None)
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = urlparse(proxy if proxy else endpoint)
    if not url.hostname:
        return False
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _not_available(repo: str, reason: str) -> ModelLoadError:
    return ModelLoadError(
        f"cannot load {repo!r} from the Hugging Face hub: {reason}. Without a network, download it "
        "elsewhere (e.g. `huggingface-cli download REPO --local-dir DIR`, or "
        "model.save_pretrained(DIR) together with its image processor's save_pretrained(DIR)), "
        "copy the directory here and pass it: vl.load_model('hf:/path/to/DIR')."
    )


#: the most layers (all stages, each tower) a configuration may ask for: ten times the deepest published ViT
MAX_LAYERS = 1000
#: the widest hidden / MLP size, and the largest input side, a configuration may ask for
MAX_WIDTH = 100_000
MAX_IMAGE_SIZE = 16_384


def _config_sizes(config: dict, where: str = "") -> Iterator[tuple[str, str, int]]:
    """``(kind, key, value)`` of every size in a configuration dict and its nested configs."""
    for key, value in config.items():
        path = f"{where}{key}"
        if isinstance(value, dict):
            yield from _config_sizes(value, path + ".")
        elif key in ("num_hidden_layers", "num_layers") and isinstance(value, int):
            yield "layers", path, value
        elif key == "depths" and isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
            yield "layers", path, sum(value)
        elif key in ("hidden_size", "intermediate_size", "embed_dim") and isinstance(value, int):
            yield "width", path, value
        elif key == "image_size":
            sides = value if isinstance(value, (list, tuple)) else [value]
            if all(isinstance(v, int) for v in sides):
                yield "image", path, max(sides, default=0)


def check_config_sizes(config: Any, source: str) -> None:
    """Refuse a configuration whose sizes no vision transformer has, before building it.

    Examples
    --------
    >>> import transformers
    >>> check_config_sizes(transformers.ViTConfig(num_hidden_layers=20_000), "cfg")
    Traceback (most recent call last):
    ...
    vitlens.errors.ModelLoadError: cfg: its config asks for 20000 layers (num_hidden_layers); vitlens refuses more than 1000 before building the model (the deepest published vision transformers have fewer than 100): check config.json.
    """
    limits = {"layers": (MAX_LAYERS, "layers", "the deepest published vision transformers have fewer than 100"),
              "width": (MAX_WIDTH, "features per token", "the widest published ones have about 25,000"),
              "image": (MAX_IMAGE_SIZE, "pixels per side", "pretrained ones take at most a few thousand")}
    for kind, key, value in _config_sizes(config.to_dict()):
        limit, unit, why = limits[kind]
        if value > limit:
            raise ModelLoadError(
                f"{source}: its config asks for {value} {unit} ({key}); vitlens refuses more than {limit} before "
                f"building the model ({why}): check config.json."
            )


def check_loaded_weights(model: nn.Module, info: dict, source: str, new_head: bool) -> None:
    """Name the tensors ``from_pretrained`` could not find (``info``: its loading info).

    A missing backbone tensor is a :class:`ModelLoadError`: transformers would have
    filled it with random values. A missing classifier head or pooler is a
    :class:`RandomWeightsWarning`, unless a new head was asked for (``new_head``).
    """
    missing = sorted(info.get("missing_keys") or ())
    if not missing:
        return
    prefix = getattr(model, "base_model_prefix", "") or ""
    body = getattr(model, prefix, None) if prefix else None
    split = isinstance(body, nn.Module) and body is not model  # a classifier: its body, then its head

    def in_head(key: str) -> bool:
        return (split and not key.startswith(prefix + ".")) or ".pooler." in f".{key}"

    def listed(keys: list[str]) -> str:
        return ", ".join(keys[:10]) + (f" and {len(keys) - 10} more" if len(keys) > 10 else "")

    backbone = [k for k in missing if not in_head(k)]
    if backbone:
        raise ModelLoadError(
            f"{source}: {len(backbone)} of the {type(model).__name__}'s tensors are missing from its weights "
            f"({listed(backbone)}); transformers would fill them with random values, and the maps would explain "
            "an untrained network. Save the whole model (model.save_pretrained(DIR)) or pass the directory that "
            "holds its weights."
        )
    if not new_head:
        warnings.warn(
            f"vl.load_model({HF_PREFIX + source!r}): {listed(missing)} are not in the saved weights, so transformers "
            "gave them RANDOM values: the logits read out through them explain nothing. Load the directory that "
            "holds them, or pass num_classes=N to say a new, untrained head is intended.",
            RandomWeightsWarning, stacklevel=4,
        )


def _model_class(transformers: Any, config: Any) -> Any:
    """The class named in the config's ``architectures``, else the image-classification auto class."""
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING

    if type(config) in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING:
        return transformers.AutoModelForImageClassification
    return transformers.AutoModel


def load_hf_model(source: str, *, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """Load a ``transformers`` model and its preprocessing, in eval mode, on the CPU.

    Parameters
    ----------
    source
        ``"hf:<repo id>"`` (from the hub, or the local cache) or ``"hf:<directory>"``
        holding what ``save_pretrained`` wrote (``config.json``, the weights and
        ``preprocessor_config.json``).
    num_classes
        Replace the classifier head by one with this many (new, untrained) outputs.
    **kwargs
        Passed to ``from_pretrained`` (e.g. ``attn_implementation="sdpa"``, ``revision=``).

    The model gets ``vitlens_name``, ``vitlens_class_names`` (from ``id2label``),
    ``vitlens_image_processor`` and, when one was saved with it,
    ``vitlens_text_processor`` (for CLIP/SigLIP prompts).

    Examples
    --------
    >>> import tempfile, transformers
    >>> cfg = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
    ...                              intermediate_size=32, image_size=16, patch_size=8,
    ...                              id2label={0: "cat", 1: "dog"})
    >>> d = tempfile.mkdtemp()
    >>> transformers.ViTForImageClassification(cfg).save_pretrained(d)
    >>> _ = transformers.ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(d)
    >>> model = load_hf_model("hf:" + d)
    >>> model.vitlens_class_names
    ['cat', 'dog']
    """
    transformers = require_transformers()
    repo = source[len(HF_PREFIX):] if is_hf_name(source) else source
    if not repo.strip():
        raise ModelLoadError("'hf:' needs a repository id or a directory, e.g. 'hf:google/vit-base-patch16-224'.")
    path = Path(repo).expanduser()
    local_dir = path.is_dir()
    if local_dir:
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{str(path)!r} has no config.json: pass a directory written by "
                "model.save_pretrained(DIR) (with the image processor's save_pretrained(DIR))."
            )
        where, local_only = str(path), True
    elif path.is_absolute() or repo.startswith((".", "~")) or repo.count("/") > 1:
        raise ModelLoadError(f"{repo!r} is not a directory (nor a hub id 'owner/name').")
    else:
        where, local_only = repo, True
        try:  # the local cache first: never touches the network
            transformers.AutoConfig.from_pretrained(where, local_files_only=True)
        except (OSError, ValueError):
            if not hub_reachable():
                why = "offline mode (HF_HUB_OFFLINE)" if _offline() else "the hub cannot be reached"
                raise _not_available(repo, f"it is not in the local cache and {why}") from None
            local_only = False

    try:
        config = transformers.AutoConfig.from_pretrained(where, local_files_only=local_only)
        check_config_sizes(config, repo)
        cls = _model_class(transformers, config)
        options = dict(kwargs)
        if num_classes is not None:
            options.update(num_labels=int(num_classes), ignore_mismatched_sizes=True)
        model, info = cls.from_pretrained(where, local_files_only=local_only, output_loading_info=True, **options)
        check_loaded_weights(model, info, repo, new_head=num_classes is not None)
    except ModelLoadError:
        raise
    except Exception as exc:  # hub, format and state-dict errors come in many types
        if not local_dir:
            raise _not_available(repo, f"{type(exc).__name__}: {exc}") from exc
        raise ModelLoadError(f"transformers could not load {str(path)!r}: {type(exc).__name__}: {exc}") from exc

    try:
        image_processor = transformers.AutoImageProcessor.from_pretrained(where, local_files_only=local_only)
    except Exception as exc:
        raise ModelLoadError(
            f"{repo!r} has no image processor config (preprocessor_config.json), which vitlens "
            "needs for resizing and normalisation; save it beside the weights: "
            "AutoImageProcessor.from_pretrained(...).save_pretrained(DIR)."
        ) from exc
    model.vitlens_image_processor = image_processor
    text = _text_processor(transformers, where, local_only)
    if text is not None:
        model.vitlens_text_processor = text
    model.vitlens_name = f"{HF_PREFIX}{repo}"
    id2label = getattr(model.config, "id2label", None) or {}
    num_labels = int(getattr(model.config, "num_labels", 0) or 0)
    if id2label and len(id2label) == num_labels:
        model.vitlens_class_names = [str(id2label[i]) for i in range(num_labels)]
    return model.eval()


def _text_processor(transformers: Any, where: str, local_only: bool) -> Any | None:
    """The tokenizer saved with an image–text model, if any (CLIP, SigLIP)."""
    try:
        return transformers.AutoTokenizer.from_pretrained(where, local_files_only=local_only)
    except Exception:  # vision-only models have none
        return None
