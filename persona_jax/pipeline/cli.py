"""Entry-point wrapper for the absl runners in `experiments/`.

`run(main)` is `absl.app.run(main)`, except that a mistake the user can make -- a
`PersonaError` raised by the runner, or a bad command-line flag -- is printed as one line
`error: <message>` on stderr with exit status 2, instead of a traceback.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging

from persona_jax.errors import PersonaError
from persona_jax.runtime import compile_cache

EXIT_USER_ERROR = 2

COMPILATION_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir", None,
    "folder of JAX's persistent compilation cache, shared by every run (default: "
    f"${compile_cache.ENV_VAR}, else ~/.cache/persona_jax/jax_cache); '' turns it off; "
    "delete the folder to clear it")


def fail(message) -> None:
    """Print `error: <message>` as a single line on stderr and exit with status 2."""
    line = " ".join(str(message).split())  # one line, whatever the message holds
    sys.stderr.write(f"error: {line}\n")
    sys.stderr.flush()
    sys.exit(EXIT_USER_ERROR)


def _parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(f"{e} (pass --helpshort to list the flags)")
    except PersonaError as e:  # e.g. raised by a config file's get_config()
        fail(e)


def _enable_compilation_cache(path) -> None:
    """Turn on the persistent compilation cache before anything compiles. A folder the
    user named must work; the default one is skipped (with a warning) when it cannot be made."""
    try:
        compile_cache.enable(path)
    except OSError as e:
        if path is not None:
            fail(f"--compilation_cache_dir={path!r} cannot be used: {e}; name a writable folder, "
                 "or pass --compilation_cache_dir='' to turn the cache off")
        logging.warning("persistent compilation cache off: %s", e)
        compile_cache.enable("")


def run(main) -> None:
    """`absl.app.run(main)` with user errors reported as one line and exit status 2."""

    def guarded(argv):
        # absl turns the default verbosity into INFO once flags are parsed; keep stderr
        # for warnings and errors unless the user asked for more with --verbosity.
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        _enable_compilation_cache(COMPILATION_CACHE_DIR.value)
        try:
            return main(argv)
        except PersonaError as e:
            fail(e)

    app.run(guarded, flags_parser=_parse_flags)
