"""Command-line plumbing shared by the entry points: flag parsing that reports bad config keys plainly, with
JAX's options as flags."""

import sys

import jax
from absl import flags, logging


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing for `app.run(..., flags_parser=parse_flags)`.

    A missing config file, or a misspelt or mistyped `--config.KEY=VALUE` override, makes ml_collections
    raise deep inside flag parsing or later; this reports it in one message naming the flag and exits 1.

    JAX's options are flags too (`jax.config.config_with_absl`), set before `main` runs: most of them, such
    as `--jax_cpu_enable_async_dispatch=false`, are read from no environment variable, and some must be set
    before JAX's backends start.
    """
    if "jax_cpu_enable_async_dispatch" not in flags.FLAGS:  # absl refuses to define a flag twice
        jax.config.config_with_absl()
    try:
        remaining = flags.FLAGS(argv)
        if "config" in flags.FLAGS:
            flags.FLAGS.config.keys()  # a config file that failed to load only says so when used
        return remaining
    except OSError as e:
        sys.exit(f"error: --config: {e}")
    except flags.Error as e:
        sys.exit(f"error: {e}\nPass --help for the flags.")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        bad = [a for a in argv[1:] if a.startswith("--config.")]
        message = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'")
        sys.exit(f"error: bad config override {' '.join(bad) or ''}: {message}")


class _QuietOrbax(logging.logging.Filter):
    """Drops orbax's per-save INFO chatter (dozens of lines a checkpoint); its warnings still show."""

    def filter(self, record) -> bool:
        """Keeps warnings and everything not from orbax."""
        return record.levelno >= logging.logging.WARNING or "/orbax/" not in record.pathname


def quiet_orbax() -> None:
    """Installs `_QuietOrbax` on absl's log handler."""
    logging.get_absl_handler().addFilter(_QuietOrbax())
