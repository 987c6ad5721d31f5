"""``python -m divergent.rl`` prints the registry's table for ``docs/methods.md``."""

from divergent.rl.registry import render_markdown

print(render_markdown(), end="")
