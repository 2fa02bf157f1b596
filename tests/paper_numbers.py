"""The paper's numbers that tests check live in memoryformer.research.paper (one source of truth);
this module re-exports them for the tests that import `paper_numbers`."""

from memoryformer.research.paper import *  # noqa: F403
