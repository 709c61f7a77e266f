"""The card functions the host offers: cards and terminals, and the POS requests the
front-end gateway forwards (`POST /internal/v1/pos`). Issue 4 grows members, classes and
the admin API here."""
