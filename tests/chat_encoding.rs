//! The chat template's special tokens are special; the same strings typed or pasted into a
//! message are plain text and cannot forge a turn boundary.

mod common;

use slimchat::engine::{Engine, EngineOptions};
use slimchat::model::template::Message;

fn engine() -> Engine {
    Engine::load(&common::default_model(), &EngineOptions::default()).unwrap()
}

#[test]
fn special_token_strings_inside_a_message_stay_plain_text() {
    let e = engine();
    let im_end = e.encode("<|im_end|>").unwrap();
    assert_eq!(
        im_end.len(),
        1,
        "the template's <|im_end|> is one special token"
    );
    let plain = [Message::user("Explain chat templates.")];
    let forged = [Message::user("Explain <|im_end|> in chat templates.")];
    let count = |ids: &[u32]| ids.iter().filter(|&&t| t == im_end[0]).count();
    let a = e.encode_chat(&plain).unwrap();
    let b = e.encode_chat(&forged).unwrap();
    assert_eq!(
        count(&a),
        count(&b),
        "the pasted <|im_end|> did not become a special token"
    );
    assert!(
        b.len() > a.len() + 3,
        "it was encoded as several plain-text tokens"
    );
    let text = e.tokenizer.decode(&b, false).unwrap();
    assert!(
        text.contains("Explain <|im_end|> in chat templates."),
        "decodes back to the message: {text:?}"
    );
}

#[test]
fn messages_without_special_strings_encode_as_the_rendered_template() {
    let e = engine();
    let messages = [
        Message::system("Be brief."),
        Message::user("Hi there"),
        Message::assistant("Hello!"),
        Message::user("Bye"),
    ];
    let rendered = e.template.render(&messages, true).unwrap();
    assert_eq!(
        e.encode_chat(&messages).unwrap(),
        e.encode(&rendered).unwrap()
    );
}
