"""A complete custom pass: long causal attention gets a sliding window with attention sinks.

Run: ``.venv/bin/python examples/long_context_window.py`` (uses the zoo's tiny LLaMA).
"""

from dataclasses import dataclass
from typing import ClassVar

import attnopt
from attnopt.passes.select import select_sites


@dataclass(frozen=True)
class LongContextWindow(attnopt.Pass):
    """For every causal attention with kv_len > min_kv_len: a window with sinks."""

    name: ClassVar[str] = "long-context-window"
    exact: ClassVar[bool] = False
    min_kv_len: int = 4096
    window: int = 1024
    sinks: int = 4

    def run(self, graph, ctx):
        sites = select_sites(graph, causal=True, min_kv_len=self.min_kv_len + 1)
        for site in sites:
            site.update(
                variant="sliding_window", window_left=self.window, window_right=0, sinks=self.sinks
            )
        return attnopt.PassResult(changed=bool(sites), rewrites=len(sites))


def main() -> attnopt.NumericsReport:
    """Apply the pass to the zoo's LLaMA at 64 tokens (threshold scaled down) and validate it."""
    from attnopt import zoo

    model = zoo.get("llama").build("eager")
    args, kwargs = zoo.get("llama").example(1, 64)
    pipeline = "canonicalize,fuse-attention,long-context-window{min_kv_len=32,window=16,sinks=4}"
    compiled = attnopt.compile(model, args, kwargs, passes=pipeline)
    print([(site.index, site.variant, round(site.kept_fraction, 2)) for site in compiled.sites])
    report = attnopt.validate(model, compiled, args, kwargs, tolerance=attnopt.Budget(cosine=0.9))
    print(report)
    return report


if __name__ == "__main__":
    main()
