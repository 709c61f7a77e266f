"""Members: natural, communication, payment and transaction identity in one record."""
