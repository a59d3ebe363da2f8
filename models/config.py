"""The models config file (TOML): which models a server or the CLI serves, by name, from which roots.

    model_roots = ["."]            # directories (relative to this file) that model directories must lie in

    [[models]]
    name = "digits-ddpm"           # what requests use; they never carry paths
    directory = "digits-ddpm"      # relative to the first root that holds it
    kind = "diffusion"             # diffusion | flow | meanflow | masked | block_diffusion; optional for a diffusers
                                   # pipeline
                                   # directory (model_index.json: sd, sdxl, sd3, flux, dit, pixart)
    dtype = "float32"              # float32 | float16 | bfloat16 (optional)
    device = "cuda:0"              # optional; default: the server's device
    default_sampler = "dpmpp_2m"   # text LMs: their family's when left out (llada, first_hitting,
    default_steps = 10             #   block_first_hitting, block_refinement x 48; models/diffusion_lms.py)
    guidance = 2.0                 # optional default classifier-free guidance scale
    null_class = 10                # class-embedding index trained as "no class"

    [verifiers]                    # classifiers the search verifiers use, by resource name
    classifier-a = "digit-classifier-a"
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from samplers.errors import InvalidRequest, UnknownModel, quote

KINDS = ("diffusion", "flow", "meanflow", "masked", "block_diffusion")  # block_diffusion: DiffusionGemma
DTYPES = ("float32", "float16", "bfloat16")
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
    family: str | None = None  # latent pipeline family detected from model_index.json (models/pipelines)
    dtype: str = "float32"
    device: str | None = None  # None: the device the server loads on


def _entry(raw: dict, roots: list[Path], index: int) -> ModelEntry:
    where = f"models[{index}]"
    for key in ("name", "directory"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise ConfigError(f"{where}.{key}: required string")
    directory = resolve_in_roots(raw["directory"], roots, f"{where}.directory")
    kind, family = _kind_and_family(raw, directory, where)
    dtype, device = _dtype_and_device(raw, where)
    known = {"name", "directory", "kind", "default_sampler", "default_steps", "guidance", "null_class", "grid",
             "dtype", "device"}
    sampler, steps = _lm_defaults(directory) if kind in ("masked", "block_diffusion") else ("dpmpp_2m", 10)
    return ModelEntry(raw["name"], directory, kind, raw.get("default_sampler", sampler),
                      int(raw.get("default_steps", steps)), raw.get("guidance"), raw.get("null_class"),
                      raw.get("grid", "uniform_lambda"), {k: v for k, v in raw.items() if k not in known},
                      family, dtype, device)


def _kind_and_family(raw: dict, directory: Path, where: str) -> tuple[str, str | None]:
    """`kind` as written, or detected from model_index.json (read before any weight); contradictions refused."""
    from .pipelines import FAMILIES, FAMILY_KINDS

    kind = raw.get("kind")
    if kind is not None and (not isinstance(kind, str) or not kind):
        raise ConfigError(f"{where}.kind: must be a non-empty string")
    index_path = directory / "model_index.json"
    if not index_path.is_file():
        if kind is None:
            raise ConfigError(f"{where}.kind: required (the directory has no model_index.json to detect it from)")
        if kind not in KINDS:
            raise ConfigError(f"{where}.kind: {kind!r} is not one of {list(KINDS)}")
        return kind, None
    try:
        cls = json.loads(index_path.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        raise ConfigError(f"{where}.directory: model_index.json is not valid JSON") from None
    if cls not in FAMILIES and kind in KINDS:
        return kind, None  # another diffusers layout (a pixel UNet pipeline) under its written kind
    if cls not in FAMILIES:
        raise ConfigError(f"{where}.directory: model_index.json names pipeline {cls!r}, which is not one of "
                          f"{sorted(FAMILIES)}")
    family = FAMILIES[cls]
    if kind is not None and kind not in (family, FAMILY_KINDS[family]):
        raise ConfigError(f"{where}.kind: {kind!r} contradicts the directory's model_index.json ({cls}: a "
                          f"{FAMILY_KINDS[family]} model of family {family!r})")
    return FAMILY_KINDS[family], family


def _lm_defaults(directory: Path) -> tuple[str, int]:
    """A text diffusion checkpoint's default sampler and steps, from its family (models/diffusion_lms.py)."""
    from .diffusion_lms import family_of

    try:
        family = family_of(directory)
    except ValueError:  # no config.json: the loader says so, with the entry's name
        return "first_hitting", 10
    return family.default_sampler, family.default_steps


def _dtype_and_device(raw: dict, where: str) -> tuple[str, str | None]:
    dtype = raw.get("dtype", "float32")
    if dtype not in DTYPES:
        raise ConfigError(f"{where}.dtype: {dtype!r} is not one of {list(DTYPES)}")
    device = raw.get("device")
    if device is not None and (not isinstance(device, str) or not re.fullmatch(r"cpu|mps|cuda(:\d+)?", device)):
        raise ConfigError(f"{where}.device: {device!r} is not 'cpu', 'mps', 'cuda' or 'cuda:N'")
    return dtype, device


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
        raise UnknownModel(f"model: no served model named {quote(name)}; available: {', '.join(sorted(entries))}")
    return entries[name]
