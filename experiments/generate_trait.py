"""Write a trait's artifacts (METHOD.md 1) with an LLM behind any OpenAI-compatible endpoint.

python -m experiments.generate_trait --name=impolite --description="The assistant is rude ..." \
    --out_dir=data_generation [--llm=gpt-4.1] [--base_url=http://host:port/v1]
Writes {out_dir}/trait_data_extract/{name}.json and {out_dir}/trait_data_eval/{name}.json
(validated, atomically; one repair retry when the LLM's first answer is invalid).
"""
from absl import flags

from persona_jax.pipeline import cli

_NAME = flags.DEFINE_string("name", None, "trait adjective, e.g. evil")
_DESCRIPTION = flags.DEFINE_string("description", None, "one paragraph describing the trait")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "root of the reference layout (trait_data_extract/, trait_data_eval/)")
_LLM = flags.DEFINE_string("llm", "gpt-4.1", "model name at the endpoint")
_BASE_URL = flags.DEFINE_string("base_url", None, "OpenAI-compatible endpoint root; default api.openai.com")
_KEY_ENV = flags.DEFINE_string("api_key_env", "OPENAI_API_KEY", "environment variable holding the API key")
_N_QUESTIONS = flags.DEFINE_integer("n_questions", 40, "questions asked for (paper: 40)")
_N_EXTRACT = flags.DEFINE_integer("n_extract", 20, "of which for extraction; the rest for evaluation (paper: 20)")
flags.mark_flags_as_required(["name", "description", "out_dir"])


def main(argv):
    del argv
    from persona_jax.method import traits

    llm = traits.openai_llm(_LLM.value, base_url=_BASE_URL.value, api_key_env=_KEY_ENV.value)
    t = traits.generate_trait_artifacts(_NAME.value, _DESCRIPTION.value, llm, n_questions=_N_QUESTIONS.value,
                                        n_extract=_N_EXTRACT.value, out_dir=_OUT_DIR.value)
    for p in traits.trait_paths(_OUT_DIR.value, t.name):
        print(p)


if __name__ == "__main__":
    cli.run(main)
