//! The LLM APIs as the gateway reads them: errors in each API's own shape, usage and tool calls from
//! whole responses, and an SSE meter that passes a stream through event by event while it counts
//! tokens, collects tool calls, and stops the stream before a denied call reaches the client.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::model::{ToolCallRecord, UpstreamKind};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    Chat,
    Responses,
    Messages,
    CountTokens,
    Models,
}

impl Api {
    pub fn name(self) -> &'static str {
        match self {
            Api::Chat => "chat.completions",
            Api::Responses => "responses",
            Api::Messages => "messages",
            Api::CountTokens => "messages.count_tokens",
            Api::Models => "models",
        }
    }

    /// Whether callers of this API expect Anthropic's error shape.
    pub fn anthropic(self) -> bool {
        matches!(self, Api::Messages | Api::CountTokens)
    }

    /// The upstream kind that serves this API.
    pub fn serves(self, kind: UpstreamKind) -> bool {
        match self {
            Api::Chat | Api::Responses => matches!(kind, UpstreamKind::OpenAi | UpstreamKind::OpenAiCompatible),
            Api::Messages | Api::CountTokens => kind == UpstreamKind::Anthropic,
            Api::Models => true,
        }
    }

    /// The path appended to an upstream's base URL (OpenAI's includes `/v1`, Anthropic's does not).
    pub fn upstream_path(self, kind: UpstreamKind) -> &'static str {
        match (self, kind == UpstreamKind::Anthropic) {
            (Api::Chat, _) => "/chat/completions",
            (Api::Responses, _) => "/responses",
            (Api::Messages, _) => "/v1/messages",
            (Api::CountTokens, _) => "/v1/messages/count_tokens",
            (Api::Models, true) => "/v1/models",
            (Api::Models, false) => "/models",
        }
    }
}

/// An error body in the caller's API format.
pub fn error_body(anthropic: bool, status: u16, code: &str, message: &str) -> Vec<u8> {
    let kind = match (status, anthropic) {
        (400, _) => "invalid_request_error",
        (401, _) => "authentication_error",
        (403, _) => "permission_error",
        (404, true) => "not_found_error",
        (404, false) => "invalid_request_error",
        (413, true) => "request_too_large",
        (413, false) => "invalid_request_error",
        (429, true) => "rate_limit_error",
        (429, false) => "rate_limit_exceeded",
        (_, true) => "api_error",
        (_, false) => "api_error",
    };
    let body = if anthropic {
        json!({"type": "error", "error": {"type": kind, "message": message}})
    } else {
        json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
    };
    serde_json::to_vec(&body).expect("JSON serializes")
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub input: u64,
    pub output: u64,
    pub cached: u64,
}

/// What the gateway learned from a response.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    pub usage: Usage,
    pub saw_usage: bool,
    pub tool_calls: Vec<ToolCallRecord>,
    /// An error the upstream reported inside a 200 stream.
    pub error: Option<String>,
}

fn u(v: &Value, path: &[&str]) -> Option<u64> {
    path.iter().try_fold(v, |v, k| v.get(k)).and_then(Value::as_u64)
}

fn s<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

fn openai_usage(usage: &Value) -> Usage {
    Usage {
        input: u(usage, &["prompt_tokens"]).unwrap_or(0),
        output: u(usage, &["completion_tokens"]).unwrap_or(0),
        cached: u(usage, &["prompt_tokens_details", "cached_tokens"]).unwrap_or(0),
    }
}

fn responses_usage(usage: &Value) -> Usage {
    Usage {
        input: u(usage, &["input_tokens"]).unwrap_or(0),
        output: u(usage, &["output_tokens"]).unwrap_or(0),
        cached: u(usage, &["input_tokens_details", "cached_tokens"]).unwrap_or(0),
    }
}

/// Anthropic counts cache reads and writes apart from `input_tokens`; the total input is their sum.
fn anthropic_usage(usage: &Value, into: &mut Usage) {
    let cached = u(usage, &["cache_read_input_tokens"]);
    let created = u(usage, &["cache_creation_input_tokens"]);
    if let Some(input) = u(usage, &["input_tokens"]) {
        into.input = input.saturating_add(cached.unwrap_or(0)).saturating_add(created.unwrap_or(0));
    }
    if let Some(c) = cached {
        into.cached = c;
    }
    if let Some(output) = u(usage, &["output_tokens"]) {
        into.output = output;
    }
}

