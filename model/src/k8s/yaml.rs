//! Reading untyped YAML while remembering where we are, so every error names its field
//! (`spec.ports[1].targetPort`). Explicit `null` counts as absent, as it does in Kubernetes.

use std::net::IpAddr;

use ipnet::IpNet;
use serde_yaml::Value;

use crate::model::{parse_ip_or_cidr, Labels};

/// A problem with one field of one object; the loader adds file, document and object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct FieldError {
    pub field: String,
    pub reason: String,
}

pub(super) type FieldResult<T> = Result<T, FieldError>;

/// A YAML value and the path that leads to it from the document root.
#[derive(Clone, Debug)]
pub(super) struct Node<'a> {
    value: &'a Value,
    path: String,
}

// === impl Node ===

impl<'a> Node<'a> {
    pub fn root(value: &'a Value) -> Self {
        Node {
            value,
            path: String::new(),
        }
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn value(&self) -> &'a Value {
        self.value
    }

    pub fn err(&self, reason: impl Into<String>) -> FieldError {
        FieldError {
            field: self.path.clone(),
            reason: reason.into(),
        }
    }

    fn child_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn expected(&self, what: &str) -> FieldError {
        self.err(format!("expected {what}, found {}", type_name(self.value)))
    }

    /// The child `key` of this mapping; `None` when absent or null.
    pub fn get(&self, key: &str) -> FieldResult<Option<Node<'a>>> {
        let Value::Mapping(map) = self.value else {
            return Err(self.expected("a mapping"));
        };
        Ok(match map.get(key) {
            None | Some(Value::Null) => None,
            Some(value) => Some(Node {
                value,
                path: self.child_path(key),
            }),
        })
    }

    pub fn required(&self, key: &str) -> FieldResult<Node<'a>> {
        self.get(key)?.ok_or_else(|| FieldError {
            field: self.child_path(key),
            reason: "required".to_string(),
        })
    }

    /// Fails on the first key not in `known`: in policy specs a misspelt field must not
    /// silently widen or narrow what the policy matches.
    pub fn only(&self, known: &[&str]) -> FieldResult<()> {
        for (key, node) in self.entries()? {
            if !known.contains(&key) {
                return Err(node.err("unknown field"));
            }
        }
        Ok(())
    }

    pub fn str(&self) -> FieldResult<&'a str> {
        match self.value {
            Value::String(s) => Ok(s),
            _ => Err(self.expected("a string")),
        }
    }

    pub fn bool(&self) -> FieldResult<bool> {
        match self.value {
            Value::Bool(b) => Ok(*b),
            _ => Err(self.expected("a boolean")),
        }
    }

    /// An integer.
    pub fn int(&self) -> FieldResult<i64> {
        match self.value {
            Value::Number(n) => n
                .as_i64()
                .ok_or_else(|| self.err(format!("expected an integer, found {n}"))),
            _ => Err(self.expected("an integer")),
        }
    }

    /// A number (integer or not).
    pub fn float(&self) -> FieldResult<f64> {
        match self.value {
            Value::Number(n) => n
                .as_f64()
                .ok_or_else(|| self.err(format!("expected a number, found {n}"))),
            _ => Err(self.expected("a number")),
        }
    }

    /// A TCP/UDP port number, 1-65535.
    pub fn port(&self) -> FieldResult<u16> {
        match self.value {
            Value::Number(n) => match n.as_i64() {
                Some(p) => port_in_range(p).ok_or_else(|| self.err(out_of_range(p))),
                None => Err(self.err(format!("expected an integer port, found {n}"))),
            },
            _ => Err(self.expected("an integer port")),
        }
    }

    /// A port written as a number or as a decimal string (Istio's API uses strings).
    pub fn port_or_string(&self) -> FieldResult<u16> {
        match self.value {
            Value::String(s) => parse_port(s).map_err(|reason| self.err(reason)),
            _ => self.port(),
        }
    }

    pub fn ip(&self) -> FieldResult<IpAddr> {
        let s = self.str()?;
        s.parse()
            .map_err(|_| self.err(format!("invalid IP address {s:?}")))
    }

    /// The elements of a sequence, each with its index in the path.
    pub fn items(&self) -> FieldResult<Vec<Node<'a>>> {
        let Value::Sequence(seq) = self.value else {
            return Err(self.expected("a sequence"));
        };
        Ok(seq
            .iter()
            .enumerate()
            .map(|(i, value)| Node {
                value,
                path: format!("{}[{i}]", self.path),
            })
            .collect())
    }

    /// The entries of a mapping whose keys are strings.
    pub fn entries(&self) -> FieldResult<Vec<(&'a str, Node<'a>)>> {
        let Value::Mapping(map) = self.value else {
            return Err(self.expected("a mapping"));
        };
        map.iter()
            .map(|(k, value)| match k {
                Value::String(key) => Ok((
                    key.as_str(),
                    Node {
                        value,
                        path: self.child_path(key),
                    },
                )),
                _ => Err(self.err(format!("expected string keys, found {}", type_name(k)))),
            })
            .collect()
    }

    /// Entries of a mapping whose keys are ports (`portLevelMtls: {8080: ..}`); YAML makes
    /// the key a number, JSON a string, both are accepted.
    pub fn port_entries(&self) -> FieldResult<Vec<(u16, Node<'a>)>> {
        let Value::Mapping(map) = self.value else {
            return Err(self.expected("a mapping"));
        };
        map.iter()
            .map(|(k, value)| {
                let key = match k {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    other => {
                        return Err(
                            self.err(format!("expected port keys, found {}", type_name(other)))
                        )
                    }
                };
                let node = Node {
                    value,
                    path: self.child_path(&key),
                };
                let port = parse_port(&key).map_err(|reason| node.err(reason))?;
                Ok((port, node))
            })
            .collect()
    }

    /// A `map[string]string` such as labels, annotations or a selector.
    pub fn string_map(&self) -> FieldResult<Labels> {
        self.entries()?
            .into_iter()
            .map(|(k, v)| Ok((k.to_string(), v.str()?.to_string())))
            .collect()
    }

    /// A list of non-empty strings.
    pub fn string_list(&self) -> FieldResult<Vec<String>> {
        self.items()?
            .into_iter()
            .map(|item| match item.str()? {
                "" => Err(item.err("empty value not allowed")),
                s => Ok(s.to_string()),
            })
            .collect()
    }

    /// A list of ports, each a number or a decimal string.
    pub fn port_list(&self) -> FieldResult<Vec<u16>> {
        self.items()?
            .iter()
            .map(|item| item.port_or_string())
            .collect()
    }

    /// A list of IP addresses or CIDRs (`ipBlocks`).
    pub fn ip_block_list(&self) -> FieldResult<Vec<IpNet>> {
        self.items()?
            .iter()
            .map(|item| {
                let s = item.str()?;
                parse_ip_or_cidr(s)
                    .ok_or_else(|| item.err(format!("invalid IP address or CIDR {s:?}")))
            })
            .collect()
    }

    pub fn opt_str(&self, key: &str) -> FieldResult<Option<&'a str>> {
        self.get(key)?.map(|n| n.str()).transpose()
    }

    pub fn opt_bool(&self, key: &str) -> FieldResult<Option<bool>> {
        self.get(key)?.map(|n| n.bool()).transpose()
    }

    pub fn opt_string_map(&self, key: &str) -> FieldResult<Labels> {
        Ok(self
            .get(key)?
            .map(|n| n.string_map())
            .transpose()?
            .unwrap_or_default())
    }

    pub fn opt_string_list(&self, key: &str) -> FieldResult<Vec<String>> {
        Ok(self
            .get(key)?
            .map(|n| n.string_list())
            .transpose()?
            .unwrap_or_default())
    }

    pub fn opt_items(&self, key: &str) -> FieldResult<Vec<Node<'a>>> {
        Ok(self
            .get(key)?
            .map(|n| n.items())
            .transpose()?
            .unwrap_or_default())
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a sequence",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

fn port_in_range(p: i64) -> Option<u16> {
    u16::try_from(p).ok().filter(|p| *p != 0)
}

fn out_of_range(p: impl std::fmt::Display) -> String {
    format!("port {p} out of range 1-65535")
}

/// A decimal port string, 1-65535.
pub(super) fn parse_port(s: &str) -> Result<u16, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("invalid port {s:?}"));
    }
    // Digits only, so the only parse failure left is overflow.
    match s.parse::<i64>().ok().and_then(port_in_range) {
        Some(p) => Ok(p),
        None => Err(out_of_range(s)),
    }
}
