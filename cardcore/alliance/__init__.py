"""Alliance partners: points exchange and settlement (a later issue).

Exchanges will be linked ledger transfers through per-partner liquidity accounts.
"""
