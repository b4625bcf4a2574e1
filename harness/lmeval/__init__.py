"""Litmus as an lm-eval model: `litmus` in lm-eval's model registry, backed by engine.LLM.

lm-eval 0.4.13 looks a `--model` name up in its own registry only, which a model class
enters by being imported (its `@register_model` decorator runs then); it reads no plugin
entry point. Importing this package registers `litmus`, so:

- from Python: `import harness.lmeval`, then `lm_eval.simple_evaluate(model="litmus",
  model_args="pretrained=PATH", tasks=[...])`;
- from the shell, lm-eval's own command line with `litmus` registered first:
  `python -m harness.lmeval run --model litmus --model_args pretrained=PATH --tasks T`
  (or the console script `litmus-lm-eval`, the same thing). Plain `lm_eval` would fail
  with "no model for this name found", having never imported this package.
"""
from __future__ import annotations

from harness.lmeval.model import LitmusLM

__all__ = ["LitmusLM", "main"]


def main() -> None:
    """lm-eval's command line (every subcommand and option), with `litmus` registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
