"""The test suite's model zoo: re-exported from :mod:`attnopt.zoo` (public, used by the CLI too)."""

from attnopt.zoo import *  # noqa: F403
from attnopt.zoo import (  # noqa: F401 - explicit names the tests use
    D_TORCH,
    MINILM_SENTENCES,
    VOCAB,
    ZOO,
    ZooEntry,
    get,
    minilm_dir,
    minilm_tokenizer,
    primary_output,
)
