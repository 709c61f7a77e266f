"""The front-end gateway: POS terminals over ISO 8583 (issue 3).

It reaches the ledger only through `cardcore.ledger.wire` (the ledger API's request and
result types) over HTTP or in-process; it never imports the ledger's store or tables.
"""
