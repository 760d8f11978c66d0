//! `triage classify`: JSON lines in, one result per line out, in input order.

use anyhow::Result;
use clap::Args;
use triage::classify::{classify_stream, ClassifyOptions, ClassifyRunError};

use super::{open_input, open_output, progress_bar, BatchArgs, FieldArgs, ModelArgs, Progress};

#[derive(Args)]
pub struct ClassifyArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    batch: BatchArgs,
    #[command(flatten)]
    fields: FieldArgs,
    /// JSON lines to classify ("-" for stdin).
    #[arg(long, short, default_value = "-")]
    input: String,
    /// Where results go ("-" for stdout).
    #[arg(long, short, default_value = "-")]
    output: String,
    /// Include embedding heads' vectors in the output.
    #[arg(long)]
    embeddings: bool,
}

pub fn run(args: ClassifyArgs) -> Result<()> {
    let model = args.model.load()?;
    let options = ClassifyOptions {
        engine: args.batch.engine(),
        fields: args.fields.field_map(),
        max_message_bytes: args.fields.max_message_bytes,
        include_embeddings: args.embeddings,
    };
    let input = open_input(&args.input)?;
    let bar = progress_bar(Progress::Bytes, input.bytes);
    let output = open_output(&args.output)?;
    let reader_bar = bar.clone();
    let summary = classify_stream(model, &options, input.reader, output, move |bytes| reader_bar.set_position(bytes));
    bar.finish_and_clear();
    let summary = match summary {
        Err(ClassifyRunError::Write(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
        other => other?,
    };
    eprintln!("{summary}");
    Ok(())
}
