"""E-coupons: campaigns, codes, what a coupon takes off a bill and who pays for it."""
