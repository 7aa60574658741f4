"""Expert-specialisation analysis of a trained run: `python -m moejax.analyze --workdir=DIR`.

    collect.py        restore the run's newest checkpoint, route a split, keep each real token's
                      experts (MoeLayer.record_routing)
    token_classes.py  what kind of text each vocabulary id is (punctuation, digits, ...)
    statistics.py     load by position, over-represented tokens, class shares, persistence
                      between layers (numpy only)
    report.py         analysis.json, report.md and the PNG figures

The command itself is moejax/analyze.py.
"""
