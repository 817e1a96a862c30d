"""One-off commands, each `python -m advunlearn_jax.tools.NAME`: the FID Inception weights fetch (fetch_inception)
and the ASR-vs-budget plot (plot_budgets)."""
