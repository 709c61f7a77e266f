"""cardcore: the central card and coupon ledger server of a retail group."""

__version__ = "0.1.0"