fn tool(name: &str, arguments: String) -> ToolCallRecord {
    ToolCallRecord { name: name.to_string(), arguments, blocked: false }
}

/// Usage and tool calls of a whole (non-streamed) response.
pub fn observe(api: Api, body: &Value) -> Observed {
    let mut o = Observed::default();
    match api {
        Api::Chat => {
            if let Some(usage) = body.get("usage").filter(|u| u.is_object()) {
                o.usage = openai_usage(usage);
                o.saw_usage = true;
            }
            for choice in body.get("choices").and_then(Value::as_array).into_iter().flatten() {
                let calls = choice.pointer("/message/tool_calls").and_then(Value::as_array);
                for call in calls.into_iter().flatten() {
                    let f = call.get("function").or(call.get("custom")).unwrap_or(&Value::Null);
                    let args = s(f, "arguments").or(s(f, "input")).unwrap_or("");
                    o.tool_calls.push(tool(s(f, "name").unwrap_or(""), args.into()));
                }
            }
        }
        Api::Responses => {
            if let Some(usage) = body.get("usage").filter(|u| u.is_object()) {
                o.usage = responses_usage(usage);
                o.saw_usage = true;
            }
            for item in body.get("output").and_then(Value::as_array).into_iter().flatten() {
                if s(item, "type").is_some_and(responses_tool_item) {
                    let args = s(item, "arguments").or(s(item, "input")).unwrap_or("");
                    o.tool_calls.push(tool(s(item, "name").unwrap_or(""), args.into()));
                }
            }
        }
        Api::Messages => {
            if let Some(usage) = body.get("usage").filter(|u| u.is_object()) {
                anthropic_usage(usage, &mut o.usage);
                o.saw_usage = true;
            }
            for block in body.get("content").and_then(Value::as_array).into_iter().flatten() {
                if s(block, "type").is_some_and(anthropic_tool_block) {
                    let input = block.get("input").map(Value::to_string).unwrap_or_default();
                    o.tool_calls.push(tool(s(block, "name").unwrap_or(""), input));
                }
            }
        }
        Api::CountTokens | Api::Models => {}
    }
    o
}

/// Responses output items that call a tool by name.
fn responses_tool_item(kind: &str) -> bool {
    matches!(kind, "function_call" | "custom_tool_call" | "mcp_call")
}

/// Anthropic content blocks that call a tool by name.
fn anthropic_tool_block(kind: &str) -> bool {
    matches!(kind, "tool_use" | "server_tool_use" | "mcp_tool_use")
}

/// A tool call being assembled from stream events.
#[derive(Default)]
struct Partial {
    name: String,
    arguments: String,
    blocked: bool,
}

/// Reads an SSE stream event by event and decides what of it the client gets.
pub struct SseMeter {
    api: Api,
    pending: Vec<u8>,
    /// Where the scan for the end of the next event resumes.
    scanned: usize,
    pub observed: Observed,
    tools: BTreeMap<(u64, String), Partial>,
    /// Drop OpenAI's usage-only chunk: the gateway asked for it, the client did not.
    hide_usage_chunk: bool,
    deny: Vec<String>,
    /// Set once a denied tool call stopped the stream: `(tool, glob)`.
    pub blocked: Option<(String, String)>,
    /// Set once the API's final event passed (`[DONE]`, `message_stop`, `response.completed`).
    pub ended: bool,
}

impl SseMeter {
    pub fn new(api: Api, hide_usage_chunk: bool, deny: Vec<String>) -> SseMeter {
        SseMeter {
            api,
            pending: Vec::new(),
            scanned: 0,
            observed: Observed::default(),
            tools: BTreeMap::new(),
            hide_usage_chunk,
            deny,
            blocked: None,
            ended: false,
        }
    }

