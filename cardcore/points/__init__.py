"""Points: loyalty programs, earning rules, lots and expiry, tiers, transfers and redemption."""
