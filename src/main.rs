//! The `slimchat` command line: the chat screen (no subcommand), `run` (headless one-shot
//! answer), `bench`, `eval`, `facts` and `perplexity`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;

use clap::{Args, Parser, Subcommand};

use slimchat::backend::attention::AttentionKind;
use slimchat::backend::linear::LinearMode;
use slimchat::bench::{self, BenchConfig, Mode};
use slimchat::config::AppConfig;
use slimchat::device::DeviceChoice;
use slimchat::engine::{Engine, EngineEvent};
use slimchat::eval::corpus::OwnText;
use slimchat::eval::corpus::Part;
use slimchat::eval::facts::{self, FactsConfig};
use slimchat::eval::{self, EvalConfig};
use slimchat::headless::{self, Overflow};
use slimchat::kv::KvDtype;
use slimchat::model::source::DownloadProgress;
use slimchat::perplexity::{self, PerplexityConfig};
use slimchat::tui::store::Store;
use slimchat::{Error, Result};

/// The system allocator with per-thread budgets: a chat template's render thread is stopped
/// at its budget instead of taking the machine's memory (src/heap_budget.rs).
#[global_allocator]
static ALLOC: slimchat::heap_budget::BudgetedAlloc = slimchat::heap_budget::BudgetedAlloc;

#[derive(Parser)]
#[command(
    name = "slimchat",
    version,
    about = "Chat with long documents; SlimInfer prunes the prompt as it climbs the layers"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    common: Common,
    /// Chat screen: reopen the latest saved conversation, or the one with this id
    #[arg(long, value_name = "ID", num_args = 0..=1, default_missing_value = "latest")]
    resume: Option<String>,
    /// List saved conversations (ids for --resume) and exit
    #[arg(long)]
    list: bool,
    /// Chat screen on a remote OpenAI-compatible engine, e.g. http://host:8080/v1 (else
    /// [backend] url); its key from [backend] api_key or $SLIMCHAT_BACKEND_KEY
    #[arg(long, value_name = "URL")]
    backend_url: Option<String>,
}

