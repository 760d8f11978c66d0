//! The LLM tier: `triage escalate` asks a large model about what the small models doubt and
//! writes its answer as the message's row, outranking the small model's. The prompt and reply
//! contract (`prompt`), the chat-completions client with retries (`client`), the rate limits
//! and hourly spend cap (`budget`) and the spend ledger replicas share (`ledger`), the answer as a row (`answer`), the consumer that drives
//! them (`escalate`) and the labelled-data export (`export`).

pub mod answer;
pub mod batch;
pub mod budget;
pub mod client;
pub mod config;
pub mod escalate;
pub mod export;
pub mod ledger;
pub mod prompt;
