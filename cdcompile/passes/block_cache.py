"""Block cache rewrite (placeholder until the DBCache pass lands)."""


def run(gm, ctx) -> None:
    """Insert the DBCache guard, cond and state (not yet implemented: graph left unchanged)."""
    return None
