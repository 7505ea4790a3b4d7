"""Serve the organism's exact judge as an OpenAI-compatible chat-completions endpoint.

python -m experiments.organism_judge_server [--port=0] [--ready_file=PATH]

Listens on 127.0.0.1 (a free port with --port=0), prints `serving URL`, writes URL to
--ready_file (atomically, once the socket listens) and serves until killed. Point a
pipeline at it with --config.judge.base_url=URL (any non-empty OPENAI_API_KEY): the
trait and coherence rubrics come back as top logprobs whose 0_100 aggregation is the
organism judge's exact score (persona_jax/organism/judge_server.py).
"""
import sys

from absl import flags

from persona_jax.pipeline import cli

_HOST = flags.DEFINE_string("host", "127.0.0.1", "address to listen on")
_PORT = flags.DEFINE_integer("port", 0, "port (0: a free one)")
_READY = flags.DEFINE_string("ready_file", None, "write the endpoint URL here once listening")


def main(argv):
    del argv
    from persona_jax.errors import PersonaError
    from persona_jax.io.atomic import atomic_open
    from persona_jax.organism.judge_server import OrganismJudgeServer

    try:
        srv = OrganismJudgeServer(_HOST.value, _PORT.value)
    except OSError as e:
        raise PersonaError(f"cannot listen on {_HOST.value}:{_PORT.value} ({e.strerror}); "
                           "choose another --port or --port=0") from None
    print(f"serving {srv.url}", flush=True)
    if _READY.value:
        with atomic_open(_READY.value) as f:
            f.write(srv.url + "\n")
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()
    sys.exit(0)


if __name__ == "__main__":
    cli.run(main)
