"""``python -m divergent.methods`` prints the registry's table for ``docs/methods.md``."""

from divergent.methods.registry import render_markdown

print(render_markdown(), end="")
