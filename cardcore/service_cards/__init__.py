"""Service cards: counted entitlements sold as packages ("ten car washes", "six spa
sessions"), redeemed one use at a time and refunded by the product's policy."""
