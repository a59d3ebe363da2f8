"""The models config file (TOML): which models a server or the CLI serves, by name, from which roots.

    model_roots = ["."]            # directories (relative to this file) that model directories must lie in

    [[models]]
    name = "digits-ddpm"           # what requests use; they never carry paths
    directory = "digits-ddpm"      # relative to the first root that holds it
    kind = "diffusion"             # diffusion | flow | meanflow | masked
    default_sampler = "dpmpp_2m"
    default_steps = 10
    guidance = 2.0                 # optional default classifier-free guidance scale
    null_class = 10                # class-embedding index trained as "no class"

    [verifiers]                    # classifiers the search verifiers use, by resource name
    classifier-a = "digit-classifier-a"
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from samplers.errors import InvalidRequest, UnknownModel

KINDS = ("diffusion", "flow", "meanflow", "masked")
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "zoo" / "models.toml"


class ConfigError(ValueError):
    """The models config file is invalid; the message names the entry and field."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    directory: Path
    kind: str
    default_sampler: str
    default_steps: int
    guidance: float | None = None
    null_class: int | None = None
    grid: str = "uniform_lambda"
    extra: dict = field(default_factory=dict)


def _entry(raw: dict, roots: list[Path], index: int) -> ModelEntry:
    where = f"models[{index}]"
    for key in ("name", "directory", "kind"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise ConfigError(f"{where}.{key}: required string")
    if raw["kind"] not in KINDS:
        raise ConfigError(f"{where}.kind: {raw['kind']!r} is not one of {list(KINDS)}")
    directory = resolve_in_roots(raw["directory"], roots, f"{where}.directory")
    known = {"name", "directory", "kind", "default_sampler", "default_steps", "guidance", "null_class", "grid"}
    return ModelEntry(raw["name"], directory, raw["kind"], raw.get("default_sampler", "dpmpp_2m"),
                      int(raw.get("default_steps", 10)), raw.get("guidance"), raw.get("null_class"),
                      raw.get("grid", "uniform_lambda"), {k: v for k, v in raw.items() if k not in known})


def resolve_in_roots(directory: str, roots: list[Path], what: str) -> Path:
    """The directory inside one of the configured roots; anything outside them is refused."""
    for root in roots:
        candidate = (root / directory).resolve()
        if candidate.is_relative_to(root) and candidate.is_dir():
            return candidate
    raise ConfigError(f"{what}: {directory!r} is not a model directory inside the configured model roots")


def load_config(path: str | Path = DEFAULT_CONFIG) -> dict[str, ModelEntry]:
    """Parse a models config file into name -> ModelEntry."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"models config: no such file {path.name!r}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"models config: not valid TOML ({err})") from None
    roots = [(path.parent / r).resolve() for r in raw.get("model_roots", ["."])]
    entries = [_entry(m, roots, i) for i, m in enumerate(raw.get("models", []))]
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ConfigError("models: model names must be unique")
    return {e.name: e for e in entries}


def load_verifier_dirs(path: str | Path = DEFAULT_CONFIG) -> dict[str, Path]:
    """The `[verifiers]` table: resource name -> classifier directory inside the model roots."""
    path = Path(path)
    raw = tomllib.loads(path.read_text())
    roots = [(path.parent / r).resolve() for r in raw.get("model_roots", ["."])]
    return {name: resolve_in_roots(d, roots, f"verifiers.{name}") for name, d in raw.get("verifiers", {}).items()}


def lookup(entries: dict[str, ModelEntry], name: str) -> ModelEntry:
    if not name:
        raise InvalidRequest("model: name is empty")
    if name not in entries:
        raise UnknownModel(f"model: no served model named {name!r}; available: {', '.join(sorted(entries))}")
    return entries[name]