    /// Feeds bytes from the upstream; appends what the client should receive to `out`. After a
    /// block nothing more passes.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) {
        if self.blocked.is_some() {
            return;
        }
        self.pending.extend_from_slice(data);
        while let Some(end) = self.event_end() {
            let event: Vec<u8> = self.pending.drain(..end).collect();
            self.scanned = 0;
            self.handle(&event, out);
            if self.blocked.is_some() {
                self.pending.clear();
                return;
            }
        }
    }

    /// The upstream ended: a trailing event without its blank line still counts.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.blocked.is_none() && !self.pending.iter().all(u8::is_ascii_whitespace) {
            let event = std::mem::take(&mut self.pending);
            self.handle(&event, out);
        }
    }

    /// The tool calls seen, in order.
    pub fn tool_calls(&self) -> Vec<ToolCallRecord> {
        self.tools
            .values()
            .map(|p| ToolCallRecord { name: p.name.clone(), arguments: p.arguments.clone(), blocked: p.blocked })
            .collect()
    }

    /// The end (exclusive) of the first complete event: the position after its blank line.
    fn event_end(&mut self) -> Option<usize> {
        let p = &self.pending;
        let mut i = self.scanned;
        while let Some(nl) = p[i..].iter().position(|b| *b == b'\n') {
            let next = i + nl + 1;
            match (p.get(next), p.get(next + 1)) {
                (Some(b'\n'), _) => return Some(next + 1),
                (Some(b'\r'), Some(b'\n')) => return Some(next + 2),
                // A line end split between chunks: look again when more arrives.
                (None, _) | (Some(b'\r'), None) => {
                    self.scanned = i;
                    return None;
                }
                (Some(_), _) => i = next,
            }
        }
        self.scanned = i;
        None
    }

    fn handle(&mut self, raw: &[u8], out: &mut Vec<u8>) {
        let text = String::from_utf8_lossy(raw);
        let mut event_name = None;
        let mut data = String::new();
        for line in text.lines() {
            if let Some(v) = line.strip_prefix("event:") {
                event_name = Some(v.trim().to_string());
            } else if let Some(v) = line.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(v.strip_prefix(' ').unwrap_or(v));
            }
        }
        let value: Option<Value> = serde_json::from_str(&data).ok();
        let kind = value.as_ref().and_then(|v| s(v, "type")).or(event_name.as_deref());
        self.ended |= match self.api {
            Api::Chat => data.trim() == "[DONE]",
            Api::Responses => matches!(kind, Some("response.completed" | "response.incomplete" | "response.failed")),
            Api::Messages => kind == Some("message_stop"),
            Api::CountTokens | Api::Models => false,
        };
        let pass = match value {
            Some(v) => self.inspect(event_name.as_deref(), &v),
            None => true,
        };
        if let Some((tool, glob)) = self.blocked.clone() {
            out.extend_from_slice(&self.block_event(&tool, &glob));
        } else if pass {
            out.extend_from_slice(raw);
        }
    }

    /// Records what one event says; returns whether the client gets it.
    fn inspect(&mut self, event: Option<&str>, v: &Value) -> bool {
        match self.api {
            Api::Chat => {
                if let Some(usage) = v.get("usage").filter(|u| u.is_object()) {
                    self.observed.usage = openai_usage(usage);
                    self.observed.saw_usage = true;
                    let no_choices = v.get("choices").and_then(Value::as_array).is_none_or(Vec::is_empty);
                    if self.hide_usage_chunk && no_choices {
                        return false;
                    }
                }
                if let Some(e) = v.get("error") {
                    self.observed.error = Some(e.to_string());
                }
                for (ci, choice) in v.get("choices").and_then(Value::as_array).into_iter().flatten().enumerate() {
                    let choice_index = u(choice, &["index"]).unwrap_or(ci as u64);
                    let calls = choice.pointer("/delta/tool_calls").and_then(Value::as_array);
                    for call in calls.into_iter().flatten() {
                        let index = u(call, &["index"]).unwrap_or(0);
                        let f = call.get("function").or(call.get("custom")).unwrap_or(&Value::Null);
                        let args = s(f, "arguments").or(s(f, "input"));
                        self.tool_part((choice_index, index.to_string()), s(f, "name"), args, false);
                    }
                }
            }
            Api::Responses => {
                let kind = s(v, "type").or(event).unwrap_or("");
                match kind {
                    "response.output_item.added" | "response.output_item.done" => {
                        let item = v.get("item").unwrap_or(&Value::Null);
                        if s(item, "type").is_some_and(responses_tool_item) {
                            let key = (0, s(item, "id").unwrap_or("").to_string());
                            let args = s(item, "arguments").filter(|a| !a.is_empty());
                            self.tool_part(key, s(item, "name"), args, true);
                        }
                    }
                    "response.function_call_arguments.delta" => {
                        let key = (0, s(v, "item_id").unwrap_or("").to_string());
                        self.tool_part(key, None, s(v, "delta"), false);
                    }
                    "response.function_call_arguments.done" => {
                        let key = (0, s(v, "item_id").unwrap_or("").to_string());
                        self.tool_part(key, None, s(v, "arguments"), true);
                    }
                    "response.completed" | "response.incomplete" | "response.failed" => {
                        if let Some(usage) = v.pointer("/response/usage").filter(|u| u.is_object()) {
                            self.observed.usage = responses_usage(usage);
                            self.observed.saw_usage = true;
                        }
                        if kind == "response.failed" {
                            self.observed.error =
                                Some(v.pointer("/response/error").unwrap_or(&Value::Null).to_string());
                        }
                    }
                    "error" => self.observed.error = Some(v.to_string()),
                    _ => {}
                }
            }
            Api::Messages => {
                let kind = s(v, "type").or(event).unwrap_or("");
                match kind {
                    "message_start" => {
                        if let Some(usage) = v.pointer("/message/usage") {
                            anthropic_usage(usage, &mut self.observed.usage);
                            self.observed.saw_usage = true;
                        }
                    }
                    "message_delta" => {
                        // Cumulative: overwrite, never add.
                        if let Some(usage) = v.get("usage") {
                            anthropic_usage(usage, &mut self.observed.usage);
                            self.observed.saw_usage = true;
                        }
                    }
                    "content_block_start" => {
                        let block = v.get("content_block").unwrap_or(&Value::Null);
                        if s(block, "type").is_some_and(anthropic_tool_block) {
                            let key = (u(v, &["index"]).unwrap_or(0), String::new());
                            self.tool_part(key, s(block, "name"), None, false);
                        }
                    }
                    "content_block_delta"
                        if v.pointer("/delta/type").and_then(Value::as_str) == Some("input_json_delta") =>
                    {
                        let key = (u(v, &["index"]).unwrap_or(0), String::new());
                        self.tool_part(key, None, v.pointer("/delta/partial_json").and_then(Value::as_str), false);
                    }
                    "error" => self.observed.error = Some(v.get("error").unwrap_or(v).to_string()),
                    _ => {}
                }
            }
            Api::CountTokens | Api::Models => {}
        }
        self.blocked.is_none()
    }

    /// Adds to a tool call (`replace`: the event carries the whole value, else a fragment); blocks the
    /// stream as soon as the name so far is denied.
    fn tool_part(&mut self, key: (u64, String), name: Option<&str>, args: Option<&str>, replace: bool) {
        let part = self.tools.entry(key).or_default();
        if let Some(n) = name.filter(|n| !n.is_empty()) {
            if replace || part.name.is_empty() {
                part.name = n.to_string();
            } else {
                part.name.push_str(n);
            }
            if let Some(glob) = self.deny.iter().find(|g| crate::oidc::glob_match(g, &part.name)) {
                part.blocked = true;
                self.blocked = Some((part.name.clone(), glob.clone()));
            }
        }
        if let Some(a) = args {
            if replace {
                part.arguments = a.to_string();
            } else {
                part.arguments.push_str(a);
            }
        }
    }

    /// The event that ends a blocked stream, in the API's own error shape.
    fn block_event(&self, tool: &str, glob: &str) -> Vec<u8> {
        let message = denied_tool_message(tool, glob);
        let body = match self.api {
            Api::Messages => {
                json!({"type": "error", "error": {"type": "permission_error", "message": message}})
            }
            Api::Responses => json!({
                "type": "error", "code": "tool_denied", "message": message, "param": null,
                "error": {"type": "permission_error", "code": "tool_denied", "message": message},
            }),
            _ => {
                json!({"error": {"message": message, "type": "permission_error", "param": null, "code": "tool_denied"}})
            }
        };
        let name = if self.api == Api::Chat { "" } else { "event: error\n" };
        format!("{name}data: {body}\n\n").into_bytes()
    }
}

