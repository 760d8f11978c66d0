//! The binary's edge: parse the command line, set up logging, dispatch, map errors to an exit
//! code. Each command lives in `cli/<command>.rs`; the work lives in the library.

mod cli;

use std::io::IsTerminal;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "triage", version, about = "Classify support tickets, returns and e-mails with small ONNX language models")]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, env = "TRIAGE_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the worker: consume Kafka, classify, write ClickHouse, commit what is done.
    Run(cli::run::RunArgs),
    /// Run the whole path on embedded defaults: mock Kafka, local ClickHouse, bundled samples, the worker.
    Demo(cli::demo::DemoArgs),
    /// Classify JSON lines (one result per input line, in input order).
    Classify(cli::classify::ClassifyArgs),
    /// Validate a configuration file without connecting to anything.
    Config {
        #[command(subcommand)]
        action: cli::config::ConfigAction,
    },
    /// The ClickHouse results table and analytics views.
    Schema {
        #[command(subcommand)]
        action: cli::schema::SchemaAction,
    },
    /// The Kafka topics triage writes (dead letters, escalations).
    Topics {
        #[command(subcommand)]
        action: cli::topics::TopicsAction,
    },
    /// Run a mock Kafka cluster for development (librdkafka's; real protocol over TCP).
    Broker(cli::broker::BrokerArgs),
    /// Run a stand-in Schema Registry (Confluent's REST subset, in memory) for demos and tests.
    Registry(cli::registry::RegistryArgs),
    /// Load JSON lines (or a CSV with a header row) into a topic.
    Produce(cli::produce::ProduceArgs),
    /// Send dead letters back to the topics they came from.
    Redrive(cli::redrive::RedriveArgs),
    /// Side-by-side benchmark: model ceiling vs the whole worker vs batch size 1, with ratios.
    Bench(cli::bench::BenchArgs),
    /// Train heads on your labelled CSV / JSON lines over a frozen encoder; writes a model directory.
    Train(Box<cli::train::TrainArgs>),
    /// The LLM tier: answer the escalation topic with a large model (OpenAI-compatible API) and
    /// write each answer as the message's row; or export the answers as training data.
    Escalate(cli::escalate::EscalateArgs),
    /// Score a model directory on labelled data, next to a TF-IDF baseline on the same split.
    Eval(cli::eval::EvalArgs),
}

fn main() {
    // Before any thread exists: the flat variable names of earlier releases become the
    // sectioned names the flags read.
    triage::config::env::export_aliases();
    let cli = Cli::parse();
    // The demo tells its own story: the worker's log lines only when something is wrong.
    let default_level = if matches!(cli.command, Command::Demo(_)) { "warn" } else { "info,ort=warn" };
    init_logging(cli.log_format, default_level);
    let result = match cli.command {
        Command::Run(args) => cli::runtime().and_then(|rt| {
            let result = rt.block_on(cli::run::run(args));
            // A start-up step still blocking (a model loading, a broker not answering) must not
            // hold the exit after SIGTERM.
            rt.shutdown_timeout(std::time::Duration::from_secs(2));
            result
        }),
        Command::Demo(args) => cli::runtime().and_then(|rt| rt.block_on(cli::demo::run(args))),
        Command::Classify(args) => cli::classify::run(args),
        Command::Config { action } => cli::config::run(action),
        Command::Schema { action } => cli::runtime().and_then(|rt| rt.block_on(cli::schema::run(action))),
        Command::Topics { action } => cli::runtime().and_then(|rt| rt.block_on(cli::topics::run(action))),
        Command::Broker(args) => cli::runtime().and_then(|rt| rt.block_on(cli::broker::run(args))),
        Command::Registry(args) => cli::runtime().and_then(|rt| rt.block_on(cli::registry::run(args))),
        Command::Produce(args) => cli::runtime().and_then(|rt| rt.block_on(cli::produce::run(args))),
        Command::Redrive(args) => cli::redrive::run(args),
        Command::Bench(args) => cli::runtime().and_then(|rt| rt.block_on(cli::bench::run(args))),
        Command::Train(args) => cli::train::run(*args),
        Command::Eval(args) => cli::eval::run(args),
        Command::Escalate(args) => cli::runtime().and_then(|rt| {
            let result = rt.block_on(cli::escalate::run(args));
            rt.shutdown_timeout(std::time::Duration::from_secs(2));
            result
        }),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn init_logging(format: LogFormat, default_level: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// clap checks its own rules (conflicts, requires, env names) only in debug builds and only
    /// for the subcommand parsed: this checks all of them at once.
    #[test]
    fn every_command_line_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
