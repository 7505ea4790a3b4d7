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


def _override_name(arg: str) -> str | None:
    """'config.steer.coefs' for '--config.steer.coefs=(0,1)' (None for other arguments)."""
    if not arg.startswith("--config."):
        return None
    return arg[2:].split("=", 1)[0]


def _refuse_repeated_tuples(argv) -> None:
    """absl joins a tuple override given twice ((0,1) then (0,1e999) ran [0,1,0,inf]);
    neither value is what the user meant alone, so a repeated tuple override is refused."""
    seen = {}
    for arg in argv[1:]:
        name = _override_name(arg)
        if name is None or "=" not in arg:
            continue
        value = arg.split("=", 1)[1].strip()
        if value[:1] in "([" and value:
            if name in seen:
                fail(f"--{name} is given twice ({seen[name]} and {value}); a tuple override is "
                     "not replaced but joined, so give it once")
            seen[name] = value


def _unknown_field(argv, e) -> str:
    """One line for an override naming a field the config does not have (ml_collections
    raises KeyError / AttributeError from inside flag parsing)."""
    while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError(...))
        e = e.args[0]
    text = str(e.args[0]) if e.args else str(e)
    name, _, hint = text.partition("\n")
    name = name.strip().strip("'\"")
    for arg in argv[1:]:
        over = _override_name(arg)
        if over and name in over.split("."):
            hint = f"; {hint.strip()}" if hint.strip() else ""
            return (f"--{over}: the config has no field {name!r}{hint} (the fields are those of "
                    "the config file and configs/base.py)")
    return f"the config has no field {name!r}"


def _parse_flags(argv):
    _refuse_repeated_tuples(argv)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(f"{e} (pass --helpshort to list the flags)")
    except PersonaError as e:  # e.g. raised by a config file's get_config()
        fail(e)
    except (KeyError, AttributeError) as e:  # an override of a field the config lacks
        if any(_override_name(a) for a in argv[1:]):
            fail(_unknown_field(argv, e))
        raise


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