#[derive(Args, Clone)]
struct Common {
    /// Model: "default", a .gguf path, hf:owner/name[@rev]/file.gguf, or random:SHAPE[@q4_0|@q8_0] (random weights of llama3.1-8b, llama3.2-3b, llama3.2-1b, qwen2.5-7b or smollm2-135m, for benchmarks)
    #[arg(long, global = true)]
    model: Option<String>,
    /// Config file (default: $SLIMCHAT_CONFIG or the XDG config dir's slimchat/config.toml)
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Linear-layer weights: int8 (GGUF blocks, 8-bit activations: fastest, compact), dense (f32
    /// weights, exact prefill), quantized (candle's) or dense-f32 (f32 decode too: the reference)
    #[arg(long, global = true, value_parser = parse_linear)]
    linear: Option<LinearMode>,
    /// Prefill attention kernel: int8 (8-bit Q·Kᵀ and P·V on AVX-512 VNNI) or f32 (the reference)
    #[arg(long, global = true, value_parser = parse_attention)]
    attention: Option<AttentionKind>,
    /// Worker threads (0 = one per core)
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// SlimInfer pruning: `--slim on|off` (`--slim` alone = on; for `bench`, dense and slim side by side); give it after the subcommand
    #[arg(long, global = true, value_parser = parse_on_off, num_args = 0..=1, default_missing_value = "on")]
    slim: Option<bool>,
    /// SlimInfer keep ratio, in (0, 1]: scales every stage's keep fraction of the preset
    #[arg(long, global = true)]
    keep: Option<f32>,
    /// Where the model runs: auto, cpu or cuda (cuda falls back to the CPU with a note)
    #[arg(long, global = true, value_parser = parse_device)]
    device: Option<DeviceChoice>,
    /// Keep every KV block in the fast tier (no KV manager): the reference run
    #[arg(long, global = true)]
    kv_resident: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Answer one prompt headless, streaming the answer to stdout
    Run(RunArgs),
    /// Time to first token, prefill and decode tokens/s at several prompt lengths
    Bench(BenchArgs),
    /// Fidelity of pruning against dense: teacher-forced agreement, KL, needle retrieval
    Eval(EvalArgs),
    /// Does the pruned model find what dense finds? Planted and natural facts in four kinds of
    /// text, ten phrasings, one to three facts a prompt; a tuning part and a reported part
    Facts(FactsArgs),
    /// Perplexity of the model on a text file, by llama.cpp's `llama-perplexity` method (dense)
    Perplexity(PerplexityArgs),
    /// Serve the engine over an OpenAI-compatible HTTP API: /v1/chat/completions (streaming or
    /// not), /v1/completions, /v1/models, /health; pruning per request with `"slim": {...}`
    Serve(ServeArgs),
    /// On a GPU: kernel checks against the CPU, then dense vs pruned prefill of a
    /// Llama-3.1-8B-shaped model with random weights (needs `--features cuda`)
    GpuCheck(GpuCheckArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on (default 127.0.0.1; anything else needs an API key)
    #[arg(long)]
    host: Option<String>,
    /// Port (default 8080; 0 = any free port, printed at start)
    #[arg(long)]
    port: Option<u16>,
    /// Bearer token clients must send (else [serve] api_key, else $SLIMCHAT_API_KEY)
    #[arg(long)]
    api_key: Option<String>,
    /// Requests that may wait behind the running one; more get 503
    #[arg(long)]
    queue: Option<usize>,
    /// Answer length when a request gives no max_tokens
    #[arg(long)]
    max_tokens: Option<usize>,
}

#[derive(Args)]
struct GpuCheckArgs {
    /// Folder for gpu_check.json
    #[arg(default_value = "gpu-check-out")]
    out_dir: PathBuf,
    /// Prompt lengths in tokens
    #[arg(long, value_delimiter = ',', default_value = "8192,16384,32768")]
    lengths: Vec<usize>,
    /// Decode steps timed after each prefill
    #[arg(long, default_value_t = 32)]
    decode_tokens: usize,
    /// Only the kernel checks
    #[arg(long)]
    kernels: bool,
    /// Only compile kernels/*.cu with NVRTC for this compute capability (e.g. 90); needs NVRTC,
    /// not a GPU
    #[arg(long, value_name = "CC")]
    compile: Option<u32>,
    /// Only the model's (--model) teacher-forced logits over this many tokens of text on the
    /// GPU against the CPU engine's; agreement.json in the folder
    #[arg(long, value_name = "TOKENS", num_args = 0..=1, default_missing_value = "256")]
    agreement: Option<usize>,
}

#[derive(Args)]
struct EvalArgs {
    /// Prompt lengths in tokens
    #[arg(long, value_delimiter = ',', default_value = "2048,4096,8192")]
    lengths: Vec<usize>,
    /// Keep ratios to compare with dense (the configured ratio is marked as the default); 0 is
    /// the unpruned model, to measure --reference-kv or --reference-attention alone
    #[arg(long, value_delimiter = ',', default_value = "0.25,0.35,0.5,0.7")]
    ratios: Vec<f32>,
    /// Length of the dense answer used for teacher forcing
    #[arg(long, default_value_t = 64)]
    answer_tokens: usize,
    /// Needle depths, evenly spaced from 0% to 100%
    #[arg(long, default_value_t = 10)]
    depths: usize,
    /// Documents per length (different parts of the text); each result averages over them
    #[arg(long, default_value_t = 1)]
    documents: usize,
    /// KV element type of the dense reference (f16, bf16 or q8; default: the configured one),
    /// to measure the pruned model in the configured type against a dense model in another
    #[arg(long, value_parser = parse_kv_dtype)]
    reference_kv: Option<KvDtype>,
    /// Prefill attention kernel of the dense reference (int8 or f32; default: the configured
    /// one), to measure the 8-bit kernel against the f32 one
    #[arg(long, value_parser = parse_attention)]
    reference_attention: Option<AttentionKind>,
    /// Print one JSON object with a `results` array at the end
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct FactsArgs {
    /// Which cases: "tune" (first halves of the texts, phrasings 0-4), "report" (second
    /// halves, phrasings 5-9) or "all"
    #[arg(long, default_value = "report")]
    part: String,
    /// Prompt lengths in tokens
    #[arg(long, value_delimiter = ',', default_value = "1024,2048,4096,8192")]
    lengths: Vec<usize>,
    /// Cases per part and length
    #[arg(long, default_value_t = 24)]
    cases: usize,
    /// Answer tokens per fact asked about
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Keep dense answers in this file between runs of one model and build (their TTFTs are
    /// then not side by side with the pruned ones)
    #[arg(long)]
    dense_cache: Option<PathBuf>,
    /// Your own document (UTF-8) to plant the facts in instead of the built-in texts, read
    /// whole by either part; repeat for several. Only planted facts are asked of it
    #[arg(long = "text", value_name = "FILE")]
    texts: Vec<PathBuf>,
    /// Ask each planted case a follow-up in a second turn, about a fact planted in the same
    /// document that the first question left out, after the first turn's cache; report the
    /// follow-ups
    #[arg(long)]
    follow_up: bool,
    /// Print one JSON object with every case and the cells at the end
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct PerplexityArgs {
    /// The text to score (UTF-8)
    #[arg(long, short)]
    file: PathBuf,
    /// Tokens per chunk; the second half of each chunk is scored
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Chunks to score (default: every whole chunk of the text)
    #[arg(long)]
    chunks: Option<usize>,
    /// KV element type (f16, bf16 or q8; default: the configured one); q8 and f16 score alike
    #[arg(long, value_parser = parse_kv_dtype)]
    kv_dtype: Option<KvDtype>,
    /// Print one JSON object at the end (the running estimate goes to stderr)
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct RunArgs {
    /// The user message (otherwise --prompt-file, otherwise stdin)
    #[arg(long, short)]
    prompt: Option<String>,
    /// Read the user message from a file
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    /// System prompt
    #[arg(long)]
    system: Option<String>,
    #[arg(long)]
    max_tokens: Option<usize>,
    /// 0 = greedy
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long)]
    repeat_penalty: Option<f32>,
    #[arg(long)]
    seed: Option<u64>,
    /// Print one JSON object with the answer and its metrics at the end
    #[arg(long)]
    json: bool,
    /// Send a UTF-8 text file with the message, as the chat screen's /read does (repeatable)
    #[arg(long, value_name = "FILE")]
    attach: Vec<PathBuf>,
    /// Continue a saved conversation (an id from --list, or "latest"), or start one ("new"),
    /// and save it with the answer; its id is printed on stderr
    #[arg(long, value_name = "ID")]
    conversation: Option<String>,
    /// With --conversation, when the message leaves no room for an answer: "error" (refuse),
    /// "drop-oldest" (leave out the fewest oldest turns without documents; they stay in the
    /// saved conversation, marked) or "new" (a new conversation with the same system prompt and
    /// documents). A single prompt has no turns to drop: one longer than the context is an error
    #[arg(long, value_name = "POLICY", value_parser = parse_overflow)]
    overflow: Option<Overflow>,
}

#[derive(Args)]
struct BenchArgs {
    /// Prompt lengths in tokens
    #[arg(long, value_delimiter = ',', default_value = "512,1024,2048,4096,8192")]
    lengths: Vec<usize>,
    /// Runs per length
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Tokens generated after each prefill to time decode
    #[arg(long, default_value_t = 32)]
    decode_tokens: usize,
    /// Print one JSON object with a `results` array at the end
    #[arg(long)]
    json: bool,
    /// Instead: this machine's peaks (FMA, int8 and bf16 dot, memory bandwidth), the prefill
    /// GEMM's and the decode GEMV kernels' rates
    #[arg(long)]
    kernels: bool,
    /// Run each mode with the KV manager and all-resident, alternating run by run
    #[arg(long)]
    kv_compare: bool,
    /// With --slim: skip the dense rows (time the pruned engine only)
    #[arg(long)]
    no_dense: bool,
}

fn parse_on_off(s: &str) -> std::result::Result<bool, String> {
    match s {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(format!("expected on or off, got {s}")),
    }
}

fn parse_overflow(s: &str) -> std::result::Result<Overflow, String> {
    Overflow::parse(s)
}

fn parse_device(s: &str) -> std::result::Result<DeviceChoice, String> {
    DeviceChoice::parse(s).ok_or_else(|| format!("expected auto, cpu or cuda, got {s}"))
}

fn parse_attention(s: &str) -> std::result::Result<AttentionKind, String> {
    AttentionKind::parse(s).ok_or_else(|| format!("expected int8 or f32, got {s}"))
}

fn parse_linear(s: &str) -> std::result::Result<LinearMode, String> {
    match s {
        "int8" => Ok(LinearMode::Int8),
        "dense" => Ok(LinearMode::Dense),
        "quantized" => Ok(LinearMode::Quantized),
        "dense-f32" => Ok(LinearMode::DenseF32),
        _ => Err(format!(
            "expected int8, dense, quantized or dense-f32, got {s}"
        )),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Messages from dependencies can span lines; the person gets one.
            let msg = e.to_string();
            eprintln!(
                "slimchat: error: {}",
                msg.split_whitespace().collect::<Vec<_>>().join(" ")
            );
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> Result<()> {
    let mut cfg = AppConfig::load(cli.common.config.as_deref())?;
    if let Some(m) = &cli.common.model {
        cfg.model.source = m.clone();
    }
    if let Some(a) = cli.common.attention {
        cfg.model.attention = a;
    }
    if let Some(l) = cli.common.linear {
        cfg.model.linear = l;
    }
    if let Some(t) = cli.common.threads {
        cfg.model.threads = t;
    }
    if let Some(on) = cli.common.slim {
        cfg.slim.enabled = on;
    }
    if let Some(r) = cli.common.keep {
        cfg.slim.keep_ratio = r;
    }
    if let Some(d) = cli.common.device {
        cfg.model.device = d;
    }
    if cli.common.kv_resident {
        cfg.kv.resident = true;
    }
    if let Some(url) = &cli.backend_url {
        slimchat::config::check_backend_url(url)
            .map_err(|e| Error::Usage(format!("--backend-url: {e}")))?;
        cfg.backend.url = url.clone();
    }
    cfg.slim.validate_keys().map_err(Error::Usage)?;
    if cfg.model.threads > 0 {
        rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.model.threads)
            .build_global()
            .map_err(|e| Error::Engine(format!("thread pool: {e}")))?;
    }
    match cli.command {
        Some(Command::Run(args)) => run(&cfg, args),
        Some(Command::Bench(args)) => {
            let modes = if cli.common.slim == Some(true) && args.no_dense {
                vec![Mode::Slim]
            } else if cli.common.slim == Some(true) {
                vec![Mode::Dense, Mode::Slim]
            } else {
                vec![Mode::Dense]
            };
            if cli.common.keep.is_some() && modes.len() == 1 {
                eprintln!("slimchat: --keep has no effect on a dense-only bench; add --slim");
            }
            run_bench(&cfg, args, modes)
        }
        Some(Command::Eval(args)) => run_eval(&cfg, args),
        Some(Command::Facts(args)) => run_facts(&cfg, args),
        Some(Command::Perplexity(args)) => run_perplexity(&mut cfg, args, cli.common.slim),
        Some(Command::Serve(args)) => serve(cfg, args),
        Some(Command::GpuCheck(args)) => gpu_check(&cfg, args),
        None if cli.list => slimchat::tui::list(&mut std::io::stdout().lock()),
        None => slimchat::tui::run(&cfg, &slimchat::tui::TuiOptions { resume: cli.resume }),
    }
}

#[cfg(not(feature = "cuda"))]
fn gpu_check(_cfg: &AppConfig, _args: GpuCheckArgs) -> Result<()> {
    Err(Error::Usage(
        "gpu-check needs a build with the CUDA backend: cargo build --release --features cuda"
            .into(),
    ))
}

#[cfg(feature = "cuda")]
fn gpu_check(cfg: &AppConfig, args: GpuCheckArgs) -> Result<()> {
    use slimchat::cuda::{kernels, probe};
    use slimchat::gpu_check;
    if let Some(cc) = args.compile {
        probe::probe_nvrtc().map_err(|e| Error::Engine(format!("cuda: {e}")))?;
        println!("slimchat: {}", probe::found());
        for (file, bytes) in kernels::compile_all(cc)? {
            println!("compiled {file} for compute_{cc}: {bytes} bytes of PTX");
        }
        return Ok(());
    }
    if let Err(why) = probe::probe() {
        return Err(Error::Engine(format!(
            "gpu-check: no usable GPU here: {why}"
        )));
    }
    println!("slimchat: {}", probe::found());
    if let Some(tokens) = args.agreement {
        let model =
            slimchat::model::source::ModelSource::parse(&cfg.model.source)?.resolve(&mut |_| {})?;
        gpu_check::agreement::run(
            &model,
            cfg.model.linear,
            tokens,
            &args.out_dir,
            &mut |line| println!("{line}"),
        )?;
        return Ok(());
    }
    // the llama3.1-8b preset at keep ratio 0.5: the paper's 8192/4096/2048 tokens at 32k
    let mut slim = cfg.slim.clone();
    slim.enabled = true;
    slim.preset = "llama3.1-8b".into();
    if cfg.slim.keep_ratio == slimchat::slim::SlimConfig::default().keep_ratio {
        slim.keep_ratio = 0.5;
    }
    let gc = gpu_check::GpuCheckArgs {
        out_dir: args.out_dir,
        lengths: args.lengths,
        decode_tokens: args.decode_tokens,
        kernels_only: args.kernels,
        slim,
    };
    let ok = gpu_check::run(&gc, &mut |line| println!("{line}"))?;
    if ok {
        Ok(())
    } else {
        Err(Error::Engine("gpu-check: some kernel checks failed".into()))
    }
}

fn serve(mut cfg: AppConfig, args: ServeArgs) -> Result<()> {
    use slimchat::serve::{self, ServeOptions};
    let key_from = |s: &str| (!s.is_empty()).then(|| s.to_string());
    let api_key = args
        .api_key
        .or_else(|| key_from(&cfg.serve.api_key))
        .or_else(|| {
            std::env::var(serve::API_KEY_ENV)
                .ok()
                .filter(|k| !k.is_empty())
        });
    if let Some(n) = args.max_tokens {
        if n == 0 {
            return Err(Error::Usage("--max-tokens must be at least 1".into()));
        }
        cfg.chat.max_tokens = n;
    }
    let opts = ServeOptions {
        host: args.host.unwrap_or_else(|| cfg.serve.host.clone()),
        port: args.port.unwrap_or(cfg.serve.port),
        api_key,
        queue: args.queue.unwrap_or(cfg.serve.queue),
        model_id: slimchat::model::source::display_name(&cfg.model.source),
    };
    serve::check_options(&opts)?;
    let engine = load_engine(&cfg)?;
    serve::run(&cfg, engine, opts)
}

fn load_engine(cfg: &AppConfig) -> Result<Engine> {
    let (_, note) = slimchat::device::resolve(cfg.model.device);
    if let Some(note) = note {
        eprintln!("{note}");
    }
    let mut last_pct = u64::MAX;
    let engine = Engine::load_configured(cfg, &mut |p: &DownloadProgress| {
        if let Some(total) = p.total_bytes.filter(|&t| t > 0) {
            let pct = p.done_bytes * 100 / total;
            if pct / 10 != last_pct / 10 {
                eprintln!("slimchat: {}: {pct}%", p.what);
                last_pct = pct;
            }
        }
    })?;
    if let Some(note) = engine.template.note() {
        eprintln!("slimchat: note: {note}");
    }
    if let Some(device) = engine.device() {
        eprintln!("slimchat: the model runs on {device} (`--device cpu` for the CPU engine)");
    }
    Ok(engine)
}

fn read_prompt(args: &RunArgs) -> Result<String> {
    if let Some(p) = &args.prompt {
        return Ok(p.clone());
    }
    let bytes = match &args.prompt_file {
        Some(path) => std::fs::read(path)
            .map_err(|e| Error::Prompt(format!("cannot read {}: {e}", path.display())))?,
        None => {
            let mut buf = Vec::new();
            std::io::stdin().read_to_end(&mut buf)?;
            buf
        }
    };
    let from = args
        .prompt_file
        .as_ref()
        .map_or("stdin".to_string(), |p| p.display().to_string());
    utf8(bytes, &from)
}

/// `bytes` as text, or a one-line error naming where they came from and the first bad byte.
fn utf8(bytes: Vec<u8>, from: &str) -> Result<String> {
    String::from_utf8(bytes).map_err(|e| {
        Error::Prompt(format!(
            "{from} is not valid UTF-8 (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        ))
    })
}

fn run(cfg: &AppConfig, args: RunArgs) -> Result<()> {
    if args.max_tokens == Some(0) {
        return Err(Error::Usage("--max-tokens must be at least 1".into()));
    }
    let prompt = read_prompt(&args)?;
    if prompt.trim().is_empty() {
        return Err(Error::Prompt("empty prompt".into()));
    }
    let mut sampling = cfg.sampling.clone();
    if let Some(v) = args.temperature {
        sampling.temperature = v;
    }
    if let Some(v) = args.top_k {
        sampling.top_k = v;
    }
    if let Some(v) = args.top_p {
        sampling.top_p = v;
    }
    if let Some(v) = args.repeat_penalty {
        sampling.repeat_penalty = v;
    }
    if let Some(v) = args.seed {
        sampling.seed = v;
    }
    sampling.validate().map_err(Error::Usage)?;

    if args.overflow.is_some() && args.conversation.is_none() {
        return Err(Error::Usage(
            "--overflow applies to a conversation continued with --conversation: a single prompt has no turns to drop".into(),
        ));
    }
    let attachments = headless::read_attachments(&args.attach)?;
    let max_tokens = args.max_tokens.unwrap_or(cfg.chat.max_tokens);
    let mut engine = load_engine(cfg)?;
    let cancel = AtomicBool::new(false);
    let stream = !args.json;
    let mut out = std::io::stdout().lock();
    let mut on_event = |ev: EngineEvent| {
        if let (true, EngineEvent::Token(t)) = (stream, &ev) {
            if out
                .write_all(t.as_bytes())
                .and_then(|_| out.flush())
                .is_err()
            {
                cancel.store(true, std::sync::atomic::Ordering::Relaxed); // the reader went away
            }
        }
    };
    let (stats, conversation) = match &args.conversation {
        Some(which) => {
            let store = Store::open_default()?;
            let system = match (&args.system, which.as_str()) {
                (Some(s), _) => Some(s.clone()),
                (None, "new") => Some(cfg.chat.system_prompt.clone()),
                _ => None,
            };
            let turn = headless::Turn {
                conversation: which.clone(),
                text: prompt,
                attachments,
                system,
                max_tokens,
                sampling,
                overflow: args.overflow.unwrap_or_default(),
            };
            let done = headless::answer(&mut engine, &store, &turn, &cancel, &mut on_event)?;
            for note in &done.notes {
                eprintln!("slimchat: {note}");
            }
            (done.stats, Some(done.conversation))
        }
        None => {
            let system = args.system.as_ref().unwrap_or(&cfg.chat.system_prompt);
            let req = headless::single(system, prompt, attachments, max_tokens, sampling);
            (engine.generate(&req, &cancel, &mut on_event)?, None)
        }
    };
    if args.json {
        let mut v = serde_json::to_value(&stats).map_err(|e| Error::Engine(e.to_string()))?;
        v["peak_rss_bytes"] = slimchat::metrics::peak_rss_bytes().into();
        if let Some(id) = &conversation {
            v["conversation"] = id.clone().into();
        }
        writeln!(out, "{v}")?;
    } else {
        writeln!(out)?;
        eprintln!(
            "slimchat: {} prompt tokens, TTFT {:.0} ms, prefill {:.1} tok/s, {}decode {:.1} tok/s, {} tokens ({:?})",
            stats.prompt_tokens, stats.ttft_ms, stats.prefill_tok_s,
            stats.heal_ms.map_or(String::new(), |h| format!("heal after the first token {h:.0} ms, ")),
            stats.decode_tok_s, stats.generated_tokens, stats.stop_reason
        );
    }
    if let Some(id) = conversation {
        eprintln!("slimchat: conversation saved as {id} (run --conversation {id} continues it)");
    }
    Ok(())
}

fn run_bench(cfg: &AppConfig, args: BenchArgs, modes: Vec<Mode>) -> Result<()> {
    if args.kernels {
        slimchat::kernel_bench::run(&mut |line| eprintln!("slimchat bench: {line}"));
        return Ok(());
    }
    let mut engine = load_engine(cfg)?;
    let bc = BenchConfig {
        lengths: args.lengths,
        modes,
        runs: args.runs,
        decode_tokens: args.decode_tokens,
        kv_resident: if args.kv_compare {
            vec![false, true]
        } else {
            vec![cfg.kv.resident]
        },
    };
    let json = args.json;
    let results = bench::run(&mut engine, &bc, &mut |r| {
        eprintln!(
            "slimchat bench: {:>5} tokens {:>6}{}: TTFT {:>8.0} ms (min {:.0}, max {:.0}{}), prefill {:>7.1} tok/s, {}decode {}; KV fast peak {:.1} MiB of dense {:.1} MiB, stall {:.1} ms",
            r.prompt_tokens, r.mode, if r.kv.kv_resident { " resident" } else { "" }, r.ttft_ms, r.ttft_ms_min, r.ttft_ms_max,
            r.ttft_vs_dense.map_or(String::new(), |x| format!("; {x:.3}x dense, median of the rounds")), r.prefill_tok_s,
            r.heal_ms.map_or(String::new(), |h| format!("heal after the first token {h:.0} ms, ")),
            r.decode_tok_s.map_or("n/a (context full)".to_string(), |d| format!("{d:.1} tok/s ({} tokens)", r.decode_tokens)),
            r.kv.kv_fast_bytes_peak as f64 / 1048576.0, r.kv.kv_dense_bytes as f64 / 1048576.0, r.kv.kv_stall_ms
        );
    })?;
    if json {
        let v = serde_json::json!({
            "model": cfg.model.source,
            "threads": rayon::current_num_threads(),
            "linear": cfg.model.linear,
            "modes": bc.modes.iter().map(|m| m.name()).collect::<Vec<_>>(),
            "slim": cfg.slim,
            "results": results,
        });
        println!("{v}");
    }
    Ok(())
}

fn parse_kv_dtype(s: &str) -> std::result::Result<KvDtype, String> {
    KvDtype::parse(s).ok_or_else(|| format!("unknown KV type {s:?}: f16, bf16 or q8"))
}

fn run_eval(cfg: &AppConfig, args: EvalArgs) -> Result<()> {
    let mut engine = load_engine(cfg)?;
    let mut ratios = args.ratios;
    if !ratios
        .iter()
        .any(|r| (r - cfg.slim.keep_ratio).abs() < 1e-6)
    {
        ratios.push(cfg.slim.keep_ratio);
    }
    let ec = EvalConfig {
        lengths: args.lengths,
        ratios,
        default_ratio: cfg.slim.keep_ratio,
        answer_tokens: args.answer_tokens,
        depths: args.depths,
        documents: args.documents,
        reference_kv: args.reference_kv,
        reference_attention: args.reference_attention,
    };
    let results = eval::run(&mut engine, &ec, &mut |r| {
        eprintln!(
            "slimchat eval: {:>5} tokens ({} doc.) ratio {:.2}{}: top-1 agreement {:.3} (lowest {:.3}), mean KL {:.4}, needle dense {:.2} slim {:.2}, TTFT {:.0} -> {:.0} ms, last layer kept {}",
            r.prompt_tokens, r.documents, r.ratio, if r.default { " (default)" } else { "" }, r.top1_agreement, r.min_top1_agreement, r.mean_kl,
            r.needle_acc_dense, r.needle_acc_slim, r.ttft_ms_dense, r.ttft_ms_slim, r.kept_last_layer
        );
    })?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "model": cfg.model.source,
                "kv_dtype": engine.kv_dtype(),
                "reference_kv": args.reference_kv.unwrap_or(engine.kv_dtype()),
                "attention": engine.attention(),
                "reference_attention": args.reference_attention.unwrap_or(engine.attention()),
                "slim": cfg.slim,
                "results": results,
            })
        );
    }
    Ok(())
}

fn run_facts(cfg: &AppConfig, args: FactsArgs) -> Result<()> {
    let parts = Part::parse(&args.part).ok_or_else(|| {
        Error::Usage(format!("unknown part {:?}: tune, report or all", args.part))
    })?;
    let texts = (args.texts.iter())
        .map(|path| {
            Ok(OwnText {
                name: path.display().to_string(),
                body: read_text(path)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut engine = load_engine(cfg)?;
    let fc = FactsConfig {
        parts,
        lengths: args.lengths,
        cases: args.cases,
        max_tokens: args.max_tokens,
        dense_cache: args.dense_cache,
        texts,
        follow_up: args.follow_up,
    };
    let (cases, cells) = facts::run(&mut engine, &fc, &mut |r| {
        eprintln!("slimchat facts: {}", r.line());
    })?;
    eprint!("{}", facts::table(&cells));
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "model": cfg.model.source,
                "kv_dtype": engine.kv_dtype(),
                "slim": cfg.slim,
                "cells": cells,
                "cases": cases,
            })
        );
    }
    Ok(())
}

/// A text file a command reads whole: UTF-8 and not empty, or a one-line error naming it.
fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::Prompt(format!("cannot read {}: {e}", path.display())))?;
    let text = utf8(bytes, &path.display().to_string())?;
    if text.trim().is_empty() {
        return Err(Error::Prompt(format!("{} is empty", path.display())));
    }
    Ok(text)
}

fn run_perplexity(cfg: &mut AppConfig, args: PerplexityArgs, slim: Option<bool>) -> Result<()> {
    let text = read_text(&args.file)?;
    if slim == Some(true) {
        eprintln!("slimchat: perplexity measures the dense model; --slim is ignored");
    }
    // dense: no pruning, and no KV manager (without pruning it would keep every block fast)
    cfg.slim.enabled = false;
    cfg.kv.resident = true;
    if let Some(d) = args.kv_dtype {
        cfg.model.kv_dtype = d;
    }
    let mut engine = load_engine(cfg)?;
    let pc = PerplexityConfig {
        ctx: args.ctx,
        chunks: args.chunks,
    };
    let json = args.json;
    let mut out = std::io::stdout().lock();
    let r = perplexity::run(&mut engine, &text, &pc, &mut |k, estimate| {
        if json {
            eprint!("[{k}]{estimate:.4},");
        } else {
            // a closed stdout only loses the progress; the error shows at the final line
            let _ = write!(out, "[{k}]{estimate:.4},").and_then(|_| out.flush());
        }
    })
    .map_err(|e| match e {
        Error::Prompt(m) => Error::Prompt(format!("{}: {m}", args.file.display())),
        e => e,
    })?;
    if json {
        eprintln!();
        let v = serde_json::json!({
            "model": cfg.model.source,
            "file": args.file,
            "linear": cfg.model.linear,
            "kv_dtype": engine.kv_dtype(),
            "attention": engine.attention(),
            "threads": rayon::current_num_threads(),
            "ppl": r.ppl,
            "ppl_stderr": r.ppl_stderr,
            "tokens": r.tokens,
            "text_tokens": r.text_tokens,
            "chunks": r.chunks,
            "ctx": r.ctx,
            "seconds": r.seconds,
            "running": r.running,
        });
        writeln!(out, "{v}")?;
    } else {
        writeln!(out)?;
        writeln!(
            out,
            "Final estimate: PPL = {:.4} +/- {:.5} ({} tokens scored in {} chunks of {}, {:.1} s)",
            r.ppl, r.ppl_stderr, r.tokens, r.chunks, r.ctx, r.seconds
        )?;
    }
    Ok(())
}
