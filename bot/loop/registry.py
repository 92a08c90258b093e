"""Model versions, the deployed one, and switching it: deploy, rollback, hot reload.

Design
------
- A version is a row of the ``models`` table: folder, parent, algorithm, training run,
  data snapshot, and a checksum of every file in the folder taken when it was
  registered, so a folder that changed since (a corrupt copy, a half-written file) is
  refused before it is served.
- Exactly one version is deployed: SQLite enforces it (a unique partial index on
  ``models.deployed``), and a switch is one transaction that moves the flag and logs who,
  when, why and from which version (:meth:`bot.store_data.LearningData.switch_deployed`).
  A process killed at any point leaves the old or the new version deployed.
- Before any deploy, bots serve the base model (the config's ``model.path``). The first
  deploy first records that base model (the config's ``model.path``; the
  default SmolLM2 when empty) as deployed, under the name its bot turns were logged
  with, so there is always something to roll back to.
- Rollback walks the deployment log as a stack: a deploy pushes, a rollback pops, and
  the version below the top is served again, through the same switch.
- Running bots follow the deployed version through :class:`DeployedPolicy`, the
  session's policy source: asked once per reply, it checks the deployed version (one
  indexed read) and loads a new one between replies; a reply being generated finishes on
  the model it started with. A version that fails to load is reported once and the old
  one keeps serving.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from bot.config import Config
from bot.errors import InvalidInput, RapportError
from bot.files import fault_point
from bot.loop.gate import run_gate
from bot.model_files import ModelRejected, verify_folder
from bot.policy import (
    DEFAULT_MODEL_NAME,
    Policy,
    Ranker,
    default_model_dir,
    default_model_folder,
)
from bot.store import Store

log = logging.getLogger(__name__)


def _base(store: Store, config: Config) -> tuple[str, bool]:
    """(name, registered?) of the config's base model, without converting or adding it."""
    spec = config.model.path
    registered = {m["version"]: m for m in store.models()}
    if spec in registered:
        return spec, True
    folder = Path(spec).expanduser().resolve() if spec else default_model_folder().resolve()
    for version, row in registered.items():
        if Path(row["path"]).resolve() == folder:
            return version, True
    return spec or DEFAULT_MODEL_NAME, False  # the name bot turns were logged under before


def base_version(store: Store, config: Config) -> str:
    """The registered name of the config's base model, registering it if needed."""
    name, registered = _base(store, config)
    if not registered:
        folder = Path(config.model.path).expanduser().resolve() if config.model.path else None
        store.add_model(name, str(folder or default_model_dir()), "prior")
    return name


def serving_version(store: Store, config: Config) -> str:
    """What the bots serve now: the deployed version, else the base model, which counts
    as deployed until the first deploy (nothing is registered or converted here)."""
    return store.deployed_version() or _base(store, config)[0]


def deployment_stack(store: Store) -> list[str]:
    """Versions deployed, oldest first, with rolled-back ones popped off."""
    stack: list[str] = []
    for row in store.deployments():
        if row["action"] == "rollback":
            stack.pop()
        else:
            stack.append(row["version"])
    return stack


def switch(
    store: Store,
    version: str,
    *,
    base: str,
    action: str,
    who: str,
    why: str,
    forced: bool = False,
    gate_check_id: int | None = None,
) -> str | None:
    """The one switch of the deployed version (deploy and rollback both use it); returns
    the version it replaced. Before the first deploy the base model is recorded as
    deployed, so the log starts with what was being served."""
    if store.deployed_version() is None:
        store.switch_deployed(base, action="initial", who=who, why="served before any deploy")
    fault_point("before-switch")
    previous = store.switch_deployed(
        version,
        action=action,
        who=who,
        why=why,
        forced=forced,
        gate_check_id=gate_check_id,
        fault=fault_point,
    )
    fault_point("after-switch")
    return previous


def rollback(store: Store, config: Config, *, who: str, why: str) -> tuple[str, str]:
    """Serve the previously deployed version again; returns (from, to)."""
    stack = deployment_stack(store)
    if len(stack) < 2:
        raise InvalidInput("nothing to roll back to: no earlier deployed version")
    current, target = stack[-1], stack[-2]
    verify_folder(store, target)
    switch(store, target, base=base_version(store, config), action="rollback", who=who, why=why)
    return current, target


def deploy(
    store: Store,
    config: Config,
    version: str,
    *,
    who: str,
    why: str,
    force: bool = False,
    dry_run: bool = False,
    echo: Callable[[str], None] = print,
) -> dict:
    """Gate ``version`` against the served one and switch to it if it passes (or is
    forced past the eval checks; integrity is never forced). Returns the verdict;
    ``dry_run`` stops after the gate (its verdict is stored either way)."""

    row = store.model(version)
    if row["deployed"]:
        raise InvalidInput(f"{version} is already deployed")
    base = base_version(store, config)
    against = store.deployed_version() or base
    verdict = run_gate(store, config, version, against, echo=echo)
    check = store.record_gate_check(version, against, verdict["passed"], force, verdict, who)
    if dry_run:
        return verdict
    if not verdict["passed"] and not force:
        failed = [c["name"] for c in verdict["checks"] if not c["passed"]]
        raise ModelRejected(
            f"refused {version}: failed {', '.join(failed)} (gate check {check}); "
            f"{against} stays deployed"
        )
    switch(
        store,
        version,
        base=base,
        action="deploy",
        who=who,
        why=why,
        forced=force and not verdict["passed"],
        gate_check_id=check,
    )
    return verdict


class DeployedPolicy:
    """A session's policy source that follows the deployed version (hot reload)."""

    def __init__(
        self,
        store: Store,
        config: Config,
        *,
        seed: int | None = None,
        ranker: Ranker | None = None,
        report: Callable[[str], None] = log.warning,
    ) -> None:
        self.store, self.config, self.seed, self.report = store, config, seed, report
        self.ranker = ranker  # best-of-N's ranking, the same for every version served
        self._lock = threading.Lock()
        self.failed: str | None = None
        deployed = store.deployed_version()
        self.policy = (
            self._load(deployed)
            if deployed
            else Policy.load(
                config.model,
                config.generation,
                registered={m["version"]: m["path"] for m in store.models()},
                seed=seed,
                ranker=ranker,
            )
        )

    def _load(self, version: str) -> Policy:
        folder = verify_folder(self.store, version)
        model_config = dataclasses.replace(self.config.model, path=str(folder))
        policy = Policy.load(
            model_config, self.config.generation, seed=self.seed, ranker=self.ranker
        )
        policy.version = version
        return policy

    def __call__(self) -> Policy:
        with self._lock:
            try:
                wanted = self.store.deployed_version()
            except RapportError as e:  # a locked or busy database: keep serving
                log.warning("cannot read the deployed version: %s", e)
                return self.policy
            if wanted and wanted != self.policy.version and wanted != self.failed:
                try:
                    self.policy = self._load(wanted)
                    self.failed = None
                    self.report(f"now serving {wanted}")
                except (RapportError, OSError) as e:
                    self.failed = wanted
                    self.report(
                        f"could not load {wanted} ({e}); still serving {self.policy.version}"
                    )
            return self.policy
