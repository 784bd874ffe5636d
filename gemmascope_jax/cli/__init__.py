"""`gemmascope-jax` command line: one parser, one verb per subcommand.

One convention for every verb (tests/test_cli_conventions.py): bad input -- a missing or
malformed file, a bad config, an unknown site, a dictionary that does not fit the model --
raises a `ValueError` or `OSError` (the project's own errors subclass `ValueError`), which
`main` prints as one line, `gemmascope-jax VERB: error: MESSAGE` on stderr (argparse's own
format for usage errors), and exits 2. A run that fails for another reason (a plan that does
not fit, a missing optional package) exits 1 with the same prefix. `GEMMASCOPE_JAX_DEBUG=1`
re-raises instead, for the traceback.
"""

# The layout (the docstring above is `gemmascope-jax --help`'s description): each verb lives in
# a module of this package with its parser (`add_<verb>_parser`) and its handler
# (`<verb>_command`); `_common.run_verb` applies the convention; `main` below is the verb
# table. The library code a verb calls lives on the floors below (docs/architecture.md); no
# library module registers a verb or parses arguments.

from __future__ import annotations

import argparse

from gemmascope_jax.cli._common import error_line, run_verb

__all__ = ["error_line", "main", "run_verb"]


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv) and run the verb; returns the exit status."""
    # the verb modules are imported here, not at the top: `import gemmascope_jax.cli` stays light
    from gemmascope_jax.cli.analysis import add_inspect_parser, add_steer_parser
    from gemmascope_jax.cli.attribution import add_attribute_parser
    from gemmascope_jax.cli.chat import add_cot_parser, add_jailbreak_parser, add_refusal_parser
    from gemmascope_jax.cli.convert import add_convert_parser
    from gemmascope_jax.cli.dashboard import add_dashboard_parser
    from gemmascope_jax.cli.demo import add_demo_parser, add_sites_parser
    from gemmascope_jax.cli.evaluate import add_evaluate_parser
    from gemmascope_jax.cli.rollouts import add_rollouts_parser
    from gemmascope_jax.cli.train import add_finetune_parser, add_plan_parser, add_train_parser

    parser = argparse.ArgumentParser(prog="gemmascope-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add_parser in (  # the order of `gemmascope-jax --help`
        add_demo_parser,
        add_train_parser,
        add_plan_parser,
        add_finetune_parser,
        add_convert_parser,
        add_rollouts_parser,
        add_attribute_parser,
        add_steer_parser,
        add_refusal_parser,
        add_jailbreak_parser,
        add_cot_parser,
        add_inspect_parser,
        add_dashboard_parser,
        add_evaluate_parser,
        add_sites_parser,
    ):
        add_parser(sub)
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "plan" and not any(x.startswith("-") for x in extra):
        args.overrides = [*args.overrides, *extra]  # key=value after --topology
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return run_verb(args.command, args.func, args)
