"""Configuration: one TOML file, then ``RAPPORT_*`` environment variables, then CLI flags.

Design
------
The settings are dataclasses, one per TOML table (:mod:`bot.config_sections`, exported
here), each field with its type, default and help text. ``data/rapport.toml`` is the
shipped, commented default file; a test checks that it loads to exactly these defaults,
so the two never drift.

Precedence, lowest first:

1. the defaults below;
2. the config file: ``--config PATH``, else ``$RAPPORT_CONFIG``, else
   ``$RAPPORT_HOME/rapport.toml`` when it exists;
3. environment variables ``RAPPORT_<TABLE>_<KEY>`` (``RAPPORT_GENERATION_TOP_P=0.8``);
4. CLI flags ``--set table.key=value``.

Every layer is validated the same way: an unknown table or key, or a value of the wrong
type or range, is a :class:`ConfigError` with one line naming the key and its source.

Where the data lives is not a config key: :func:`rapport_home` reads ``RAPPORT_HOME``
(default: the per-user data folder, e.g. ``~/.local/share/rapport``), because the config
file itself may live there.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

from bot.config_sections import (
    DiscordConfig,
    GateConfig,
    GenerationConfig,
    ModelConfig,
    ProcessesConfig,
    SafetyConfig,
    ScoringConfig,
    StoreConfig,
    WeightsConfig,
)
from bot.errors import ConfigError

ENV_PREFIX = "RAPPORT_"
# Environment variables in our namespace that are not config keys.
RESERVED_ENV = {"RAPPORT_HOME", "RAPPORT_CONFIG", "RAPPORT_FAULT_POINT"}
DEFAULT_CONFIG_FILE = Path(__file__).resolve().parent.parent / "data" / "rapport.toml"


def rapport_home() -> Path:
    """The folder that holds the database, the pseudonym key and cached models."""
    home = os.environ.get("RAPPORT_HOME")
    path = Path(home).expanduser() if home else Path(platformdirs.user_data_dir("rapport"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_once(target: Path, marker: str, build: Callable[[Path], None]) -> Path:
    """``target``, a cached folder that ``build(folder)`` fills the first time it is needed.

    ``target / marker`` existing means the folder is whole. It is built in a temporary
    sibling and renamed into place, so a build killed half-way leaves no ``target`` behind,
    and of two concurrent builds the second to finish keeps the first one's folder.
    """
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / marker).exists():  # not a concurrent build
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclass
class Config:
    store: StoreConfig = field(default_factory=StoreConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    discord: DiscordConfig = field(default_factory=DiscordConfig)
    processes: ProcessesConfig = field(default_factory=ProcessesConfig)

    def validate(self) -> None:
        for section in dataclasses.fields(self):
            getattr(self, section.name).validate()

    def database_path(self) -> Path:
        return (
            Path(self.store.path).expanduser()
            if self.store.path
            else (rapport_home() / "rapport.db")
        )

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


def _sections() -> dict[str, type]:
    return {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


def _coerce(value: Any, kind: type, where: str) -> Any:
    """Check (TOML) or parse (environment, --set strings) one value into ``kind``; a
    number must be finite (TOML and ``float()`` both read ``inf`` and ``nan``)."""
    value = _typed(value, kind, where)
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    return value


def _typed(value: Any, kind: type, where: str) -> Any:
    if isinstance(value, str) and kind is not str:
        text = value.strip()
        try:
            if kind is bool:
                if text.lower() in ("1", "true", "yes", "on"):
                    return True
                if text.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            return kind(text)
        except ValueError:
            raise ConfigError(f"{where} must be {_type_name(kind)}, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ConfigError(f"{where} must be {_type_name(kind)}, got {value!r}")
    return value


def _type_name(kind: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}[kind]


def _shown(name: str) -> str:
    """A name the user wrote, fit for a one-line message: as written when printable,
    else quoted with escapes (a TOML key may hold a newline or an RTL mark)."""
    return name if name.isprintable() else repr(name)


def _apply(config: Config, table: str, key: str, value: Any, source: str) -> None:
    sections = _sections()
    if table not in sections:
        raise ConfigError(
            f"{source}: unknown section [{_shown(table)}] (known: {', '.join(sections)})"
        )
    section = getattr(config, table)
    fields = {f.name: f for f in dataclasses.fields(section)}
    if key not in fields:
        raise ConfigError(
            f"{source}: unknown key '{table}.{_shown(key)}' "
            f"(known in [{table}]: {', '.join(fields)})"
        )
    kind = type(fields[key].default)
    setattr(section, key, _coerce(value, kind, f"{source}: {table}.{key}"))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} cannot be read: {e}") from None


def _config_file(explicit: str | Path | None) -> Path | None:
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get("RAPPORT_CONFIG"):
        return Path(os.environ["RAPPORT_CONFIG"]).expanduser()
    candidate = rapport_home() / "rapport.toml"
    return candidate if candidate.exists() else None


def _env_key(name: str) -> tuple[str, str]:
    """``RAPPORT_GENERATION_TOP_P`` -> (``generation``, ``top_p``)."""
    rest = name[len(ENV_PREFIX) :].lower()
    table, _, key = rest.partition("_")
    return table, key


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    environ: dict[str, str] | None = None,
) -> Config:
    """Build the effective config from the file, the environment and ``--set`` flags."""
    config = Config()
    config_file = _config_file(path)
    if config_file is not None:
        for table, values in _read_toml(config_file).items():
            if not isinstance(values, dict):
                raise ConfigError(f"{config_file}: '{table}' must be a [section], not a value")
            for key, value in values.items():
                _apply(config, table, key, value, str(config_file))
    environ = os.environ if environ is None else environ
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in RESERVED_ENV:
            table, key = _env_key(name)
            _apply(config, table, key, environ[name], f"environment variable {name}")
    for item in overrides:
        dotted, sep, value = item.partition("=")
        table, dot, key = dotted.strip().partition(".")
        if not sep or not dot:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        _apply(config, table, key, value, f"--set {_shown(dotted.strip())}")
    config.validate()
    return config
