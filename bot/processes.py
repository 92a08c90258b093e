"""Sharing one machine: batch work yields to the bot that serves people.

Design
------
A small server runs ``rapport discord`` (or ``chat``) and, beside it, the work that
retrains the bot: ``train``, ``retrain``, ``score``, ``eval``, ``simulate``,
``reward-model train``, the gate of ``deploy``. Left alone, each torch process starts one
OpenMP thread per core, and OpenMP threads spin while they wait for work: two such
processes on two cores spend much of their time spinning against each other (issue 18
measured a chat at 19% of its speed beside one training, and 8x the CPU for the same
self-play with several processes at once).

So every command is one of two kinds, decided by its name alone: *serving* (``chat``,
``discord``) and *batch* (every other command). Before any heavy import, the ``rapport``
entry point applies the ``[processes]`` settings of its kind (:func:`apply`):

- ``OMP_WAIT_POLICY=PASSIVE`` (batch work; serving too if configured): an idle OpenMP
  thread sleeps instead of spinning. libgomp reads the variable once, when it loads with
  torch, so it is set in the environment first; a value the user set is kept. The bot
  keeps libgomp's default, a short spin: a token is ~200 small matmuls, and waking a
  sleeping thread for each may cost more than the matmul (not measured idle yet: the
  bench's ``new, bot passive`` row measures it).
- The torch thread count (``OMP_NUM_THREADS``, which torch reads when it starts its thread
  pool), when the config names one; 0 keeps torch's default (one per core) and any
  ``OMP_NUM_THREADS`` the user set.
- For batch work, a niceness (``os.setpriority``): the kernel then gives the cores to the
  serving process whenever it wants them, and to the batch work when the bot is idle.
  On Linux a niceness belongs to a thread, and a new thread inherits its starter's: so it
  is set on every thread there is (imports have started a few) before torch starts its
  pool. It is only ever raised (a ``nice -n 19 rapport train`` stays at 19), never
  lowered.

- For batch work, glibc's malloc keeps the memory it frees (:func:`keep_freed_memory`):
  a training step allocates and frees buffers of tens of MB (the output layer's logits
  over a 49,152-token vocabulary); by default glibc hands each back to the kernel (an
  ``munmap``, or a trim of the heap's top) and the next step faults it in again, page by
  page. Kept, the test suite's toy trainings (a 32-wide model: the buffers are most of
  the work) took 0.55-0.70x the time; SmolLM2-135M's steps, where the matmuls dominate,
  0.87-1.0x (bench/RESULTS.md).
  The cost: the process's RSS stays at its peak until it ends, which a batch command
  reaches anyway; the serving bot keeps glibc's defaults (the soak watches its RSS).

torch's inter-op pool is left at its default: rapport never calls ``torch.jit.fork``, the
only user of that pool, so its threads are never started. ``bench/colocation_bench.py``
measures these settings against torch's defaults.

This module imports nothing heavy: it runs before torch is imported.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

SERVING_COMMANDS = frozenset({"chat", "discord"})


@dataclass(frozen=True)
class ProcessSettings:
    """What :func:`apply` does to one process (``bot.config.ProcessesConfig`` picks it)."""

    nice: int  # the least niceness; 0 leaves the process's own
    threads: int  # torch intra-op threads; 0: torch's default
    passive_wait: bool
    keep_freed: bool = False  # glibc malloc keeps freed memory (keep_freed_memory)


def kind_of(command: str | None) -> str:
    """``"serving"`` for the commands that answer people, ``"batch"`` for the rest."""
    return "serving" if command in SERVING_COMMANDS else "batch"


def apply(settings: ProcessSettings, environ: dict[str, str] | None = None) -> None:
    """Set this process's wait policy, thread count and niceness (before torch loads)."""
    environ = os.environ if environ is None else environ
    if settings.passive_wait:
        environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if settings.threads:
        environ["OMP_NUM_THREADS"] = str(settings.threads)
        torch = sys.modules.get("torch")
        if torch is not None:  # loaded already (an in-process call): the variable is too late
            torch.set_num_threads(settings.threads)
    if settings.nice > os.getpriority(os.PRIO_PROCESS, 0):
        for thread in _threads():
            os.setpriority(os.PRIO_PROCESS, thread, settings.nice)
    if settings.keep_freed:
        keep_freed_memory()


# mallopt(3) parameters, and the values set: blocks up to 1 GiB come from the heap (not a
# fresh mmap each), and the heap's top is given back only past 2 GiB free, grown 256 MiB
# at a time. mallopt takes a C int, so 2 GiB - 1 is the most it can say.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
KEEP_FREED = ((M_MMAP_THRESHOLD, 1 << 30), (M_TRIM_THRESHOLD, (1 << 31) - 1), (M_TOP_PAD, 1 << 28))


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse (module doc); returns whether
    it took every setting. Elsewhere (macOS, musl) nothing changes. A user's own
    ``MALLOC_*_`` variables win: glibc read them at start, and they are left alone."""
    if any(name.startswith("MALLOC_") and name.endswith("_") for name in os.environ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in KEEP_FREED)


def _threads() -> list[int]:
    """This process's threads. On Linux a niceness belongs to one thread, and imports
    before the command (numpy's, jemalloc's) have started some; elsewhere (macOS) it
    belongs to the process, which ``0`` names."""
    try:
        return [int(task) for task in os.listdir("/proc/self/task")]
    except FileNotFoundError:
        return [0]


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere: then no bf16)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_bf16() -> bool:
    """Whether the CPU computes bf16 in hardware (AVX512-BF16 or AMX). Elsewhere oneDNN
    and OpenVINO still accept bf16 (``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` says
    True on any AVX512 CPU) and emulate it, much slower than fp32: on 2 cores of an Intel
    Xeon with AVX512 but no AVX512-BF16, a (64 x 576) @ (576 x 1536) matmul took 5.3 ms in
    bf16 vs 2.4 ms in fp32, and MiniLM on OpenVINO embedded 64 sentences in 26.8 s with the
    bf16 hint vs 1.1 s in fp32, where the AMD EPYC with AVX512-BF16 ran bf16 2.5-3x faster
    than fp32 (bench/RESULTS.md). So bf16 is chosen only where this says True."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
