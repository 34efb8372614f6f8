//! A JSON reader that accepts `//` and `/* */` comments and trailing commas, and remembers the line and
//! column of every value so that policy errors can point at the place. It never panics: every input is
//! either a document or an error with a position.

use std::fmt;

/// A 1-based line and column.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pos {
    pub line: u32,
    pub col: u32,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.col)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(String),
    Array(Vec<Node>),
    /// Members in document order, each with the position of its key.
    Object(Vec<(String, Pos, Node)>),
}

/// A value and where it starts.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub pos: Pos,
    pub value: Value,
}

impl Node {
    pub fn kind(&self) -> &'static str {
        match self.value {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Number(_) => "a number",
            Value::String(_) => "a string",
            Value::Array(_) => "an array",
            Value::Object(_) => "an object",
        }
    }

    /// The plain JSON value (positions dropped).
    pub fn to_json(&self) -> serde_json::Value {
        match &self.value {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => serde_json::Value::Bool(*b),
            Value::Number(n) => serde_json::Value::Number(n.clone()),
            Value::String(s) => serde_json::Value::String(s.clone()),
            Value::Array(items) => serde_json::Value::Array(items.iter().map(Node::to_json).collect()),
            Value::Object(members) => {
                serde_json::Value::Object(members.iter().map(|(k, _, v)| (k.clone(), v.to_json())).collect())
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

const MAX_DEPTH: usize = 64;

pub fn parse(text: &str) -> Result<Node, SyntaxError> {
    let mut p = Parser { chars: text.chars().collect(), i: 0, line: 1, col: 1 };
    p.skip_space()?;
    let node = p.value(0)?;
    p.skip_space()?;
    if p.i < p.chars.len() {
        return Err(p.error("unexpected text after the document"));
    }
    Ok(node)
}

struct Parser {
    chars: Vec<char>,
    i: usize,
    line: u32,
    col: u32,
}

impl Parser {
    fn pos(&self) -> Pos {
        Pos { line: self.line, col: self.col }
    }

    fn error(&self, message: impl Into<String>) -> SyntaxError {
        SyntaxError { pos: self.pos(), message: message.into() }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.i).copied()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.i += 1;
        if c == '\n' {
            self.line += 1;
            self.col = 1;
        } else {
            self.col += 1;
        }
        Some(c)
    }

    fn skip_space(&mut self) -> Result<(), SyntaxError> {
        loop {
            match self.peek() {
                Some(c) if c.is_whitespace() => {
                    self.bump();
                }
                Some('/') => match self.chars.get(self.i + 1) {
                    Some('/') => {
                        while self.peek().is_some_and(|c| c != '\n') {
                            self.bump();
                        }
                    }
                    Some('*') => {
                        let start = self.pos();
                        self.bump();
                        self.bump();
                        loop {
                            match self.bump() {
                                Some('*') if self.peek() == Some('/') => {
                                    self.bump();
                                    break;
                                }
                                Some(_) => {}
                                None => {
                                    return Err(SyntaxError {
                                        pos: start,
                                        message: "comment is not closed with */".into(),
                                    });
                                }
                            }
                        }
                    }
                    _ => return Err(self.error("unexpected '/'")),
                },
                _ => return Ok(()),
            }
        }
    }

    fn expect(&mut self, word: &str) -> Result<(), SyntaxError> {
        for w in word.chars() {
            if self.peek() != Some(w) {
                return Err(self.error(format!("expected {word:?}")));
            }
            self.bump();
        }
        Ok(())
    }

    fn value(&mut self, depth: usize) -> Result<Node, SyntaxError> {
        if depth > MAX_DEPTH {
            return Err(self.error(format!("nested more than {MAX_DEPTH} deep")));
        }
        let pos = self.pos();
        let value = match self.peek() {
            None => return Err(self.error("unexpected end of the document")),
            Some('{') => self.object(depth)?,
            Some('[') => self.array(depth)?,
            Some('"') => Value::String(self.string()?),
            Some('t') => {
                self.expect("true")?;
                Value::Bool(true)
            }
            Some('f') => {
                self.expect("false")?;
                Value::Bool(false)
            }
            Some('n') => {
                self.expect("null")?;
                Value::Null
            }
            Some(c) if c == '-' || c.is_ascii_digit() => self.number()?,
            Some(c) => return Err(self.error(format!("unexpected {c:?}"))),
        };
        Ok(Node { pos, value })
    }

    fn object(&mut self, depth: usize) -> Result<Value, SyntaxError> {
        self.bump();
        let mut members: Vec<(String, Pos, Node)> = Vec::new();
        loop {
            self.skip_space()?;
            if self.peek() == Some('}') {
                self.bump();
                return Ok(Value::Object(members));
            }
            let key_pos = self.pos();
            if self.peek() != Some('"') {
                return Err(self.error("expected a quoted key or '}'"));
            }
            let key = self.string()?;
            if members.iter().any(|(k, _, _)| *k == key) {
                return Err(SyntaxError { pos: key_pos, message: format!("duplicate key {key:?}") });
            }
            self.skip_space()?;
            if self.peek() != Some(':') {
                return Err(self.error(format!("expected ':' after {key:?}")));
            }
            self.bump();
            self.skip_space()?;
            let value = self.value(depth + 1)?;
            members.push((key, key_pos, value));
            self.skip_space()?;
            match self.peek() {
                Some(',') => {
                    self.bump();
                }
                Some('}') => {}
                _ => return Err(self.error("expected ',' or '}'")),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<Value, SyntaxError> {
        self.bump();
        let mut items = Vec::new();
        loop {
            self.skip_space()?;
            if self.peek() == Some(']') {
                self.bump();
                return Ok(Value::Array(items));
            }
            items.push(self.value(depth + 1)?);
            self.skip_space()?;
            match self.peek() {
                Some(',') => {
                    self.bump();
                }
                Some(']') => {}
                _ => return Err(self.error("expected ',' or ']'")),
            }
        }
    }

    fn string(&mut self) -> Result<String, SyntaxError> {
        let start = self.pos();
        self.bump();
        let mut out = String::new();
        loop {
            match self.bump() {
                None | Some('\n') => return Err(SyntaxError { pos: start, message: "string is not closed".into() }),
                Some('"') => return Ok(out),
                Some('\\') => match self.bump() {
                    Some('"') => out.push('"'),
                    Some('\\') => out.push('\\'),
                    Some('/') => out.push('/'),
                    Some('b') => out.push('\u{8}'),
                    Some('f') => out.push('\u{c}'),
                    Some('n') => out.push('\n'),
                    Some('r') => out.push('\r'),
                    Some('t') => out.push('\t'),
                    Some('u') => {
                        let code = self.hex4()?;
                        let c = if (0xd800..0xdc00).contains(&code) {
                            // A surrogate pair.
                            if self.bump() != Some('\\') || self.bump() != Some('u') {
                                return Err(self.error("a high surrogate must be followed by \\u and a low one"));
                            }
                            let low = self.hex4()?;
                            if !(0xdc00..0xe000).contains(&low) {
                                return Err(self.error("invalid low surrogate"));
                            }
                            char::from_u32(0x10000 + ((code - 0xd800) << 10) + (low - 0xdc00))
                        } else {
                            char::from_u32(code)
                        };
                        out.push(c.ok_or_else(|| self.error("invalid \\u escape"))?);
                    }
                    _ => return Err(self.error("invalid escape")),
                },
                Some(c) if (c as u32) < 0x20 => return Err(self.error("control character in a string")),
                Some(c) => out.push(c),
            }
        }
    }

    fn hex4(&mut self) -> Result<u32, SyntaxError> {
        let mut code = 0;
        for _ in 0..4 {
            let d = self.bump().and_then(|c| c.to_digit(16)).ok_or_else(|| self.error("expected 4 hex digits"))?;
            code = code * 16 + d;
        }
        Ok(code)
    }

    fn number(&mut self) -> Result<Value, SyntaxError> {
        let start = self.i;
        let pos = self.pos();
        while self.peek().is_some_and(|c| c.is_ascii_digit() || "+-.eE".contains(c)) {
            self.bump();
        }
        let text: String = self.chars[start..self.i].iter().collect();
        serde_json::from_str::<serde_json::Number>(&text)
            .map(Value::Number)
            .map_err(|_| SyntaxError { pos, message: format!("{text:?} is not a number") })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_and_trailing_commas() {
        let doc = parse("// policy\n{\n  /* groups */ \"a\": [1, 2,],\n  \"b\": {\"c\": true,},\n}\n").unwrap();
        assert_eq!(doc.to_json(), serde_json::json!({"a": [1, 2], "b": {"c": true}}));
        let Value::Object(members) = &doc.value else { panic!() };
        assert_eq!(members[1].1, Pos { line: 4, col: 3 });
    }

    #[test]
    fn errors_have_positions() {
        let e = parse("{\n  \"a\": [1 2]\n}").unwrap_err();
        assert_eq!((e.pos.line, e.pos.col), (2, 11), "at the 2");
        assert!(parse("{\"a\": 1, \"a\": 2}").unwrap_err().message.contains("duplicate"));
        assert!(parse("/* open").is_err());
        assert!(parse(&"[".repeat(100)).unwrap_err().message.contains("nested"));
        assert_eq!(parse("\"\\ud83d\\ude00\"").unwrap().to_json(), serde_json::json!("😀"));
    }

    #[test]
    fn never_panics_on_arbitrary_input() {
        // A deterministic pseudo-random walk over inputs built from JSON's own alphabet.
        let alphabet: Vec<char> = "{}[]\":,/*\\ \n\tatrue0123456789.-eEnulfsx\u{e9}\u{1F600}".chars().collect();
        let mut state: u64 = 0x9e3779b97f4a7c15;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 40) as usize;
            let text: String = (0..len)
                .map(|i| {
                    let r = state.rotate_left(i as u32 * 7);
                    alphabet[(r % alphabet.len() as u64) as usize]
                })
                .collect();
            let _ = parse(&text);
            let _ = crate::policy::Policy::parse(&text);
        }
    }
}
