//! The `deadlift` command. It only parses arguments and wires library types together;
//! everything it does is a call into the `deadlift` library.

#![forbid(unsafe_code)]

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use deadlift::{CallContext, Engine, Grant, LogLevel, NewModule, registry};

#[derive(Debug, Parser)]
#[command(
    name = "deadlift",
    version,
    about = "Run Extism plug-ins next to your data"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load a plug-in and call one of its functions
    Run(RunArgs),
    /// Validate a plug-in and list its imports and exports
    Inspect {
        /// The .wasm file
        file: PathBuf,
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The .wasm file
    file: PathBuf,
    /// The exported function to call
    function: String,
    /// Input bytes, given as text
    #[arg(long, default_value = "", conflicts_with = "input_file")]
    input: String,
    /// Read the input from a file instead
    #[arg(long)]
    input_file: Option<PathBuf>,
    /// Call the function this many times on the same warm instance
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    /// Grant a host function (repeatable)
    #[arg(long = "allow", value_name = "HOST_FUNCTION")]
    allow: Vec<String>,
    /// Config value for the plug-in, KEY=VALUE (repeatable)
    #[arg(long = "config", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    config: Vec<(String, String)>,
    /// Wall-clock limit per call
    #[arg(long, default_value_t = 1000)]
    timeout_ms: u64,
    /// Instruction budget per call
    #[arg(long)]
    fuel: Option<u64>,
    /// Memory budget of the instance
    #[arg(long, default_value_t = deadlift::grant::DEFAULT_MEMORY_BYTES)]
    memory_bytes: u64,
    /// Tenant the call runs for (scopes the built-in key-value store)
    #[arg(long, default_value = "default")]
    tenant: String,
}

fn parse_key_value(raw: &str) -> Result<(String, String), String> {
    raw.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, got `{raw}`"))
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(error) = run(Cli::parse()) {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Inspect { file, json } => inspect(&file, json),
        Command::Run(args) => call(args),
    }
}

fn read_module(file: &PathBuf) -> anyhow::Result<Vec<u8>> {
    std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))
}

fn inspect(file: &PathBuf, json: bool) -> anyhow::Result<()> {
    let inspection = registry::inspect(&read_module(file)?)?;
    if json {
        let value = serde_json::json!({
            "id": inspection.id,
            "exports": inspection.exports,
            "imports": inspection.imports,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!("{}", inspection.id);
    for (title, items) in [
        ("exports", &inspection.exports),
        ("imports", &inspection.imports),
    ] {
        println!("{title}:");
        for item in items {
            let name = if item.module.is_empty() {
                item.name.clone()
            } else {
                format!("{}::{}", item.module, item.name)
            };
            println!(
                "  {:<8} {name:<40} {}",
                item.kind,
                item.signature.as_deref().unwrap_or("")
            );
        }
    }
    Ok(())
}

fn call(args: RunArgs) -> anyhow::Result<()> {
    let bytes = read_module(&args.file)?;
    let input = match &args.input_file {
        Some(path) => {
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?
        }
        None => args.input.clone().into_bytes(),
    };
    let engine = Engine::builder()
        .workers(1)
        .log_level(LogLevel::Trace)
        .build()?;
    let name = args
        .file
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("module")
        .replace(
            |c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '_',
            "-",
        );
    let module = engine.add_module(
        &args.tenant,
        NewModule {
            name,
            bytes,
            ..NewModule::default()
        },
    )?;
    let mut grant = Grant::default()
        .allow(args.allow)
        .with_timeout(Duration::from_millis(args.timeout_ms))
        .with_memory_bytes(args.memory_bytes);
    grant.fuel = args.fuel;
    grant.config.extend(args.config);
    let ctx = CallContext::new(args.tenant);
    let mut stdout = std::io::stdout().lock();
    for _ in 0..args.repeat.max(1) {
        let out = match engine.call_blocking(&module.id, &args.function, &input, &grant, &ctx) {
            Ok(out) => out,
            Err(error) => bail!("{} ({})", error, error.code()),
        };
        for line in &out.logs {
            eprintln!("[guest {:?}] {}", line.level, line.message);
        }
        stdout.write_all(&out.output)?;
        writeln!(stdout)?;
        eprintln!(
            "module {}: {} in {:?}, {} fuel",
            module.id, args.function, out.duration, out.fuel_used
        );
    }
    Ok(())
}
