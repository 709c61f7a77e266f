"""Result codes of ledger operations: the one table, documented in docs/ledger.md.

A code is part of the API contract: never rename one, only add.
"""

from typing import Final

OK: Final = "ok"

# Codes whose failure is kept against the idempotency key for ever (`id_already_failed`).
# Business outcomes that a retry must never flip.
PERSISTED_FAILURES: Final = frozenset(
    {
        "asset_not_found",
        "account_not_found",
        "account_asset_mismatch",
        "accounts_must_be_different",
        "postings_unbalanced",
        "amount_must_be_positive",
        "debit_account_frozen",
        "credit_account_frozen",
        "exceeds_credits",
        "exceeds_debits",
        "overflows_balance",
        "pending_transfer_not_found",
        "pending_transfer_not_pending",
        "pending_transfer_already_posted",
        "pending_transfer_already_voided",
        "pending_transfer_expired",
        "exceeds_pending_amount",
        "partial_post_not_uniform",
        "target_not_found",
        "target_failed",
        "target_not_reversible",
        "target_not_uniform",
        "target_already_reversed",
        "target_already_refunded",
        "target_partly_refunded",
        "exceeds_refundable_amount",
    }
)

MESSAGES: Final[dict[str, str]] = {
    OK: "applied",
    "asset_not_found": "no asset with this code",
    "account_not_found": "no account with this id",
    "account_asset_mismatch": "the account holds another asset than the transfer",
    "accounts_must_be_different": "an account appears in more than one posting",
    "postings_unbalanced": "debits and credits of the transfer differ",
    "amount_must_be_positive": "amounts are positive integers in minor units",
    "debit_account_frozen": "the account refuses debits (frozen)",
    "credit_account_frozen": "the account refuses credits (frozen)",
    "exceeds_credits": "insufficient funds: debits would exceed credits",
    "exceeds_debits": "credits would exceed debits (no overcredit)",
    "overflows_balance": "a balance would pass the 64-bit limit",
    "pending_transfer_not_found": "no transfer with this pending_id",
    "pending_transfer_not_pending": "the transfer named by pending_id is not a hold",
    "pending_transfer_already_posted": "the hold was already posted",
    "pending_transfer_already_voided": "the hold was already voided",
    "pending_transfer_expired": "the hold timed out and was released",
    "exceeds_pending_amount": "the amount to post is larger than the hold",
    "partial_post_not_uniform": "partial posting needs a hold whose legs have equal amounts",
    "target_not_found": "no transfer with this target_key",
    "target_failed": "the target_key's transfer failed; there is nothing to give back",
    "target_not_reversible": "only posted transfers, posts, refunds and reversals can be "
    "reversed; only posted transfers and posts refunded",
    "target_not_uniform": "the target's legs have different amounts",
    "target_already_reversed": "the target was already reversed",
    "target_already_refunded": "the target was refunded in full; nothing is left to reverse",
    "target_partly_refunded": "the target was refunded in part; a whole reversal is refused",
    "exceeds_refundable_amount": "refunds would exceed what is left of the target",
    "reversed_before_arrival": "a reversal for this key arrived first; it is never applied",
    "exists_with_different_target_key": "the key was used with another target",
    "exists_with_different_kind": "an asset with this code exists with another kind",
    "exists_with_different_scale": "an asset with this code exists with another scale",
    "exists_with_different_name": "an asset with this code exists with another name",
    "exists_with_different_flags": "the account exists with other flags",
    "exists_with_different_op": "the key was used for another operation",
    "exists_with_different_asset": "the key was used with another asset",
    "exists_with_different_postings": "the key was used with other postings",
    "exists_with_different_pending": "the key was used with another pending flag",
    "exists_with_different_timeout_s": "the key was used with another timeout",
    "exists_with_different_pending_id": "the key was used with another pending_id",
    "exists_with_different_amount": "the key was used with another amount",
    "exists_with_different_reason": "the key was used with another reason",
    "exists_with_different_metadata": "the key was used with other metadata",
    "id_already_failed": "the key's first attempt failed; a retry keeps that outcome",
    "linked_event_failed": "another operation of the linked group failed",
    "linked_event_chain_open": "the last operation of the request is linked to nothing",
}


def message(code: str) -> str:
    return MESSAGES.get(code, code.replace("_", " "))
