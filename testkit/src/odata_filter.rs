//! The subset of OData v4 `$filter` the stand-in Dataverse understands: comparisons with
//! `eq`/`ne` joined by `and`/`or`/`not` and parentheses, over string literals (`'` doubled
//! inside), unquoted GUIDs, numbers, `true`/`false`/`null`. Literals are matched as values,
//! never re-parsed, so a correctly escaped injection attempt matches nothing, while an
//! unescaped one changes the expression exactly as it would on real Dataverse.

use serde_json::{Map, Value};

/// Declared type of a property, for the type checks OData does before evaluating.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PropType {
    Guid,
    String,
    Boolean,
    /// Dynamic entity sets: compared by the literal's type.
    Any,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Literal {
    Str(String),
    Guid(String),
    Num(f64),
    Bool(bool),
    Null,
}

#[derive(Clone, Debug)]
pub(crate) enum Operand {
    Property(String),
    Literal(Literal),
}

#[derive(Clone, Debug)]
pub(crate) enum Expr {
    Eq(Operand, Operand, bool),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Word(String),
    Str(String),
    LParen,
    RParen,
}

/// A `$filter` rejected the way Dataverse rejects it (400, code 0x80060888).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FilterError(pub(crate) String);

fn is_guid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Whether `s` is a GUID in its canonical 8-4-4-4-12 form.
pub(crate) fn is_guid_text(s: &str) -> bool {
    is_guid(s)
}

fn tokenize(input: &str) -> Result<Vec<(usize, Tok)>, FilterError> {
    let chars: Vec<char> = input.chars().collect();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '(' {
            toks.push((i, Tok::LParen));
            i += 1;
        } else if c == ')' {
            toks.push((i, Tok::RParen));
            i += 1;
        } else if c == '\'' {
            let start = i;
            let mut text = String::new();
            i += 1;
            loop {
                match chars.get(i) {
                    None => {
                        return Err(FilterError(format!(
                            "Syntax error: unterminated string literal at position {start} in '{input}'."
                        )))
                    }
                    Some('\'') if chars.get(i + 1) == Some(&'\'') => {
                        text.push('\'');
                        i += 2;
                    }
                    Some('\'') => {
                        i += 1;
                        break;
                    }
                    Some(ch) => {
                        text.push(*ch);
                        i += 1;
                    }
                }
            }
            toks.push((start, Tok::Str(text)));
        } else if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/' | '@') {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric()
                    || matches!(chars[i], '_' | '-' | '.' | '/' | '@'))
            {
                i += 1;
            }
            toks.push((start, Tok::Word(chars[start..i].iter().collect())));
        } else {
            return Err(FilterError(format!(
                "Syntax error at position {i} in '{input}'."
            )));
        }
    }
    Ok(toks)
}

struct Parser<'a> {
    input: &'a str,
    toks: Vec<(usize, Tok)>,
    pos: usize,
}

