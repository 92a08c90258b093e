"""Sharing the machine: batch commands yield to serving ones (bot/processes.py).

The real ``rapport`` entry point runs in a subprocess with each command's body replaced
by a probe, which reports what the process it runs in was given: its niceness (of every
thread, after torch has started its pool), torch's thread count and the OpenMP wait
policy. A niceness can only be raised, so each command gets a process of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bot import processes
from bot.processes import ProcessSettings
from tests.conftest import BUSY_MACHINE

PROBE = r"""
import json, os, resource, sys
BLOCK = 64 << 20  # bytes: 16,384 pages of 4 KiB
from bot.loop import cli

def probe(*args, **kwargs):
    report = {"wait": os.environ.get("OMP_WAIT_POLICY"), "omp": os.environ.get("OMP_NUM_THREADS")}
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):  # a training step's buffer, freed and taken again
        block = bytearray(BLOCK)
        block[::4096] = bytes(len(range(0, BLOCK, 4096)))  # touch every page
        del block
    report["faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    if os.environ.get("PROBE_TORCH"):
        import torch
        torch.ones(256, 256) @ torch.ones(256, 256)  # starts the OpenMP pool
        report["threads"] = torch.get_num_threads()
    nices = []
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/stat") as f:
            nices.append(int(f.read().rsplit(")", 1)[1].split()[16]))
    report["nices"] = sorted(set(nices))
    print(json.dumps(report))

group = cli.cli
for name in sys.argv[1:]:
    if not name.startswith("-") and name in getattr(group, "commands", {}):
        group = group.commands[name]
group.callback = probe
cli.main(sys.argv[1:])
"""

# Every command the issue names as batch work, and the two that serve people.
BATCH = [
    ["train"],
    ["retrain"],
    ["score"],
    ["eval"],
    ["simulate"],
    ["reward-model", "train"],
    ["deploy", "v1"],
]
SERVING = [["chat"], ["discord"]]


def bare_environment() -> dict[str, str]:
    """This environment without the OpenMP variables (the suite runs with OMP_NUM_THREADS)
    and without the suite's own RAPPORT_PROCESSES_BATCH_NICE (tests/conftest.py)."""
    dropped = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "RAPPORT_PROCESSES_BATCH_NICE")
    return {k: v for k, v in os.environ.items() if k not in dropped and not k.startswith("MALLOC_")}


def probe(args: list[str], config: str = "", torch: bool = False, env: dict | None = None):
    environ = {**bare_environment(), **(env or {})}
    if torch:
        environ["PROBE_TORCH"] = "1"
    prefix = ["--config", config] if config else []
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *prefix, *args],
        capture_output=True,
        text=True,
        env=environ,
        timeout=60 * BUSY_MACHINE,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "rapport.toml"
    path.write_text("[processes]\nbatch_nice = 19\nbatch_threads = 1\nserve_threads = 0\n")
    return str(path)


def test_commands_are_serving_or_batch():
    assert {processes.kind_of(c[0]) for c in SERVING} == {"serving"}
    assert {processes.kind_of(c[0]) for c in BATCH} == {"batch"}


@pytest.mark.parametrize("command", BATCH, ids=" ".join)
def test_batch_commands_run_niced_with_the_configured_threads(command, config_file):
    torch = command == ["train"]  # one command starts torch's pool; the rest read the setup
    report = probe(command, config_file, torch=torch)
    assert report["nices"] == [19]  # every thread, torch's pool included
    assert report["omp"] == "1" and report["wait"] == "PASSIVE"
    if torch:
        assert report["threads"] == 1


@pytest.mark.parametrize("command", SERVING, ids=" ".join)
def test_serving_commands_keep_their_priority_and_threads(command, config_file):
    report = probe(command, config_file, torch=command == ["chat"])
    assert report["nices"] == [os.getpriority(os.PRIO_PROCESS, 0)]
    assert report["omp"] is None and report["wait"] is None  # spins between matmuls
    if "threads" in report:
        fresh = subprocess.run(
            [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
            capture_output=True,
            text=True,
            env=bare_environment(),
            timeout=60 * BUSY_MACHINE,
        )
        assert report["threads"] == int(fresh.stdout)  # torch's own default


# One 64 MiB block taken and freed 10 times: the pages faulted in (4 KiB each).
PAGES = (64 << 20) // 4096


def test_batch_commands_keep_freed_memory_and_serving_ones_give_it_back(tmp_path):
    """A batch command's malloc keeps what it frees: the block is faulted in once, not at
    every reuse; the bot's gives it back (glibc's default); the setting can be off."""
    assert probe(["score"])["faults"] < 2 * PAGES
    assert probe(["chat"])["faults"] > 8 * PAGES
    path = tmp_path / "c.toml"
    path.write_text("[processes]\nbatch_keep_freed = false\n")
    assert probe(["score"], str(path))["faults"] > 8 * PAGES


def test_a_wait_policy_the_user_set_is_kept_and_passive_wait_can_be_off(tmp_path):
    assert probe(["train"], env={"OMP_WAIT_POLICY": "ACTIVE"})["wait"] == "ACTIVE"
    path = tmp_path / "c.toml"
    path.write_text("[processes]\nbatch_passive_wait = false\n")
    assert probe(["train"], str(path))["wait"] is None


def test_niceness_is_raised_to_the_setting_and_never_lowered(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "setpriority", lambda which, who, nice: calls.append(nice))
    monkeypatch.setattr(os, "getpriority", lambda which, who: 0)
    processes.apply(ProcessSettings(nice=19, threads=0, passive_wait=False), environ={})
    assert calls and set(calls) == {19}  # each thread
    done = len(calls)
    monkeypatch.setattr(os, "getpriority", lambda which, who: 19)
    processes.apply(ProcessSettings(nice=10, threads=0, passive_wait=False), environ={})
    assert len(calls) == done  # already nicer: left alone
