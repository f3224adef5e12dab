"""Architecture defaults that refuse a value which would be accepted and silently ignored.

An architecture function fills each option the user left unset; where an option has nothing to act on
in the chosen layout (a convolution option without a convolution branch, a conv2d option with the LFR
front-end), a value other than the default is refused with one line naming the option, the value and
why. The default itself is accepted: fairseq re-runs the architecture function on the saved config of
every checkpoint, and those configs hold the defaults.
"""
from typing import Any, Optional


def option_name(dest: str) -> str:
    """The command-line spelling of an argparse ``dest``: ``encoder_glu`` -> ``--encoder-glu``."""
    return "--" + dest.replace("_", "-")


def format_value(value: Any) -> str:
    """``value`` as it is written on the command line (lists space-separated)."""
    if hasattr(value, "__iter__") and not isinstance(value, str):
        return " ".join(str(item) for item in value)
    return str(value)


def fill_default(args, dest: str, default: Any, ignored_because: Optional[str] = None) -> None:
    """Set ``args.<dest>`` to ``default`` where unset (absent or None); with ``ignored_because`` (the
    reason the option has nothing to act on here), refuse any other value instead of ignoring it."""
    value = getattr(args, dest, None)
    if value is None:
        value = default
    elif ignored_because is not None and value != default:
        raise ValueError(f"{option_name(dest)} {format_value(value)} {ignored_because}")
    setattr(args, dest, value)
