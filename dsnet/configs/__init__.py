"""The YAML configs shipped with dsnet, as package data (a wheel carries them).

``default.yml`` is the main job, ``sweep_default.yml`` the default sweep, ``tiny.yml`` the
tests' pipeline, the authors' three stage files ``mobilenetv1_bn_uniform*.yml`` as released,
and ``imagenet_ds_*.yml`` wire them into ImageNet pipelines. Every command's ``-c`` takes a
path or the name of one of these (``-c tiny`` or ``-c tiny.yml``).
"""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent


def shipped_configs() -> list[Path]:
    """Every shipped YAML, sorted by name."""
    return sorted(CONFIG_DIR.glob("*.yml"))


def find_config(name_or_path: str | Path) -> Path:
    """``name_or_path`` if it names a file; else the shipped config of that name.

    A name that matches neither is returned unchanged, so the loader's "no such file" error
    names what the user typed.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / (path.name if path.suffix in (".yml", ".yaml") else f"{path.name}.yml")
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    return path
