//! The chat formats of the model families slimchat runs, written here, for when a model's own
//! template is missing or does not work: ChatML (SmolLM, Qwen), Llama 3's header format and
//! Llama 2 / Mistral's `[INST]` format. [`for_vocabulary`] picks one by the vocabulary's marker
//! tokens, as the format a model was trained on is the one whose markers it has.

use candle_core::quantized::gguf_file::{Content, Value};

/// ChatML: `<|im_start|>role\ncontent<|im_end|>\n`.
pub const CHATML: &str = "{% for message in messages %}\
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\
{% endfor %}\
{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Llama 3's format (its template without tools or the date line).
pub const LLAMA3: &str = "{{ bos_token }}{% for message in messages %}\
{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}\
{% endfor %}\
{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}";

/// Llama 2 / Mistral: `[INST] user [/INST] answer</s>`, a system prompt inside the next `[INST]`.
pub const LLAMA2: &str = "{{ bos_token }}{% set ns = namespace(system='') %}\
{% for message in messages %}\
{% if message['role'] == 'system' %}{% set ns.system = '<<SYS>>\\n' + message['content'] + '\\n<</SYS>>\\n\\n' %}\
{% elif message['role'] == 'user' %}{{ '[INST] ' + ns.system + message['content'] + ' [/INST]' }}{% set ns.system = '' %}\
{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}\
{% endfor %}";

/// The known format for a model: `(name, source)`.
pub fn for_vocabulary(content: &Content) -> (&'static str, &'static str) {
    let has = |marker: &str| match content.metadata.get("tokenizer.ggml.tokens") {
        Some(Value::Array(tokens)) => tokens
            .iter()
            .any(|t| matches!(t, Value::String(s) if s == marker)),
        _ => false,
    };
    let spm = matches!(
        content.metadata.get("tokenizer.ggml.model"),
        Some(Value::String(m)) if m == "llama"
    );
    if has("<|im_start|>") {
        ("ChatML", CHATML)
    } else if has("<|start_header_id|>") {
        ("Llama 3", LLAMA3)
    } else if spm || has("[INST]") {
        ("Llama 2", LLAMA2)
    } else {
        ("ChatML", CHATML)
    }
}
