"""The recipes that ship with the package (`pipelines/configs/`, which a clone also shows as `configs/`),
found by name from any folder:

    python -m pipelines recipes                   # (ccg-recipes) every recipe with its one-line description
    python -m pipelines recipes cgan/demo_cpu     # print one, to start a recipe of your own from it
    python train_cgan.py --config cgan/demo_cpu   # a shipped recipe by name; a path to a file still works
    accelerate launch --config_file "$(ccg-recipes --path accelerate/multi_gpu_bf16)" train_ddpm.py ...
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from pathlib import Path
from typing import Optional

from .typed_yaml import ConfigError

SHIPPED = Path(__file__).resolve().parent / "configs"

# What each folder's files are for, in the order the listing shows them.
KINDS = {
    "cgan": "conditional GANs: python train_cgan.py --config NAME",
    "ddpm": "conditional diffusion: python train_ddpm.py --config NAME",
    "sweeps": "W&B grids, run locally: python -m pipelines.sweep NAME",
    "experiments": "named runs compared in one report: python -m pipelines.sweep NAME",
    "accelerate": "launcher settings: accelerate launch --config_file \"$(ccg-recipes --path NAME)\" ...",
}


def recipe_names() -> list[str]:
    return sorted(str(p.relative_to(SHIPPED).with_suffix("")) for p in SHIPPED.glob("*/*.yaml"))


def recipe_path(name_or_path: str | Path) -> Path:
    """A file that exists is used as it is; otherwise a shipped recipe of that name (`cgan/demo_cpu`, with or
    without `.yaml`, or the clone's path `configs/cgan/demo_cpu.yaml` from any folder)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = path.as_posix().removeprefix("configs/").removesuffix(".yaml")
    shipped = SHIPPED / f"{name}.yaml"
    if name in recipe_names():
        return shipped
    close = difflib.get_close_matches(name, recipe_names(), n=3)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise ConfigError(f"config file not found: {name_or_path} (neither a file nor a shipped recipe; {hint}"
                      "`python -m pipelines recipes` lists the recipes)")


def description(path: Path, width: int = 90) -> str:
    """The first sentence of the file's leading comment, cut to `width` characters."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(lines)
    sentence = re.split(r"(?<=\.)\s", text, maxsplit=1)[0].rstrip(".")
    return sentence if len(sentence) <= width else sentence[:width - 3].rstrip() + "..."


def listing() -> str:
    names = recipe_names()
    width = max(map(len, names))
    out = []
    for kind, how in KINDS.items():
        out.append(f"{kind} ({how})")
        out += [f"  {name:<{width}}  {description(SHIPPED / f'{name}.yaml')}"
                for name in names if name.split("/")[0] == kind]
        out.append("")
    return "\n".join(out) + f"The files: {SHIPPED}"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="ccg-recipes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", help="print this recipe (cgan/demo_cpu, ...)")
    parser.add_argument("--path", metavar="NAME", help="print the path of this recipe's file")
    args = parser.parse_args(argv)
    try:
        if args.path:
            print(recipe_path(args.path))
        elif args.name:
            print(recipe_path(args.name).read_text(), end="")
        else:
            print(listing())
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