impl Parser<'_> {
    fn peek_word(&self, word: &str) -> bool {
        matches!(self.toks.get(self.pos), Some((_, Tok::Word(w))) if w.eq_ignore_ascii_case(word))
    }

    fn error(&self) -> FilterError {
        let at = self
            .toks
            .get(self.pos)
            .map_or(self.input.len(), |(p, _)| *p);
        FilterError(format!(
            "Syntax error at position {at} in '{}'.",
            self.input
        ))
    }

    fn or(&mut self) -> Result<Expr, FilterError> {
        let mut left = self.and()?;
        while self.peek_word("or") {
            self.pos += 1;
            let right = self.and()?;
            left = Expr::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, FilterError> {
        let mut left = self.unary()?;
        while self.peek_word("and") {
            self.pos += 1;
            let right = self.unary()?;
            left = Expr::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Expr, FilterError> {
        if self.peek_word("not") {
            self.pos += 1;
            return Ok(Expr::Not(Box::new(self.unary()?)));
        }
        if matches!(self.toks.get(self.pos), Some((_, Tok::LParen))) {
            self.pos += 1;
            let inner = self.or()?;
            if !matches!(self.toks.get(self.pos), Some((_, Tok::RParen))) {
                return Err(self.error());
            }
            self.pos += 1;
            return Ok(inner);
        }
        let left = self.operand()?;
        let equal = if self.peek_word("eq") {
            true
        } else if self.peek_word("ne") {
            false
        } else {
            return Err(self.error());
        };
        self.pos += 1;
        let right = self.operand()?;
        Ok(Expr::Eq(left, right, equal))
    }

    fn operand(&mut self) -> Result<Operand, FilterError> {
        let tok = self.toks.get(self.pos).cloned();
        let operand = match tok {
            Some((_, Tok::Str(s))) => Operand::Literal(Literal::Str(s)),
            Some((_, Tok::Word(w))) => {
                if is_guid(&w) {
                    Operand::Literal(Literal::Guid(w.to_ascii_lowercase()))
                } else if w == "true" {
                    Operand::Literal(Literal::Bool(true))
                } else if w == "false" {
                    Operand::Literal(Literal::Bool(false))
                } else if w == "null" {
                    Operand::Literal(Literal::Null)
                } else if let Ok(n) = w.parse::<f64>() {
                    Operand::Literal(Literal::Num(n))
                } else if w.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                    && !matches!(w.as_str(), "eq" | "ne" | "and" | "or" | "not")
                {
                    Operand::Property(w)
                } else {
                    return Err(self.error());
                }
            }
            _ => return Err(self.error()),
        };
        self.pos += 1;
        Ok(operand)
    }
}

/// Parses `$filter` text (already percent-decoded).
pub(crate) fn parse(input: &str) -> Result<Expr, FilterError> {
    let toks = tokenize(input)?;
    let mut parser = Parser {
        input,
        toks,
        pos: 0,
    };
    let expr = parser.or()?;
    if parser.pos != parser.toks.len() {
        return Err(parser.error());
    }
    Ok(expr)
}

impl Expr {
    /// Checks property names and literal types against the entity's declaration, as OData
    /// does before running the query. `types` answers `None` for an unknown property.
    pub(crate) fn check(
        &self,
        entity: &str,
        types: &dyn Fn(&str) -> Option<PropType>,
    ) -> Result<(), FilterError> {
        match self {
            Expr::And(a, b) | Expr::Or(a, b) => {
                a.check(entity, types)?;
                b.check(entity, types)
            }
            Expr::Not(a) => a.check(entity, types),
            Expr::Eq(a, b, _) => {
                let ty = |o: &Operand| -> Result<Option<PropType>, FilterError> {
                    match o {
                        Operand::Property(p) => types(p).map(Some).ok_or_else(|| {
                            FilterError(format!(
                                "Could not find a property named '{p}' on type 'Microsoft.Dynamics.CRM.{entity}'."
                            ))
                        }),
                        Operand::Literal(_) => Ok(None),
                    }
                };
                let (ta, tb) = (ty(a)?, ty(b)?);
                for (prop, other) in [(ta, b), (tb, a)] {
                    let (Some(prop), Operand::Literal(lit)) = (prop, other) else {
                        continue;
                    };
                    let found = match lit {
                        Literal::Str(_) => "Edm.String",
                        Literal::Guid(_) => "Edm.Guid",
                        Literal::Num(_) => "Edm.Int32",
                        Literal::Bool(_) => "Edm.Boolean",
                        Literal::Null => continue,
                    };
                    let expected = match prop {
                        PropType::Guid => "Edm.Guid",
                        PropType::String => "Edm.String",
                        PropType::Boolean => "Edm.Boolean",
                        PropType::Any => continue,
                    };
                    if found != expected {
                        return Err(FilterError(format!(
                            "A binary operator with incompatible types was detected. Found operand types '{expected}' and '{found}' for operator kind 'Equal'."
                        )));
                    }
                }
                Ok(())
            }
        }
    }

    /// Evaluates against one row. Strings compare case-insensitively, as Dataverse's SQL
    /// collation does; GUIDs compare case-insensitively.
    pub(crate) fn matches(&self, row: &Map<String, Value>) -> bool {
        match self {
            Expr::And(a, b) => a.matches(row) && b.matches(row),
            Expr::Or(a, b) => a.matches(row) || b.matches(row),
            Expr::Not(a) => !a.matches(row),
            Expr::Eq(a, b, equal) => (value_of(a, row) == value_of(b, row)) == *equal,
        }
    }
}

/// A comparable form of an operand's value.
#[derive(PartialEq, Debug)]
enum Cmp {
    Text(String),
    Num(f64),
    Bool(bool),
    Null,
}

fn value_of(operand: &Operand, row: &Map<String, Value>) -> Cmp {
    match operand {
        Operand::Literal(Literal::Str(s)) | Operand::Literal(Literal::Guid(s)) => {
            Cmp::Text(s.to_lowercase())
        }
        Operand::Literal(Literal::Num(n)) => Cmp::Num(*n),
        Operand::Literal(Literal::Bool(b)) => Cmp::Bool(*b),
        Operand::Literal(Literal::Null) => Cmp::Null,
        Operand::Property(p) => match row.get(p) {
            Some(Value::String(s)) => Cmp::Text(s.to_lowercase()),
            Some(Value::Number(n)) => n.as_f64().map_or(Cmp::Null, Cmp::Num),
            Some(Value::Bool(b)) => Cmp::Bool(*b),
            _ => Cmp::Null,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row() -> Map<String, Value> {
        json!({"internalemailaddress": "alice@contoso.example", "isdisabled": false, "azureactivedirectoryobjectid": "11111111-2222-3333-4444-555555555555"})
            .as_object()
            .unwrap()
            .clone()
    }

    fn eval(f: &str) -> bool {
        parse(f).unwrap().matches(&row())
    }

    #[test]
    fn literal_matching() {
        assert!(eval("internalemailaddress eq 'alice@contoso.example'"));
        assert!(eval("internalemailaddress eq 'ALICE@contoso.example'"));
        assert!(eval(
            "azureactivedirectoryobjectid eq 11111111-2222-3333-4444-555555555555"
        ));
        assert!(eval(
            "isdisabled eq false and (internalemailaddress ne 'x')"
        ));
        assert!(!eval("internalemailaddress eq 'x'' or ''1''eq''1'"));
    }

    #[test]
    fn unescaped_injection_changes_the_expression() {
        // What an unescaping client would send: real OData evaluates it as a tautology.
        assert!(eval("internalemailaddress eq 'x' or '1'eq'1'"));
    }

    #[test]
    fn syntax_and_type_errors() {
        assert!(parse("internalemailaddress eq 'x").is_err());
        assert!(parse("internalemailaddress eq").is_err());
        assert!(parse("a eq 'x' junk").is_err());
        let types = |p: &str| match p {
            "azureactivedirectoryobjectid" => Some(PropType::Guid),
            "internalemailaddress" => Some(PropType::String),
            _ => None,
        };
        let quoted_guid =
            parse("azureactivedirectoryobjectid eq '11111111-2222-3333-4444-555555555555'")
                .unwrap();
        assert!(quoted_guid.check("systemuser", &types).is_err());
        assert!(parse("nosuch eq 'x'")
            .unwrap()
            .check("systemuser", &types)
            .is_err());
    }
}
