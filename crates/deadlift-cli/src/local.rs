//! The commands that need no agent: `run` loads a plug-in from a local `.wasm` file into
//! an in-process `Engine` and calls one function under a grant built from the flags;
//! `inspect` validates a file and lists its imports and exports. Named `local` rather
//! than `run` because "run" already means a workflow run everywhere else in the CLI.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use deadlift::{CallContext, Engine, Grant, LogLevel, NewModule, registry};

#[derive(Debug, Args)]
pub struct RunArgs {
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
    /// Let the plug-in reach hosts matching this glob with http_request (repeatable;
    /// an IP address must be given exactly)
    #[arg(long = "allow-host", value_name = "PATTERN")]
    allow_host: Vec<String>,
    /// Allow WASI preview 1 (stdout and stderr are printed as log lines)
    #[arg(long)]
    wasi: bool,
    /// Map a directory for WASI, HOST:GUEST or HOST:GUEST:ro (repeatable; implies --wasi)
    #[arg(long = "dir", value_name = "HOST:GUEST[:ro]", value_parser = parse_dir)]
    dirs: Vec<(String, String, bool)>,
}

fn parse_dir(raw: &str) -> Result<(String, String, bool), String> {
    let (rest, read_only) = match raw.strip_suffix(":ro") {
        Some(rest) => (rest, true),
        None => (raw, false),
    };
    rest.split_once(':')
        .filter(|(host, guest)| !host.is_empty() && !guest.is_empty())
        .map(|(host, guest)| (host.to_owned(), guest.to_owned(), read_only))
        .ok_or_else(|| format!("expected HOST:GUEST or HOST:GUEST:ro, got `{raw}`"))
}

fn parse_key_value(raw: &str) -> Result<(String, String), String> {
    raw.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, got `{raw}`"))
}

/// The bytes of a `.wasm` file, with its path in the error.
pub fn read_module(file: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))
}

pub fn inspect(file: &Path, json: bool) -> anyhow::Result<()> {
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

pub fn run(args: RunArgs) -> anyhow::Result<()> {
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
    grant.allowed_hosts = args.allow_host;
    grant.wasi = args.wasi || !args.dirs.is_empty();
    for (host, guest, read_only) in args.dirs {
        grant = grant.with_dir(host, guest, read_only);
    }
    grant.config.extend(args.config);
    let ctx = CallContext::new(args.tenant);
    let mut stdout = std::io::stdout().lock();
    // The output's bytes exactly; a newline after them only for a person at a terminal.
    let terminal = std::io::IsTerminal::is_terminal(&stdout);
    for _ in 0..args.repeat.max(1) {
        let out = match engine.call_blocking(&module.id, &args.function, &input, &grant, &ctx) {
            Ok(out) => out,
            Err(error) => bail!("{} ({})", error, error.code()),
        };
        for line in &out.logs {
            eprintln!("[guest {:?}] {}", line.level, line.message);
        }
        stdout.write_all(&out.output)?;
        if terminal {
            writeln!(stdout)?;
        }
        stdout.flush()?;
        eprintln!(
            "module {}: {} in {:?}, {} fuel",
            module.id, args.function, out.duration, out.fuel_used
        );
    }
    Ok(())
}
