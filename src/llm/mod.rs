//! The LLM tier (issue 14, in progress, not yet a command): what `triage escalate` will use to
//! ask a large model about what the small models doubt. So far: the prompt and reply contract
//! (`prompt`), the chat-completions client with retries (`client`), and the rate limits and
//! hourly spend cap (`budget`).

pub mod budget;
pub mod client;
pub mod prompt;
