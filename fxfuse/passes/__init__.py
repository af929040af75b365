"""Rewrite passes over captured ATen graphs. See ``pipeline.py`` for how they fit together."""
from fxfuse.passes.pipeline import DEFAULT_PIPELINE, Match, Miss, PassResult, parse_pipeline, run_pipeline

__all__ = ["DEFAULT_PIPELINE", "Match", "Miss", "PassResult", "parse_pipeline", "run_pipeline"]
