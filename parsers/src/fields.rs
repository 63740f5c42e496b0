//! The output of a parser: an ordered list of borrowed key/value pairs.

use std::borrow::Cow;

/// Fields extracted from one line, in the order they were found.
///
/// Keys and values borrow from the line (or are `'static` names) whenever
/// possible; `Cow::Owned` is used only when a value had to be unescaped or a
/// key had to be built (e.g. JSON dotted keys). Duplicate keys are kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fields<'a> {
    pairs: Vec<(Cow<'a, str>, Cow<'a, str>)>,
}

impl<'a> Fields<'a> {
    /// An empty set of fields.
    pub fn new() -> Self {
        Fields { pairs: Vec::new() }
    }

    /// An empty set of fields with room for `n` pairs.
    pub fn with_capacity(n: usize) -> Self {
        Fields {
            pairs: Vec::with_capacity(n),
        }
    }

    /// Appends a pair.
    #[inline]
    pub fn push(&mut self, key: impl Into<Cow<'a, str>>, value: impl Into<Cow<'a, str>>) {
        self.pairs.push((key.into(), value.into()));
    }

    /// Iterates over the pairs in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.pairs.iter().map(|(k, v)| (k.as_ref(), v.as_ref()))
    }

    /// The value of the last pair named `key`, if any.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_ref())
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    /// True when there are no pairs.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// Removes all pairs, keeping the allocation.
    pub fn clear(&mut self) {
        self.pairs.clear();
    }

    /// The pairs as a flat JSON object of string values (a later duplicate key wins).
    pub fn to_json_object(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut map = serde_json::Map::with_capacity(self.pairs.len());
        for (k, v) in &self.pairs {
            map.insert(k.to_string(), serde_json::Value::String(v.to_string()));
        }
        map
    }

    /// Consumes the fields, returning the underlying pairs.
    pub fn into_pairs(self) -> Vec<(Cow<'a, str>, Cow<'a, str>)> {
        self.pairs
    }
}

impl<'f, 'a> IntoIterator for &'f Fields<'a> {
    type Item = &'f (Cow<'a, str>, Cow<'a, str>);
    type IntoIter = std::slice::Iter<'f, (Cow<'a, str>, Cow<'a, str>)>;
    fn into_iter(self) -> Self::IntoIter {
        self.pairs.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basics() {
        let mut f = Fields::new();
        assert!(f.is_empty());
        f.push("a", "1");
        f.push(String::from("a"), String::from("2"));
        assert_eq!(f.len(), 2);
        assert_eq!(f.get("a"), Some("2"));
        assert_eq!(f.to_json_object()["a"], "2");
        f.clear();
        assert!(f.is_empty());
    }
}
