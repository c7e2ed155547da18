//! Chat templates: a model's Hugging Face Jinja template, rendered with minijinja under a
//! fuel bound (a signed template cannot loop the node forever).

use minijinja::value::Value;
use minijinja::{Environment, Error, ErrorKind, State};
use serde::Serialize;

/// Instructions a template may run per rendering: far above what real chat templates
/// need for a long conversation, far below a stuck node.
const FUEL: u64 = 2_000_000;
/// Longest rendered prompt, bytes (a template could otherwise multiply its input).
const MAX_RENDERED: usize = 4 << 20;

/// One message of a chat.
#[derive(Clone, Debug, Serialize)]
pub struct Message {
    /// `system`, `user`, `assistant` (or what the template knows).
    pub role: String,
    /// The text.
    pub content: String,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChatTemplate")
    }
}

impl ChatTemplate {
    /// Compile `source`; an error names the template's fault.
    pub fn new(source: &str) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_fuel(Some(FUEL));
        env.set_recursion_limit(64);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.set_unknown_method_callback(python_methods);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| format!("chat template: {e}"))?;
        Ok(ChatTemplate { env })
    }

    /// Render `messages` with the generation prompt appended (the assistant's turn).
    pub fn render(
        &self,
        messages: &[Message],
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String, String> {
        let t = self
            .env
            .get_template("chat")
            .map_err(|e| format!("chat template: {e}"))?;
        let out = t
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => bos_token,
                eos_token => eos_token,
            })
            .map_err(|e| format!("the model's chat template failed on these messages: {e}"))?;
        if out.len() > MAX_RENDERED {
            return Err("the chat template rendered an over-long prompt".into());
        }
        Ok(out)
    }
}

/// The Python string and dict methods chat templates call (Jinja runs on Python objects;
/// minijinja does not have their methods).
fn python_methods(
    _: &State<'_, '_>,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, Error> {
    let arg = |i: usize| args.get(i).and_then(|a| a.as_str().map(str::to_string));
    if let Some(s) = value.as_str() {
        let chars = arg(0);
        let set = |c: char| {
            chars
                .as_deref()
                .map_or(c.is_whitespace(), |cs| cs.contains(c))
        };
        return Ok(match method {
            "strip" => Value::from(s.trim_matches(set)),
            "lstrip" => Value::from(s.trim_start_matches(set)),
            "rstrip" => Value::from(s.trim_end_matches(set)),
            "upper" => Value::from(s.to_uppercase()),
            "lower" => Value::from(s.to_lowercase()),
            "startswith" => Value::from(arg(0).is_some_and(|p| s.starts_with(&p))),
            "endswith" => Value::from(arg(0).is_some_and(|p| s.ends_with(&p))),
            "split" => match arg(0) {
                Some(sep) if !sep.is_empty() => {
                    Value::from(s.split(sep.as_str()).map(Value::from).collect::<Vec<_>>())
                }
                _ => Value::from(s.split_whitespace().map(Value::from).collect::<Vec<_>>()),
            },
            _ => return Err(Error::from(ErrorKind::UnknownMethod)),
        });
    }
    match method {
        "get" => {
            let key = args.first().cloned().unwrap_or(Value::UNDEFINED);
            let found = value.get_item(&key).unwrap_or(Value::UNDEFINED);
            Ok(if found.is_undefined() {
                args.get(1).cloned().unwrap_or(Value::from(()))
            } else {
                found
            })
        }
        _ => Err(Error::from(ErrorKind::UnknownMethod)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and \
        messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}\
        {% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'].strip() + \
        '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn user(text: &str) -> Message {
        Message {
            role: "user".into(),
            content: text.into(),
        }
    }

    #[test]
    fn chatml_renders_as_hugging_face_does() {
        let t = ChatTemplate::new(CHATML).expect("compiles");
        let out = t
            .render(&[user(" Hi ")], "", "<|im_end|>")
            .expect("renders");
        assert_eq!(
            out,
            "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\n"
        );
    }

    #[test]
    fn a_template_that_raises_or_loops_is_an_error_not_a_hang() {
        let t = ChatTemplate::new("{{ raise_exception('only user turns') }}").expect("compiles");
        assert!(
            t.render(&[user("x")], "", "")
                .unwrap_err()
                .contains("only user turns")
        );
        let t = ChatTemplate::new(
            "{% for a in range(10000) %}{% for b in range(10000) %}x{% endfor %}{% endfor %}",
        )
        .expect("compiles");
        assert!(t.render(&[user("x")], "", "").is_err());
        assert!(ChatTemplate::new("{% for %}").is_err());
    }
}
