"""Banking77 intent -> priority. Why a map and not a head: Banking77 has no priority labels; the
urgency of an intent is a business rule (money missing or card abused first, questions last)."""
URGENT = [
    "lost_or_stolen_card", "compromised_card", "card_payment_not_recognised",
    "cash_withdrawal_not_recognised", "direct_debit_payment_not_recognised",
    "lost_or_stolen_phone", "transaction_charged_twice", "card_swallowed",
]
HIGH = [
    "wrong_amount_of_cash_received", "transfer_not_received_by_recipient", "pin_blocked",
    "card_not_working", "declined_cash_withdrawal", "declined_transfer", "declined_card_payment",
    "failed_transfer", "top_up_failed", "top_up_reverted", "reverted_card_payment?",
    "balance_not_updated_after_bank_transfer", "balance_not_updated_after_cheque_or_cash_deposit",
    "Refund_not_showing_up", "extra_charge_on_statement", "unable_to_verify_identity",
    "passcode_forgotten", "virtual_card_not_working", "contactless_not_working",
    "wrong_exchange_rate_for_cash_withdrawal", "card_payment_wrong_exchange_rate",
]
LOW = [
    "card_arrival", "card_delivery_estimate", "age_limit", "fiat_currency_support",
    "supported_cards_and_currencies", "visa_or_mastercard", "country_support", "exchange_rate",
    "top_up_limits", "disposable_card_limits", "getting_spare_card", "get_physical_card",
    "getting_virtual_card", "get_disposable_virtual_card", "apple_pay_or_google_pay", "atm_support",
    "card_acceptance", "why_verify_identity", "exchange_via_app", "automatic_top_up",
    "receiving_money",
]
DEFAULT = "normal"


def priority_of(label: str) -> str:
    if label in URGENT:
        return "urgent"
    if label in HIGH:
        return "high"
    if label in LOW:
        return "low"
    return DEFAULT
