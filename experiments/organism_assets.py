"""Write the organism's trait artifacts to disk in the reference layout.

python -m experiments.organism_assets --out=DIR [--traits=evil,sycophantic]

Writes DIR/trait_data_extract/{trait}.json and DIR/trait_data_eval/{trait}.json (5
instruction pairs, 20 questions of the split, the judge rubric), the files the
organism's own trait source makes in memory (`persona_jax.organism.artifacts`). Run the
paper configs on them with --config.trait_dir=DIR (see configs/organism_real_path.py).
"""
from absl import flags

from persona_jax.pipeline import cli

_OUT = flags.DEFINE_string("out", None, "directory that gets trait_data_extract/ and trait_data_eval/")
_TRAITS = flags.DEFINE_list("traits", None, "traits to write (default: all four of the organism)")
flags.mark_flag_as_required("out")


def main(argv):
    del argv
    from persona_jax.organism import artifacts
    from persona_jax.organism import language as L

    traits = _TRAITS.value or list(L.TRAITS)
    for t in traits:
        L.check_trait(t)  # an unknown trait is an error before anything is written
    for t, paths in artifacts.write_trait_artifacts(_OUT.value, traits).items():
        print(f"{t}: {paths['extract']} {paths['eval']}")


if __name__ == "__main__":
    cli.run(main)