pub fn denied_tool_message(tool: &str, glob: &str) -> String {
    format!(
        "the response called tool {tool:?}, which this node may not use (rule tools.deny {glob:?}); the gateway blocked it"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(meter: &mut SseMeter, stream: &str, split: usize) -> String {
        let mut out = Vec::new();
        for chunk in stream.as_bytes().chunks(split) {
            meter.feed(chunk, &mut out);
        }
        meter.finish(&mut out);
        String::from_utf8(out).unwrap()
    }

    const CHAT: &str = concat!(
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"c1\",\"function\":{\"name\":\"get_weather\",\"arguments\":\"\"}}]}}],\"usage\":null}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"city\\\":\"}}]}}],\"usage\":null}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"\\\"Oslo\\\"}\"}}]}}],\"usage\":null}\n\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":7,\"prompt_tokens_details\":{\"cached_tokens\":3}}}\n\n",
        "data: [DONE]\n\n",
    );

    #[test]
    fn chat_stream_usage_and_tools_whatever_the_chunking() {
        for split in [1, 7, 64, 4096] {
            let mut m = SseMeter::new(Api::Chat, true, vec![]);
            let out = run(&mut m, CHAT, split);
            assert_eq!(m.observed.usage, Usage { input: 11, output: 7, cached: 3 });
            assert_eq!(m.tool_calls(), vec![tool("get_weather", "{\"city\":\"Oslo\"}".into())]);
            assert!(!out.contains("prompt_tokens"), "the usage chunk the client did not ask for is hidden");
            assert!(out.ends_with("data: [DONE]\n\n"));
        }
        let mut m = SseMeter::new(Api::Chat, false, vec![]);
        assert_eq!(run(&mut m, CHAT, 10), CHAT, "passed through unchanged");
        // CRLF line ends, split anywhere (also between the \r and the \n).
        let crlf = CHAT.replace('\n', "\r\n");
        for split in [1, 2, 3, 5, 33] {
            let mut m = SseMeter::new(Api::Chat, true, vec!["get_*".into()]);
            let out = run(&mut m, &crlf, split);
            assert!(m.blocked.is_some() && out.contains("tool_denied"), "split {split}: {out}");
        }
    }

    #[test]
    fn a_tool_name_streamed_in_pieces_is_checked_whole() {
        let stream = concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"name\":\"shell\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"name\":\".exec\"}}]}}]}\n\n",
        );
        let mut m = SseMeter::new(Api::Chat, false, vec!["shell.exec".into()]);
        run(&mut m, stream, 4096);
        assert_eq!(m.blocked, Some(("shell.exec".into(), "shell.exec".into())));
    }

    #[test]
    fn a_denied_tool_ends_the_stream_before_it_reaches_the_client() {
        let mut m = SseMeter::new(Api::Chat, false, vec!["get_*".into()]);
        let out = run(&mut m, CHAT, 13);
        assert!(!out.contains("get_weather\",\"arguments"), "{out}");
        assert!(out.contains("tool_denied") && !out.contains("[DONE]"), "{out}");
        assert_eq!(m.blocked, Some(("get_weather".into(), "get_*".into())));
        assert!(m.tool_calls()[0].blocked);
    }

    #[test]
    fn anthropic_usage_is_cumulative() {
        let stream = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":20,\"cache_read_input_tokens\":5,\"output_tokens\":1}}}\n\n",
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"t\",\"name\":\"shell.exec\",\"input\":{}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"cmd\\\": \\\"ls\\\"}\"}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":9}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\n",
        );
        let mut m = SseMeter::new(Api::Messages, false, vec![]);
        run(&mut m, stream, 5);
        assert_eq!(m.observed.usage, Usage { input: 25, output: 15, cached: 5 });
        assert_eq!(m.tool_calls(), vec![tool("shell.exec", "{\"cmd\": \"ls\"}".into())]);
    }

    #[test]
    fn responses_stream_records_function_calls_and_final_usage() {
        let stream = concat!(
            "event: response.output_item.added\ndata: {\"type\":\"response.output_item.added\",\"output_index\":0,\"item\":{\"type\":\"function_call\",\"id\":\"fc1\",\"name\":\"lookup\",\"arguments\":\"\"}}\n\n",
            "event: response.function_call_arguments.delta\ndata: {\"type\":\"response.function_call_arguments.delta\",\"item_id\":\"fc1\",\"delta\":\"{\\\"q\\\":1}\"}\n\n",
            "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":4,\"output_tokens\":6}}}\n\n",
        );
        let mut m = SseMeter::new(Api::Responses, false, vec![]);
        run(&mut m, stream, 9);
        assert_eq!(m.observed.usage, Usage { input: 4, output: 6, cached: 0 });
        assert_eq!(m.tool_calls(), vec![tool("lookup", "{\"q\":1}".into())]);
    }
}
