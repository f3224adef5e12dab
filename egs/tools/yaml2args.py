#!/usr/bin/env python3
"""Turn a flat YAML experiment config into fairseq command-line arguments, one per output line.

    max_tokens: 4096           ->  --max-tokens 4096
    adam-betas: (0.9, 0.98)    ->  --adam-betas "(0.9, 0.98)"   (one argument)
    share_all_embeddings: true ->  --share-all-embeddings
    fp16: false  /  fp16:      ->  (nothing)
    encoder_branch_type: [attn:1:80:4, lightweight:default:80:4]
                               ->  --encoder-branch-type attn:1:80:4 lightweight:default:80:4

A config is either flat (every value a scalar or a list) or made of sections (every value a mapping,
e.g. ``train:`` and ``generate:``); ``--section NAME`` picks one section of the latter.

Read the output into a bash array through a file, so that a bad config stops a ``set -e`` script
(a failure inside ``< <(...)`` would not) and the exact arguments are kept with the experiment:

    python egs/tools/yaml2args.py conf/x.yaml --section train > exp/x/train.args
    mapfile -t train_args < exp/x/train.args
    fairseq-train data-bin "${train_args[@]}"

``--null`` separates arguments by NUL instead (``mapfile -d '' -t``), for values with line breaks.

``--override OTHER.yaml`` lays the same section of a second config over the first, key by key: its values
replace the first config's (``false`` drops a flag the first one sets), its new keys come last. The
recipes' compression fine-tunes use it to apply ``conf/compress/*.yaml`` to the trained model's config:

    python egs/tools/yaml2args.py conf/base.yaml --section train --override conf/compress/sparse50.yaml
"""
import argparse
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class ConfigError(ValueError):
    """A missing or ill-formed config; printed as one line, exit status 2."""


def load_config(path: Path) -> Dict[str, Any]:
    """The top-level mapping of the YAML file ``path`` (an empty file gives an empty mapping)."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{where}: not valid YAML: {problem}") from err
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ConfigError(
            f"{path}: expected a mapping of option: value at the top, got a {type(config).__name__}"
        )
    return config


def select_section(config: Dict[str, Any], path: Path, section: Optional[str] = None) -> Dict[str, Any]:
    """The options of ``section`` (or of the whole flat config when ``section`` is None)."""
    sections = sorted(str(key) for key, value in config.items() if isinstance(value, dict))
    if sections and len(sections) != len(config):
        options = sorted(str(key) for key, value in config.items() if not isinstance(value, dict))
        raise ConfigError(
            f"{path}: mixes sections ({', '.join(sections)}) with top-level options "
            f"({', '.join(options)}); put every option inside a section"
        )
    if section is None:
        if sections:
            raise ConfigError(f"{path} has sections ({', '.join(sections)}); choose one with --section")
        return config
    if not sections:
        raise ConfigError(
            f"{path} has no sections, so --section {section} cannot be used; drop --section"
        )
    if section not in config:
        raise ConfigError(f"{path} has no section '{section}'; its sections: {', '.join(sections)}")
    return config[section]


def override_options(options: Dict[str, Any], overrides: Dict[str, Any]) -> Dict[str, Any]:
    """``options`` with each key of ``overrides`` set to its value there: in its place when ``options`` has
    it ('-' and '_' count as the same, as on the command line), else appended."""
    def flag(key: Any) -> str:
        return str(key).replace("-", "_")

    replaced = {flag(key): (key, value) for key, value in overrides.items()}
    merged = dict(replaced.pop(flag(key), (key, value)) for key, value in options.items())
    merged.update(dict(replaced.values()))
    return merged


def _scalar(value: Any, path: Path, key: str) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, (dict, list)):
        raise ConfigError(f"{path}: key '{key}': list items must be strings or numbers, got {value!r}")
    return str(value)


def config_to_args(options: Dict[str, Any], path: Path, where: str = "") -> List[str]:
    """fairseq arguments for ``options`` (see the module docstring), in the config's order."""
    args: List[str] = []
    for key, value in options.items():
        name = f"{where}{key}"
        if not isinstance(key, str) or not _KEY.match(key):
            raise ConfigError(
                f"{path}: key '{name}' is not an option name (letters, digits, '_' and '-', "
                f"e.g. max_tokens)"
            )
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, list):
            if not value:
                raise ConfigError(
                    f"{path}: key '{name}' is an empty list; remove the key or give values"
                )
            args.append(flag)
            args.extend(_scalar(item, path, name) for item in value)
        elif isinstance(value, dict):
            raise ConfigError(
                f"{path}: key '{name}' holds a mapping, which has no command-line form; "
                f"use a scalar or a list"
            )
        else:
            args.append(flag)
            args.append(str(value))
    return args


def main(argv: Optional[List[str]] = None) -> int:
    """Print the arguments of the config (section) named on the command line; exit 2 on a bad config."""
    parser = argparse.ArgumentParser(
        description="Print the fairseq command-line arguments of a YAML experiment config, one per "
        "line.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n"
        "  python egs/tools/yaml2args.py conf/x.yaml --section train > exp/x/train.args\n"
        "  mapfile -t train_args < exp/x/train.args\n"
        '  fairseq-train data-bin "${train_args[@]}"',
    )
    parser.add_argument(
        "config", type=Path, help="YAML file: option: value pairs, optionally in sections"
    )
    parser.add_argument("--section", help="use this top-level section (e.g. train or generate)")
    parser.add_argument(
        "--override", type=Path, metavar="OTHER.yaml",
        help="a second config whose options (same --section) replace or extend the first one's",
    )
    parser.add_argument(
        "--null", action="store_true", help="end every argument with NUL instead of newline"
    )
    args = parser.parse_args(argv)
    try:
        options = select_section(load_config(args.config), args.config, args.section)
        where = f"{args.section}." if args.section else ""
        if args.override:
            overrides = select_section(load_config(args.override), args.override, args.section)
            config_to_args(overrides, args.override, where)  # its own mistakes name its own file
            options = override_options(options, overrides)
        fairseq_args = config_to_args(options, args.config, where)
        if not args.null:
            broken = [arg for arg in fairseq_args if "\n" in arg]
            if broken:
                raise ConfigError(f"{args.config}: value {broken[0]!r} contains a line break; use --null")
    except ConfigError as err:
        print(f"yaml2args.py: error: {err}", file=sys.stderr)
        return 2
    end = "\0" if args.null else "\n"
    sys.stdout.write("".join(arg + end for arg in fairseq_args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
